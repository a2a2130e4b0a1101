"""Image resizing that matches what the reference's models were fed.

The reference resizes through PIL (torchvision's `resize` on a PIL image: bilinear
with a support widened by the scale factor, i.e. antialiased when shrinking) for
GroundingDINO and SAM. OpenCV's INTER_LINEAR does not antialias, so shrinking a
1600-px image to 800 would feed different pixels. This module reproduces PIL's
separable triangle filter in its own fixed-point arithmetic (numba kernels, parallel over
output rows; cached taps per size pair), so the bytes equal PIL's.
"""
from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np

PRECISION_BITS = 22  # PIL's fixed-point coefficients for 8-bit images (32 - 8 - 2)


@lru_cache(maxsize=64)
def _pil_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's bilinear ("triangle") taps per output pixel: fixed-point weights [O, T], first input index, tap count."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1, widened when shrinking (antialias)
    width = int(np.ceil(support)) * 2 + 1
    weights = np.zeros((out_size, width), dtype=np.int64)
    first = np.zeros(out_size, dtype=np.int64)
    count = np.zeros(out_size, dtype=np.int64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax, dtype=np.float64)
        w = np.clip(1.0 - np.abs((taps - center + 0.5) / filterscale), 0.0, None)
        total = w.sum()
        if total != 0.0:
            w = w / total
        fixed = np.where(w < 0, -0.5 + w * (1 << PRECISION_BITS), 0.5 + w * (1 << PRECISION_BITS)).astype(np.int64)
        weights[out_index, : len(fixed)] = fixed
        first[out_index], count[out_index] = xmin, len(fixed)
    return weights, first, count


@numba.njit(cache=True, parallel=True)
def _resample_rows_numba(image: np.ndarray, weights: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Resample axis 1 of a uint8 [H, W, C] array with PIL's fixed-point arithmetic (rows in parallel)."""
    height, _, channels = image.shape
    out_size = weights.shape[0]
    out = np.empty((height, out_size, channels), np.uint8)
    half = 1 << (PRECISION_BITS - 1)
    for y in numba.prange(height):
        for o in range(out_size):
            for c in range(channels):
                total = half
                for t in range(count[o]):
                    total += np.int64(image[y, first[o] + t, c]) * weights[o, t]
                value = total >> PRECISION_BITS
                out[y, o, c] = 0 if value < 0 else (255 if value > 255 else value)
    return out


@numba.njit(cache=True, parallel=True)
def _resample_columns_numba(image: np.ndarray, weights: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Resample axis 0 of a uint8 [H, W, C] array, same arithmetic, output rows in parallel.

    Whole input rows are accumulated per tap, so the inner loop runs along contiguous memory
    (the twin transposes instead: two full copies of the image)."""
    _, width, channels = image.shape
    out_size = weights.shape[0]
    out = np.empty((out_size, width, channels), np.uint8)
    half = 1 << (PRECISION_BITS - 1)
    for o in numba.prange(out_size):
        total = np.full((width, channels), half, np.int64)
        for t in range(count[o]):
            row = image[first[o] + t]
            weight = weights[o, t]
            for x in range(width):
                for c in range(channels):
                    total[x, c] += np.int64(row[x, c]) * weight
        for x in range(width):
            for c in range(channels):
                value = total[x, c] >> PRECISION_BITS
                out[o, x, c] = 0 if value < 0 else (255 if value > 255 else value)
    return out


def _dense(weights: np.ndarray, first: np.ndarray, count: np.ndarray, in_size: int) -> np.ndarray:
    dense = np.zeros((weights.shape[0], in_size), np.float64)
    for o in range(weights.shape[0]):
        dense[o, first[o]: first[o] + count[o]] = weights[o, : count[o]]
    return dense


def pil_weight_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out_size, in_size]: PIL's fixed-point bilinear weights of one pass as a dense matrix
    (integers, exact in float64); 2^22 times the identity where the size stays, which leaves
    the pixels as they are, as PIL's skipped pass does. The device canvas graph's input."""
    if in_size == out_size:
        return np.eye(in_size, dtype=np.float64) * float(1 << PRECISION_BITS)
    return _dense(*_pil_bilinear_taps(in_size, out_size), in_size)


def _resample_rows_numpy(image: np.ndarray, weights: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Twin of the kernel: a dense fixed-point matrix product (integers stay exact in float64)."""
    dense = _dense(weights, first, count, image.shape[1])
    total = np.einsum("ow,hwc->hoc", dense, image.astype(np.float64), optimize=True) + (1 << (PRECISION_BITS - 1))
    return np.clip(np.floor(total / (1 << PRECISION_BITS)), 0, 255).astype(np.uint8)


def _taps_per_output(in_size: int, out_size: int) -> int:
    return int(np.ceil(max(in_size / out_size, 1.0))) * 2 + 1


def vertical_pass_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether PIL (13) resamples vertically first: when that filter is the wider one."""
    return _taps_per_output(in_hw[0], out_hw[0]) > _taps_per_output(in_hw[1], out_hw[1])


def resize_like_pil(image: np.ndarray, size_hw: tuple[int, int], twin: bool = False) -> np.ndarray:
    """Resize a uint8 HxW or HxWxC image to size_hw exactly as PIL's Image.resize(BILINEAR) does.

    Two separable passes with PIL's 22-bit fixed-point weights, rounded to 8 bits between
    passes; the vertical pass goes first when its filter is wider (Pillow 13's order, found by
    comparing outputs; Pillow's own C code of older releases always went horizontal first).
    twin: the numpy twin of the numba kernels (tests).
    """
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    in_h, in_w = image.shape[:2]
    squeeze = image.ndim == 2
    data = np.ascontiguousarray(image[:, :, None] if squeeze else image, dtype=np.uint8)

    def horizontal(values: np.ndarray) -> np.ndarray:
        if values.shape[1] == out_w:
            return values
        kernel = _resample_rows_numpy if twin else _resample_rows_numba
        return kernel(values, *_pil_bilinear_taps(values.shape[1], out_w))

    def vertical(values: np.ndarray) -> np.ndarray:
        if values.shape[0] == out_h:
            return values
        taps = _pil_bilinear_taps(values.shape[0], out_h)
        if not twin:
            return _resample_columns_numba(values, *taps)
        swapped = np.ascontiguousarray(values.transpose(1, 0, 2))
        return np.ascontiguousarray(_resample_rows_numpy(swapped, *taps).transpose(1, 0, 2))

    if vertical_pass_first((in_h, in_w), (out_h, out_w)):
        data = horizontal(vertical(data))
    else:
        data = vertical(horizontal(data))
    data = data.copy() if data is image else data
    return data[:, :, 0] if squeeze else data


def longest_side_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide.get_preprocess_shape: (new_h, new_w) with the longest side = long_side."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def shorter_side_shape(height: int, width: int, short_side: int, max_side: int) -> tuple[int, int]:
    """GroundingDINO's RandomResize([short_side], max_size): torchvision's get_size_with_aspect_ratio."""
    size = short_side
    min_original = float(min(width, height))
    max_original = float(max(width, height))
    if max_original / min_original * size > max_side:
        size = int(round(max_side * min_original / max_original))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        new_w = size
        new_h = int(size * height / width)
    else:
        new_h = size
        new_w = int(size * width / height)
    return new_h, new_w
