"""Image resizing that matches what the reference's models were fed.

The reference resizes through PIL (torchvision's `resize` on a PIL image: bilinear
with a support widened by the scale factor, i.e. antialiased when shrinking) for
GroundingDINO and SAM. OpenCV's INTER_LINEAR does not antialias, so shrinking a
1600-px image to 800 would feed different pixels. This module reproduces PIL's
separable triangle filter as two small matrix products, cached per size pair.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of PIL's bilinear ("triangle") resampling weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear filter support is 1
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax, dtype=np.float64)
        w = 1.0 - np.abs((taps - center + 0.5) / filterscale)
        w = np.clip(w, 0.0, None)
        total = w.sum()
        if total > 0:
            weights[out_index, xmin:xmax] = w / total
    return weights.astype(np.float32)


def resize_like_pil(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 HxW or HxWxC image to size_hw as PIL's BILINEAR does; returns uint8.

    Equal to PIL up to its fixed-point coefficients (a difference of 1 on a few pixels).
    """
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return image.copy()
    data = image.astype(np.float32)
    squeeze = data.ndim == 2
    if squeeze:
        data = data[:, :, None]
    # PIL resamples horizontally first, then vertically, rounding to 8 bits after each pass.
    if in_w != out_w:
        cols = _pil_bilinear_weights(in_w, out_w)
        data = np.clip(np.floor(np.einsum("ow,hwc->hoc", cols, data, optimize=True) + 0.5), 0, 255)
    if in_h != out_h:
        rows = _pil_bilinear_weights(in_h, out_h)
        data = (rows @ data.reshape(in_h, -1)).reshape(out_h, out_w, -1)
        data = np.clip(np.floor(data + 0.5), 0, 255)
    out = data.astype(np.uint8)
    return out[:, :, 0] if squeeze else out


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
