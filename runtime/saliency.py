"""The saliency prompt P^S: how much each pixel differs from the rest of the image (no torch).

An ImageNet CNN (saliency.onnx: image [1,3,H,W] -> L2-normalised features
[1,C,H/4,W/4]) describes each grid position; the kNN kernels in
`saliency_kernels` turn those features into a map:

- one object (the reference's single_object_similarity): the image resized to
  256x256, each position scored by the mean of its n = 400 largest distances
  d = 0.5 * (1 - cos) ("farthest", the code) or n smallest ("nearest", the paper);
- several objects (the reference's multi-instance branch): the image resized to
  1024x1024, each object's positions scored by their distance to the closest
  position of the other objects.

The grid map is resized to the image size with cv2's bilinear resize, as the
reference does. Preprocessing copies the reference: cv2.resize (INTER_LINEAR) of
the array as given (the reference passes cv2's BGR array as if it were RGB),
mean/std on the 0..255 scale, HWC -> CHW.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from . import manifest as mf
from .errors import ConfigError, EngineError, ImageError, ManifestError
from .saliency_kernels import DEFAULT_BLOCK_BYTES, MODES, knn_distance_mean, multi_instance_distance

INPUT_NAME = "image"  # [1, 3, H, W] float32, normalised
OUTPUT_NAME = "features"  # [1, C, H/4, W/4] float32, unit length over C
SIZE_MULTIPLE = 16  # the stride-16 layer must tile the input exactly for the nearest upsampling to line up

PREPROCESS_KEYS = ("backbone", "channels", "single_size", "multi_size", "stride", "mean", "std")


@dataclass(frozen=True)
class SaliencySettings:
    """What a study may vary; the defaults are the reference code's choices.

    n: neighbours averaged per position (reference: 400).
    mode: "farthest" (reference code: the n largest distances) or "nearest" (paper).
    exclude_self: leave a position's distance to itself out; None: False for "farthest"
        (as the reference), True for "nearest".
    single_size / multi_size: CNN input side for one / several objects; None: the
        manifest's (256 / 1024).
    block_bytes: memory for one block of similarities.
    """

    n: int = 400
    mode: str = "farthest"
    exclude_self: bool | None = None
    single_size: int | None = None
    multi_size: int | None = None
    block_bytes: int = DEFAULT_BLOCK_BYTES

    def checked(self) -> "SaliencySettings":
        if self.mode not in MODES:
            raise ConfigError(f"saliency mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ConfigError(f"saliency n must be an integer >= 1, got {self.n!r}")
        for name in ("single_size", "multi_size"):
            size = getattr(self, name)
            if size is not None:
                _check_size(size, name)
        if self.block_bytes < 1 << 16:
            raise ConfigError(f"saliency block_bytes {self.block_bytes} is too small (at least 64 KiB)")
        return self


def _check_size(size: Any, what: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < SIZE_MULTIPLE or size % SIZE_MULTIPLE:
        raise ConfigError(f"saliency {what} must be a multiple of {SIZE_MULTIPLE}, at least {SIZE_MULTIPLE}; got {size!r}")
    return int(size)


def _default_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class SaliencyExtractor:
    """saliency.onnx plus the kNN kernels; one per pipeline, called per image."""

    def __init__(
        self,
        manifest: mf.Manifest,
        make_session: Callable[[Path], Any] | None = None,
        settings: SaliencySettings | None = None,
    ) -> None:
        record = manifest.preprocess.get("saliency")
        if not isinstance(record, dict):
            raise ManifestError(f"{manifest.engine_dir / mf.MANIFEST_NAME}: no preprocess['saliency'] section")
        missing = [key for key in PREPROCESS_KEYS if key not in record]
        if missing:
            raise ManifestError(f"{manifest.engine_dir / mf.MANIFEST_NAME}: preprocess['saliency'] lacks {missing}")
        self.backbone = str(record["backbone"])
        self.channels = int(record["channels"])
        self.stride = int(record["stride"])
        self.mean = np.asarray(record["mean"], np.float32).reshape(1, 1, 3)
        self.std = np.asarray(record["std"], np.float32).reshape(1, 1, 3)
        self.settings = (settings or SaliencySettings()).checked()
        self.single_size = _check_size(self.settings.single_size or int(record["single_size"]), "single_size")
        self.multi_size = _check_size(self.settings.multi_size or int(record["multi_size"]), "multi_size")
        path = manifest.model_path(mf.SALIENCY)
        self.session = (make_session or _default_session)(path)
        self.path = path

    # ------------------------------------------------------------------ CNN

    def features(self, image: np.ndarray, size: int) -> np.ndarray:
        """CNN features [C, size/4, size/4] float32 of `image` (uint8 HxWx3, as given) resized to size x size."""
        _check_image(image)
        size = _check_size(size, "input size")
        resized = cv2.resize(image, (size, size))  # INTER_LINEAR, as the reference
        normalised = (resized.astype(np.float32) - self.mean) / self.std
        batch = np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])
        try:
            (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        except Exception as err:  # onnxruntime raises several private exception types
            raise EngineError(f"{self.path}: saliency CNN failed at {size}x{size} ({str(err).splitlines()[0]})") from None
        grid = size // self.stride
        expected = (1, self.channels, grid, grid)
        if tuple(out.shape) != expected:
            raise EngineError(f"{self.path}: features have shape {tuple(out.shape)}, the manifest promises {expected}")
        return out[0]

    # ------------------------------------------------------------------ one object

    def single_object_grid(self, image: np.ndarray, n: int | None = None, mode: str | None = None) -> np.ndarray:
        """Saliency on the feature grid [size/4, size/4] float32 (before the resize to image size)."""
        settings = self._with(n, mode)
        features = self.features(image, self.single_size)
        channels, height, width = features.shape
        scores = knn_distance_mean(
            features.reshape(channels, -1), settings.n, settings.mode, settings.exclude_self, settings.block_bytes
        )
        return scores.reshape(height, width)

    def single_object_saliency(self, image: np.ndarray, n: int | None = None, mode: str | None = None) -> np.ndarray:
        """float32 [H, W] map: per position, mean of its n largest (or smallest) feature distances."""
        grid = self.single_object_grid(image, n, mode)
        return cv2.resize(grid, (image.shape[1], image.shape[0]))  # bilinear, as the reference

    # ------------------------------------------------------------------ several objects

    def grid_masks(self, object_masks: np.ndarray, grid: int) -> np.ndarray:
        """Object masks [M, H, W] -> [M, grid, grid] bool, resized as the reference does
        (int32, cv2 INTER_NEAREST)."""
        masks = np.asarray(object_masks)
        if masks.ndim != 3:
            raise ImageError(f"object masks must be [M, H, W], got shape {masks.shape}")
        out = np.zeros((len(masks), grid, grid), bool)
        for index, mask in enumerate(masks):
            out[index] = cv2.resize(mask.astype(np.int32), (grid, grid), interpolation=cv2.INTER_NEAREST) > 0
        return out

    def multi_object_grid(self, image: np.ndarray, object_masks: np.ndarray) -> np.ndarray | None:
        """Multi-instance saliency on the grid [size/4, size/4] float32; None when fewer than two
        masks keep a position on the grid (nothing to compare: the reference crashes there)."""
        _check_image(image)
        masks = np.asarray(object_masks)
        if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
            raise ImageError(
                f"object masks must be [M, H, W] with H, W = {image.shape[:2]} (the image's), got shape {masks.shape}"
            )
        grid = self.multi_size // self.stride
        small = self.grid_masks(masks, grid)
        if int(small.reshape(len(small), -1).any(axis=1).sum()) < 2:
            return None
        features = self.features(image, self.multi_size)
        channels = features.shape[0]
        scores = multi_instance_distance(features.reshape(channels, -1), small, self.settings.block_bytes)
        return scores.reshape(grid, grid)

    def multi_object_saliency(self, image: np.ndarray, object_masks: np.ndarray) -> np.ndarray:
        """float32 [H, W]: each object's pixels scored against the other objects, max over objects.

        With fewer than two masks non-empty on the feature grid there is nothing to compare:
        the single-object saliency is returned instead (the reference crashes there).
        """
        grid = self.multi_object_grid(image, object_masks)
        if grid is None:
            return self.single_object_saliency(image)
        return cv2.resize(grid, (image.shape[1], image.shape[0]))

    def _with(self, n: int | None, mode: str | None) -> SaliencySettings:
        changes = {key: value for key, value in (("n", n), ("mode", mode)) if value is not None}
        return replace(self.settings, **changes).checked() if changes else self.settings


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"saliency needs a uint8 HxWx3 image, got {what}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"saliency got an empty image {image.shape}")


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "SaliencyExtractor", "SaliencySettings"]
