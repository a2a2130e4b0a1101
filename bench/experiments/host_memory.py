"""`python -m bench.experiments.host_memory`: the host memory one full-pipeline call takes at large image sizes,
against the estimate `runtime.engine.host_memory.mask_bytes` refuses images by.

    python -m bench.experiments.host_memory --engine-dir ENGINES --sizes 2000 4000 8000 --out bench/results/host_memory_cpu_DATE.json

Each size runs in its own process: the pipeline opens, one call on a 900x900 image warms it up,
then the kernel's peak-RSS mark is reset (/proc/self/clear_refs) and one call runs on the demo
image resized to SIZE x SIZE. The call's memory is the new peak less the RSS before it. The
region count is the one the pipeline checks (the masks SAM makes). A ratio measured / estimate
above 1 means the guard lets through calls that need more than it thinks. Linux only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tests" / "data" / "bottle_demo.png"

_CHILD = r"""
import json, sys
import cv2
import runtime.pipeline as pipeline_module
from runtime.engine.host_memory import mask_bytes
from runtime.image_io import read_image

engine_dir, dataset, category, size, demo = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

counts = []
import runtime.stages.segmenter as segmenter_module
check = segmenter_module.check_mask_memory
def counting(count, image_hw):
    counts.append((count, image_hw))
    check(count, image_hw)
segmenter_module.check_mask_memory = counting

pipeline = pipeline_module.Pipeline.open(engine_dir, dataset=dataset, category=category)
image = read_image(demo)
pipeline(image)  # warm-up: sessions, numba, arenas
large = cv2.resize(image, (size, size))
counts.clear()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
result = pipeline(large)
peak = status("VmHWM")
count, image_hw = counts[-1] if counts else (0, (size, size))
print(json.dumps({"size": size, "regions": count, "rss_before_mb": before / 2**20, "peak_mb": peak / 2**20,
                  "call_mb": (peak - before) / 2**20, "estimate_mb": mask_bytes(count, image_hw) / 2**20,
                  "end_to_end_ms": result.timings_ms["end_to_end"]}))
"""


def measure(engine_dir: Path, dataset: str, category: str, size: int, timeout: float) -> dict[str, Any]:
    """One size in a fresh process; its JSON line, or the reason it failed."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(engine_dir), dataset, category, str(size), str(DEMO)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"size": size, "failed": f"exit {done.returncode}: {tail}"}
    record = json.loads(lines[-1])
    record["measured_over_estimate"] = record["call_mb"] / record["estimate_mb"] if record["estimate_mb"] else None
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.host_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, required=True, help="a `full` profile engines dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per size")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("needs Linux's /proc/self/clear_refs to reset the peak-RSS mark")
    if any(size < 64 for size in args.sizes):
        parser.error("--sizes must be at least 64 pixels")
    from runtime.errors import ManifestError
    from runtime.manifest import load_manifest

    try:
        manifest = load_manifest(args.engine_dir, verify_hashes=False)
    except ManifestError as err:
        parser.error(str(err))
    if manifest.profile != "full":
        parser.error(f"{args.engine_dir} holds {manifest.profile} engines: masks exist only in the full profile")
    runs = []
    print(f"{'size':>6s} {'regions':>8s} {'call MB':>9s} {'estimate MB':>12s} {'ratio':>6s}")
    for size in args.sizes:
        run = measure(args.engine_dir, args.dataset, args.category, size, args.timeout)
        runs.append(run)
        if "failed" in run:
            print(f"{size:6d} failed: {run['failed']}")
        else:
            print(f"{size:6d} {run['regions']:8d} {run['call_mb']:9.0f} {run['estimate_mb']:12.0f} "
                  f"{run['measured_over_estimate'] or 0:6.2f}")
    record = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.experiments.host_memory " + " ".join(sys.argv[1:] if argv is None else argv),
        "engine_dir": str(args.engine_dir), "tiny": manifest.data.get("size") != "full",
        "machine": platform.machine(), "config": f"{args.dataset}/{args.category}", "image": str(DEMO), "runs": runs,
        "estimate": "runtime.engine.host_memory.mask_bytes: 1 byte a region-pixel + 32 bytes a pixel",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if any("failed" in run for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
