"""Few-shot and streaming protocols for the normal memory, on top of bench.evaluate.

    python -m bench.fewshot --engine-dir E --dataset mtd --root R --out DIR --shots K [--seed S]
    python -m bench.fewshot --engine-dir E --dataset mtd --root R --out DIR --stream [--seed S]
    python -m bench.fewshot --engine-dir E --dataset mtd --root R --study    # docs/line-side.md's table
    python -m bench.fewshot --engine-dir E --dataset mtd --root R --tune     # blend chosen here
    python -m bench.fewshot --engine-dir E --dataset mtd --root R --latency  # cost per memory size

Protocols (metrics, normalisation and metrics.json keys exactly as bench.evaluate, plus "protocol"):
  * zero-shot: the pipeline as shipped.
  * shots K, seed S: K good images drawn with seed S from the category's good set (MVTec AD
    train/good, VisA's normal train images, MTD's MT_Free) build the memory (runtime.memory,
    default settings); evaluation runs on the remaining test images only (for MTD, whose good
    images are test images, the K shots leave the test set).
  * stream, seed S: the test images in an order shuffled with seed S, the pipeline with an empty
    streaming memory (runtime.lineside.stream, default guard) that learns as it goes; each image is
    scored before it can be learned.
--split: MTD-style sets have no separate tuning data, so mtd-dev is split once (per defect type,
seed 0) into a tune third and a held-out two thirds; shot pools come from the same part. Defaults
(blend) are chosen on `tune`; the README reports `heldout`.
The features of each image are computed once per process (the CNN is deterministic), so the many
runs of --study cost one CNN pass plus the memory searches.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtime.errors import SaaError
from runtime.image_io import IMAGE_SUFFIXES, read_image

from . import evaluate as ev
from .datasets import DATASETS, GOOD, VISA_SPLIT_CSV, Sample, list_samples, read_mask

SPLIT_SEED = 0  # the tune/held-out split of a dataset is fixed
TUNE_FRACTION = 1.0 / 3.0
STUDY_SHOTS = (1, 4, 16)
STUDY_SEEDS = (0, 1, 2)
TUNE_BLENDS = (0.5, 0.75, 1.0)
TUNE_SIGMAS = (0.0, 1.0, 2.0)
LATENCY_SIZES = (1024, 2048, 4096, 8192, 16384)
TABLE_KEYS = ("pixel_max_f1", "pixel_auroc", "image_auroc")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- data


def split_samples(samples: Sequence[Sample], split: str) -> list[Sample]:
    """`all`, or the tune third / held-out rest of each defect type (good included), fixed seed."""
    if split == "all":
        return list(samples)
    if split not in ("tune", "heldout"):
        raise SaaError(f"--split must be all, tune or heldout, got {split!r}")
    rng = np.random.default_rng(SPLIT_SEED)
    tune = set()
    for kind in sorted({s.defect_type for s in samples}):
        members = [i for i, s in enumerate(samples) if s.defect_type == kind]
        rng.shuffle(members)
        tune.update(members[: int(len(members) * TUNE_FRACTION)])
    return [s for i, s in enumerate(samples) if (i in tune) == (split == "tune")]


def good_pool(dataset: str, root: Path, category: str, samples: Sequence[Sample]) -> tuple[list[Path], bool]:
    """The good images shots are drawn from, and whether they are test images (then shots leave the test)."""
    if dataset == "mvtec":
        folder = root / category / "train" / GOOD
        if not folder.is_dir():
            raise SaaError(f"{folder}: no train/good folder to draw shots from")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), False
    if dataset == "visa" and (root / VISA_SPLIT_CSV).is_file():
        with open(root / VISA_SPLIT_CSV, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["object"] == category and r["split"] == "train"
                    and r["label"] == "normal"]
        return sorted(root / r["image"] for r in rows), False
    return [s.image_path for s in samples if not s.label], True  # MTD (MT_Free), raw VisA, folders


def draw_shots(pool: Sequence[Path], shots: int, seed: int) -> list[Path]:
    if shots < 1 or shots > len(pool):
        raise SaaError(f"--shots {shots}: the good set has {len(pool)} images")
    chosen = np.random.default_rng(seed).choice(len(pool), shots, replace=False)
    return [pool[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- feature cache


class FeatureCache:
    """Memoises the saliency CNN's single-object features per image (by content digest) on one
    extractor instance; the CNN is deterministic, so results are unchanged."""

    def __init__(self, extractor: Any) -> None:
        self.store: dict[bytes, np.ndarray] = {}
        self.original = extractor.single_object_features
        extractor.single_object_features = self  # instance attribute: every caller goes through here

    def __call__(self, image: np.ndarray) -> np.ndarray:
        key = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest() + bytes(str(image.shape), "ascii")
        if key not in self.store:
            self.store[key] = self.original(image)
        return self.store[key]


# ---------------------------------------------------------------- protocols


def _predictor(pipe: Any, events: list | None = None) -> ev.Predict:
    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = pipe(image)
        if events is not None:
            events.append(result.stream)
        return result.anomaly_map, result.saliency_map
    return predict


def run_zero_shot(pipe: Any, test: Sequence[Sample], **kwargs: Any) -> dict[str, Any]:
    pipe.memory = pipe.stream = None
    metrics = ev.evaluate_category(test, _predictor(pipe), **kwargs)
    return {**metrics, "protocol": {"name": "zero-shot", "test_images": len(test)}}


def run_shots(pipe: Any, test: Sequence[Sample], pool: Sequence[Path], pool_in_test: bool, shots: int, seed: int,
              settings: Any = None, **kwargs: Any) -> dict[str, Any]:
    from runtime.lineside.normal_memory import NormalMemory

    chosen = draw_shots(pool, shots, seed)
    started = time.perf_counter()
    memory = NormalMemory.from_images(pipe.saliency, pipe.manifest, ((p.name, read_image(p)) for p in chosen),
                                      settings)
    build_s = time.perf_counter() - started
    taken = set(chosen) if pool_in_test else set()
    remaining = [s for s in test if s.image_path not in taken]
    pipe.stream, pipe.memory = None, memory
    try:
        metrics = ev.evaluate_category(remaining, _predictor(pipe), **kwargs)
    finally:
        pipe.memory = None
    return {**metrics, "protocol": {"name": "shots", "shots": shots, "seed": seed, "test_images": len(remaining),
                                    "shot_images": [p.name for p in chosen], "memory_size": len(memory),
                                    "memory_settings": asdict(memory.settings), "build_s": round(build_s, 2)}}


def run_stream(pipe: Any, test: Sequence[Sample], seed: int, capacity: int, stream_settings: Any = None,
               **kwargs: Any) -> dict[str, Any]:
    from runtime.lineside.stream import StreamingMemory

    order = [test[i] for i in np.random.default_rng(seed).permutation(len(test))]
    stream = StreamingMemory.empty(pipe.manifest, pipe.saliency, capacity, stream_settings)
    pipe.stream, pipe.memory = stream, stream.memory
    events: list = []
    try:
        metrics = ev.evaluate_category(order, _predictor(pipe, events), **kwargs)
    finally:
        pipe.stream = pipe.memory = None
    return {**metrics, "protocol": {"name": "stream", "seed": seed, "test_images": len(order),
                                    "capacity": capacity, "settings": asdict(stream.settings),
                                    "guard": stream_audit(order, events, stream, pipe.saliency)}}


def stream_audit(order: Sequence[Sample], events: Sequence[dict], stream: Any, extractor: Any) -> dict[str, Any]:
    """How well the guard kept defects out, from the ground truth the stream never saw."""
    learned = [(s, e) for s, e in zip(order, events) if e and e["learned"]]
    defect_parts = [(s, e) for s, e in learned if s.label]
    serial_of = {e["memory_serial"]: s for s, e in learned}
    sources = stream.memory.sources
    from_defect_parts = sum(1 for serial, _ in sources if serial_of.get(int(serial)) is not None
                            and serial_of[int(serial)].label)
    on_defect_pixels = 0
    grid = extractor.single_size // extractor.stride
    for sample, event in defect_parts:
        mask = read_mask(sample, read_image(sample.image_path).shape[:2]).astype(np.float32)
        on_grid = cv2.resize(mask, (grid, grid), interpolation=cv2.INTER_AREA) > 0
        positions = sources[sources[:, 0] == event["memory_serial"], 1]
        on_defect_pixels += int(on_grid.reshape(-1)[positions].sum())
    return {"parts_learned": len(learned), "defect_parts_learned": len(defect_parts),
            "defect_parts": int(sum(s.label for s in order)), "memory_size": len(stream.memory),
            "memory_features_from_defect_parts": from_defect_parts,
            "memory_features_on_defect_pixels": on_defect_pixels}


# ---------------------------------------------------------------- study, tune, latency


def _mean_spread(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in ev.METRIC_KEYS:
        values = [r[key] for r in runs if r.get(key) is not None and not math.isnan(r[key])]
        out[key] = {"mean": float(np.mean(values)) if values else float("nan"),
                    "std": float(np.std(values)) if len(values) > 1 else 0.0,
                    "min": float(np.min(values)) if values else float("nan"),
                    "max": float(np.max(values)) if values else float("nan")}
    return out


def study_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| protocol | pixel max-F1 | pixel AUROC | image AUROC |", "|---|---:|---:|---:|"]
    for name, stats in rows.items():
        cells = []
        for key in TABLE_KEYS:
            value = stats[key]
            cells.append(f"{value['mean']:.2f}" + (f" ± {value['std']:.2f}" if value["std"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_study(pipe: Any, test: Sequence[Sample], pool: Sequence[Path], pool_in_test: bool, args: argparse.Namespace,
              **kwargs: Any) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"zero-shot": [run_zero_shot(pipe, test, **kwargs)]}
    _say(f"zero-shot: {_brief(runs['zero-shot'][-1])}")
    for shots in STUDY_SHOTS:
        name = f"{shots}-shot"
        for seed in STUDY_SEEDS:
            runs.setdefault(name, []).append(run_shots(pipe, test, pool, pool_in_test, shots, seed, **kwargs))
            _say(f"{name} seed {seed}: {_brief(runs[name][-1])}")
    for seed in STUDY_SEEDS:
        runs.setdefault("stream", []).append(run_stream(pipe, test, seed, _capacity(args), **kwargs))
        _say(f"stream seed {seed}: {_brief(runs['stream'][-1])} guard {runs['stream'][-1]['protocol']['guard']}")
    summary = {name: _mean_spread(found) for name, found in runs.items()}
    return {"summary": summary, "table": study_table(summary), "runs": runs}


def run_tune(pipe: Any, test: Sequence[Sample], pool: Sequence[Path], pool_in_test: bool,
             **kwargs: Any) -> dict[str, Any]:
    """Blend sweep: the self-similarity and memory grids are computed once per (shots, seed), and
    each blend is the memory's own blend function of the two, evaluated like the pipeline's map."""
    from runtime.lineside.normal_memory import MemorySettings, NormalMemory, single_object_grids
    from runtime.stages.saliency import smooth_grid

    options = pipe.config.options
    self_grids = {}
    for sample in test:
        _, self_grids[sample.image_path] = single_object_grids(pipe.saliency, read_image(sample.image_path),
                                                               options.saliency_n, options.saliency_mode)
    results: dict[str, list[dict[str, Any]]] = {}
    for shots in STUDY_SHOTS:
        for seed in STUDY_SEEDS:
            chosen = draw_shots(pool, shots, seed)
            memory = NormalMemory.from_images(pipe.saliency, pipe.manifest,
                                              ((p.name, read_image(p)) for p in chosen), MemorySettings())
            taken = set(chosen) if pool_in_test else set()
            remaining = [s for s in test if s.image_path not in taken]
            distances = {s.image_path: memory.distance_grid(pipe.saliency.single_object_features(
                read_image(s.image_path))) for s in remaining}
            variants = [(0.0, 0.0)] + [(b, g) for b in TUNE_BLENDS for g in TUNE_SIGMAS]
            for blend, sigma in variants:
                settings = MemorySettings(blend=blend, blur_sigma=sigma)
                weighted = NormalMemory(memory.binding, settings, memory.features, memory.sources)
                # the memory's own steps (memory_map = blurred distances, then blend) on the cached grids
                blurred = {path: smooth_grid(grid, sigma) for path, grid in distances.items()}

                def predict(image: np.ndarray, path_of=_current_path) -> tuple[np.ndarray, None]:
                    path = path_of()
                    grid = weighted.blend(self_grids[path], blurred[path])
                    return cv2.resize(grid, (image.shape[1], image.shape[0])), None

                metrics = ev.evaluate_category(remaining, predict, read_image=_tracking_read, **kwargs)
                name = "zero-shot" if blend == 0 else f"blend {blend:g} blur {sigma:g}"
                results.setdefault(name, []).append({**metrics, "shots": shots, "seed": seed})
                _say(f"tune {shots}-shot seed {seed} {name}: {_brief(metrics)}")
    summary = {name: _mean_spread(found) for name, found in results.items()}
    return {"summary": summary, "table": study_table(summary), "runs": results}


# evaluate_category hands predict() the image only; the tune sweep looks its cached grids up by path,
# so its read_image remembers which path it read last (one evaluation at a time, in order).
_last_path: list[Path] = []


def _tracking_read(path: Path) -> np.ndarray:
    _last_path[:] = [path]
    return read_image(path)


def _current_path() -> Path:
    return _last_path[0]


def run_latency(pipe: Any, images: Sequence[Path], repeats: int = 15) -> dict[str, Any]:
    """Per memory size: the saliency stage with the memory, the search alone, and one stream update."""
    from runtime.lineside.normal_memory import MemorySettings, NormalMemory, as_rows
    from runtime.lineside.stream import StreamingMemory

    pictures = [read_image(p) for p in images]
    bank = np.concatenate([as_rows(pipe.saliency.single_object_features(im)) for im in pictures])

    def timed(call: Callable[[], Any]) -> float:
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            values.append((time.perf_counter() - start) * 1000.0)
        return float(np.median(values))

    image = pictures[0]
    pipe.memory = pipe.stream = None
    pipe(image)  # warm-up (numba, onnxruntime)
    out = {"zero-shot": {"pipeline_ms": timed(lambda: pipe(image)),
                         "cnn_ms": timed(lambda: pipe.saliency.single_object_features(image))}}
    features = pipe.saliency.single_object_features(image)
    for size in LATENCY_SIZES:
        if size > len(bank):
            break
        rows = bank[np.random.default_rng(0).choice(len(bank), size, replace=False)]
        memory = NormalMemory(NormalMemory.empty(pipe.manifest, pipe.saliency).binding, MemorySettings(capacity=size),
                              rows, np.zeros((size, 2), np.int64))
        pipe.memory = memory
        pipe(image)
        record = {"pipeline_ms": timed(lambda: pipe(image)),
                  "search_ms": timed(lambda: memory.distance_grid(features))}
        stream = StreamingMemory(NormalMemory(memory.binding, MemorySettings(capacity=size), rows,
                                              np.zeros((size, 2), np.int64)))
        half = as_rows(features)[: size // 4 + 1]  # enough new rows to force one coreset reduction
        record["stream_reduce_ms"] = timed(lambda: stream.memory.add(half, 0, np.arange(len(half))))
        out[str(size)] = record
        _say(f"memory {size}: {record}")
    pipe.memory = None
    return out


# ---------------------------------------------------------------- CLI


def _brief(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {metrics[k]:.2f}" for k in TABLE_KEYS)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fewshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", help="one category (default: the dataset's first)")
    parser.add_argument("--config", type=Path, help="prompt config file instead of the shipped prompts")
    parser.add_argument("--out", type=Path, help="folder for metrics.json (single protocols) or the results JSON")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--shots", type=int, help="K good images build the memory")
    mode.add_argument("--stream", action="store_true", help="streaming memory over the shuffled test images")
    mode.add_argument("--study", action="store_true", help="zero-shot, 1/4/16 shots x 3 seeds, stream x 3 seeds")
    mode.add_argument("--tune", action="store_true", help="blend sweep (run it on --split tune)")
    mode.add_argument("--latency", action="store_true", help="memory cost per memory size")
    parser.add_argument("--seed", type=int, default=0, help="shots draw / stream order")
    parser.add_argument("--split", default="all", choices=["all", "tune", "heldout"])
    parser.add_argument("--capacity", type=int, default=None,
                        help="memory capacity in features, for --shots and --stream (default: runtime.memory's)")
    parser.add_argument("--bins", type=int, default=ev.mt.DEFAULT_BINS)
    parser.add_argument("--device", help="passed to Pipeline.open")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from bench.evaluate import run_cli

    return run_cli(_parser(), run, argv)


def _capacity(args: argparse.Namespace) -> int:
    from runtime.lineside.normal_memory import DEFAULT_CAPACITY

    return DEFAULT_CAPACITY if args.capacity is None else args.capacity


def run(args: argparse.Namespace) -> dict[str, Any]:
    from runtime.lineside.normal_memory import MemorySettings
    from runtime.pipeline import Pipeline

    listed = list_samples(args.dataset, args.root, [args.category] if args.category else None)
    category = args.category or next(iter(listed))
    samples = split_samples(listed[category], args.split)
    pool, pool_in_test = good_pool(args.dataset, args.root, category, samples)
    kwargs = {"device": args.device} if args.device else {}
    if args.config is not None:
        pipe = Pipeline.open(args.engine_dir, config=args.config, **kwargs)
    else:
        pipe = Pipeline.open(args.engine_dir, dataset=args.dataset, category=category, **kwargs)
    if not args.latency:
        FeatureCache(pipe.saliency)
    evaluation = {"n_bins": args.bins, "category": category, "progress": False}
    started = time.time()
    where = {"dataset": args.dataset, "root": str(args.root), "category": category, "split": args.split,
             "engine_dir": str(args.engine_dir), "test_images": len(samples), "good_pool": len(pool)}
    if args.study or args.tune or args.latency:
        if args.latency:
            result = run_latency(pipe, pool[:16])
        elif args.tune:
            result = run_tune(pipe, samples, pool, pool_in_test, **evaluation)
        else:
            result = run_study(pipe, samples, pool, pool_in_test, args, **evaluation)
        name = "latency" if args.latency else ("tune" if args.tune else "study")
        record = {**where, "protocol": name, "seconds": round(time.time() - started, 1), **result}
        out = args.out or RESULTS
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"fewshot_{args.dataset}_{name}.json"
        path.write_text(json.dumps(ev._json_safe(record), indent=1, default=str) + "\n")
        if "table" in result:
            print(result["table"])
        _say(f"wrote {path}")
        return record
    if args.out is None:
        raise SaaError("--out is needed for a single protocol's metrics.json")
    plot = {"workdir": args.out}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.shots is not None:
        settings = MemorySettings(capacity=_capacity(args))
        metrics = run_shots(pipe, samples, pool, pool_in_test, args.shots, args.seed, settings, **evaluation, **plot)
    elif args.stream:
        metrics = run_stream(pipe, samples, args.seed, _capacity(args), **evaluation, **plot)
    else:
        metrics = run_zero_shot(pipe, samples, **evaluation, **plot)
    protocol = metrics.pop("protocol")
    ev.write_report(args.out, {category: metrics}, {**where, "protocol": protocol,
                                                    "seconds": round(time.time() - started, 1)})
    report = json.loads((args.out / "metrics.json").read_text())
    (args.out / "metrics.json").write_text(json.dumps({**report, "protocol": protocol}, indent=1) + "\n")
    print(ev.markdown_table({category: metrics}, ev.mean_metrics({category: metrics})))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
