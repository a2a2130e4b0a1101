"""`python -m bench.latency`: per-stage latency of the runtime, and of the PyTorch reference in the same run.

    python -m bench.latency --engine-dir engines/ --device cpu --dataset mvtec --category bottle \
        --iters 20 --warmup 3 --reference --out bench/results/

Prints a table and writes a JSON file named by device, profile, precision and date. Stage
times come from the pipeline's own timers (AnomalyResult.timings_ms); the text side is
encoded once per config (Pipeline.text_ms) and reported apart. With --reference the torch
models are rebuilt from the manifest (bench/reference/load.py), checked against the ONNX
graphs, and the reference algorithm runs on the same image, alternating with the runtime
so that both see the same machine load; the speed-up is reference p50 / runtime p50.
The reference runs in a process of its own (bench/reference/worker.py); torch is never
imported in this one.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO / "tests" / "data" / "bottle_demo.png"
DEFAULT_OUT = REPO / "bench" / "results"
SCHEMA_VERSION = 1

# The pipeline's stages, in data-flow order (AnomalyResult.timings_ms keys).
STAGES = ("preprocess", "detector_image", "detector_prompts", "regions", "overlap_wait", "sam_encoder", "sam_decoder",
          "saliency", "fusion", "end_to_end")
# The reference's timers (ReferenceSAA / SaliencyReference) and the runtime stages doing the same work.
REFERENCE_STAGES = {
    "detector": ("detector_image", "detector_prompts"),
    "sam": ("sam_encoder", "sam_decoder"),
    "saliency": ("saliency",),
    "fusion": ("fusion",),
    "total": ("end_to_end",),
}
PERCENTILES = (50, 95, 99)


class BenchError(RuntimeError):
    """A benchmark argument or input that cannot work, said in one line."""


# ---------------------------------------------------------------------------------- statistics


def summarize(values_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min of a list of milliseconds (linear-interpolated percentiles)."""
    values = np.asarray(values_ms, dtype=np.float64)
    if values.size == 0:
        raise BenchError("no timings to summarize")
    out = {f"p{p}_ms": round(float(np.percentile(values, p)), 3) for p in PERCENTILES}
    out.update(mean_ms=round(float(values.mean()), 3), min_ms=round(float(values.min()), 3), n=int(values.size))
    return out


def stage_series(timings: list[dict[str, float]], stages: Sequence[str]) -> list[float]:
    """Per iteration, the summed time of `stages` (0 where the pipeline skipped a stage)."""
    return [sum(t.get(s, 0.0) for s in stages) for t in timings]


def stage_name(ref_stage: str) -> str:
    """The runtime stage a reference timer is compared with: the stage itself, or the group's name."""
    group = REFERENCE_STAGES[ref_stage]
    return group[0] if len(group) == 1 else ref_stage


