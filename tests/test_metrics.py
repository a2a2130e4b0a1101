"""bench.metrics against scikit-learn, a brute-force AUPRO, and its own exact path."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from bench import metrics as mt


def sklearn_max_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=precision + recall != 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Threshold at every distinct score; per-region overlap by explicit loops; clip the polyline at max_fpr."""
    regions = []
    for index, mask in enumerate(masks):
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(index, labels == k) for k in range(1, count)]
    negative = ~masks
    points = [(0.0, 0.0)]
    for threshold in sorted(np.unique(maps), reverse=True):
        predicted = maps >= threshold
        fpr = (predicted & negative).sum() / negative.sum()
        pro = np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_case(rng: np.random.Generator, n: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    return (np.round(scores, decimals) if decimals is not None else scores), labels


@pytest.mark.parametrize("decimals", [None, 1, 0])  # 0 and 1 decimal: heavy ties
@pytest.mark.parametrize("seed", range(8))
def test_metrics_match_sklearn(seed: int, decimals: int | None) -> None:
    scores, labels = random_case(np.random.default_rng(seed), 60 + 37 * seed, decimals)
    assert mt.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert mt.average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    f1, threshold = mt.max_f1(scores, labels)
    expected_f1, expected_threshold = sklearn_max_f1(labels, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold


def test_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 1, 1, 1], bool)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mt.roc_auc(scores, labels) == 1.0 and mt.max_f1(scores, labels) == (1.0, 0.3)
    assert mt.roc_auc(-scores, labels) == 0.0
    assert mt.roc_auc(np.zeros(5), labels) == 0.5  # all tied: chance


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn warns on one-class input
def test_single_class_edge_cases_follow_sklearn() -> None:
    scores = np.array([0.3, 0.1, 0.7, 0.7])
    for labels in (np.zeros(4, bool), np.ones(4, bool)):
        assert math.isnan(mt.roc_auc(scores, labels)) and math.isnan(roc_auc_score(labels, scores))
        assert mt.average_precision(scores, labels) == average_precision_score(labels, scores)
        assert mt.max_f1(scores, labels)[0] == pytest.approx(sklearn_max_f1(labels, scores)[0])
    assert mt.max_f1(scores, np.ones(4, bool))[0] == 1.0
    assert mt.average_precision(scores, np.zeros(4, bool)) == 0.0


def test_image_metrics_keys_and_values() -> None:
    result = mt.image_metrics(np.array([0.9, 0.2, 0.8, 0.1]), np.array([1, 0, 1, 0]))
    assert result == {"image_auroc": 1.0, "image_max_f1": 1.0}


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        mt.roc_auc(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        mt.roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        mt.PixelAccumulator(16).add(np.zeros((4, 4)), np.zeros((4, 5), bool))


def blob_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    masks = np.zeros((n, size, size), bool)
    for mask in masks[: n - 1]:  # the last image stays defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 5, 2)
            mask[y:y + h, x:x + w] = True
    return masks


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 4, 14)
    maps = rng.random(masks.shape) + masks * rng.uniform(0.0, 0.8)
    if seed % 2:
        maps = np.round(maps, 1)  # ties across regions and background
    assert mt.aupro(maps, masks) == pytest.approx(brute_force_aupro(maps, masks), abs=1e-12)
    assert mt.aupro(maps, masks, 0.05) == pytest.approx(brute_force_aupro(maps, masks, 0.05), abs=1e-12)


def test_aupro_averages_regions_not_pixels() -> None:
    # A 100-pixel region fully found at the top threshold and a 1-pixel region missed: PRO 0.5 there
    # (a pixel average would give 100/101).
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 2:12, 2:12] = True
    mask[0, 18, 18] = True
    scores = np.zeros(mask.shape)
    scores[0, 2:12, 2:12] = 1.0
    scores[0, 0, 0] = 0.5  # one normal pixel between the two
    first = 1 / (~mask).sum()
    # Curve (0,0) -> (0,0.5) -> (first,0.5) -> (1,1), integrated to 0.3 and divided by 0.3.
    y_at = 0.5 + 0.5 * (0.3 - first) / (1 - first)
    expected = (0.5 * first + (0.3 - first) * (0.5 + y_at) / 2) / 0.3
    assert mt.aupro(scores, mask) == pytest.approx(expected, abs=1e-12)
    assert brute_force_aupro(scores, mask) == pytest.approx(expected, abs=1e-12)


