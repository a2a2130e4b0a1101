"""uint8 HxWxC pixels -> the normalised float32 CHW canvas a model graph takes.

Both GroundingDINO's and SAM's image graphs take a fixed-size canvas with the resized image at the
top left and zeros elsewhere. Their transforms normalise in float32: torchvision's
ToTensor + Normalize ((x / 255 - mean) / std) and Sam.preprocess ((x - mean) / std). One
parallel numba pass does the same float32 operations in the same order, so the values are
bit-equal to the numpy expressions it replaced. It also writes channels-first straight into the
canvas, where numpy took two temporaries and a transposing copy (the whole SAM input, resize
included: bench/results/host_prep_cpu_2026-11-26.json).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def _normalise_into(image: np.ndarray, canvas: np.ndarray, divisor: np.float32, mean: np.ndarray, std: np.ndarray) -> None:
    height, width, channels = image.shape
    for y in numba.prange(height):
        for c in range(channels):
            for x in range(width):
                canvas[c, y, x] = (np.float32(image[y, x, c]) / divisor - mean[c]) / std[c]


def normalised_canvas(image: np.ndarray, canvas_hw: tuple[int, int], mean: np.ndarray, std: np.ndarray,
                      divisor: float = 1.0) -> np.ndarray:
    """[1, C, H, W] float32: (image / divisor - mean) / std at the top left, zeros elsewhere.

    image: uint8 [h, w, C] with h, w within canvas_hw; mean, std: C values."""
    height, width, channels = image.shape
    if height > canvas_hw[0] or width > canvas_hw[1]:
        raise ValueError(f"image of {height}x{width} does not fit a {canvas_hw[0]}x{canvas_hw[1]} canvas")
    mean, std = (np.asarray(v, dtype=np.float32).reshape(-1) for v in (mean, std))
    if mean.size != channels or std.size != channels:
        raise ValueError(f"{channels}-channel image with {mean.size} means and {std.size} deviations")
    canvas = np.zeros((1, channels, int(canvas_hw[0]), int(canvas_hw[1])), dtype=np.float32)
    _normalise_into(np.ascontiguousarray(image, dtype=np.uint8), canvas[0], np.float32(divisor), mean, std)
    return canvas
