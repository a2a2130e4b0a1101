"""Threshold-free anomaly metrics: pixel/image AUROC, AP, max-F1 and AUPRO (FPR <= 0.3).

Every metric here is computed from one representation: per distinct threshold,
in descending order, the count of positives and negatives scoring exactly at
that threshold ("counts"). Exact metrics take the thresholds from the distinct
scores (np.unique); the bounded-memory pixel path takes them from a fixed grid
of bins over [0, 1]. The same curve code serves both, so the binned result
differs from the exact one only by pixels whose scores share a bin.

Bounded memory on a full dataset (hundreds of millions of pixels): the harness
min-max normalises each map with the category's min and max (known after a
first pass, see bench/evaluate.py) and feeds it to `PixelAccumulator.add`,
which adds it into three histograms of `n_bins` bins: negative pixels,
positive pixels, and positive pixels weighted by 1 / (area of their
ground-truth connected component). The last one makes AUPRO linear in the
pixels: the mean per-region overlap at threshold t equals
sum(weights of positive pixels scoring >= t) / number of regions. Memory is
3 * n_bins float64 whatever the dataset size; nothing per pixel is kept.
With the default 2^18 bins the binned metrics match the exact ones to about
0.001 points (measured by `python -m bench.metrics`, see `_measure`; the
tests hold them to < 0.1 points).

Conventions follow scikit-learn where it defines a value: AUROC is NaN when
only one class is present; AP and max-F1 are 0 without positives (AP 1 and
max-F1 1 when all are positive). AUPRO is NaN without regions or without
negative pixels. All values are fractions in [0, 1]; the harness reports percent.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_BINS = 1 << 18  # 2 MiB per histogram; binned metrics within ~0.001 points of exact (see _measure)
MAX_FPR = 0.3  # AUPRO integration limit, as MVTec's official script and anomalib


# ---- curves from counts -------------------------------------------------------------------------------


def counts_from_scores(scores: np.ndarray, labels: np.ndarray,
                       weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with the positive and negative counts at each.

    With `weights`, the positive counts are sums of those weights instead (AUPRO's region weights).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in size")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    negated, inverse = np.unique(-scores, return_inverse=True)  # ascending -s = descending s
    pos_weight = labels.astype(np.float64) if weights is None else np.where(labels, np.ravel(weights), 0.0)
    pos = np.bincount(inverse, weights=pos_weight, minlength=negated.size)
    neg = np.bincount(inverse, weights=(~labels).astype(np.float64), minlength=negated.size)
    return -negated, pos, neg


def _drop_empty(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = (pos + neg) > 0  # empty bins would add repeated points and 0/0 precisions
    return pos[keep], neg[keep]


def roc_auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    if tp.size == 0 or tp[-1] == 0 or fp[-1] == 0:
        return float("nan")
    tpr = np.concatenate([[0.0], tp / tp[-1]])
    fpr = np.concatenate([[0.0], fp / fp[-1]])
    return float(np.trapezoid(tpr, fpr))


def average_precision_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over descending thresholds, as scikit-learn's average_precision_score."""
    pos, neg = _drop_empty(pos, neg)
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    if tp.size == 0 or tp[-1] == 0:
        return 0.0
    precision = tp / (tp + fp)
    recall_step = pos / tp[-1]
    return float(np.sum(recall_step * precision))


def max_f1_from_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[float, int]:
    """Largest F1 over the thresholds and the index of the threshold that gives it (-1 if none)."""
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    if tp.size == 0 or tp[-1] == 0:
        return 0.0, -1
    f1 = 2.0 * tp / (tp + fp + tp[-1])  # = 2PR / (P + R) with P = tp/(tp+fp), R = tp/positives
    index = int(np.argmax(f1))
    return float(f1[index]), index


def pr_curve_from_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and the index into the counts (non-empty thresholds only, descending)."""
    index = np.flatnonzero((pos + neg) > 0)
    tp, fp = np.cumsum(pos)[index], np.cumsum(neg)[index]
    total = tp[-1] if tp.size else 0.0
    precision = tp / np.maximum(tp + fp, 1e-300)
    recall = tp / total if total > 0 else np.zeros_like(tp)
    return precision, recall, index


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x nondecreasing) from x[0] to x_max, interpolating at x_max."""
    k = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.trapezoid(y[:k], x[:k])) if k > 1 else 0.0
    if 0 < k < x.size and x[k - 1] < x_max:
        slope = (y[k] - y[k - 1]) / (x[k] - x[k - 1])
        y_at = y[k - 1] + slope * (x_max - x[k - 1])
        area += float((x_max - x[k - 1]) * (y[k - 1] + y_at) / 2.0)
    return area


