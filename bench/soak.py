"""`python -m bench.soak --engine-dir DIR`: 1,000 calls through the C ABI with resident memory sampled.

Reports
- growth: the slope of a least-squares line through (call, RSS) samples taken after the
  warm-up, in bytes per call, over all samples and over the second half (allocators grow
  in steps early on); flat is the goal: a leak of one map per call would show as
  4 * height * width bytes/call;
- overhead: end-to-end time per call through the ABI against the Python API on the same
  image and engines (interleaved calls, medians), and the ABI's own cost with the
  pipeline taken out (a handle whose pipeline replays one cached result: ctypes, C,
  _host, the map and region copies).

The ABI is driven through the ctypes binding in this process: the same libsaa.so entry
points a C++ program calls, with this interpreter as the host.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.settings import DEVICES

DEFAULT_IMAGE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mtd_break_exp6_num_348888.jpg"


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth_per_call(calls: Sequence[int], rss: Sequence[int]) -> float:
    """Least-squares slope of RSS over call index, bytes per call (0.0 with fewer than 2 samples)."""
    if len(calls) < 2:
        return 0.0
    slope, _ = np.polyfit(np.asarray(calls, dtype=np.float64), np.asarray(rss, dtype=np.float64), 1)
    return float(slope)


class _ReplayPipeline:
    """Stands in for Pipeline inside an ABI handle: returns one precomputed result, so timing the
    handle measures everything but the pipeline."""

    result: Any = None

    @classmethod
    def open(cls, *args: Any, **kwargs: Any) -> "_ReplayPipeline":
        return cls()

    def __call__(self, image: np.ndarray, out_size: Any = None) -> Any:
        return _ReplayPipeline.result

    def close(self) -> None:
        pass


def abi_overhead_us(abi_open: dict[str, Any], image: np.ndarray, result: Any, calls: int) -> float:
    """Median microseconds per saa_infer call with the pipeline replaced by a cached result."""
    from runtime.capi import CPipeline, _host

    _ReplayPipeline.result = result
    real, _host.Pipeline = _host.Pipeline, _ReplayPipeline
    try:
        replay = CPipeline.open(**abi_open)
    finally:
        _host.Pipeline = real
    buffer = np.empty(image.shape[:2], np.float32)
    times = []
    with replay:
        for _ in range(calls):
            start = time.perf_counter()
            replay(image, map_out=buffer)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", required=True, help="engines dir written by `python -m export`")
    parser.add_argument("--dataset", default="mtd", help="shipped prompt set (default mtd)")
    parser.add_argument("--category", default="mtd", help="category within --dataset (default mtd)")
    parser.add_argument("--config", help="your own prompt file instead of --dataset/--category")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image to segment on every call")
    parser.add_argument("--device", default="cpu", choices=list(DEVICES))
    parser.add_argument("--calls", type=int, default=1000, help="ABI calls in the soak (default 1000)")
    parser.add_argument("--warmup", type=int, default=10, help="calls before sampling starts (arenas, caches)")
    parser.add_argument("--sample-every", type=int, default=10, help="calls between RSS samples")
    parser.add_argument("--compare-calls", type=int, default=20, help="interleaved ABI / Python API calls for timing")
    parser.add_argument("--overhead-calls", type=int, default=200, help="calls timing the ABI without the pipeline")
    parser.add_argument("--json", help="also write the report here")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from runtime.capi import CPipeline
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    for name in ("calls", "sample_every", "compare_calls", "overhead_calls"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    image = read_image(args.image)
    config = {"config": args.config} if args.config else {"dataset": args.dataset, "category": args.category}
    abi_open = {"engine_dir": args.engine_dir, "device": args.device, **config}
    abi = CPipeline.open(**abi_open)
    python = Pipeline.open(args.engine_dir, device=args.device, **config)
    buffer = np.empty(image.shape[:2], np.float32)  # a line reuses its buffer, as a C++ caller would
    for _ in range(max(args.warmup, 1)):
        abi(image, map_out=buffer)
    reference = python(image)

    samples_calls, samples_rss, call_times = [0], [rss_bytes()], []
    for call in range(1, args.calls + 1):
        start = time.perf_counter()
        abi(image, map_out=buffer)
        call_times.append(time.perf_counter() - start)
        if call % args.sample_every == 0 or call == args.calls:
            samples_calls.append(call)
            samples_rss.append(rss_bytes())
    if not np.array_equal(buffer, reference.anomaly_map):
        print("warning: the ABI's map differs from the Python API's", file=sys.stderr)

    abi_times, python_times = [], []
    for _ in range(args.compare_calls):
        start = time.perf_counter()
        abi(image, map_out=buffer)
        abi_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        python(image)
        python_times.append(time.perf_counter() - start)
    abi.close()
    python.close()
    pure_overhead = abi_overhead_us(abi_open, image, reference, calls=args.overhead_calls)

    half = len(samples_calls) // 2
    abi_ms, python_ms = statistics.median(abi_times) * 1e3, statistics.median(python_times) * 1e3
    return {
        "engine_dir": str(args.engine_dir),
        "image": str(args.image),
        "image_shape": list(image.shape),
        "calls": args.calls,
        "rss_start_mib": samples_rss[0] / 2**20,
        "rss_end_mib": samples_rss[-1] / 2**20,
        "rss_growth_bytes_per_call": growth_per_call(samples_calls, samples_rss),
        # allocators grow in steps early on; the second half shows the steady state
        "rss_growth_bytes_per_call_second_half": growth_per_call(samples_calls[half:], samples_rss[half:]),
        "rss_total_growth_mib": (samples_rss[-1] - samples_rss[0]) / 2**20,
        "map_bytes": int(buffer.nbytes),
        "soak_ms_per_call_median": statistics.median(call_times) * 1e3,
        "abi_ms_per_call_median": abi_ms,
        "python_api_ms_per_call_median": python_ms,
        "abi_minus_python_ms": abi_ms - python_ms,
        "abi_overhead_us_without_pipeline": pure_overhead,
        "rss_samples": [[c, r] for c, r in zip(samples_calls, samples_rss)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.errors import SaaError

    try:
        report = run(args)
    except SaaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{report['calls']} ABI calls on {report['image']} {tuple(report['image_shape'])}: "
          f"{report['soak_ms_per_call_median']:.1f} ms/call (median)")
    print(f"RSS {report['rss_start_mib']:.1f} -> {report['rss_end_mib']:.1f} MiB after warm-up: "
          f"{report['rss_growth_bytes_per_call']:+.1f} bytes/call (least squares), "
          f"{report['rss_growth_bytes_per_call_second_half']:+.1f} bytes/call over the second half "
          f"(one map is {report['map_bytes']} bytes)")
    print(f"end to end: ABI {report['abi_ms_per_call_median']:.2f} ms, Python API "
          f"{report['python_api_ms_per_call_median']:.2f} ms (medians of interleaved calls, "
          f"difference {report['abi_minus_python_ms']:+.2f} ms)")
    print(f"ABI overhead with the pipeline taken out: {report['abi_overhead_us_without_pipeline']:.1f} us/call")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