def test_aupro_undefined_without_regions_or_negatives() -> None:
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(mt.aupro(maps, np.zeros((2, 5, 5), bool)))
    assert math.isnan(mt.aupro(maps, np.ones((2, 5, 5), bool)))


def test_area_up_to_interpolates_the_limit() -> None:
    x, y = np.array([0.0, 0.2, 0.2, 0.6]), np.array([0.0, 0.4, 0.8, 1.2])
    # 0..0.2 under 0 -> 0.4 (0.04); vertical jump; 0.2..0.3 under 0.8 -> 0.9 (0.085)
    assert mt.area_up_to(x, y, 0.3) == pytest.approx(0.04 + 0.085)
    assert mt.area_up_to(x, y, 1.0) == pytest.approx(0.04 + 0.4 * 1.0)


def test_binned_equals_exact_when_scores_lie_on_the_bin_grid() -> None:
    rng = np.random.default_rng(3)
    n_bins = 64
    masks = blob_masks(rng, 5, 16)
    maps = rng.integers(0, n_bins, masks.shape) / n_bins
    maps[masks] = np.minimum(maps[masks] + 13 / n_bins, (n_bins - 1) / n_bins)  # stays on the grid
    accumulator = mt.PixelAccumulator(n_bins)
    for score_map, mask in zip(maps, masks):
        accumulator.add(score_map, mask)
    binned, exact = accumulator.metrics(), mt.exact_pixel_metrics(maps, masks)
    for key in exact:
        assert binned[key] == pytest.approx(exact[key], abs=1e-12), key
    assert binned["pixel_threshold"] == mt.max_f1(maps, masks)[1]
    flat_scores, flat_labels = maps.ravel(), masks.ravel()
    assert binned["pixel_auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)
    assert binned["pixel_ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=1e-12)
    assert binned["pixel_max_f1"] == pytest.approx(sklearn_max_f1(flat_labels, flat_scores)[0], abs=1e-12)


def test_binned_within_a_tenth_of_a_point_of_exact_on_continuous_maps() -> None:
    maps, masks = mt.synthetic_maps(6, size=200, seed=1)
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    accumulator = mt.PixelAccumulator()
    for score_map, mask in zip(maps, masks):
        accumulator.add(score_map, mask)
    binned, exact = accumulator.metrics(), mt.exact_pixel_metrics(maps, masks)
    for key in exact:
        assert abs(binned[key] - exact[key]) * 100 < 0.1, key


def test_pr_curve_marks_the_max_f1_point() -> None:
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 3, 20)
    maps = np.clip(rng.random(masks.shape) * 0.7 + masks * 0.3, 0, 1)
    accumulator = mt.PixelAccumulator(256)
    for score_map, mask in zip(maps, masks):
        accumulator.add(score_map, mask)
    precision, recall, best = accumulator.curves().pr_curve()
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    assert f1[best] == pytest.approx(f1.max()) == pytest.approx(accumulator.metrics()["pixel_max_f1"])
    assert recall[-1] == 1.0 and np.all(np.diff(recall) >= 0)


def test_accumulator_counts_every_pixel_once_in_fixed_memory() -> None:
    accumulator = mt.PixelAccumulator(1024)
    maps, masks = mt.synthetic_maps(2, size=64)
    for _ in range(3):
        accumulator.add(maps[1], masks[1])
    assert accumulator.pos.sum() == 3 * masks[1].sum() and accumulator.neg.sum() == 3 * (~masks[1]).sum()
    assert accumulator.region_weight.sum() == pytest.approx(accumulator.n_regions)  # each region weighs 1
    assert accumulator.pos.size == accumulator.neg.size == accumulator.region_weight.size == 1024
