"""Evaluate the runtime's pipeline on a dataset's test images, with the reference's protocol.

    python -m bench.evaluate --engine-dir engines/ --dataset mtd --root PATH --out DIR
        [--category C ...] [--limit N] [--seed S] [--config my_prompts.yaml] [--bins B] [--no-plots]

Protocol (the reference's eval_SAA.py and SAA/model.py), all of it in `to_eval_size`,
`mask_to_eval_size` and `normalise` below:
  * anomaly map -> 400x400 with cv2 bilinear: the reference model resizes its fused map to its
    out_size (400, cv2.resize default INTER_LINEAR); the evaluation's cubic resize to 400x400
    then copies it unchanged. Saliency maps (pictures only) go image size -> 400 cubic, as there.
  * ground truth -> 400x400 nearest, defect where mask > the dataset's threshold (see datasets.py).
  * min-max normalisation over the whole category's maps; image score = max of its map;
    threshold-free pixel max-F1, AUROC, AP, AUPRO (FPR <= 0.3), image AUROC and max-F1.

Memory stays bounded on any dataset size: pass 1 runs the pipeline and appends each 400x400 map
(float32), saliency (float16) and mask (uint8) to flat files in a temporary folder while keeping
the category's min and max; pass 2 reads them back one at a time, normalises and adds them to the
histograms of bench.metrics.PixelAccumulator. Nothing per pixel is held in RAM across images.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from runtime.errors import SaaError
from runtime.image_io import read_image as runtime_read_image

from . import metrics as mt
from .datasets import DATASETS, Sample, list_samples, read_mask, subsample

EVAL_SIZE = 400  # the reference's --eval-resolution
ANOMALY_INTERPOLATION = cv2.INTER_LINEAR  # the reference model's own out_size resize (see docstring)
SALIENCY_INTERPOLATION = cv2.INTER_CUBIC
METRIC_KEYS = ("pixel_max_f1", "pixel_auroc", "pixel_ap", "image_auroc", "image_max_f1", "aupro")
METRIC_TITLES = ("pixel max-F1", "pixel AUROC", "pixel AP", "image AUROC", "image max-F1", "AUPRO@0.3")
N_CASES = 3  # best and worst anomalous images shown per category

Predict = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]
ReadImage = Callable[[Path], np.ndarray]


# ---- the protocol: one place -----------------------------------------------------------------------------


def to_eval_size(values: np.ndarray, interpolation: int = ANOMALY_INTERPOLATION) -> np.ndarray:
    return cv2.resize(np.asarray(values, np.float32), (EVAL_SIZE, EVAL_SIZE), interpolation=interpolation)


def mask_to_eval_size(mask: np.ndarray) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), (EVAL_SIZE, EVAL_SIZE), interpolation=cv2.INTER_NEAREST) > 0


def normalise(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Min-max with the category's range; a constant category maps to zeros."""
    span = high - low
    return (values.astype(np.float64) - low) / span if span > 0 else np.zeros(values.shape, np.float64)


# ---- spill files: bounded memory between the two passes -------------------------------------------------


class _MapSpill:
    """Fixed-size records appended to flat files, read back by index."""

    FIELDS = (("anomaly", np.float32), ("saliency", np.float16), ("gt", np.uint8))

    def __init__(self, folder: Path) -> None:
        self.paths = {name: Path(folder) / f"{name}.bin" for name, _ in self.FIELDS}
        self.files = {name: open(path, "wb") for name, path in self.paths.items()}
        self.count = 0
        self.low, self.high = math.inf, -math.inf
        self.saliency_low, self.saliency_high = math.inf, -math.inf

    def append(self, anomaly: np.ndarray, saliency: np.ndarray | None, gt: np.ndarray) -> None:
        self.low, self.high = min(self.low, float(anomaly.min())), max(self.high, float(anomaly.max()))
        if saliency is None:
            saliency = np.full(anomaly.shape, np.nan, np.float32)
        else:
            self.saliency_low = min(self.saliency_low, float(saliency.min()))
            self.saliency_high = max(self.saliency_high, float(saliency.max()))
        for (name, dtype), values in zip(self.FIELDS, (anomaly, saliency, gt)):
            self.files[name].write(np.ascontiguousarray(values, dtype=dtype).tobytes())
        self.count += 1

    def finish(self) -> None:
        for handle in self.files.values():
            handle.close()

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = []
        size = EVAL_SIZE * EVAL_SIZE
        for name, dtype in self.FIELDS:
            offset = index * size * np.dtype(dtype).itemsize
            values = np.fromfile(self.paths[name], dtype=dtype, count=size, offset=offset)
            out.append(values.reshape(EVAL_SIZE, EVAL_SIZE))
        anomaly, saliency, gt = out
        return anomaly, saliency, gt.astype(bool)


# ---- one category ------------------------------------------------------------------------------------------


def _checked_map(values: object, image_hw: tuple[int, int], path: Path, what: str) -> np.ndarray:
    if not isinstance(values, np.ndarray) or values.ndim != 2:
        raise SaaError(f"{path}: the pipeline's {what} is not a 2-D array ({getattr(values, 'shape', type(values))})")
    if values.shape != image_hw:
        raise SaaError(f"{path}: the pipeline's {what} is {values.shape}, the image is {image_hw}")
    if not np.all(np.isfinite(values)):
        raise SaaError(f"{path}: the pipeline's {what} contains NaN or infinity")
    return values


