"""Where each engine's time goes: onnxruntime's profiler over whole pipeline calls, summarised per graph.

    python -m bench.gpu.profile_graphs --engine-dir ENGINES --device cuda --iters 10 --out profile.json

Every session of the pipeline (the engines and the built-in graphs) profiles itself
(EngineSettings.ort_profile). Per graph the summary gives: the p50 of a whole run
(`model_run`), time per execution provider, the op types that take longest, the nodes
onnxruntime placed on the CPU in a GPU session (each one a copy and a sync), and, where the
onnxruntime build records them, the CUDA kernels. On a GPU a node's own `dur` is mostly the
launch on the host; `model_run` includes the wait for the device.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MEMCPY_OPS = ("MemcpyToHost", "MemcpyFromHost")


def graph_name(profile_file: Path) -> str:
    """`sam_encoder_2026-11-26_01-45-16_116.json` -> `sam_encoder`."""
    return re.sub(r"_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+$", "", profile_file.stem)


def _dims(spec: Any) -> list[int]:
    """A profile's shape entry ({"float": [2, 3]}) -> [2, 3]."""
    return [int(d) for d in next(iter(spec.values()))] if isinstance(spec, dict) and spec else []


def node_flops(args: dict[str, Any]) -> float:
    """Multiply-adds x 2 of a MatMul / Gemm / Conv node (or onnxruntime's fused forms) from the shapes its profile
    event recorded (0 for other ops, and for a Conv whose weights the event leaves out).

    A product's shared dimension is A's last, unless A is transposed: then A's last dimension is
    the output's rows (onnxruntime leaves pre-packed weights, B, out of the event, so A and the
    output are what is always there to ask)."""
    op = args.get("op_name")
    inputs = [_dims(spec) for spec in args.get("input_type_shape", [])]
    outputs = [_dims(spec) for spec in args.get("output_type_shape", [])]
    if not inputs or not inputs[0] or not outputs or not outputs[0]:
        return 0.0
    out = float(np.prod(outputs[0]))
    if op in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"):
        a, rows = inputs[0], outputs[0][-2] if len(outputs[0]) >= 2 else 1
        shared = a[-2] if len(a) >= 2 and a[-2] != rows and a[-1] == rows else a[-1]
        return 2.0 * out * shared
    if op in ("Conv", "FusedConv") and len(inputs) >= 2 and len(inputs[1]) >= 2:
        return 2.0 * out * float(np.prod(inputs[1][1:]))
    return 0.0