def aupro_from_counts(region_weight: np.ndarray, neg: np.ndarray, n_regions: int, max_fpr: float = MAX_FPR) -> float:
    """Area under per-region-overlap vs FPR up to max_fpr, divided by max_fpr.

    region_weight[i]: sum over positive pixels at threshold i of 1/(their region's area).
    """
    if n_regions == 0 or neg.sum() == 0:
        return float("nan")
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    pro = np.concatenate([[0.0], np.cumsum(region_weight) / n_regions])
    return float(area_up_to(fpr, pro, max_fpr) / max_fpr)


# ---- exact metrics (small inputs, image level, and the definition the binned path is checked against) --


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    _, pos, neg = counts_from_scores(scores, labels)
    return roc_auc_from_counts(pos, neg)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    _, pos, neg = counts_from_scores(scores, labels)
    return average_precision_from_counts(pos, neg)


def max_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Max F1 over thresholds (predicted positive: score >= threshold) and that threshold (NaN if none)."""
    thresholds, pos, neg = counts_from_scores(scores, labels)
    value, index = max_f1_from_counts(pos, neg)
    return value, float(thresholds[index]) if index >= 0 else float("nan")


def region_weights(gt_mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel 1/area of its 8-connected ground-truth region (0 outside), and the number of regions."""
    mask = np.ascontiguousarray(gt_mask, dtype=np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n_labels <= 1:
        return np.zeros(mask.shape, np.float64), 0
    inverse_area = np.zeros(n_labels, np.float64)
    inverse_area[1:] = 1.0 / stats[1:, cv2.CC_STAT_AREA]
    return inverse_area[labels], n_labels - 1


def aupro(score_maps: np.ndarray, gt_masks: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """Exact AUPRO over a stack of maps [N,H,W] and boolean masks [N,H,W] (thresholds: every distinct score)."""
    score_maps, gt_masks = np.asarray(score_maps), np.asarray(gt_masks).astype(bool)
    if score_maps.ndim != 3 or score_maps.shape != gt_masks.shape:
        raise ValueError(f"expected maps and masks of one shape [N,H,W], got {score_maps.shape} and {gt_masks.shape}")
    weights = np.zeros(gt_masks.shape, np.float64)
    n_regions = 0
    for i, mask in enumerate(gt_masks):
        weights[i], count = region_weights(mask)
        n_regions += count
    _, region_weight, neg = counts_from_scores(score_maps, gt_masks, weights=weights)
    return aupro_from_counts(region_weight, neg, n_regions, max_fpr)


def image_metrics(image_scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Image AUROC and image max-F1 (fractions) from one score per image."""
    _, pos, neg = counts_from_scores(image_scores, labels)
    return {"image_auroc": roc_auc_from_counts(pos, neg), "image_max_f1": max_f1_from_counts(pos, neg)[0]}


def exact_pixel_metrics(score_maps: np.ndarray, gt_masks: np.ndarray, max_fpr: float = MAX_FPR) -> dict[str, float]:
    """All pixel metrics from the distinct scores; holds every pixel in memory (tests, measurements)."""
    _, pos, neg = counts_from_scores(score_maps, gt_masks)
    return {
        "pixel_max_f1": max_f1_from_counts(pos, neg)[0],
        "pixel_auroc": roc_auc_from_counts(pos, neg),
        "pixel_ap": average_precision_from_counts(pos, neg),
        "aupro": aupro(score_maps, gt_masks, max_fpr),
    }


# ---- bounded-memory pixel metrics -----------------------------------------------------------------------


def bin_index(normalised: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each score in [0, 1] on a grid of n_bins equal bins (values outside are clipped)."""
    index = np.floor(np.asarray(normalised, dtype=np.float64) * n_bins)
    return np.clip(index, 0, n_bins - 1).astype(np.intp)


@dataclass
class PixelCurves:
    """The binned pixel counts of a category, descending thresholds (bin lower edges)."""

    thresholds: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    region_weight: np.ndarray
    n_regions: int

    def metrics(self, max_fpr: float = MAX_FPR) -> dict[str, float]:
        f1, index = max_f1_from_counts(self.pos, self.neg)
        return {
            "pixel_max_f1": f1,
            "pixel_auroc": roc_auc_from_counts(self.pos, self.neg),
            "pixel_ap": average_precision_from_counts(self.pos, self.neg),
            "aupro": aupro_from_counts(self.region_weight, self.neg, self.n_regions, max_fpr),
            "pixel_threshold": float(self.thresholds[index]) if index >= 0 else float("nan"),
        }

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Precision, recall, and the position of the max-F1 point in them (-1 without positives)."""
        precision, recall, index = pr_curve_from_counts(self.pos, self.neg)
        _, best = max_f1_from_counts(self.pos, self.neg)
        return precision, recall, int(np.searchsorted(index, best)) if best >= 0 else -1


class PixelAccumulator:
    """Histograms of normalised pixel scores for one category; add maps one at a time."""

    def __init__(self, n_bins: int = DEFAULT_BINS) -> None:
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        self.n_bins = n_bins
        self.pos = np.zeros(n_bins, np.float64)
        self.neg = np.zeros(n_bins, np.float64)
        self.region_weight = np.zeros(n_bins, np.float64)
        self.n_regions = 0

    def add(self, normalised: np.ndarray, gt_mask: np.ndarray) -> None:
        """Add one map (scores min-max normalised to [0, 1]) and its boolean ground truth of the same shape."""
        if normalised.shape != gt_mask.shape:
            raise ValueError(f"map {normalised.shape} and mask {gt_mask.shape} differ in shape")
        gt = gt_mask.astype(bool).ravel()
        bins = bin_index(normalised, self.n_bins).ravel()
        weights, n_regions = region_weights(gt_mask.astype(bool))
        self.neg += np.bincount(bins[~gt], minlength=self.n_bins)
        if n_regions:
            self.pos += np.bincount(bins[gt], minlength=self.n_bins)
            self.region_weight += np.bincount(bins[gt], weights=weights.ravel()[gt], minlength=self.n_bins)
            self.n_regions += n_regions

    def curves(self) -> PixelCurves:
        # Bins ascend; thresholds must descend (highest score first).
        thresholds = np.arange(self.n_bins - 1, -1, -1, dtype=np.float64) / self.n_bins
        return PixelCurves(thresholds, self.pos[::-1].copy(), self.neg[::-1].copy(),
                           self.region_weight[::-1].copy(), self.n_regions)

    def metrics(self, max_fpr: float = MAX_FPR) -> dict[str, float]:
        return self.curves().metrics(max_fpr)


# ---- measurement -----------------------------------------------------------------------------------------


def synthetic_maps(n: int, size: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Maps that look like SAA+ output at the eval size: flat zero background, blobs scored per region,
    bilinear-upscaled from a coarse grid, plus false-positive blobs; half the images carry defects."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        coarse = np.zeros((64, 64), np.float32)
        for is_defect in ([True] * int(rng.integers(1, 4)) if i % 2 else []) + [False] * int(rng.integers(0, 3)):
            cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
            r = rng.uniform(0.015, 0.075) * size
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            if is_defect:
                masks[i] |= blob
            shift = rng.integers(-size // 50, size // 50 + 1, 2)
            shifted = np.roll(blob, (int(shift[0]), int(shift[1])), axis=(0, 1))
            score = rng.uniform(0.3, 1.0) if is_defect else rng.uniform(0.0, 0.6)
            coarse = np.maximum(coarse, cv2.resize(shifted.astype(np.float32), (64, 64)) * score)
        maps[i] = cv2.resize(coarse, (size, size)) + rng.normal(0, 0.002, (size, size)).clip(0)
    return maps, masks


def _measure(n_maps: int = 500, n_exact: int = 40, bins: tuple[int, ...] = (1 << 16, 1 << 18, 1 << 20)) -> None:
    """Print binned-vs-exact differences and the accumulator's time and peak traced memory."""
    import time
    import tracemalloc

    maps, masks = synthetic_maps(n_exact)
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    exact = exact_pixel_metrics(maps, masks)
    for n_bins in bins:
        accumulator = PixelAccumulator(n_bins)
        for m, g in zip(maps, masks):
            accumulator.add(m, g)
        binned = accumulator.metrics()
        diffs = {k: round(100 * abs(binned[k] - exact[k]), 5) for k in exact}
        print(f"{n_exact} maps, {n_bins} bins: |binned - exact| in points {diffs}")
    del maps, masks
    one_map, one_mask = synthetic_maps(2)
    tracemalloc.start()
    start = time.perf_counter()
    accumulator = PixelAccumulator()
    for i in range(n_maps):
        accumulator.add(one_map[i % 2], one_mask[i % 2])
    accumulator.metrics()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{n_maps} maps of 400x400 into {DEFAULT_BINS} bins: {seconds:.2f} s, peak traced memory "
          f"{peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    _measure()
