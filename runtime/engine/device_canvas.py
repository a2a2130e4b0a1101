"""uint8 image -> an image graph's normalised float32 canvas, made on the device (GPU paths, opt-in).

On an H200 the host's share of GroundingDINO's image stage was 7.6 of 15 ms and of SAM's encoder
stage 4.1 ms (bench/results/latency_cuda-h200_*): the PIL-exact resize and the normalisation
(runtime.engine.resize, runtime.engine.pixels), then a 7.7 / 12.6 MB float32 upload. The built-in graphs
image_canvas_hv / _vh (export/builtin_graphs.py) do both on the device: each resize pass is a
float64 matrix product with PIL's fixed-point weights (runtime.engine.resize.pil_weight_matrix; the
integer sums stay exact) and PIL's rounding, then the same float32 normalisation and the zero
padding. The canvas is the host path's to the bit (tested on the CPU provider). The host uploads
the uint8 image (2.4 MB for 900x900) and builds nothing per image: the weight matrices stay on the
device per image size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import engine_failure
from .resize import pil_weight_matrix, vertical_pass_first
from ..settings import EngineSettings
from .clock import engine_time
from .sessions import builtin_graph_session

KEPT_SIZES = 4  # image sizes whose weight matrices stay on the device (a line camera has one)


class DeviceCanvas:
    """Calls give one OrtValue, the same buffer every call (a CUDA-graph input can take it)."""

    def __init__(self, device: str, canvas_hw: tuple[int, int], mean: np.ndarray, std: np.ndarray,
                 divisor: float = 1.0, settings: EngineSettings | None = None) -> None:
        self.device = device
        self.settings = settings
        self.canvas = ort.OrtValue.ortvalue_from_shape_and_type([1, 3, *map(int, canvas_hw)], np.float32, device, 0)
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
        self._graphs: dict[bool, tuple[Any, Any]] = {}  # by pass order: (session, its IO binding)
        per_channel = [1, 3, 1, 1]
        self._fixed = {
            "mean": self._on_device(np.asarray(mean, np.float32).reshape(per_channel)),
            "std": self._on_device(np.asarray(std, np.float32).reshape(per_channel)),
            "divisor": self._on_device(np.array(divisor, np.float32)),
        }
        self._per_size: dict[tuple, dict[str, ort.OrtValue]] = {}

    def _on_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _size_inputs(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> dict[str, ort.OrtValue]:
        key = (in_hw, out_hw)
        if key not in self._per_size:
            if len(self._per_size) >= KEPT_SIZES:
                self._per_size.pop(next(iter(self._per_size)))  # the oldest size
            pads = [0, 0, 0, 0, 0, 0, self.canvas_hw[0] - out_hw[0], self.canvas_hw[1] - out_hw[1]]
            self._per_size[key] = {
                "rows": self._on_device(pil_weight_matrix(in_hw[0], out_hw[0])),
                "cols_t": self._on_device(pil_weight_matrix(in_hw[1], out_hw[1]).T),
                "pads": self._on_device(np.array(pads, np.int64)),
            }
        return self._per_size[key]

    def _graph(self, vertical_first: bool) -> tuple[Any, Any]:
        if vertical_first not in self._graphs:
            name = "image_canvas_vh" if vertical_first else "image_canvas_hv"
            session = builtin_graph_session(name, "cpu" if self.device == "cpu" else "cuda", self.settings)
            self._graphs[vertical_first] = (session, session.io_binding())
        return self._graphs[vertical_first]

    def __call__(self, image: np.ndarray, resized_hw: tuple[int, int]) -> ort.OrtValue:
        """image: uint8 [h, w, 3]; resized_hw: the content size inside the canvas."""
        in_hw = (int(image.shape[0]), int(image.shape[1]))
        out_hw = (int(resized_hw[0]), int(resized_hw[1]))
        if out_hw[0] > self.canvas_hw[0] or out_hw[1] > self.canvas_hw[1]:
            raise ValueError(f"a {out_hw[0]}x{out_hw[1]} image does not fit the {self.canvas_hw} canvas")
        session, binding = self._graph(vertical_pass_first(in_hw, out_hw))
        try:
            with engine_time():  # the upload and the graph: onnxruntime's work, as in every other stage
                binding.bind_cpu_input("image", np.ascontiguousarray(image, dtype=np.uint8))
                for name, value in {**self._size_inputs(in_hw, out_hw), **self._fixed}.items():
                    binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output("canvas", self.canvas)
                session.run_with_iobinding(binding)
        except Exception as err:  # onnxruntime raises several private exception types
            raise engine_failure("the device canvas (image resize on the device) failed", err) from None
        return self.canvas