def evaluate_category(samples: Sequence[Sample], predict: Predict, *, read_image: ReadImage = runtime_read_image,
                      n_bins: int = mt.DEFAULT_BINS, plot_dir: Path | None = None, category: str = "",
                      progress: bool = True, workdir: Path | None = None) -> dict[str, float]:
    """Run `predict` (image BGR uint8 -> (anomaly map, saliency map or None), both at image size) over the
    samples and return the six metrics in percent (NaN where undefined) plus n_images, n_anomalous and
    pixel_threshold (the max-F1 threshold on normalised scores). With plot_dir, writes the pictures of
    bench.plots and scores.csv there."""
    if not samples:
        raise ValueError(f"category {category!r}: no samples to evaluate")
    labels = np.array([s.label for s in samples], dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="saa-eval-", dir=workdir) as tmp:
        spill = _MapSpill(Path(tmp))
        try:
            for sample in tqdm(samples, desc=category or "evaluate", unit="img", disable=not progress):
                image = read_image(sample.image_path)
                try:
                    anomaly, saliency = predict(image)
                except SaaError as err:
                    raise type(err)(f"{sample.image_path}: {err}") from None
                hw = image.shape[:2]
                anomaly = _checked_map(anomaly, hw, sample.image_path, "anomaly map")
                if saliency is not None:
                    saliency = to_eval_size(_checked_map(saliency, hw, sample.image_path, "saliency map"),
                                            SALIENCY_INTERPOLATION)
                spill.append(to_eval_size(anomaly), saliency, mask_to_eval_size(read_mask(sample, hw)))
        finally:
            spill.finish()

        accumulator = mt.PixelAccumulator(n_bins)
        image_scores = np.empty(len(samples), np.float64)
        for index in range(len(samples)):
            anomaly, _, gt = spill.read(index)
            normalised = normalise(anomaly, spill.low, spill.high)
            accumulator.add(normalised, gt)
            image_scores[index] = normalised.max()
        curves = accumulator.curves()
        pixel = curves.metrics()
        image = mt.image_metrics(image_scores, labels)
        result = {key: 100.0 * {**pixel, **image}[key] for key in METRIC_KEYS}
        result.update(n_images=len(samples), n_anomalous=int(labels.sum()), pixel_threshold=pixel["pixel_threshold"])
        if plot_dir is not None:
            _write_outputs(Path(plot_dir), category, samples, spill, image_scores, curves, pixel["pixel_threshold"],
                           n_bins, read_image)
    return result


def _image_f1(normalised: np.ndarray, gt: np.ndarray, threshold: float, n_bins: int) -> float:
    # Same binning as the accumulator, so "predicted" means exactly what the max-F1 threshold meant.
    predicted = mt.bin_index(normalised, n_bins) >= mt.bin_index(np.array(threshold), n_bins)
    tp = np.count_nonzero(predicted & gt)
    denominator = np.count_nonzero(predicted) + np.count_nonzero(gt)
    return 2.0 * tp / denominator if denominator else 1.0


def _write_outputs(folder: Path, category: str, samples: Sequence[Sample], spill: _MapSpill,
                   image_scores: np.ndarray, curves: mt.PixelCurves, threshold: float, n_bins: int,
                   read_image: ReadImage) -> None:
    from . import plots  # matplotlib only when pictures are asked for

    folder.mkdir(parents=True, exist_ok=True)
    anomalous = [i for i, s in enumerate(samples) if s.label]
    f1 = {}
    if not math.isnan(threshold):
        for index in anomalous:
            anomaly, _, gt = spill.read(index)
            f1[index] = _image_f1(normalise(anomaly, spill.low, spill.high), gt, threshold, n_bins)
    with open(folder / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "defect_type", "image_score", "pixel_f1_at_threshold"])
        for index, sample in enumerate(samples):
            writer.writerow([sample.image_path, sample.label, sample.defect_type, f"{image_scores[index]:.6f}",
                             f"{f1[index]:.6f}" if index in f1 else ""])

    if f1:  # best and worst anomalous images by their F1 at the category's max-F1 threshold
        ranked = sorted(f1, key=lambda i: (-f1[i], i))
        chosen = ranked[:N_CASES] + [i for i in ranked[-N_CASES:] if i not in ranked[:N_CASES]]
        heading = f"{category}: best and worst anomalous images by F1 at threshold {threshold:.3f}"
    else:  # no defects: the good images the pipeline scores highest (false alarms)
        chosen = list(np.argsort(-image_scores, kind="stable")[:N_CASES])
        heading = f"{category}: highest-scoring good images"
    cases = []
    for index in chosen:
        anomaly, saliency, gt = spill.read(index)
        picture = cv2.resize(read_image(samples[index].image_path), (EVAL_SIZE, EVAL_SIZE),
                             interpolation=cv2.INTER_AREA)
        saliency_view = None
        if not np.isnan(saliency).any():
            saliency_view = normalise(saliency.astype(np.float32), spill.saliency_low, spill.saliency_high)
        f1_text = f"F1 {f1[index]:.2f}, " if index in f1 else ""
        cases.append(plots.Case(f"{samples[index].name} ({f1_text}score {image_scores[index]:.2f})", picture, gt,
                                normalise(anomaly, spill.low, spill.high), saliency_view))
    plots.plot_cases(cases, folder / "cases.png", heading)
    precision, recall, best = curves.pr_curve()
    plots.plot_pr_curve(precision, recall, best, folder / "pr_curve.png", f"{category}: pixel precision-recall")


