"""SAM's mask post-processing (Sam.postprocess_masks, then the threshold) as one ONNX graph.

runtime/stages/segmenter.py upscales each box's mask with cv2 on the CPU, ~2 ms a box; on a GPU
that loop would outweigh the networks. This graph does the same for all boxes at once on the
session's device, and can take the decoder's `low_res_masks` still on the device (an OrtValue
from DeviceRunner.run(..., keep=("low_res_masks",))) and leave its masks there
(runtime/stages/mask_fusion.py scores and fuses them without bringing them to the host).

The graph is runtime/data/graphs/mask_upscale.onnx, built by export/builtin_graphs.py:
  inputs  low_res_masks float32 [n, 1, m, m]
          sizes int64 [5] = (image_size, input_h, input_w, height, width)
          threshold float32 [1]
  output  masks bool [n, height, width]
  Resize(linear, half_pixel) to image_size^2 -> Slice [:input_h, :input_w]
  -> Resize(linear, half_pixel) to height x width -> Squeeze channel -> Greater threshold.
Opset-17 Resize has no antialias and clamps source coordinates at the edges, so each step is
F.interpolate(bilinear, align_corners=False), as the reference, and cv2.INTER_LINEAR, as
segmenter.upscale_mask_logits. Logits agree with cv2 to ~6e-5 on unit-noise logits (each
computes the source coordinate in float32, ~1000 px wide: ulp 6e-5 px); masks differ only
where a logit is that close to the threshold.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import EngineError

GRAPH_INPUTS = ("low_res_masks", "sizes", "threshold")
GRAPH_OUTPUT = "masks"


def mask_session(device: str = "cuda", settings: Any = None) -> Any:
    """An onnxruntime session of the mask graph on `device` ("cpu" in tests; "cuda" not yet run on a GPU),
    with an EngineSettings' session switches (None: the defaults)."""
    from ..engine.sessions import builtin_graph_session

    return builtin_graph_session("mask_upscale", device, settings)


def _shape_and_type(low_res: Any) -> tuple[tuple[int, ...], str]:
    """Shape and element type of a numpy array or an onnxruntime OrtValue (wherever it lives)."""
    if isinstance(low_res, np.ndarray):
        return low_res.shape, "float" if low_res.dtype == np.float32 else str(low_res.dtype)
    if hasattr(low_res, "shape") and hasattr(low_res, "data_type") and callable(low_res.shape):
        kind = low_res.data_type()  # "tensor(float)"
        return tuple(int(d) for d in low_res.shape()), kind[len("tensor("):-1] if kind.startswith("tensor(") else kind
    raise EngineError(f"mask upscaling needs a numpy array or an OrtValue, got {type(low_res).__name__}")


def _pair(name: str, value: Any) -> tuple[int, int]:
    try:
        first, second = (int(v) for v in value)
    except (TypeError, ValueError):
        raise EngineError(f"mask upscaling: {name} must be (height, width), got {value!r}") from None
    return first, second


def upscale_masks_graph(
    low_res: Any,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int,
    mask_threshold: float,
    runner: Any,
    keep_on_device: bool = False,
) -> Any:
    """Decoder logits [n, 1, m, m] -> bool masks [n, H, W] at `original_size`, all boxes in one run.

    low_res: numpy float32 array or an OrtValue the decoder left on the device. input_size:
    (h, w) of the image resized into the image_size x image_size frame before padding.
    runner: a runtime.engine.sessions.DeviceRunner over mask_session(). keep_on_device: return the
    masks as an OrtValue left on the runner's device. n == 0 returns an empty numpy
    [0, H, W] without running the graph.
    """
    shape, kind = _shape_and_type(low_res)
    if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3] or shape[2] < 1:
        raise EngineError(f"mask upscaling needs decoder logits of shape [n, 1, m, m], got {list(shape)}")
    input_h, input_w = _pair("input_size", input_size)
    height, width = _pair("original_size", original_size)
    image_size = int(image_size)
    if not (1 <= input_h <= image_size and 1 <= input_w <= image_size):
        raise EngineError(f"mask upscaling: input_size {input_h}x{input_w} must fit in image_size {image_size}")
    if height < 1 or width < 1:
        raise EngineError(f"mask upscaling: original_size {height}x{width} is empty")
    if shape[0] == 0:
        return np.zeros((0, height, width), dtype=bool)
    if isinstance(low_res, np.ndarray):
        low_res = np.ascontiguousarray(low_res, dtype=np.float32)
    elif kind != "float":
        raise EngineError(f"mask upscaling needs float32 logits, got an OrtValue of {kind}")
    import onnxruntime as ort

    # Host OrtValues: Resize and Slice read their sizes on the host on every provider (a numpy feed
    # would go to the GPU and back); the threshold is 4 bytes either way.
    sizes = ort.OrtValue.ortvalue_from_numpy(np.array([image_size, input_h, input_w, height, width], np.int64))
    threshold = ort.OrtValue.ortvalue_from_numpy(np.array([mask_threshold], np.float32))
    keep = (GRAPH_OUTPUT,) if keep_on_device else ()
    (masks,) = runner.run([GRAPH_OUTPUT], dict(zip(GRAPH_INPUTS, (low_res, sizes, threshold))), keep=keep)
    return masks


__all__ = ["GRAPH_INPUTS", "GRAPH_OUTPUT", "mask_session", "upscale_masks_graph"]
