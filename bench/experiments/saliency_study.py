"""Saliency study: the best saliency-only map for `lite` engines, chosen on one half of MTD, reported on both.

    python -m bench.experiments.saliency_study --engine-dir ENGINES --root ../shared/data/mtd-dev --out DIR
        [--results bench/results/saliency_study_mtd.json] [--seed 0] [--good-limit 150] [--threads 1]
        [--cache DIR] [--no-guard] [--min-gain 0.5] [--n N ...] [--sigmas S ...] [--steps STEP ...]

Protocol (no tuning on test data):
  * the MTD images are split by `split_samples` into a TUNE and a HELD-OUT half with a fixed seed,
    stratified by class (MT_Free, the good class, is first subsampled to --good-limit images);
  * settings are chosen on TUNE only, by pixel max-F1 (the paper's metric), one factor at a time in
    the order of `STEPS`, keeping a change only when it beats the current best by more than
    --min-gain points (simpler settings win near-ties) and keeps TUNE AUPRO at least the reference's
    (--no-guard drops that: pixel max-F1 on MTD is mostly its large "uneven" regions, and without
    the guard the winner is a heavy blur that loses the small defects); at every step the kNN
    choice (mode, n) and the blur are re-chosen with the new features;
  * every step's winner is then scored on both halves, with the reference setting on the same images;
  * the metrics are bench.evaluate's protocol (map -> image size -> 400x400 bilinear, min-max over the
    half, threshold-free curves on 2^18 bins). `Scorer` is that computation over cached grid maps; the
    final rows are re-run through the runtime's SaliencyExtractor and bench.evaluate.evaluate_category
    (which also draws the pictures), and the two must agree.

Cost: the CNN and the similarity matrix are computed once per image and feature setting (input size,
layers, contrast, padding); one sort of each similarity row gives the kNN mean for every n of
`N_GRID` and both modes at once (`knn_means`), so varying n, mode and the blur costs only the scoring.
Grid maps are cached under DIR/cache, so a rerun with the same images costs only the scoring.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from runtime.errors import SaaError
from runtime.image_io import read_image as runtime_read_image
from runtime.stages.saliency import SaliencyExtractor, SaliencySettings, smooth_grid

from .. import metrics as mt
from ..datasets import GOOD, Sample, list_samples, read_mask
from ..evaluate import METRIC_KEYS, evaluate_category, mask_to_eval_size, normalise, to_eval_size

SEED = 0
GOOD_LIMIT = 150  # MT_Free images kept (of 293 in mtd-dev), drawn with SEED
N_GRID = (10, 30, 100, 200, 400, 700, 1000, 2000, 100_000)  # 100_000: every position (n >= P - 1)
SIGMAS = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # blur, in grid cells (4 input pixels each)
MODES = ("farthest", "nearest")
REFERENCE = SaliencySettings()  # the reference code: farthest 400 at 256x256, layers 1-3, nothing else
SELECT_KEY = "pixel_max_f1"
TIE_KEY = "pixel_auroc"
MIN_GAIN = 0.5  # points of TUNE pixel max-F1 a change from the current (or default) choice must earn
# A setting must keep TUNE AUPRO at least the reference's: AUPRO weighs every defect region equally,
# so this rules out maps that win pixels on MTD's large defects by blurring the small ones away.
GUARD_KEY = "aupro"
AGREEMENT_POINTS = 0.05  # study scorer vs runtime + harness, in metric points
N_BLOCK_BYTES = 32 << 20  # similarity rows sorted at once


@dataclass(frozen=True)
class Step:
    name: str  # what the row of the table says was changed
    field: str  # the SaliencySettings field varied ("" : only the kNN choice and the blur)
    values: tuple  # alternatives to the current value


# The order factors are tried in: cheapest and most general first.
STEPS = (
    Step("kNN: mode, n, self excluded", "", ()),
    Step("blur of the grid map", "blur_sigma", ()),
    Step("reflect padding (px per side)", "pad", (16,)),
    Step("CNN layers", "layers", ((2, 3), (3,), (1, 2))),
    Step("contrast before the CNN", "contrast", ("clahe", "equalize")),
    Step("input size", "single_size", (192, 384)),
)


# ---- the split ------------------------------------------------------------------------------------------


def split_samples(samples: Sequence[Sample], seed: int = SEED,
                  good_limit: int | None = GOOD_LIMIT) -> tuple[list[Sample], list[Sample]]:
    """TUNE and HELD-OUT halves, stratified by defect type; the good class is first cut to good_limit.

    Each class is shuffled with `seed` and its first ceil(half) goes to TUNE; both halves are sorted
    by path. Deterministic for a given list of files."""
    if good_limit is not None and good_limit < 2:
        raise ValueError(f"good_limit must be at least 2 (one good image per half), got {good_limit}")
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: str(s.image_path)):
        by_type.setdefault(sample.defect_type, []).append(sample)
    tune: list[Sample] = []
    held: list[Sample] = []
    for defect_type in sorted(by_type):
        members = by_type[defect_type]
        order = rng.permutation(len(members))
        if defect_type == GOOD and good_limit is not None:
            order = order[:good_limit]
        chosen = [members[i] for i in order]
        half = (len(chosen) + 1) // 2
        tune += chosen[:half]
        held += chosen[half:]
    if not any(s.label for s in tune) or not any(s.label for s in held):
        raise ValueError("each half needs anomalous images: too few samples to split")
    return sorted(tune, key=lambda s: str(s.image_path)), sorted(held, key=lambda s: str(s.image_path))


# ---- kNN means for many n at once ---------------------------------------------------------------------


Variant = tuple[str, int, bool]  # (mode, n, exclude_self)


def knn_means(features: np.ndarray, ns: Iterable[int], block_bytes: int = N_BLOCK_BYTES) -> dict[Variant, np.ndarray]:
    """For each n and mode, with the position itself excluded and included: what
    runtime.stages.saliency_kernels.knn_distance_mean returns (float32 [P]).

    Each row of d = 0.5 * (1 - cos) is sorted once (the position itself set to +inf so it sorts
    last); the sum of its k smallest others is then a prefix sum, and of its k largest the total
    minus the P - 1 - k smallest. Prefix sums are taken only where an n needs them (float64)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    positions = features.shape[1]
    others = positions - 1
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"n values must be >= 1, got {ns}")
    if others < 1:
        raise ValueError("knn_means needs at least two positions")
    needed = set()
    for n in ns:
        k = min(n, others)
        needed |= {k, k - 1, others - k}
    counts = sorted((needed | {others}) - {0})  # prefix lengths to sum; length 0 sums to 0
    starts = np.array([0] + counts[:-1])
    sums = np.zeros((len(counts) + 1, positions), np.float64)  # row i + 1: sum of the counts[i] smallest
    self_distance = np.empty(positions, np.float64)
    rows_per_block = max(1, min(positions, block_bytes // (4 * positions)))
    for first in range(0, positions, rows_per_block):
        rows = np.arange(first, min(positions, first + rows_per_block))
        distance = features[:, rows].T @ features
        distance *= np.float32(-0.5)
        distance += np.float32(0.5)  # = 0.5 * (1 - cos) in float32, as the kernels
        local = np.arange(rows.size)
        self_distance[rows] = distance[local, rows]
        distance[local, rows] = np.inf
        distance.sort(axis=1)
        segments = np.add.reduceat(distance[:, :others], starts, axis=1, dtype=np.float64)
        sums[1:, rows] = np.cumsum(segments, axis=1).T
    prefix = dict(zip([0] + counts, sums))
    total = prefix[others]
    out: dict[Variant, np.ndarray] = {}
    for n in ns:
        k = min(n, others)
        nearest = prefix[k]
        farthest = total - prefix[others - k]
        out[("nearest", n, True)] = (nearest / k).astype(np.float32)
        out[("farthest", n, True)] = (farthest / k).astype(np.float32)
        # With itself: the self distance (~0) is the smallest, so it joins the n nearest and
        # enters the n farthest only when n covers every position (the reference's slice).
        near_with = self_distance + prefix[k - 1] if n <= others else total + self_distance
        far_with = farthest if n <= others else total + self_distance
        count = min(n, positions)
        out[("nearest", n, False)] = (near_with / count).astype(np.float32)
        out[("farthest", n, False)] = (far_with / count).astype(np.float32)
    return out


# ---- grid maps per feature setting, cached -------------------------------------------------------------


def feature_key(settings: SaliencySettings, base_size: int) -> str:
    """What the CNN and the similarity depend on; n, mode and the blur are applied later."""
    layers = "all" if settings.layers is None else "".join(map(str, settings.layers))
    return f"s{settings.single_size or base_size}_l{layers}_{settings.contrast}_p{settings.pad}"


class GridCache:
    """Grid maps (before blur and resize) of every kNN variant, per split and feature setting."""

    def __init__(self, extractor: SaliencyExtractor, folder: Path | None, ns: Sequence[int] = N_GRID,
                 read_image: Callable[[Path], np.ndarray] = runtime_read_image, progress: bool = True,
                 engine_id: str = "") -> None:
        self.extractor = extractor
        self.engine_id = engine_id  # e.g. the CNN's sha256: a cache from other weights is not reused
        self.folder = folder
        self.ns = tuple(ns)
        self.read_image = read_image
        self.progress = progress
        self.memory: dict[tuple[str, str], dict[Variant, np.ndarray]] = {}
        self.seconds: dict[str, float] = {}  # feature setting -> CNN + kNN seconds per image

    def grids(self, split: str, samples: Sequence[Sample], settings: SaliencySettings) -> dict[Variant, list[np.ndarray]]:
        key = feature_key(settings, self.extractor.single_size)
        if (split, key) not in self.memory:
            self.memory[(split, key)] = self._load(split, key, samples) or self._compute(split, key, samples, settings)
        stacked = self.memory[(split, key)]
        return {variant: list(values) for variant, values in stacked.items()}

    def forget(self, keep: set[str]) -> None:
        """Drop feature settings not in `keep` from memory (they stay on disk)."""
        self.memory = {k: v for k, v in self.memory.items() if k[1] in keep}

    def _path(self, split: str, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{split}_{key}.npz"

    def _load(self, split: str, key: str, samples: Sequence[Sample]) -> dict[Variant, np.ndarray] | None:
        path = self._path(split, key)
        if path is None or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            same = (list(data["images"]) == [str(s.image_path) for s in samples]
                    and list(data["ns"]) == list(self.ns) and str(data["engine"]) == self.engine_id)
            if not same:
                return None  # another split, n grid or CNN: recompute
            return {_parse_variant(name): data[name] for name in data.files if name not in ("images", "ns", "engine")}

    def _compute(self, split: str, key: str, samples: Sequence[Sample],
                 settings: SaliencySettings) -> dict[Variant, np.ndarray]:
        from tqdm import tqdm

        extractor = self.extractor.with_settings(settings)
        collected: dict[Variant, list[np.ndarray]] = {}
        start = time.perf_counter()
        for sample in tqdm(samples, desc=f"{split} {key}", unit="img", disable=not self.progress,
                           leave=False):
            features = extractor.single_object_features(self.read_image(sample.image_path))
            channels, height, width = features.shape
            for variant, scores in knn_means(features.reshape(channels, -1), self.ns).items():
                collected.setdefault(variant, []).append(scores.reshape(height, width))
        self.seconds[key] = (time.perf_counter() - start) / len(samples)
        stacked = {variant: np.stack(values) for variant, values in collected.items()}
        path = self._path(split, key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = {_variant_name(v): a for v, a in stacked.items()}
            np.savez(path, images=np.array([str(s.image_path) for s in samples]), ns=np.array(self.ns),
                     engine=np.array(self.engine_id), **arrays)
        return stacked


def _variant_name(variant: Variant) -> str:
    mode, n, exclude = variant
    return f"{mode}_{n}_{'excl' if exclude else 'incl'}"


def _parse_variant(name: str) -> Variant:
    mode, n, exclude = name.split("_")
    return mode, int(n), exclude == "excl"


# ---- scoring: bench.evaluate's protocol over cached grids ----------------------------------------------


class Scorer:
    """The harness's metrics for grid maps of one split, with masks and region weights read once.

    Same steps as evaluate_category with predict = the saliency map: grid -> image size (bilinear,
    as SaliencyExtractor.single_object_saliency) -> 400x400 (bilinear), min-max over the split,
    histograms of mt.PixelAccumulator, image score = max of the normalised map."""

    def __init__(self, samples: Sequence[Sample], read_image: Callable[[Path], np.ndarray] = runtime_read_image,
                 n_bins: int = mt.DEFAULT_BINS) -> None:
        self.samples = list(samples)
        self.n_bins = n_bins
        self.shapes: list[tuple[int, int]] = []
        self.gt: list[np.ndarray] = []
        self.region_weight: list[np.ndarray] = []  # 1/area of each positive pixel's region, in gt order
        self.image_regions: list[int] = []
        for sample in self.samples:
            shape = read_image(sample.image_path).shape[:2]
            gt = mask_to_eval_size(read_mask(sample, shape))
            weights, count = mt.region_weights(gt)
            self.shapes.append(shape)
            self.gt.append(gt)
            self.region_weight.append(weights[gt])
            self.image_regions.append(count)
        self.labels = np.array([s.label for s in self.samples], np.int64)

    def eval_maps(self, grids: Sequence[np.ndarray], sigma: float = 0.0) -> list[np.ndarray]:
        if len(grids) != len(self.samples):
            raise ValueError(f"{len(grids)} grid maps for {len(self.samples)} images")
        return [to_eval_size(cv2.resize(smooth_grid(g, sigma), (w, h))) for g, (h, w) in zip(grids, self.shapes)]

    def metrics(self, grids: Sequence[np.ndarray], sigma: float = 0.0,
                subset: Sequence[int] | None = None) -> dict[str, float]:
        """The six metrics in percent, as evaluate_category reports them; with `subset`, over those
        images only (normalised with the whole split's range, as in the split's evaluation)."""
        maps = self.eval_maps(grids, sigma)
        low = min(float(m.min()) for m in maps)
        high = max(float(m.max()) for m in maps)
        chosen = range(len(maps)) if subset is None else subset
        accumulator = mt.PixelAccumulator(self.n_bins)
        image_scores = np.empty(len(chosen), np.float64)
        n_regions = 0
        for index, at in enumerate(chosen):
            values, gt, weights = maps[at], self.gt[at], self.region_weight[at]
            n_regions += self.image_regions[at]
            normalised = normalise(values, low, high)
            image_scores[index] = normalised.max()
            bins = mt.bin_index(normalised, self.n_bins)
            accumulator.neg += np.bincount(bins[~gt], minlength=self.n_bins)
            if weights.size:
                accumulator.pos += np.bincount(bins[gt], minlength=self.n_bins)
                accumulator.region_weight += np.bincount(bins[gt], weights=weights, minlength=self.n_bins)
        accumulator.n_regions = n_regions
        pixel = accumulator.metrics()
        image = mt.image_metrics(image_scores, self.labels[list(chosen)])
        return {key: 100.0 * {**pixel, **image}[key] for key in METRIC_KEYS}


# ---- the search ------------------------------------------------------------------------------------------


def _beats(a: dict[str, float], b: dict[str, float] | None, margin: float = 0.0) -> bool:
    """a's SELECT_KEY exceeds b's by more than margin (margin 0: ties broken by TIE_KEY)."""
    if b is None:
        return True
    gain = _finite(a[SELECT_KEY]) - _finite(b[SELECT_KEY])
    if gain != 0 or margin > 0:
        return gain > margin
    return _finite(a[TIE_KEY]) > _finite(b[TIE_KEY])


def _finite(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _passes(result: dict[str, float], guard: float | None) -> bool:
    return guard is None or _finite(result[GUARD_KEY]) >= guard - 1e-9


def knn_choices(ns: Sequence[int], with_self_variants: bool) -> list[Variant]:
    """(mode, n, exclude_self) tried: each mode with its runtime default; the other choice of
    exclude_self too when asked (the reference includes itself, the paper's nearest must not)."""
    choices = [(mode, n, mode == "nearest") for mode in MODES for n in ns]
    if with_self_variants:
        choices += [(mode, n, mode != "nearest") for mode in MODES for n in ns]
    return choices


def settings_for(base: SaliencySettings, variant: Variant, sigma: float) -> SaliencySettings:
    mode, n, exclude = variant
    default_exclude = mode == "nearest"
    return replace(base, mode=mode, n=n, exclude_self=None if exclude == default_exclude else exclude,
                   blur_sigma=float(sigma)).checked()


def variant_of(settings: SaliencySettings) -> Variant:
    exclude = settings.exclude_self if settings.exclude_self is not None else settings.mode == "nearest"
    return settings.mode, settings.n, exclude


def best_knn(cache: GridCache, scorer: Scorer, samples: Sequence[Sample], base: SaliencySettings,
             variants: Sequence[Variant], sigmas: Sequence[float], log: list[dict],
             min_gain: float = MIN_GAIN,
             guard: float | None = None) -> tuple[SaliencySettings, dict[str, float]] | None:
    """The best (variant, sigma) on these features whose GUARD_KEY is at least `guard` (None: no
    guard; no setting passes: None); every trial is appended to `log`. A non-default exclude_self
    is kept only when it earns min_gain over the default."""
    grids = cache.grids("tune", samples, base)
    results: dict[tuple[Variant, float], dict[str, float]] = {}
    best: tuple[Variant, float] | None = None
    for variant in variants:
        for sigma in sigmas:
            result = scorer.metrics(grids[variant], sigma)
            results[(variant, sigma)] = result
            log.append(_trial(settings_for(base, variant, sigma), result, cache.extractor.single_size))
            if not _passes(result, guard):
                continue
            if best is None or _beats(result, results[best]):
                best = (variant, sigma)
    if best is None:
        return None
    (mode, n, exclude), sigma = best
    default = ((mode, n, mode == "nearest"), sigma)
    if default in results and _passes(results[default], guard) and not _beats(results[best], results[default], min_gain):
        best = default
    return settings_for(base, *best), results[best]


def search(cache: GridCache, scorer: Scorer, tune: Sequence[Sample], steps: Sequence[Step] = STEPS,
           ns: Sequence[int] = N_GRID, sigmas: Sequence[float] = SIGMAS, min_gain: float = MIN_GAIN,
           guard: bool = True, progress: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """Greedy, one factor at a time, on TUNE only: a step's best replaces the current setting when it
    earns more than min_gain points (and, with `guard`, keeps TUNE GUARD_KEY at least the
    reference's). Returns the table rows (the reference, then each step's winner) and the log of
    every trial."""
    log: list[dict] = []
    reference_result = scorer.metrics(cache.grids("tune", tune, REFERENCE)[variant_of(REFERENCE)])
    rows = [{"step": "reference (farthest 400, 256 px, layers 1-3)", "settings": REFERENCE, "tune": reference_result,
             "kept": True}]
    log.append(_trial(REFERENCE, reference_result, cache.extractor.single_size))
    current, current_result = REFERENCE, reference_result
    floor = reference_result[GUARD_KEY] if guard else None
    base_size = cache.extractor.single_size
    fully_searched: set[str] = set()  # feature settings whose whole (kNN, blur) grid was tried
    for step in steps:
        alternatives = [current] + [replace(current, **{step.field: value}) for value in step.values]
        for alternative in alternatives:
            key = feature_key(alternative, base_size)
            if key in fully_searched:
                continue  # its best is already `current` or was beaten
            variants = knn_choices(ns, with_self_variants=not step.field)
            step_sigmas = (current.blur_sigma,) if not step.field else sigmas
            found = best_knn(cache, scorer, tune, alternative, variants, step_sigmas, log, min_gain, floor)
            if step.field:
                fully_searched.add(key)
            if found is None:
                continue
            settings, result = found
            if _beats(result, current_result, min_gain):
                current, current_result = settings, result
        rows.append({"step": step.name, "settings": current, "tune": current_result,
                     "kept": current != rows[-1]["settings"]})
        progress(f"after '{step.name}': {describe(current)} -> TUNE {SELECT_KEY} {current_result[SELECT_KEY]:.2f}")
        cache.forget({feature_key(current, cache.extractor.single_size)})
    return rows, log


def _trial(settings: SaliencySettings, result: dict[str, float], base_size: int) -> list:
    """One line of the trial log: [setting, TUNE pixel max-F1, pixel AUROC, image AUROC]."""
    return [short(settings, base_size)] + [round(result[k], 2) for k in TABLE_KEYS]


def describe(settings: SaliencySettings) -> dict:
    data = asdict(settings)
    data.pop("block_bytes")
    data["layers"] = list(settings.layers) if settings.layers else None
    return data


def explore_multi_n(cache: GridCache, scorer: Scorer, tune: Sequence[Sample], best: SaliencySettings,
                    ns: Sequence[int]) -> list[dict]:
    """TUNE metrics of the mean of several n's maps around the best n (not a runtime setting: reported
    so the idea is measured; worth implementing only if it beats the best clearly)."""
    grids = cache.grids("tune", tune, best)
    mode, n, exclude = variant_of(best)
    ordered = sorted(ns)
    at = ordered.index(n) if n in ordered else None
    combos = []
    if at is not None:
        combos.append(tuple(ordered[max(0, at - 1):at + 2]))
        combos.append(tuple(ordered[max(0, at - 2):at + 3]))
    combos.append(tuple(ordered))
    explored = []
    for combo in dict.fromkeys(c for c in combos if len(c) > 1):
        mean_grids = [np.mean(stack, axis=0) for stack in zip(*(grids[(mode, k, exclude)] for k in combo))]
        explored.append({"mode": mode, "n": list(combo), "blur_sigma": best.blur_sigma,
                         "tune": scorer.metrics(mean_grids, best.blur_sigma)})
    return explored


# ---- held-out scoring and the runtime check -------------------------------------------------------------


def score_rows(rows: list[dict], cache: GridCache, split: str, samples: Sequence[Sample], scorer: Scorer) -> None:
    for row in rows:
        settings = row["settings"]
        grids = cache.grids(split, samples, replace(settings, blur_sigma=0.0))
        row[split] = scorer.metrics(grids[variant_of(settings)], settings.blur_sigma)


def per_class(rows: list[dict], cache: GridCache, split: str, samples: Sequence[Sample],
              scorer: Scorer) -> dict[str, dict[str, dict[str, float]]]:
    """Pixel metrics of the reference and the best row on each defect type's images of a split."""
    types = sorted({s.defect_type for s in samples if s.label})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, row in (("reference", rows[0]), ("best", rows[-1])):
        settings = row["settings"]
        grids = cache.grids(split, samples, settings)[variant_of(settings)]
        out[name] = {}
        for defect_type in types:
            subset = [i for i, s in enumerate(samples) if s.defect_type == defect_type]
            result = scorer.metrics(grids, settings.blur_sigma, subset)
            out[name][defect_type] = {k: result[k] for k in ("pixel_max_f1", "pixel_auroc", "aupro")}
    return out


def runtime_check(extractor: SaliencyExtractor, settings: SaliencySettings, samples: Sequence[Sample],
                  plot_dir: Path | None, name: str) -> tuple[dict[str, float], float]:
    """The runtime's own map (SaliencyExtractor.single_object_saliency) through the harness; returns its
    metrics and the mean milliseconds per image of the map alone."""
    runner = extractor.with_settings(settings)
    elapsed: list[float] = []

    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        saliency = runner.single_object_saliency(image)
        elapsed.append(time.perf_counter() - start)
        return saliency, saliency

    result = evaluate_category(samples, predict, plot_dir=plot_dir, category=name, progress=False)
    return {key: result[key] for key in METRIC_KEYS}, 1000.0 * float(np.mean(elapsed))


# ---- report -----------------------------------------------------------------------------------------------


TABLE_KEYS = ("pixel_max_f1", "pixel_auroc", "image_auroc")


def short(settings: SaliencySettings, base_size: int) -> str:
    parts = [f"{settings.mode} {settings.n if settings.n < 100_000 else 'all'}"]
    exclude = settings.exclude_self if settings.exclude_self is not None else settings.mode == "nearest"
    parts.append("self excluded" if exclude else "self included")
    parts.append(f"{settings.single_size or base_size} px")
    parts.append("layers " + ("1-3" if settings.layers is None else "+".join(map(str, settings.layers))))
    if settings.pad:
        parts.append(f"pad {settings.pad}")
    if settings.contrast != "none":
        parts.append(settings.contrast)
    if settings.blur_sigma:
        parts.append(f"blur {settings.blur_sigma:g}")
    return ", ".join(parts)


def markdown_table(rows: list[dict], base_size: int) -> str:
    def cell(value: float) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"

    titles = {"pixel_max_f1": "pixel max-F1", "pixel_auroc": "pixel AUROC", "image_auroc": "image AUROC"}
    head = "| step | setting | " + " | ".join(f"TUNE {titles[k]}" for k in TABLE_KEYS) + " | " + \
        " | ".join(f"HELD-OUT {titles[k]}" for k in TABLE_KEYS) + " |"
    lines = [head, "|---|---|" + "---:|" * (2 * len(TABLE_KEYS))]
    for row in rows:
        settings = row["settings"]
        values = [cell(row["tune"][k]) for k in TABLE_KEYS] + [cell(row["held"][k]) for k in TABLE_KEYS]
        step = row["step"] if row.get("kept", True) else f"{row['step']}: not kept"
        lines.append(f"| {step} | {short(settings, base_size)} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(classes: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    """HELD-OUT pixel max-F1 / AUPRO per defect type, reference vs best."""
    held = classes["held"]
    types = list(held["reference"])
    lines = ["| HELD-OUT, per defect type | " + " | ".join(types) + " |", "|---|" + "---:|" * len(types)]
    for name in ("reference", "best"):
        for key, title in (("pixel_max_f1", "pixel max-F1"), ("aupro", "AUPRO@0.3")):
            lines.append(f"| {name} {title} | " + " | ".join(f"{held[name][t][key]:.1f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(value: object) -> object:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, SaliencySettings):
        return describe(value)
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _dumps(value: object, depth: int = 0) -> str:
    """JSON with one line per list of scalars (the split and the trial log stay readable and short)."""
    pad = " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + _dumps(v, depth + 1) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value)


# ---- CLI ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.saliency_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="`lite` engines (python -m export --profile lite)")
    parser.add_argument("--root", type=Path, required=True, help="MTD folder (MT_<class>/Imgs)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table, pictures, cache and results")
    parser.add_argument("--results", type=Path, help="also write the results JSON here (the committed copy)")
    parser.add_argument("--seed", type=int, default=SEED, help="split seed")
    parser.add_argument("--good-limit", type=int, default=GOOD_LIMIT, help="MT_Free images kept (random, seeded)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (set OMP_NUM_THREADS for BLAS)")
    parser.add_argument("--n", type=int, nargs="+", default=list(N_GRID), help="kNN n values tried")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS), help="blur sigmas tried")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN,
                        help="TUNE pixel max-F1 points a change must earn to be kept")
    parser.add_argument("--no-guard", action="store_true",
                        help=f"select on pixel max-F1 alone (default: TUNE {GUARD_KEY} must stay >= the reference's)")
    parser.add_argument("--steps", nargs="+", choices=[s.field or "knn" for s in STEPS],
                        help="factors varied (default: all, in the order of STEPS)")
    parser.add_argument("--cache", type=Path, help="grid-map cache folder (default: OUT/cache)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write a cache")
    return parser


def run(args: argparse.Namespace) -> dict:
    from runtime import manifest as mf
    from runtime.engine.sessions import session_factory
    from runtime.settings import EngineSettings

    started = time.time()
    manifest = mf.load_manifest(args.engine_dir)
    extractor = SaliencyExtractor(manifest, session_factory(EngineSettings(threads=args.threads)))
    samples = list_samples("mtd", args.root)["mtd"]
    tune, held = split_samples(samples, args.seed, args.good_limit)
    print(f"TUNE {len(tune)} images ({sum(s.label for s in tune)} anomalous), "
          f"HELD-OUT {len(held)} ({sum(s.label for s in held)} anomalous)")
    args.out.mkdir(parents=True, exist_ok=True)
    engine_id = str(manifest.models[mf.SALIENCY].get("sha256", extractor.path))
    folder = None if args.no_cache else args.cache or args.out / "cache"
    cache = GridCache(extractor, folder, ns=args.n, engine_id=engine_id)
    steps = [s for s in STEPS if args.steps is None or (s.field or "knn") in args.steps]
    tune_scorer = Scorer(tune)
    rows, log = search(cache, tune_scorer, tune, steps, args.n, args.sigmas, args.min_gain, not args.no_guard)
    explored = explore_multi_n(cache, tune_scorer, tune, rows[-1]["settings"], args.n)
    cache.forget(set())
    held_scorer = Scorer(held)
    score_rows(rows, cache, "held", held, held_scorer)
    classes = {"tune": per_class(rows, cache, "tune", tune, tune_scorer),
               "held": per_class(rows, cache, "held", held, held_scorer)}
    best = rows[-1]["settings"]

    checks = {}
    for name, settings in (("reference", REFERENCE), ("best", best)):
        for split, split_samples_ in (("tune", tune), ("held", held)):
            plot_dir = args.out / "pictures" / f"{name}_{split}" if split == "held" else None
            metrics, ms = runtime_check(extractor, settings, split_samples_, plot_dir, f"{name} ({split})")
            expected = rows[0][split] if name == "reference" else rows[-1][split]
            worst = max(abs(metrics[k] - expected[k]) for k in METRIC_KEYS if not math.isnan(expected[k]))
            checks[f"{name}_{split}"] = {"runtime_metrics": metrics, "ms_per_image": ms, "max_abs_diff_points": worst}
            if worst > AGREEMENT_POINTS:
                raise SaaError(f"the runtime's {name} map disagrees with the study's scoring on {split} by "
                               f"{worst:.3f} points (> {AGREEMENT_POINTS})")

    base_size = extractor.single_size
    table = markdown_table(rows, base_size)
    ratio = {split: rows[-1][split]["pixel_max_f1"] / rows[0][split]["pixel_max_f1"] for split in ("tune", "held")}
    results = {
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "protocol": {"seed": args.seed, "good_limit": args.good_limit, "select": SELECT_KEY, "tie": TIE_KEY,
                     "min_gain": args.min_gain, "guard": None if args.no_guard else f"tune {GUARD_KEY} >= reference's",
                     "n_grid": list(args.n), "sigmas": list(args.sigmas), "steps": [asdict(s) for s in steps],
                     "eval": "bench.evaluate protocol: 400x400 bilinear, min-max over the half, 2^18 bins"},
        "engine": {"backbone": extractor.backbone, "channels": extractor.channels,
                   "layer_channels": list(extractor.layer_channels or [])},
        "split": {"tune": [str(s.image_path.relative_to(args.root)) for s in tune],
                  "held": [str(s.image_path.relative_to(args.root)) for s in held]},
        "rows": [{"step": r["step"], "kept": r["kept"], "setting": short(r["settings"], base_size),
                  "settings": r["settings"], "tune": r["tune"], "held": r["held"]} for r in rows],
        "best": best,
        "pixel_max_f1_ratio_best_over_reference": ratio,
        "target_2x_on_held_out": ratio["held"] >= 2.0,
        "per_defect_type": classes,
        "runtime_check": checks,
        "cnn_knn_seconds_per_image": cache.seconds,
        "explored_multi_n": explored,
        "trials_columns": ["setting"] + [f"tune_{k}" for k in TABLE_KEYS],
        "trials": log,
        "seconds": round(time.time() - started, 1),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    text = _dumps(_json_safe(results)) + "\n"
    (args.out / "saliency_study_mtd.json").write_text(text)
    (args.out / "table.md").write_text(table + "\n" + per_class_table(classes))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
    print(table + "\n" + per_class_table(classes))
    print(f"best / reference pixel max-F1: TUNE x{ratio['tune']:.2f}, HELD-OUT x{ratio['held']:.2f}; "
          f"{results['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    from bench.evaluate import run_cli

    return run_cli(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