def runtime_stages(timings: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Percentiles per pipeline stage, plus "detector" and "sam" (their stages summed per call)."""
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        values = [t[stage] for t in timings if stage in t]
        if values:
            stages[stage] = summarize(values)
    for ref_stage, group in REFERENCE_STAGES.items():
        if len(group) > 1 and all(s in stages for s in group):
            stages[ref_stage] = {**summarize(stage_series(timings, group)), "sum_of": list(group)}
    return stages


def add_engine_shares(stages: dict[str, dict[str, Any]], engine: list[dict[str, float]]) -> None:
    """Each stage's median time inside onnxruntime runs (AnomalyResult.engine_ms): the rest is host work."""
    for stage, stats in stages.items():
        group = stats.get("sum_of", [stage])
        if all(any(s in e for e in engine) for s in group):
            stats["engine_p50_ms"] = round(float(np.median(stage_series(engine, group))), 3)


def compare_stages(runtime: list[dict[str, float]], reference: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per reference timer: its p50, the runtime's p50 over the matching stages, and the ratio."""
    out = {}
    for ref_stage, stages in REFERENCE_STAGES.items():
        ref_values = [t[ref_stage] for t in reference if ref_stage in t]
        if not ref_values:
            continue
        ref_p50 = float(np.percentile(ref_values, 50))
        run_p50 = float(np.percentile(stage_series(runtime, stages), 50))
        out[ref_stage] = {
            "runtime_stages": list(stages),
            "runtime_p50_ms": round(run_p50, 3),
            "reference_p50_ms": round(ref_p50, 3),
            "speedup": round(ref_p50 / run_p50, 2) if run_p50 > 0 else None,
        }
    return out


# ---------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any]:
    """Name, driver and memory of GPU 0 from nvidia-smi, or {} where there is none."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()[0]
        name, driver, total = (v.strip() for v in line.split(","))
        return {"name": name, "driver": driver, "memory_total_mb": float(total)}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def gpu_memory_used_mb(pid: int) -> float | None:
    """GPU memory held by process `pid` (onnxruntime's arena keeps its peak), from nvidia-smi; in a
    container that hides host pids, the memory used on GPU 0 as a whole."""
    if shutil.which("nvidia-smi") is None:
        return None
    queries = (["--query-compute-apps=pid,used_memory"], ["--query-gpu=index,memory.used", "-i", "0"])
    for query, wanted in zip(queries, (str(pid), "0")):
        try:
            out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0] == wanted:
                try:
                    return float(parts[1])
                except ValueError:
                    return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def versions(with_torch: bool, device: str = "cpu") -> dict[str, str]:
    out = {"python": platform.python_version()}
    packages = ["numpy", "onnxruntime", "onnxruntime-gpu", "numba", "opencv-python-headless"] + (["torch"] if with_torch else [])
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    import onnxruntime

    # Both distributions may be installed (a GPU machine's image ships the CPU one; the GPU wheel
    # goes first on the path): say which one this process runs.
    out["onnxruntime_imported"] = f"{onnxruntime.__version__} ({Path(onnxruntime.__file__).parent})"
    out["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    from runtime.engine import custom_ops

    out["saa_ops"] = custom_ops.describe(device)  # the custom-op library a fused head runs with
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_path(out: Path, record: dict[str, Any]) -> Path:
    """out itself when it names a .json file, else out/latency_<device>_<profile>[-variant]_<precision>_<date>.json."""
    if out.suffix == ".json":
        return out
    profile = record["profile"] + (f"-{record['sam_variant']}" if record.get("sam_variant") else "")
    return out / f"latency_{record['device']}_{slug(profile)}_{record['precision']}_{record['created'][:10]}.json"


# ---------------------------------------------------------------------------------- runs


def set_threads(threads: int) -> dict[str, Any]:
    """Cap numba (and BLAS, where threadpoolctl is installed) at `threads`; 0 leaves the defaults."""
    import numba

    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    limiter = None
    try:
        import threadpoolctl

        limiter = threadpoolctl.threadpool_limits(threads) if threads else None
    except ImportError:
        pass
    return {"numba": numba.get_num_threads(), "blas_limited": limiter is not None, "requested": threads}


SETTLE_S = 0.6  # past the other side's idle thread-pool spinning (0.15 s left lite runtime calls 30% slower; 2 s gained nothing more)


def settle() -> None:
    """Between runtime and reference calls: collect garbage, let the other side's thread pools go idle."""
    gc.collect()
    time.sleep(SETTLE_S)


def progress(count: int, label: str) -> Any:
    """A progress bar over `count` calls on stderr: a full-size CPU run takes many minutes. tqdm
    draws nothing when stderr is not a terminal (logs, python -m bench.gpu's step logs)."""
    from tqdm import tqdm

    return tqdm(range(count), desc=label, unit="call", file=sys.stderr, disable=None, leave=False)


def timed_calls(fn: Callable[[], Any], count: int, label: str = "calls") -> list[Any]:
    results = []
    for _ in progress(count, label):
        gc.collect()  # a collection inside a timed call would be charged to whichever stage it hit
        results.append(fn())
    return results


def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """--option KEY=VALUE pairs (JSON values, else strings) for the prompt config's algorithm options."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from runtime.errors import SaaError
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline
    from runtime.settings import EngineSettings
    from runtime.stages.regions import distinct_boxes

    if args.iters < 1 or args.warmup < 0:
        raise BenchError(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    threads = set_threads(args.threads)
    dataset, category = args.dataset, args.category
    if args.config is None and dataset is None and category is None:
        dataset, category = "mvtec", "bottle"  # the default image is an MVTec bottle
    image_path = Path(args.image) if args.image else DEFAULT_IMAGE
    load_before = os.getloadavg()
    options = parse_options(args.option)
    if args.reference:
        # The PyTorch reference implements the reference saliency only: compare like for like.
        options.setdefault("saliency_preset", "reference")
    try:
        image = read_image(image_path)
        settings = EngineSettings.parse(",".join(getattr(args, "setting", None) or ()), device=args.device,
                                        threads=args.threads)  # --setting over the environment
        pipeline = Pipeline.open(args.engine_dir, dataset=dataset, category=category, config=args.config,
                                 device=args.device, threads=args.threads, options=options, settings=settings)
        warm_up_s = pipeline.warm_up() if args.warm_up else None
    except SaaError as err:
        raise BenchError(str(err)) from None
    manifest = pipeline.manifest
    notes: list[str] = []
    gpu = gpu_info() if args.device != "cpu" else {}

    # 1. The runtime alone: warm-up, timed calls, memory before torch is ever imported.
    call = lambda: pipeline(image)  # noqa: E731
    reference: dict[str, Any] = {"ran": False}
    speedup = None
    stage_ratios: dict[str, dict[str, float]] = {}
    try:
        warm = timed_calls(call, args.warmup, "warm-up")
        results = timed_calls(call, args.iters, "runtime")
        runtime_timings = [r.timings_ms for r in results]
        engine_timings = [r.engine_ms for r in results]
        rss_runtime = peak_rss_mb()
        gpu_mb = gpu_memory_used_mb(os.getpid()) if args.device != "cpu" else None

        # 2. The reference, alternating with the runtime so both see the same load.
        if args.reference:
            reference, paired_runtime = run_reference(args, pipeline, image, call, notes)
            stage_ratios = compare_stages(paired_runtime, reference.pop("_timings"))
            speedup = stage_ratios["total"]["speedup"]
    except SaaError as err:
        raise BenchError(f"the pipeline failed on {image_path}: {err}") from None

    load_after = os.getloadavg()
    e2e = summarize(stage_series(runtime_timings, ("end_to_end",)))
    stages = runtime_stages(runtime_timings)
    add_engine_shares(stages, engine_timings)
    for ref_stage, ratio in stage_ratios.items():
        name = stage_name(ref_stage)
        if name in stages:
            stages[name].update({"paired_p50_ms": ratio["runtime_p50_ms"], "reference_p50_ms": ratio["reference_p50_ms"],
                                 "speedup": ratio["speedup"]})
    sam = manifest.preprocess.get("sam", {})
    record = {
        "schema": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.latency " + " ".join(sys.argv[1:]) if args.command_line else None,
        "device": args.device,
        "device_name": gpu.get("name") or cpu_model(),
        "driver": gpu.get("driver"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in load_after]},
        "versions": versions(with_torch=args.reference, device=args.device),
        "engine_dir": str(args.engine_dir),
        "profile": manifest.profile,
        "size": manifest.data.get("size"),
        "sam_variant": sam.get("variant"),
        "precision": manifest.data.get("precision", "fp32"),
        "random_weights": manifest.random_init,
        "config": pipeline.config.name,
        "options": options,
        # The runtime's switches read from the environment (TF32, cuDNN search, fixed head shapes, ...).
        "environment": {key: value for key, value in sorted(os.environ.items()) if key.startswith("SAA_")},
        "settings": pipeline.settings.to_json(),  # every switch as the pipeline ran (--setting, the environment, defaults)
        "ops_fallback": getattr(pipeline, "ops_fallback", None),  # why the fused head's op ran on the CPU, if it did
        # GPU pipelines: the head's caption and token counts and the decoder's box count fixed
        "static_shapes": {"head": pipeline.detector.head_dims, "decoder_boxes": pipeline.segmenter.decoder_boxes,
                          "refused": pipeline.static_shapes_refused}
        if pipeline.detector is not None else None,
        "cuda_graphs": getattr(pipeline, "cuda_graphs", {}),  # per graph: "captured" or onnxruntime's reason
        "image": str(image_path),
        "image_shape": list(image.shape[:2]),
        "iters": args.iters,
        "warmup": args.warmup,
        "text_ms": round(pipeline.text_ms, 3) if hasattr(pipeline, "text_ms") else None,
        # SAM's work grows with the boxes that pass the filters (random weights: see docs/performance.md);
        # regions of one box (joined captions) share a decode.
        "defect_regions": None if pipeline.saliency_only else len(results[-1].regions),
        "boxes_to_sam": None if pipeline.saliency_only else len(distinct_boxes(results[-1].regions)[0]),
        # What the export measured per graph (ONNX vs torch; fp16 vs fp32), so the figure travels with the timing.
        "export_parity": {name: model.get("parity") for name, model in manifest.models.items()},
        "weights_source": {name: model.get("source", {}) for name, model in manifest.models.items()},
        "end_to_end_p50_ms": e2e["p50_ms"],
        # The first call after opening (numba loading, arenas, a GPU's algorithm choice and graph
        # capture): what a line's first part pays without Pipeline.warm_up.
        "first_call_ms": round((warm or results)[0].timings_ms["end_to_end"], 1),
        "warm_up_s": None if warm_up_s is None else round(warm_up_s, 3),  # --warm-up: Pipeline.warm_up first
        "end_to_end_p95_ms": e2e["p95_ms"],
        "end_to_end_p99_ms": e2e["p99_ms"],
        "images_per_s": round(1000.0 / e2e["mean_ms"], 2),
        "speedup_vs_reference": speedup,
        "stages": stages,
        "reference_stages": stage_ratios,
        "reference": reference,
        "peak_rss_mb": rss_runtime,
        "peak_rss_mb_after_paired_calls": peak_rss_mb() if args.reference else None,
        "gpu_memory_mb": gpu_mb,
        "gpu_memory_total_mb": gpu.get("memory_total_mb"),
        "notes": notes + _default_notes(manifest, pipeline),
    }
    pipeline.close()
    return record


def run_reference(args: argparse.Namespace, pipeline: Any, image: np.ndarray, call: Callable[[], Any],
                  notes: list[str]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Rebuild, check and time the reference (in its own process: bench/reference/worker.py says
    why); returns its record and the runtime timings paired with it."""
    from bench.reference.compare import compare_to_reference
    from bench.reference.worker import ReferenceProcess, ReferenceProcessError

    try:
        reference = ReferenceProcess(args.engine_dir, pipeline.config, device=args.device, threads=args.threads,
                                     check_parity=not args.skip_parity)
    except ReferenceProcessError as err:
        raise BenchError(f"--reference: {err}") from None
    iters = args.reference_iters or args.iters
    with reference:
        try:
            timed_calls(lambda: reference(image), max(1, min(args.warmup, 2)), "reference warm-up")
            ref_outputs, paired = [], []
            for _ in progress(iters, "runtime + reference"):
                settle()
                paired.append(call().timings_ms)
                settle()
                ref_outputs.append(reference(image))
            stats = reference.stats()
        except ReferenceProcessError as err:
            raise BenchError(f"--reference failed: {err}") from None
    comparison = compare_to_reference(ref_outputs[-1], call(), pipeline.config.top_k)
    ref_timings = [o["timings_ms"] for o in ref_outputs]
    notes.append("reference: " + "; ".join(reference.ready["notes"]))
    notes.append("reference ran in its own process (torch's and numba's OpenMP runtimes slow each other in one)")
    record = {
        "ran": True,
        "device": args.device,
        "iters": iters,
        "stages": {stage: summarize([t[stage] for t in ref_timings if stage in t])
                   for stage in REFERENCE_STAGES if any(stage in t for t in ref_timings)},
        "parity_max_abs_diff": reference.ready["parity"],
        "map_max_abs_diff": comparison["max_abs_diff"],
        "map": comparison["map"],
        "comparison": comparison,  # bench/reference/compare.py: how much of the map differs, and the boxes
        "peak_rss_mb": round(stats["peak_rss_mb"], 1),  # the reference process
        "gpu_memory_peak_mb": None if stats["gpu_memory_peak_mb"] is None else round(stats["gpu_memory_peak_mb"], 1),
        "_timings": ref_timings,
    }
    return record, paired


def _default_notes(manifest: Any, pipeline: Any) -> list[str]:
    notes = [f"engines variant: {manifest.data['variant']}"] if manifest.data.get("variant") else []
    if pipeline.config.options.max_boxes_per_prompt is not None:
        notes.append("max_boxes_per_prompt is a runtime option the reference ignores: a speed-up is not like for like")
    if pipeline.config.options.joined_captions:
        notes.append("joined_captions: GroundingDINO once per image on all captions joined, on both sides; the "
                     "authors' algorithm runs it once per caption (not their results: a speed-up against it would be larger)")
    if manifest.random_init:
        notes.append("random weights: full-size architectures, timings only (no accuracy meaning)")
    if pipeline.saliency_only:
        notes.append("lite engines: saliency-only pipeline (EfficientNet-Lite0, real ImageNet weights)")
    return notes


# ---------------------------------------------------------------------------------- output


def format_table(record: dict[str, Any]) -> str:
    """The stage table a person reads: runtime percentiles, reference p50 and speed-up per stage."""
    threads = record["threads"]["requested"] or "default"
    lines = [
        f"{record['device']} ({record['device_name']}), {record['profile']}"
        + (f" {record['sam_variant']}" if record["sam_variant"] else "")
        + f", {record['precision']}, random weights: {record['random_weights']}, threads: {threads}",
        f"image {record['image_shape'][1]}x{record['image_shape'][0]}, config {record['config']}, "
        f"{record['iters']} calls after {record['warmup']} warm-up, load average {record['load_average']['before'][0]:.2f}",
        "",
        f"{'stage':<18}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'in ORT p50':>12}"
        f"{'paired p50':>12}{'ref p50 ms':>12}{'speed-up':>10}",
    ]
    for stage, stats in record["stages"].items():
        label = stage + (" (sum)" if "sum_of" in stats else "")
        line = f"{label:<18}{stats['p50_ms']:>10.1f}{stats['p95_ms']:>10.1f}{stats['p99_ms']:>10.1f}"
        engine = stats.get("engine_p50_ms")
        line += f"{engine:>12.1f}" if engine is not None else " " * 12
        if stats.get("reference_p50_ms") is not None:
            line += f"{stats['paired_p50_ms']:>12.1f}{stats['reference_p50_ms']:>12.1f}{stats['speedup']:>9.1f}x"
        lines.append(line)
    if record["text_ms"] is not None:
        lines.append(f"{'text (per config)':<18}{record['text_ms']:>10.1f}")
    lines.append("")
    lines.append(f"end to end p50 {record['end_to_end_p50_ms']:.1f} ms, p95 {record['end_to_end_p95_ms']:.1f} ms, "
                 f"{record['images_per_s']:.1f} images/s, peak RSS {record['peak_rss_mb']:.0f} MB"
                 + (f", GPU {record['gpu_memory_mb']:.0f} MB" if record["gpu_memory_mb"] else "")
                 + (f"; first call {record['first_call_ms']:.0f} ms" if record.get("first_call_ms") else ""))
    lines.append("'in ORT p50': time inside onnxruntime runs, with their copies to and from the device (on a GPU, "
                 "the device's compute); the rest of a stage is host work")
    if record["speedup_vs_reference"] is not None:
        lines.append(f"speed-up vs the PyTorch reference: {record['speedup_vs_reference']:.1f}x (reference p50 / runtime p50 "
                     "over calls alternating with it: 'paired p50')")
        comparison = format_comparison(record["reference"].get("comparison"))
        if comparison:
            lines.append(comparison)
    return "\n".join(lines)


def format_comparison(comparison: dict[str, Any] | None) -> str:
    """One line on how far the runtime's last answer is from the reference's (bench/reference/compare.py)."""
    if not comparison or comparison.get("max_abs_diff") is None:
        return ""
    line = (f"against the reference, {comparison['map']} map: max |diff| {comparison['max_abs_diff']:.3g}, "
            f"mean {comparison['mean_abs_diff']:.3g}, {100 * comparison['differing_pixel_share']:.3f}% of pixels differ")
    boxes = comparison.get("boxes")
    if boxes:
        score = boxes["matched_score_max_abs_diff"]
        line += (f"; boxes to SAM {boxes['runtime_boxes']} (reference {boxes['reference_boxes']}), "
                 f"{boxes['matched']} the same" + (f" (scores within {score:.2g})" if score is not None else "")
                 + f", top-k {'the same' if boxes['same_top_k'] else 'differs'}")
    return line


def build_parser() -> argparse.ArgumentParser:
    from runtime.settings import DEVICES

    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", required=True, help="folder written by `python -m export`")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--dataset", help="shipped prompt set (default with no --config: mvtec)")
    parser.add_argument("--category", help="category within --dataset (default: bottle)")
    parser.add_argument("--config", help="your own prompt file (YAML or JSON)")
    parser.add_argument("--image", help=f"image to time (default: {DEFAULT_IMAGE.relative_to(REPO)})")
    parser.add_argument("--iters", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for onnxruntime, numba, BLAS and torch (0: defaults)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="algorithm option for both runtime and reference, e.g. max_boxes_per_prompt=20 (repeatable)")
    parser.add_argument("--setting", action="append", metavar="KEY=VALUE",
                        help="an EngineSettings field for the runtime, e.g. cuda_graphs=true (repeatable; over the "
                             "SAA_* environment)")
    parser.add_argument("--reference", action="store_true", help="also run the PyTorch reference on the same weights and image")
    parser.add_argument("--reference-iters", type=int, default=0, help="reference calls (default: --iters)")
    parser.add_argument("--skip-parity", action="store_true", help="do not check the rebuilt torch models against the engines")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder, or a .json file path (default bench/results/)")
    parser.add_argument("--warm-up", action="store_true",
                        help="Pipeline.warm_up after opening (first_call_ms then shows what a warmed-up line pays)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = argv is None
    if args.config and (args.dataset or args.category):
        print("error: give either --config FILE or --dataset D --category C, not both", file=sys.stderr)
        return 2
    from runtime.errors import SaaError
    from runtime.settings import EngineSettings

    out = Path(args.out)
    folder = out.parent if out.suffix == ".json" else out
    try:
        EngineSettings(threads=args.threads)  # a bad count named now, not after the export's load
        if not args.no_write:  # now, not after minutes of timing
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise BenchError(f"--out: the folder {folder} is not writable")
        record = run_benchmark(args)
    except (BenchError, SaaError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --out: cannot create the folder {folder} ({err.strerror or err})", file=sys.stderr)
        return 2
    print(format_table(record))
    if not args.no_write:
        path = result_path(out, record)
        try:
            path.write_text(json.dumps(record, indent=1) + "\n")
        except OSError as err:
            print(json.dumps(record, indent=1))  # the measurement is not lost
            print(f"error: cannot write {path} ({err.strerror or err}); the record is printed above", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
