"""Rescoring by saliency (P^S) and the confidence prompt P^C: top-K regions fused into one map.

`fuse_regions` is the step as the pipeline runs it: each region's mean saliency inside its mask
rescores it, the top K are marked and fused, on the host or (DeviceMasks) on the device.
"""
from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ..config import AlgorithmOptions
from .mask_fusion import DeviceMasks, MaskFusion
from .regions import Region


@numba.njit(cache=True, parallel=True)
def _mask_sums_numba(saliency: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = masks.shape[0]
    sums = np.zeros(count, np.float64)
    areas = np.zeros(count, np.int64)
    for i in numba.prange(count):
        total = 0.0
        area = 0
        for p in range(saliency.shape[0]):
            if masks[i, p]:
                total += saliency[p]
                area += 1
        sums[i] = total
        areas[i] = area
    return sums, areas


def mean_inside_masks_numpy(saliency: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Definition (the kernel's twin): mean saliency inside each mask [N,H,W] and its pixel count (0 -> mean 0)."""
    if len(masks) == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    means = np.array([saliency[m].mean(dtype=np.float64) if m.any() else 0.0 for m in masks], np.float64)
    return means, masks.reshape(len(masks), -1).sum(axis=1).astype(np.int64)


def mean_inside_masks(saliency: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean saliency inside each mask [N,H,W] and each mask's pixel count (0 -> mean 0)."""
    if len(masks) == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    flat = np.ascontiguousarray(masks, dtype=np.bool_).reshape(len(masks), -1)
    sums, areas = _mask_sums_numba(np.ascontiguousarray(saliency, dtype=np.float32).reshape(-1), flat)
    return np.where(areas > 0, sums / np.maximum(areas, 1), 0.0), areas


def rescore(detector_scores: np.ndarray, saliency_means: np.ndarray, areas: np.ndarray, gain: float) -> np.ndarray:
    """score * exp(gain * mean saliency in the mask); an empty mask keeps its score (x1), as the reference."""
    factor = np.where(areas > 0, np.exp(gain * saliency_means), 1.0)
    return np.asarray(detector_scores, np.float64) * factor


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores in the reference's order (numpy argsort, ascending, last k)."""
    return np.argsort(scores)[-k:] if len(scores) else np.zeros(0, np.int64)


@numba.njit(cache=True)
def _fuse_numba(masks: np.ndarray, scores: np.ndarray, plus_one: bool) -> np.ndarray:
    count, height, width = masks.shape
    out = np.zeros((height, width), dtype=np.float64)
    base = 1.0 if plus_one else 0.0
    for y in range(height):
        for x in range(width):
            total = 0.0
            weight = base
            for i in range(count):
                if masks[i, y, x]:
                    total += scores[i]
                    weight += 1.0
            if weight > 0:
                out[y, x] = total / weight
    return out


def fuse_masks_numpy(masks: np.ndarray, scores: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Definition (the kernel's twin): sum(mask * score) / (1 + sum(mask)), or / sum(mask) where > 0."""
    height, width = masks.shape[1:]
    anomaly = np.zeros((height, width), np.float64)
    weight = np.ones((height, width), np.float64) if plus_one else np.zeros((height, width), np.float64)
    for mask, score in zip(masks, scores):
        anomaly += mask * score
        weight += mask * 1.0
    positive = weight > 0
    anomaly[positive] /= weight[positive]
    return anomaly


def fuse_masks(masks: np.ndarray, scores: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Weighted mean of the kept masks' scores per pixel (float64 [H,W])."""
    return _fuse_numba(np.ascontiguousarray(masks, dtype=np.bool_), np.ascontiguousarray(scores, dtype=np.float64),
                       bool(plus_one))


def fuse_regions(regions: list[Region], masks: np.ndarray | DeviceMasks, mask_of_region: np.ndarray,
                 saliency: np.ndarray, options: AlgorithmOptions, top_k: int,
                 mask_fusion: MaskFusion | None = None) -> np.ndarray:
    """The anomaly map of `regions` (masks[mask_of_region[i]] is region i's): their saliency,
    mask area and final score set on each, the top K marked in_top_k and fused. Masks on the
    device (DeviceMasks) are scored and fused there by `mask_fusion`."""
    if not regions:
        return np.zeros(saliency.shape, np.float32)
    on_device = isinstance(masks, DeviceMasks)
    if on_device and mask_fusion is None:
        raise ValueError("masks on the device need a MaskFusion to score and fuse them")
    device: Any = mask_fusion
    means, areas = device.mean_inside_masks(saliency, masks) if on_device else mean_inside_masks(saliency, masks)
    means, areas = means[mask_of_region], areas[mask_of_region]
    scores = rescore(np.array([r.detector_score for r in regions]), means, areas, options.rescore_gain)
    for region, mean, area, score in zip(regions, means, areas, scores):
        region.saliency, region.mask_area, region.score = float(mean), int(area), float(score)
    keep = top_k_indices(scores, top_k)
    for index in keep:
        regions[index].in_top_k = True
    if on_device:
        return device.fuse_masks(masks, mask_of_region[keep], scores[keep], options.fusion_plus_one)
    return fuse_masks(masks[mask_of_region[keep]], scores[keep], options.fusion_plus_one).astype(np.float32)
