"""bench/reference/compare.py: the runtime's answer against the reference's, beyond the largest difference."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench.reference.compare import PIXEL_TOLERANCE, compare_boxes, compare_maps, compare_to_reference
from runtime.stages.regions import Region


def region(box, score, in_top_k=False):
    return Region(box=tuple(float(v) for v in box), detector_score=0.5, phrase="hole", prompt_index=0, prompt="hole",
                  box_area=0.01, score=score, in_top_k=in_top_k)


def test_one_edge_pixel_moves_the_largest_difference_not_the_share():
    reference = np.zeros((100, 100), np.float32)
    runtime = reference.copy()
    runtime[3, 4] = 0.8  # one mask-edge pixel on in one run only
    runtime[5, 5] = PIXEL_TOLERANCE / 2  # float32 noise: not a difference
    record = compare_maps(reference, runtime)
    assert record["max_abs_diff"] == pytest.approx(0.8)
    assert record["differing_pixel_share"] == pytest.approx(1e-4)
    assert record["mean_abs_diff"] == pytest.approx((0.8 + PIXEL_TOLERANCE / 2) / 1e4)
    assert compare_maps(reference, reference)["max_abs_diff"] == 0.0


def test_maps_of_other_shapes_are_not_compared():
    record = compare_maps(np.zeros((4, 5)), np.zeros((5, 4)))
    assert record["max_abs_diff"] is None and record["shapes"] == [[4, 5], [5, 4]]


def test_boxes_are_matched_one_to_one_whatever_their_order():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 10, 10.01]], np.float32)  # two near-equal boxes
    scores = np.array([0.9, 0.5, 0.3])
    regions = [region(boxes[1], 0.5), region(boxes[2], 0.3 + 1e-6), region(boxes[0], 0.9 - 1e-6, in_top_k=True)]
    record = compare_boxes(boxes, scores, regions, top_k=1)
    assert record == {"reference_boxes": 3, "runtime_boxes": 3, "matched": 3,
                      "matched_score_max_abs_diff": pytest.approx(1e-6), "same_top_k": True}


def test_a_missing_box_and_another_top_k_are_reported():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    scores = np.array([0.9, 0.5])
    regions = [region(boxes[1], 0.5, in_top_k=True)]  # the runtime lost the best box
    record = compare_boxes(boxes, scores, regions, top_k=1)
    assert record["matched"] == 1 and record["runtime_boxes"] == 1 and record["same_top_k"] is False
    # no box on either side: nothing matched, and the same (empty) top-k
    empty = compare_boxes(np.zeros((0, 4)), np.array([0.0]), [], top_k=3)
    assert empty["matched"] == 0 and empty["matched_score_max_abs_diff"] is None and empty["same_top_k"]


def test_saliency_only_results_compare_the_saliency_map():
    saliency = np.ones((8, 8), np.float32)
    result = SimpleNamespace(saliency_only=True, saliency_map=saliency, anomaly_map=np.zeros((8, 8)), regions=[])
    record = compare_to_reference({"saliency_map": saliency, "anomaly_map": None, "defect_boxes": None}, result, 5)
    assert record["map"] == "saliency" and record["differing_pixel_share"] == 0.0 and "boxes" not in record


def test_the_same_box_twice_is_matched_by_its_score():
    """Random full-size weights give several queries one box with other scores (seen: 0.52 and 0.24)."""
    box = [10, 10, 50, 50]
    boxes = np.array([box, box], np.float32)
    scores = np.array([0.52, 0.24])
    regions = [region(box, 0.24 + 2e-6), region(box, 0.52 - 1e-6, in_top_k=True)]
    record = compare_boxes(boxes, scores, regions, top_k=1)
    assert record["matched"] == 2 and record["matched_score_max_abs_diff"] < 1e-5 and record["same_top_k"]
