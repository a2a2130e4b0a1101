"""How far the runtime's answer for one image is from the reference's, in terms that say why.

A map's largest difference alone cannot tell a broken port from a pixel at a mask's edge: one
pixel whose SAM logit sits at 0 in one implementation and just above it in the other moves the
map by a whole region score there. So besides the largest difference this records how much of
the map differs at all, and whether the two runs sent the same boxes to SAM with the same scores.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from runtime.stages.regions import box_iou

PIXEL_TOLERANCE = 1e-4  # map values closer than this count as equal (float32 sums in another order)
SAME_BOX_IOU = 0.99  # boxes this close are the same detection (pixel boxes from float32 vs float64 arithmetic)


def compare_maps(reference: np.ndarray, runtime: np.ndarray) -> dict[str, Any]:
    """Largest and mean absolute difference, and the share of pixels differing by more than
    PIXEL_TOLERANCE; None values where the two maps' shapes differ."""
    reference, runtime = np.asarray(reference, np.float64), np.asarray(runtime, np.float64)
    if reference.shape != runtime.shape:
        return {"max_abs_diff": None, "mean_abs_diff": None, "differing_pixel_share": None,
                "shapes": [list(reference.shape), list(runtime.shape)]}
    diff = np.abs(reference - runtime)
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "differing_pixel_share": float((diff > PIXEL_TOLERANCE).mean()) if diff.size else 0.0,
    }


def compare_boxes(reference_boxes: np.ndarray, reference_scores: np.ndarray, regions: Sequence[Any],
                  top_k: int) -> dict[str, Any]:
    """The boxes each run sent to SAM, matched one to one, with the largest final-score
    difference among the matched, and whether the top_k fused regions are the same boxes.

    Boxes at least SAME_BOX_IOU apart are the same box; among those, pairs are taken greedily
    by the closest final score. Random full-size weights give several queries (often of other
    prompts) the same box with other scores: matched by IoU alone, a 0.52 box met a 0.24 one."""
    reference_boxes = np.asarray(reference_boxes, np.float32).reshape(-1, 4)
    reference_scores = np.asarray(reference_scores, np.float64).reshape(-1)[:len(reference_boxes)]
    runtime_boxes = np.array([r.box for r in regions], np.float32).reshape(-1, 4)
    runtime_scores = np.array([r.score for r in regions], np.float64)
    iou = box_iou(reference_boxes, runtime_boxes)
    same_box = np.argwhere(iou >= SAME_BOX_IOU)
    gaps = np.abs(reference_scores[same_box[:, 0]] - runtime_scores[same_box[:, 1]]) if len(same_box) else np.zeros(0)
    pairs: dict[int, int] = {}  # reference index -> runtime index
    for i, j in same_box[np.argsort(gaps, kind="stable")].tolist():
        if i not in pairs and j not in pairs.values():
            pairs[i] = j
    score_diffs = [abs(reference_scores[i] - runtime_scores[j]) for i, j in pairs.items()]
    reference_top = set(np.argsort(reference_scores)[-top_k:].tolist()) if len(reference_scores) else set()
    runtime_top = {j for j, r in enumerate(regions) if r.in_top_k}
    return {
        "reference_boxes": len(reference_boxes),
        "runtime_boxes": len(runtime_boxes),
        "matched": len(pairs),
        "matched_score_max_abs_diff": float(max(score_diffs)) if score_diffs else None,
        "same_top_k": {pairs.get(i) for i in reference_top} == runtime_top,
    }


def compare_to_reference(reference_output: dict[str, Any], result: Any, top_k: int) -> dict[str, Any]:
    """reference_output: the reference worker's answer (maps, defect_boxes, defect_scores);
    result: the runtime's AnomalyResult for the same image."""
    key = "saliency_map" if result.saliency_only else "anomaly_map"
    record = {"map": "saliency" if result.saliency_only else "anomaly",
              **compare_maps(reference_output[key], getattr(result, key))}
    if not result.saliency_only and reference_output.get("defect_boxes") is not None:
        record["boxes"] = compare_boxes(reference_output["defect_boxes"], reference_output["defect_scores"],
                                        result.regions, top_k)
    return record


__all__ = ["PIXEL_TOLERANCE", "SAME_BOX_IOU", "compare_boxes", "compare_maps", "compare_to_reference"]
