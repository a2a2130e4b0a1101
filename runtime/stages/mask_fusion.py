"""P^S rescoring sums and top-K fusion over masks that stay on the GPU (runtime/stages/fusion.py's device twin).

On a GPU the mask graph (runtime/stages/mask_graph.py) leaves each decoder chunk's masks on the
device. Bringing them to the host and scoring them there costs more than the 25 ms budget
allows (59 masks of 900x900 are 48 MB over PCIe, then 15 ms of mask means and 6 ms of fusion
on a 2-core CPU), so two small built-in graphs (export/builtin_graphs.py) do it where the
masks are: `mask_sums` gives each mask's saliency sum and pixel count, the host picks the top
K from those few numbers (numpy argsort, as the reference), and `mask_fuse` adds the kept
masks into the anomaly map, one chunk at a time. The map and a few numbers per mask are all
that come back. Sums are float32 on the device (the host path sums in float64; the reference
takes numpy's float32 mean): agreement to rounding, not bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import EngineError
from ..engine.runners import DeviceRunner
from ..engine.sessions import builtin_graph_session
from ..settings import EngineSettings

FUSE_ACCUMULATORS = ("total_out", "weight_out")


@dataclass
class DeviceMasks:
    """Bool masks [count, height, width] kept on a device as the decoder's chunks (OrtValues)."""

    chunks: list[Any]  # OrtValue bool [n_i, height, width] each, on `device`
    height: int
    width: int
    device: str
    counts: list[int] | None = None  # masks in use per chunk, where a fixed-size decoder padded its chunks

    @property
    def sizes(self) -> list[int]:
        """Masks in use per chunk: counts, or every row of each chunk."""
        return list(self.counts) if self.counts is not None else [int(chunk.shape()[0]) for chunk in self.chunks]

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self), self.height, self.width

    def to_host(self) -> np.ndarray:
        """The masks as one numpy bool array (a copy from the device: for checks, not the hot path)."""
        if not self.chunks:
            return np.zeros((0, self.height, self.width), bool)
        return np.concatenate([chunk.numpy()[:size] for chunk, size in zip(self.chunks, self.sizes)])


class MaskFusion:
    """The two fusion graphs on one device, with the start accumulators cached per map size."""

    def __init__(self, device: str, settings: EngineSettings | None = None) -> None:
        self.device = device
        self._sums = DeviceRunner(builtin_graph_session("mask_sums", device, settings))
        self._fuse = DeviceRunner(builtin_graph_session("mask_fuse", device, settings))
        self._starts: dict[tuple[int, int, bool], tuple[Any, Any]] = {}

    def _on_device(self, array: np.ndarray) -> Any:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    @staticmethod
    def _check_masks(masks: DeviceMasks) -> None:
        if not isinstance(masks, DeviceMasks):
            raise EngineError(f"mask fusion needs DeviceMasks, got {type(masks).__name__}")

    def mean_inside_masks(self, saliency: np.ndarray, masks: DeviceMasks) -> tuple[np.ndarray, np.ndarray]:
        """fusion.mean_inside_masks on the device: mean saliency inside each mask (0 where the mask
        is empty) as float64, and each mask's pixel count as int64."""
        saliency = np.asarray(saliency, dtype=np.float32)
        self._check_masks(masks)
        if saliency.shape != (masks.height, masks.width):
            raise EngineError(f"mask fusion: saliency of shape {list(saliency.shape)} does not match masks of "
                              f"{masks.height}x{masks.width}")
        if len(masks) == 0:
            return np.zeros(0, np.float64), np.zeros(0, np.int64)
        on_device = self._on_device(saliency)  # sent once, read by every chunk's run
        sums, areas = [], []
        for chunk, size in zip(masks.chunks, masks.sizes):
            chunk_sums, chunk_areas = self._sums.run(["sums", "areas"], {"masks": chunk, "saliency": on_device})
            sums.append(chunk_sums[:size])  # a padded chunk's copies are left out
            areas.append(chunk_areas[:size])
        total, count = np.concatenate(sums).astype(np.float64), np.rint(np.concatenate(areas)).astype(np.int64)
        return np.where(count > 0, total / np.maximum(count, 1), 0.0), count

    def _start(self, height: int, width: int, plus_one: bool) -> tuple[Any, Any]:
        key = (height, width, plus_one)
        if key not in self._starts:
            if len(self._starts) >= 4:  # a few image sizes at most: do not hold every size ever seen
                self._starts.clear()
            self._starts[key] = (self._on_device(np.zeros((height, width), np.float32)),
                                 self._on_device(np.full((height, width), 1.0 if plus_one else 0.0, np.float32)))
        return self._starts[key]

    def fuse_masks(self, masks: DeviceMasks, keep: np.ndarray, scores: np.ndarray, plus_one: bool = True) -> np.ndarray:
        """fusion.fuse_masks(masks[keep], scores, plus_one) on the device -> float32 [H, W] on the host.

        keep: indices into all the masks; scores: one per kept mask."""
        self._check_masks(masks)
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(keep) != len(scores):
            raise EngineError(f"mask fusion: {len(keep)} kept masks but {len(scores)} scores")
        if len(keep) and (keep.min() < 0 or keep.max() >= len(masks)):
            raise EngineError(f"mask fusion: kept index out of range for {len(masks)} masks")
        total, weight = self._start(masks.height, masks.width, bool(plus_one))
        steps = []
        sizes = masks.sizes
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        for chunk, start, size in zip(masks.chunks, starts, sizes):
            inside = (keep >= start) & (keep < start + size)
            if inside.any():
                steps.append((chunk, keep[inside] - start, scores[inside]))
        if not steps:  # nothing kept: the map is 0 everywhere (weight 1 or 0 divides nothing)
            return np.zeros((masks.height, masks.width), np.float32)
        for index, (chunk, local, chunk_scores) in enumerate(steps):
            feeds = {"masks": chunk, "keep": local, "scores": chunk_scores, "total": total, "weight": weight}
            if index < len(steps) - 1:
                total, weight = self._fuse.run(FUSE_ACCUMULATORS, feeds, keep=FUSE_ACCUMULATORS)
            else:
                (anomaly,) = self._fuse.run(["anomaly"], feeds)
        return anomaly


__all__ = ["DeviceMasks", "MaskFusion"]
