"""Regions and the property prompt P^P: which detector boxes survive, before SAM sees them.

The reference keeps a box when its best token score passes the box threshold, its
normalised area w*h lies in (min_area, max_area), and the phrase its tokens spell
does not contain the prompt's exclude word. The area rule is applied to boxes, as
the reference code does (the paper applies it to masks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numba
import numpy as np

OBJECT_PROMPT_INDEX = -1


@dataclass
class Region:
    """One candidate region, from detector box to final score (the region JSON's row)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    detector_score: float  # best sigmoid token score of the box
    phrase: str  # tokens above the text threshold, decoded
    prompt_index: int  # index into PromptConfig.all_defect_prompts(); -1: the object prompt
    prompt: str
    box_area: float  # normalised w*h, what the area rule compares
    mask_area: int = 0  # pixels in the SAM mask
    saliency: float = 0.0  # mean saliency inside the mask
    score: float = 0.0  # detector_score * exp(gain * saliency)
    in_top_k: bool = False

    def to_json(self) -> dict:
        data = asdict(self)
        data["box"] = [round(float(v), 2) for v in self.box]
        return data


@numba.njit(cache=True)
def _box_keep_numba(logits: np.ndarray, boxes: np.ndarray, box_threshold: float, min_area: float,
                    max_area: float) -> np.ndarray:
    count = logits.shape[0]
    keep = np.zeros(count, dtype=np.bool_)
    for q in range(count):
        best = -np.inf
        for t in range(logits.shape[1]):
            if logits[q, t] > best:
                best = logits[q, t]
        area = boxes[q, 2] * boxes[q, 3]
        keep[q] = best > box_threshold and area < max_area and area > min_area
    return keep


def box_keep_numpy(logits: np.ndarray, boxes: np.ndarray, box_threshold: float, min_area: float,
                   max_area: float) -> np.ndarray:
    """Definition of the score and area rules (the numba kernel's twin)."""
    if logits.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    best = logits.max(axis=1) if logits.shape[1] else np.full(logits.shape[0], -np.inf, dtype=logits.dtype)
    area = boxes[:, 2] * boxes[:, 3]
    return (best > box_threshold) & (area < max_area) & (area > min_area)


def box_keep(logits: np.ndarray, boxes: np.ndarray, box_threshold: float, min_area: float, max_area: float) -> np.ndarray:
    """Boolean mask over queries: score above threshold and normalised area in (min_area, max_area)."""
    return _box_keep_numba(np.ascontiguousarray(logits, dtype=np.float32), np.ascontiguousarray(boxes, dtype=np.float32),
                           float(box_threshold), float(min_area), float(max_area))


def cxcywh_to_xyxy_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1), as the reference denormalises (no clipping)."""
    scaled = boxes.astype(np.float32) * np.array([width, height, width, height], dtype=np.float32)
    xyxy = np.empty_like(scaled)
    xyxy[:, :2] = scaled[:, :2] - scaled[:, 2:] / 2
    xyxy[:, 2:] = xyxy[:, :2] + scaled[:, 2:]
    return xyxy


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU matrix between xyxy boxes [N,4] and [M,4] (paper's location rule)."""
    if len(boxes) == 0 or len(others) == 0:
        return np.zeros((len(boxes), len(others)), dtype=np.float32)
    x0 = np.maximum(boxes[:, None, 0], others[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], others[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], others[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], others[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def select_regions(
    logits: np.ndarray,
    boxes: np.ndarray,
    phrase_of: Callable[[np.ndarray], str],
    exclude: str | None,
    prompt_index: int,
    prompt: str,
    image_hw: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
    min_area: float,
    max_area: float,
    max_boxes: int | None = None,
) -> list[Region]:
    """P^P for one prompt's detections: score, area and exclude-word rules, in query order.

    logits: sigmoid token scores [Q, L] over the caption's real tokens; boxes: [Q, 4] cx,cy,w,h in 0..1.
    phrase_of maps one query's boolean token mask (score > text_threshold) to its phrase.
    """
    keep = np.flatnonzero(box_keep(logits, boxes, box_threshold, min_area, max_area))
    if max_boxes is not None and len(keep) > max_boxes:
        best = logits[keep].max(axis=1)
        keep = np.sort(keep[np.argsort(-best, kind="stable")[:max_boxes]])
    height, width = image_hw
    pixel_boxes = cxcywh_to_xyxy_pixels(boxes[keep], height, width) if len(keep) else np.zeros((0, 4), np.float32)
    regions = []
    phrases: dict[bytes, str] = {}  # many boxes share a token pattern: decode each pattern once
    for row, query in enumerate(keep):
        above = logits[query] > text_threshold
        key = above.tobytes()
        if key not in phrases:
            phrases[key] = phrase_of(above)
        phrase = phrases[key]
        if exclude is not None and exclude in phrase:
            continue
        regions.append(Region(
            box=tuple(float(v) for v in pixel_boxes[row]),
            detector_score=float(logits[query].max()),
            phrase=phrase,
            prompt_index=prompt_index,
            prompt=prompt,
            box_area=float(boxes[query, 2] * boxes[query, 3]),
        ))
    return regions