def summarise_profile(events: Sequence[dict[str, Any]], skip_runs: int = 1, top: int = 8) -> dict[str, Any]:
    """One graph's profile events -> per-run figures (the first `skip_runs` runs left out)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    kept = runs[skip_runs:] if len(runs) > skip_runs else runs
    if not kept:
        return {"runs": 0}
    start = kept[0]["ts"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["ts"] >= start]
    kernels = [e for e in events if e.get("cat") == "Kernel" and e["ts"] >= start]
    per_run = 1.0 / len(kept)
    by_provider: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    cpu_ops: Counter = Counter()
    for node in nodes:
        args = node.get("args", {})
        provider, op = args.get("provider", "?"), args.get("op_name", "?")
        by_provider[provider] += node["dur"]
        by_op[op] += node["dur"]
        if provider == "CPUExecutionProvider":
            cpu_ops[op] += 1
    gpu_session = any(p != "CPUExecutionProvider" for p in by_provider)
    flops = sum(node_flops(node.get("args", {})) for node in nodes)
    summary: dict[str, Any] = {
        "runs": len(kept),
        "model_run_p50_ms": round(float(np.median([r["dur"] for r in kept])) / 1000.0, 3),
        "gflop_per_run": round(flops * per_run / 1e9, 2),  # products and convolutions only
        "nodes_per_run": round(len(nodes) * per_run, 1),  # after onnxruntime's optimisations: launches, roughly
        "node_ms_per_run_by_provider": {p: round(v * per_run / 1000.0, 3) for p, v in sorted(by_provider.items())},
        "top_ops_ms_per_run": {op: round(v * per_run / 1000.0, 3)
                               for op, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]},
        "memcpy_nodes_per_run": round(sum(1 for n in nodes if n.get("args", {}).get("op_name") in MEMCPY_OPS) * per_run, 1),
        "cpu_nodes_per_run": {op: round(n * per_run, 1) for op, n in cpu_ops.most_common(top)} if gpu_session else {},
    }
    if kernels:
        by_kernel: dict[str, float] = defaultdict(float)
        for kernel in kernels:
            by_kernel[kernel.get("name", "?")[:80]] += kernel["dur"]
        summary["cuda_kernel_ms_per_run"] = round(sum(by_kernel.values()) * per_run / 1000.0, 3)
        summary["top_kernels_ms_per_run"] = {k: round(v * per_run / 1000.0, 3)
                                             for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]}
    return summary


def end_all_profiles() -> list[Path]:
    """Ask every live onnxruntime session to write its profile; the files written."""
    import onnxruntime as ort

    written = []
    for obj in gc.get_objects():
        if type(obj) is ort.InferenceSession:  # type(), not isinstance(): no __class__ lookups on foreign objects
            name = obj.end_profiling()
            if name:
                written.append(Path(name))
    return written


def profile_pipeline(engine_dir: Path, device: str, image_path: Path, dataset: str, category: str,
                     iters: int, warmup: int, folder: Path) -> dict[str, Any]:
    from runtime.image_io import read_image
    from runtime.pipeline import Pipeline

    pipeline = Pipeline.open(engine_dir, dataset=dataset, category=category, device=device, ort_profile=str(folder))
    image = read_image(image_path)
    for _ in range(warmup):
        pipeline(image)
    calls = [pipeline(image) for _ in range(iters)]
    files = end_all_profiles()
    graphs: dict[str, Any] = {}
    for path in sorted(files):
        events = json.loads(path.read_text())
        graphs[graph_name(path)] = summarise_profile(events, skip_runs=warmup)
    return {
        "engine_dir": str(engine_dir), "device": device, "image": str(image_path), "config": f"{dataset}/{category}",
        "iters": iters, "warmup": warmup,
        "stages_p50_ms": {s: round(float(np.median([c.timings_ms.get(s, 0.0) for c in calls])), 3)
                          for s in calls[0].timings_ms},
        "engine_p50_ms": {s: round(float(np.median([c.engine_ms.get(s, 0.0) for c in calls])), 3)
                          for s in calls[0].engine_ms},
        "graphs": graphs,
    }


def format_summary(record: dict[str, Any]) -> str:
    lines = [f"{record['device']} {record['engine_dir']} {record['config']}, {record['iters']} calls",
             f"{'graph':<22}{'runs':>6}{'run p50 ms':>12}  providers (node ms/run)   CPU nodes/run (GPU sessions)"]
    for name, g in record["graphs"].items():
        if not g.get("runs"):
            lines.append(f"{name:<22}{0:>6}")
            continue
        providers = ", ".join(f"{p.replace('ExecutionProvider', '')} {v:.1f}" for p, v in g["node_ms_per_run_by_provider"].items())
        cpu = ", ".join(f"{op} {n:g}" for op, n in g["cpu_nodes_per_run"].items())
        rate = g["gflop_per_run"] / g["model_run_p50_ms"] if g["model_run_p50_ms"] else 0.0  # GFLOP/ms = TFLOP/s
        lines.append(f"{name:<22}{g['runs']:>6}{g['model_run_p50_ms']:>12.2f}  {providers:<26}{cpu}")
        lines.append(f"{'':<28}{g['gflop_per_run']:.1f} GFLOP a run, {rate:.2f} TFLOP/s, {g['nodes_per_run']:g} nodes a run")
        lines.append(f"{'':<28}top ops: " + ", ".join(f"{op} {v:.1f}" for op, v in g["top_ops_ms_per_run"].items()))
        if "cuda_kernel_ms_per_run" in g:
            lines.append(f"{'':<28}CUDA kernels {g['cuda_kernel_ms_per_run']:.1f} ms/run")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.profile_graphs", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda", "tensorrt"))
    parser.add_argument("--image", type=Path, default=REPO / "tests" / "data" / "bottle_demo.png")
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the summary JSON here")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    from runtime.errors import SaaError

    with tempfile.TemporaryDirectory(prefix="saa-profile-") as folder:
        try:
            record = profile_pipeline(args.engine_dir, args.device, args.image, args.dataset, args.category,
                                      args.iters, args.warmup, Path(folder))
        except SaaError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(format_summary(record))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
