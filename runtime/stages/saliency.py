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

The one-object map has options beyond the reference (all off by default, see
`SaliencySettings`; measured in docs/saliency-study.md): a subset of the CNN's
layers, contrast equalisation before the CNN, reflect padding so the border
positions do not see the CNN's zero padding, and a Gaussian blur of the grid map.
Presets: "reference" (the code's choices) and "tuned" (the study's best, per
backbone); `preset_settings` resolves them for a manifest.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from .. import manifest as mf
from ..errors import ConfigError, EngineError, ImageError, ManifestError, engine_failure
from ..engine.pixels import normalised_canvas
from ..engine.clock import engine_time
from ..engine.runners import DeviceRunner
from ..settings import EngineSettings
from .saliency_kernels import (DEFAULT_BLOCK_BYTES, MODES, knn_distance_mean, knn_distance_mean_graph, knn_session,
                               multi_instance_distance)

INPUT_NAME = "image"  # [1, 3, H, W] float32, normalised
OUTPUT_NAME = "features"  # [1, C, H/4, W/4] float32, unit length over C
SIZE_MULTIPLE = 16  # the stride-16 layer must tile the input exactly for the nearest upsampling to line up

PREPROCESS_KEYS = ("backbone", "channels", "single_size", "multi_size", "stride", "mean", "std")
CONTRASTS = ("none", "equalize", "clahe")
CLAHE_CLIP_LIMIT = 2.0  # OpenCV's usual values
CLAHE_TILES = 8
PAD_MULTIPLE = SIZE_MULTIPLE // 2  # both sides together keep the input a multiple of 16


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

    One object only (the multi-instance map stays the reference's):
    layers: which of the manifest's CNN layers to compare (e.g. (2, 3)); their channels
        are re-normalised to unit length, which is what exporting only those layers
        would give. None: all (reference).
    contrast: "equalize" / "clahe" the luminance before the CNN; "none" (reference).
    pad: reflect-pad the resized image by this many pixels per side (a multiple of 8)
        and crop the padding off the feature grid, so border positions are described
        by image content instead of the CNN's zero padding. 0: none (reference).
    blur_sigma: Gaussian sigma of a blur of the grid map, in grid cells (stride-4
        pixels of the CNN input). 0: none (reference).
    """

    n: int = 400
    mode: str = "farthest"
    exclude_self: bool | None = None
    single_size: int | None = None
    multi_size: int | None = None
    block_bytes: int = DEFAULT_BLOCK_BYTES
    layers: tuple[int, ...] | None = None
    contrast: str = "none"
    pad: int = 0
    blur_sigma: float = 0.0

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
        layers = self.layers
        if layers is not None:
            if not isinstance(layers, (tuple, list)) or not layers or not all(_is_int(x) for x in layers) or len(set(layers)) != len(layers):
                raise ConfigError(f"saliency layers must be distinct layer numbers such as (2, 3), got {layers!r}")
            layers = tuple(sorted(int(x) for x in layers))
        if self.contrast not in CONTRASTS:
            raise ConfigError(f"saliency contrast must be one of {CONTRASTS}, got {self.contrast!r}")
        if not _is_int(self.pad) or self.pad < 0 or self.pad % PAD_MULTIPLE:
            raise ConfigError(f"saliency pad must be a multiple of {PAD_MULTIPLE} pixels, >= 0; got {self.pad!r}")
        sigma = self.blur_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)) or not 0 <= sigma < 1e3:
            raise ConfigError(f"saliency blur_sigma must be a number of grid cells in [0, 1000), got {sigma!r}")
        if layers != self.layers or type(sigma) is not float:
            return replace(self, layers=layers, blur_sigma=float(sigma))
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
        knn_device: str | None = None,
        engine: EngineSettings | None = None,
    ) -> None:
        """knn_device: None runs the one-object kNN with the numba kernels on the host; a device
        name ("cuda"; "cpu" in tests) runs it as one onnxruntime graph (similarity, TopK, mean)
        there, as on a GPU pipeline the 4096 x 4096 x C product would otherwise land on the host.
        engine: the pipeline's EngineSettings (the kNN graph's session options, the host kNN's
        gemm_backend)."""
        record = manifest.preprocess_section("saliency", PREPROCESS_KEYS)
        self.backbone = str(record["backbone"])
        self.channels = int(record["channels"])
        self.stride = int(record["stride"])
        self.mean = np.asarray(record["mean"], np.float32).reshape(1, 1, 3)
        self.std = np.asarray(record["std"], np.float32).reshape(1, 1, 3)
        self.record = record
        self.layer_numbers = tuple(int(x) for x in record.get("layers", ()))
        channels = manifest.models.get(mf.SALIENCY, {}).get("source", {}).get("layer_channels")
        self.layer_channels = tuple(int(x) for x in channels) if channels else None
        self.manifest_path = manifest.engine_dir / mf.MANIFEST_NAME
        self._apply(settings or SaliencySettings())
        path = manifest.model_path(mf.SALIENCY)
        self.session = (make_session or _default_session)(path)
        self.path = path
        engine = (engine or EngineSettings()).resolved()
        self.gemm_backend = engine.gemm_backend
        self.knn_session = None if knn_device is None else knn_session(knn_device, engine)

    def _apply(self, settings: SaliencySettings) -> None:
        self.settings = settings.checked()
        self.single_size = _check_size(self.settings.single_size or int(self.record["single_size"]), "single_size")
        self.multi_size = _check_size(self.settings.multi_size or int(self.record["multi_size"]), "multi_size")
        self.channel_index = self._channel_index(self.settings.layers)

    def _channel_index(self, layers: tuple[int, ...] | None) -> np.ndarray | None:
        """Feature channels of the chosen layers (None: all, no re-normalisation needed)."""
        if layers is None or layers == self.layer_numbers:
            return None
        unknown = [x for x in layers if x not in self.layer_numbers]
        if unknown:
            raise ConfigError(f"saliency layers {list(unknown)} are not in the exported layers {list(self.layer_numbers)}")
        widths = self.layer_channels
        if widths is None or len(widths) != len(self.layer_numbers) or sum(widths) != self.channels:
            raise ManifestError(
                f"{self.manifest_path}: models['saliency']['source']['layer_channels'] = {widths} does not split "
                f"the {self.channels} channels over layers {list(self.layer_numbers)}; re-export to choose layers"
            )
        starts = np.cumsum((0,) + widths)
        return np.concatenate([np.arange(starts[i], starts[i + 1]) for i, x in enumerate(self.layer_numbers) if x in layers])

    def with_settings(self, settings: SaliencySettings) -> "SaliencyExtractor":
        """A second extractor with other settings sharing this one's ONNX session (cheap)."""
        other = copy.copy(self)
        other._apply(settings)
        return other

    # ------------------------------------------------------------------ CNN

    def features(self, image: np.ndarray, size: int, on_device: bool = False) -> Any:
        """CNN features [C, size/4, size/4] float32 of `image` (uint8 HxWx3, as given) resized to
        size x size; on_device: see _run."""
        _check_image(image)
        size = _check_size(size, "input size")
        resized = cv2.resize(image, (size, size))  # INTER_LINEAR, as the reference
        return self._run(resized, on_device)

    def _run(self, resized: np.ndarray, on_device: bool = False) -> Any:
        """CNN features [C, h/4, w/4] of an already resized uint8 image [h, w, 3]; on_device: the
        [1, C, h/4, w/4] output left where the CNN ran, as an OrtValue (one IO binding per call:
        extractors sharing the session may run in several threads)."""
        height, width = resized.shape[:2]
        batch = normalised_canvas(resized, (height, width), self.mean, self.std)
        try:
            if on_device:
                (out,) = DeviceRunner(self.session).run([OUTPUT_NAME], {INPUT_NAME: batch}, keep=(OUTPUT_NAME,))
            else:
                with engine_time():
                    (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        except Exception as err:  # onnxruntime raises several private exception types
            raise engine_failure(f"{self.path}: saliency CNN failed at {height}x{width}", err) from None
        expected = (1, self.channels, height // self.stride, width // self.stride)
        shape = tuple(out.shape()) if on_device else tuple(out.shape)
        if shape != expected:
            raise EngineError(f"{self.path}: features have shape {shape}, the manifest promises {expected}")
        return out if on_device else out[0]

    def single_object_features(self, image: np.ndarray) -> np.ndarray:
        """Features [C', size/4, size/4] the one-object map compares: the settings' contrast,
        padding and layers applied (with the defaults, exactly `features(image, single_size)`)."""
        _check_image(image)
        settings = self.settings
        size, pad = self.single_size, settings.pad
        resized = cv2.resize(adjust_contrast(image, settings.contrast), (size, size))  # INTER_LINEAR, as the reference
        if pad:
            resized = cv2.copyMakeBorder(resized, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
        features = self._run(resized)
        if pad:
            cells = pad // self.stride
            features = features[:, cells:-cells, cells:-cells]
        if self.channel_index is not None:
            features = features[self.channel_index]
            norm = np.sqrt(np.einsum("chw,chw->hw", features, features))
            features = features / np.maximum(norm, np.float32(1e-12))  # as F.normalize
        return np.ascontiguousarray(features, dtype=np.float32)

    # ------------------------------------------------------------------ one object

    def single_object_grid(self, image: np.ndarray, n: int | None = None, mode: str | None = None) -> np.ndarray:
        """Saliency on the feature grid [size/4, size/4] float32 (before the resize to image size)."""
        settings = self._with(n, mode)
        if self.knn_session is not None and self.channel_index is None and not settings.pad and settings.contrast == "none":
            # The CNN's output goes straight into the kNN graph on the device: only the means come back.
            features = self.features(image, self.single_size, on_device=True)
            _, _, height, width = features.shape()
            try:
                scores = knn_distance_mean_graph(features, settings.n, settings.mode, settings.exclude_self, self.knn_session)
            except ValueError as err:
                raise EngineError(f"{self.path}: {err}") from None
            return smooth_grid(scores.reshape(height, width), settings.blur_sigma)
        features = self.single_object_features(image)
        channels, height, width = features.shape
        flat = features.reshape(channels, -1)
        try:
            if self.knn_session is not None:
                scores = knn_distance_mean_graph(flat, settings.n, settings.mode, settings.exclude_self, self.knn_session)
            else:
                scores = knn_distance_mean(flat, settings.n, settings.mode, settings.exclude_self, settings.block_bytes,
                                           self.gemm_backend)
        except ValueError as err:  # NaN or inf features: the CNN (or its preprocessing) is broken
            raise EngineError(f"{self.path}: {err}") from None
        return smooth_grid(scores.reshape(height, width), settings.blur_sigma)

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
        try:
            scores = multi_instance_distance(features.reshape(channels, -1), small, self.settings.block_bytes)
        except ValueError as err:  # NaN or inf features
            raise EngineError(f"{self.path}: {err}") from None
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


# ---------------------------------------------------------------- presets

PRESETS = ("reference", "tuned")
# The saliency study's best one-object setting per backbone (docs/saliency-study.md:
# chosen on the TUNE half of MTD dev, reported on the HELD-OUT half). Backbones not
# listed (the full profile's WideResNet50) have only the reference setting.
TUNED: dict[str, SaliencySettings] = {
    "efficientnet_lite0": SaliencySettings(n=1000, mode="nearest", layers=(3,), blur_sigma=12.0),
}


def default_preset(profile: str) -> str:
    """"tuned" for lite engines (saliency-only maps, tuned on MTD); "reference" for full ones."""
    return "tuned" if profile == "lite" else "reference"


def preset_settings(
    manifest: mf.Manifest, preset: str | None = None, n: int | None = None, mode: str | None = None
) -> SaliencySettings:
    """The one-object settings a pipeline runs: the preset (None: the profile's default), with an
    explicit n or mode replacing the preset's. Without a tuned entry for the backbone, "tuned"
    fails and the default falls back to "reference"."""
    record = manifest.preprocess.get("saliency")
    backbone = record.get("backbone") if isinstance(record, dict) else None
    if preset is None:
        preset = default_preset(manifest.profile)
        if preset == "tuned" and backbone not in TUNED:
            preset = "reference"
    if preset not in PRESETS:
        raise ConfigError(f"saliency preset must be one of {PRESETS}, got {preset!r}")
    if preset == "tuned" and backbone not in TUNED:
        raise ConfigError(f"no tuned saliency setting for backbone {backbone!r} (tuned: {sorted(TUNED)}); use 'reference'")
    settings = TUNED[backbone] if preset == "tuned" else SaliencySettings()
    changes = {key: value for key, value in (("n", n), ("mode", mode)) if value is not None}
    return replace(settings, **changes).checked()


def adjust_contrast(image: np.ndarray, contrast: str) -> np.ndarray:
    """Equalise the luminance of a uint8 HxWx3 image ("equalize": global histogram,
    "clahe": contrast-limited, per tile); "none" returns it unchanged. A grey image stays grey."""
    if contrast == "none":
        return image
    if contrast not in CONTRASTS:
        raise ConfigError(f"saliency contrast must be one of {CONTRASTS}, got {contrast!r}")
    grey = image[:, :, 0]
    if np.array_equal(grey, image[:, :, 1]) and np.array_equal(grey, image[:, :, 2]):
        return np.repeat(_equalise(np.ascontiguousarray(grey), contrast)[:, :, None], 3, axis=2)
    ycrcb = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb)
    ycrcb[:, :, 0] = _equalise(np.ascontiguousarray(ycrcb[:, :, 0]), contrast)
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR)


def _equalise(channel: np.ndarray, contrast: str) -> np.ndarray:
    if contrast == "equalize":
        return cv2.equalizeHist(channel)
    return cv2.createCLAHE(CLAHE_CLIP_LIMIT, (CLAHE_TILES, CLAHE_TILES)).apply(channel)


def smooth_grid(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a saliency grid (sigma in grid cells, reflected borders); sigma 0: unchanged."""
    if sigma <= 0:
        return grid
    return cv2.GaussianBlur(grid, (0, 0), float(sigma), borderType=cv2.BORDER_REFLECT_101)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"saliency needs a uint8 HxWx3 image, got {what}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"saliency got an empty image {image.shape}")


__all__ = [
    "CONTRASTS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PRESETS",
    "TUNED",
    "SaliencyExtractor",
    "SaliencySettings",
    "adjust_contrast",
    "default_preset",
    "preset_settings",
    "smooth_grid",
]
