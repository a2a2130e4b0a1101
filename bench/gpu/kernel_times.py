"""Where each stage's GPU time goes: every CUDA kernel of whole pipeline calls, timed on the device.

    python -m bench.gpu.kernel_times --engine-dir ENGINES --device cuda --iters 5 --label vit_b --out kernels.json

    python -m bench.gpu.kernel_times --engine-dir ENGINES --device cuda --setting cuda_graphs=true \
        --option joined_captions=true --label vit_b-joined --out kernels.json

onnxruntime's own profile (profile_graphs.py) times a GPU node on the host: mostly its launch.
This asks CUPTI, through torch's profiler (torch, installed for the export, brings CUPTI; the
runtime itself never imports torch), for every kernel and copy the process ran, and charges each
to the pipeline stage whose window holds its start. During these calls each stage ends with a
device synchronise, so a stage's kernels finish inside its own window.

`--setting` takes EngineSettings fields (runtime.settings; repeatable), `--option` the prompt
config's algorithm options (joined_captions=true profiles the joined captions). The profile runs
with the overlap off whatever is asked: with SAM's encoder and the saliency in a second thread,
their kernels would start inside the main thread's stage windows and be charged to the head.

Per stage: wall p50, kernel time per call, the share of the wall the GPU was busy, kernels per
call, copies, and the kernels that take longest (names shortened to the function). A busy share
near 1 says the kernels themselves are the cost; far below it, launches, copies or host work are.
`--out` holds one entry per `--label`, so ViT-B and ViT-H runs share a file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STAGE_PREFIX = "saa_stage:"  # record_function names of the stage windows
CALL = "saa_call"  # record_function name of a whole pipeline call
KERNEL_CATS = ("kernel", "gpu_op")  # trace categories (lower case) of device work
COPY_WORDS = ("memcpy", "memset")  # in the categories of copies and fills (kineto: gpu_memcpy, gpu_memset)


def short_kernel_name(name: str) -> str:
    """`void onnxruntime::cuda::_TransposeKernel<float, 4>(int, ...)` -> `onnxruntime::cuda::_TransposeKernel`."""
    name = re.sub(r"^(void|static)\s+", "", name.strip())
    out, depth = [], 0
    for char in name:  # drop template arguments, however deeply nested
        if char == "<":
            depth += 1
        elif char == ">":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(char)
    short = "".join(out).strip()
    if short.endswith(")"):  # drop the parameter list: the last bracket group
        depth = 0
        for index in range(len(short) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(short[index], 0)
            if depth == 0:
                short = short[:index].strip()
                break
    return short[:100] or name[:100]


def _windows(events: Sequence[dict[str, Any]], name_of: Callable[[str], str | None]) -> list[tuple[float, float, str]]:
    spans = []
    for event in events:
        if event.get("cat") == "user_annotation" and event.get("ph") == "X":
            label = name_of(event.get("name", ""))
            if label is not None:
                spans.append((float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0.0)), label))
    return sorted(spans)


def _holder(spans: list[tuple[float, float, str]], starts: list[float], ts: float) -> str | None:
    """The label of the span holding time ts (spans sorted and not overlapping), else None."""
    index = int(np.searchsorted(starts, ts, side="right")) - 1
    if index >= 0 and spans[index][0] <= ts <= spans[index][1]:
        return spans[index][2]
    return None


def summarise_trace(events: Sequence[dict[str, Any]], top: int = 8) -> dict[str, Any]:
    """A torch profiler chrome trace's events -> per-stage device time per call.

    Stage windows are the `STAGE_PREFIX` annotations, calls the `CALL` ones; a kernel or copy is
    charged to the window holding its start (outside every stage: "outside stages")."""
    stages = _windows(events, lambda n: n[len(STAGE_PREFIX):] if n.startswith(STAGE_PREFIX) else None)
    calls = _windows(events, lambda n: n if n == CALL else None)
    ncalls = max(len(calls), 1)
    stage_starts = [s[0] for s in stages]
    call_starts = [c[0] for c in calls]
    walls: dict[str, list[float]] = defaultdict(list)
    for start, end, label in stages:
        walls[label].append(end - start)
    kernel_us: dict[str, float] = defaultdict(float)
    kernel_count: dict[str, int] = defaultdict(int)
    copy_us: dict[str, float] = defaultdict(float)
    copy_bytes: dict[str, float] = defaultdict(float)
    by_name: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    in_calls_us = 0.0
    for event in events:
        cat = str(event.get("cat", "")).lower()
        is_kernel = cat in KERNEL_CATS
        if event.get("ph") != "X" or not (is_kernel or any(word in cat for word in COPY_WORDS)):
            continue
        ts, dur = float(event["ts"]), float(event.get("dur", 0.0))
        if calls and _holder(calls, call_starts, ts) is None:
            continue  # warm-up or profiler noise outside the timed calls
        in_calls_us += dur
        stage = _holder(stages, stage_starts, ts) or "outside stages"
        if is_kernel:
            kernel_us[stage] += dur
            kernel_count[stage] += 1
            by_name[stage][short_kernel_name(event.get("name", "?"))] += dur
        else:
            copy_us[stage] += dur
            copy_bytes[stage] += float(event.get("args", {}).get("bytes", 0) or 0)
    call_walls = [end - start for start, end, _ in calls]
    summary: dict[str, Any] = {"calls": len(calls), "stages": {}}
    for stage in list(dict.fromkeys([s[2] for s in stages] + sorted(set(kernel_us) | set(copy_us)))):
        wall = walls.get(stage)
        wall_per_call = sum(wall) / ncalls if wall else None
        busy = (kernel_us[stage] + copy_us[stage]) / ncalls
        summary["stages"][stage] = {
            "wall_p50_ms": round(float(np.median(wall)) / 1000.0, 3) if wall else None,
            "wall_ms_per_call": round(wall_per_call / 1000.0, 3) if wall_per_call is not None else None,
            "kernel_ms_per_call": round(kernel_us[stage] / ncalls / 1000.0, 3),
            "copy_ms_per_call": round(copy_us[stage] / ncalls / 1000.0, 3),
            "copy_mb_per_call": round(copy_bytes[stage] / ncalls / 1e6, 2),
            "busy_share": round(busy / wall_per_call, 3) if wall_per_call else None,
            "kernels_per_call": round(kernel_count[stage] / ncalls, 1),
            "top_kernels_ms_per_call": {k: round(v / ncalls / 1000.0, 3)
                                        for k, v in sorted(by_name[stage].items(), key=lambda kv: -kv[1])[:top]},
        }
    if calls:
        summary["call_wall_p50_ms"] = round(float(np.median(call_walls)) / 1000.0, 3)
        summary["device_busy_ms_per_call"] = round(in_calls_us / ncalls / 1000.0, 3)
    return summary


@contextmanager
def stage_windows(record: Callable[[str], Any], synchronise: Callable[[], None]) -> Iterator[None]:
    """While inside, every pipeline stage runs in a `record(STAGE_PREFIX + stage)` range and ends
    with `synchronise()`, so its device work finishes inside its window."""
    import runtime.pipeline as pipeline_module

    original = pipeline_module.timed

    @contextmanager
    def windowed(timings: dict[str, float], stage: str) -> Iterator[None]:
        with record(STAGE_PREFIX + stage), original(timings, stage):
            yield
            synchronise()

    pipeline_module.timed = windowed
    try:
        yield
    finally:
        pipeline_module.timed = original


def profile_kernels(engine_dir: Path, device: str, image_path: Path, dataset: str, category: str,
                    iters: int, warmup: int, top: int = 8, settings: dict[str, Any] | None = None,
                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`iters` pipeline calls under torch's profiler (CUDA activity where torch sees a GPU).
    settings: EngineSettings fields over the environment (the overlap is always off: module doc);
    options: the prompt config's algorithm options."""
    import torch  # before onnxruntime: its CUDA libraries are the ones onnxruntime then finds
    from torch.profiler import ProfilerActivity, profile, record_function

    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    cuda = device == "cuda" and torch.cuda.is_available()
    synchronise = torch.cuda.synchronize if cuda else (lambda: None)
    switches = dict(settings or {})
    overlap_asked = bool(switches.pop("overlap", False))
    pipeline = Pipeline.open(engine_dir, dataset=dataset, category=category, device=device, options=options,
                             **switches, overlap=False)
    image = read_image(image_path)
    for _ in range(warmup):
        pipeline(image)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        with stage_windows(record_function, synchronise), profile(activities=activities) as profiler:
            for _ in range(iters):
                with record_function(CALL):
                    pipeline(image)
                    synchronise()
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    summary = summarise_trace(events, top=top)
    notes = []
    if overlap_asked:
        notes.append("overlap asked for, profiled with it off: the second thread's kernels would be charged to the "
                     "main thread's stage windows (the other switches as asked)")
    if not cuda:
        notes.append(f"device {device}: torch {torch.__version__} sees no GPU here, so no kernels were recorded (stage windows only)")
    elif not any(s["kernels_per_call"] for s in summary["stages"].values()):
        notes.append("CUPTI recorded no kernels: onnxruntime's CUDA libraries may be outside torch's profiler")
    summary.update({
        "engine_dir": str(engine_dir), "device": device, "image": str(image_path), "config": f"{dataset}/{category}",
        "iters": iters, "warmup": warmup, "cuda_graphs": dict(getattr(pipeline, "cuda_graphs", {}) or {}),
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
        "onnxruntime": _onnxruntime_version(), "switches": {k: v for k, v in os.environ.items() if k.startswith("SAA_")},
        "settings": pipeline.settings.to_json(), "options": dict(options or {}), "overlap_asked": overlap_asked,
        "ops_fallback": getattr(pipeline, "ops_fallback", None), "notes": notes,
    })
    return summary


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """--setting KEY=VALUE pairs -> EngineSettings fields (runtime.settings.parse_value; ConfigError on a bad one)."""
    from runtime.errors import ConfigError
    from runtime.settings import parse_value

    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--setting expects KEY=VALUE, got {item!r}")
        if key.strip() == "device":
            raise ConfigError("--setting device=...: give --device instead")
        settings[key.strip()] = parse_value(key.strip(), value, source="--setting")
    return settings


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def print_table(label: str, summary: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"{label}: {summary.get('device')}, {summary['calls']} calls, call wall p50 {summary.get('call_wall_p50_ms')} ms, "
          f"device busy {summary.get('device_busy_ms_per_call')} ms a call", file=out)
    print(f"{'stage':20s} {'wall p50':>9s} {'kernels':>9s} {'copies':>8s} {'busy':>6s} {'launches':>9s}  longest kernel (ms)", file=out)
    for stage, row in summary["stages"].items():
        first = next(iter(row["top_kernels_ms_per_call"].items()), None)
        busy = f"{100 * row['busy_share']:.0f}%" if row["busy_share"] is not None else "-"
        wall = f"{row['wall_p50_ms']:.2f}" if row["wall_p50_ms"] is not None else "-"
        print(f"{stage:20s} {wall:>9s} {row['kernel_ms_per_call']:9.2f} {row['copy_ms_per_call']:8.2f} {busy:>6s} "
              f"{row['kernels_per_call']:9.0f}  {f'{first[0][:48]} {first[1]:.2f}' if first else ''}", file=out)
    for note in summary.get("notes", []):
        print(f"note: {note}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.kernel_times", description=__doc__.split("\n")[0])
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--image", type=Path, default=REPO / "tests" / "data" / "bottle_demo.png")
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=8, help="kernels listed per stage")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="an EngineSettings field, e.g. cuda_graphs=true (repeatable; overlap is profiled off)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an algorithm option of the prompt config, e.g. joined_captions=true (repeatable)")
    parser.add_argument("--label", default=None, help="this run's key in --out (default: the engine dir's name)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file; an existing one keeps its other labels")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if importlib.util.find_spec("torch") is None:
        print("kernel_times needs torch (its profiler reaches CUPTI); it is not installed here", file=sys.stderr)
        return 2
    from bench.latency import BenchError, parse_options
    from runtime.errors import SaaError

    try:
        settings = parse_settings(args.setting)
        options = parse_options(args.option)
        summary = profile_kernels(args.engine_dir, args.device, args.image, args.dataset, args.category,
                                  args.iters, args.warmup, args.top, settings=settings, options=options)
    except (SaaError, BenchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    label = args.label or args.engine_dir.name
    print_table(label, summary)
    existing: dict[str, Any] = {}
    if args.out.exists():
        try:
            existing = json.loads(args.out.read_text())
        except (OSError, ValueError):
            existing = {}
    existing[label] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(existing, indent=1) + "\n")
    print(f"wrote {args.out} ({label})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
