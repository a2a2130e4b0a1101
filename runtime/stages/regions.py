"""Regions and the property prompt P^P: which detector boxes survive, before SAM sees them.

The reference keeps a box when its best token score passes the box threshold, its
normalised area w*h lies in (min_area, max_area), and the phrase its tokens spell
does not contain the prompt's exclude word. The area rule is applied to boxes, as
the reference code does (the paper applies it to masks). `detected_regions` applies every
rule to one image's detections: the object's, then the defects' bounded by the object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numba
import numpy as np

from ..config import PromptConfig

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


def detected_regions(detections: Sequence[Any], config: PromptConfig, image_hw: tuple[int, int],
                     notes: list[str]) -> tuple[list[Region], list[Region]]:
    """P^P over one image's detections (the object caption's first, then each defect prompt's, as
    runtime.stages.detector returns them): (object regions, defect regions).

    The object's largest box sets the defect area bound (max_area = object area * defect_area_ratio);
    with no object box the whole image is the object (area 1), and `notes` says so. With the paper's
    location rule (object_iou_threshold) a defect box must overlap an object box that much."""
    options = config.options

    def regions(detection: Any, exclude: str | None, index: int, prompt: str, max_area: float) -> list[Region]:
        return select_regions(detection.logits, detection.boxes, detection.phrase_of, exclude, index, prompt, image_hw,
                              options.box_threshold, options.text_threshold, 0.0, max_area,
                              options.max_boxes_per_prompt)

    objects = regions(detections[0], None, OBJECT_PROMPT_INDEX, config.object_prompt, config.object_max_area)
    if objects:
        object_area = float(max(r.box_area for r in objects))
    else:
        object_area = 1.0
        notes.append("no object box passed the filter: the whole image is taken as the object (object area 1)")
    max_area = float(np.float32(object_area) * np.float32(config.defect_area_ratio))
    defects: list[Region] = []
    for index, (prompt, detection) in enumerate(zip(config.all_defect_prompts(), detections[1:])):
        defects += regions(detection, prompt.exclude, index, prompt.text, max_area)
    if options.object_iou_threshold is not None and objects and defects:
        iou = box_iou(np.array([r.box for r in defects]), np.array([r.box for r in objects])).max(axis=1)
        defects = [r for r, v in zip(defects, iou) if v >= options.object_iou_threshold]
    return objects, defects


def distinct_boxes(regions: list[Region]) -> tuple[np.ndarray, np.ndarray]:
    """(the regions' distinct boxes, float32 [m, 4] in first-seen order; each region's row in them)."""
    boxes = np.array([r.box for r in regions], dtype=np.float32).reshape(-1, 4)
    _, first, inverse = np.unique(boxes, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts the rows; SAM gets them in the regions' order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return boxes[first[order]], rank[inverse.reshape(-1)].astype(np.int64)