# ---- reports ----------------------------------------------------------------------------------------------


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over categories of each metric, ignoring categories where it is undefined (NaN)."""
    mean = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in per_category.values() if not math.isnan(r[key])]
        mean[key] = float(np.mean(values)) if values else float("nan")
    return mean


def markdown_table(per_category: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    lines = ["| category | images | " + " | ".join(METRIC_TITLES) + " |",
             "|---|---:|" + "---:|" * len(METRIC_KEYS)]
    for name, row in per_category.items():
        lines.append(f"| {name} | {row['n_images']} | " + " | ".join(cell(row[k]) for k in METRIC_KEYS) + " |")
    total = sum(r["n_images"] for r in per_category.values())
    lines.append(f"| **mean** | {total} | " + " | ".join(f"**{cell(mean[k])}**" for k in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(value: object) -> object:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None  # JSON has no NaN
    return value


def write_report(out: Path, per_category: dict[str, dict[str, float]], run: dict[str, object]) -> str:
    """Write metrics.json ({category: metrics, ..., "mean": metrics}), metrics.md and run.json; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    mean = mean_metrics(per_category)
    table = markdown_table(per_category, mean)
    (out / "metrics.json").write_text(json.dumps(_json_safe({**per_category, "mean": mean}), indent=1) + "\n")
    (out / "metrics.md").write_text(table)
    (out / "run.json").write_text(json.dumps(_json_safe(run), indent=1, default=str) + "\n")
    return table


# ---- CLI ----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="exported engines folder (manifest.json)")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--root", type=Path, required=True, help="the dataset's root folder")
    parser.add_argument("--category", nargs="+", help="categories to run (default: all found)")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, metrics.md, pictures")
    parser.add_argument("--config", type=Path, help="prompt config file, instead of the dataset's shipped prompts "
                                                    "(required for --dataset folder)")
    parser.add_argument("--limit", type=int, help="at most N test images per category (random, stratified)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --limit's draw")
    parser.add_argument("--bins", type=int, default=mt.DEFAULT_BINS, help="histogram bins for pixel metrics")
    parser.add_argument("--device", help="passed to Pipeline.open (default: its own)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG pictures")
    return parser


def pipeline_predictor(pipe: Callable) -> Predict:
    """Adapt a runtime Pipeline (image -> result with .anomaly_map, .saliency_map) to a Predict."""
    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = pipe(image)
        return result.anomaly_map, result.saliency_map
    return predict


def _open_pipeline(args: argparse.Namespace, category: str):
    from runtime.pipeline import Pipeline

    kwargs = {"device": args.device} if args.device else {}
    if args.config is not None:
        return Pipeline.open(args.engine_dir, config=args.config, **kwargs)
    return Pipeline.open(args.engine_dir, dataset=args.dataset, category=category, **kwargs)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.dataset == "folder" and args.config is None:
        raise SaaError("--dataset folder needs --config my_prompts.yaml (the prompts for your part)")
    if args.limit is not None and args.limit < 1:
        raise SaaError(f"--limit must be at least 1, got {args.limit}")
    if args.bins < 2:
        raise SaaError(f"--bins must be at least 2, got {args.bins}")
    np.random.seed(args.seed)
    listed = list_samples(args.dataset, args.root, args.category)
    args.out.mkdir(parents=True, exist_ok=True)  # the spill files go here too, not to a RAM-backed /tmp
    per_category: dict[str, dict[str, float]] = {}
    started = time.time()
    for category, samples in listed.items():
        samples = subsample(samples, args.limit, args.seed)
        pipe = _open_pipeline(args, category)
        try:
            category_start = time.time()
            per_category[category] = evaluate_category(
                samples, pipeline_predictor(pipe), n_bins=args.bins, category=category,
                plot_dir=None if args.no_plots else args.out / category, workdir=args.out)
            per_category[category]["seconds"] = round(time.time() - category_start, 2)
        finally:
            pipe.close()
    run_info = {"dataset": args.dataset, "root": str(args.root), "engine_dir": str(args.engine_dir),
                "config": str(args.config) if args.config else None, "limit": args.limit, "seed": args.seed,
                "bins": args.bins, "eval_size": EVAL_SIZE, "seconds": round(time.time() - started, 2)}
    print(write_report(args.out, per_category, run_info))
    return per_category


def run_cli(parser: argparse.ArgumentParser, run_args, argv) -> int:
    """The bench commands' shared door: parse, run, and turn a SaaError into one line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        run_args(args)
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
