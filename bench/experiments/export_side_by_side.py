"""`python -m bench.experiments.export_side_by_side OUT.json`: two exports sharing a machine, with and without --threads.

Times tiny full exports: one alone, two side by side each taking every CPU (torch's and
onnxruntime's defaults), and two side by side with `--threads 1` each. The GPU benchmark
(bench/gpu) runs exports side by side; this is the check, on any machine, that splitting the
CPUs between them is not slower than letting them fight.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

EXPORT = [sys.executable, "-m", "export", "--profile", "full", "--tiny", "--random-init",
          "--detector-size", "224x224", "--force"]


def side_by_side(count: int, extra: Sequence[str], scratch: Path) -> float:
    """Wall seconds for `count` exports started together."""
    start = time.monotonic()
    procs = [subprocess.Popen([*EXPORT, *extra, "--out", str(scratch / f"engines-{i}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(count)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"export failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return round(time.monotonic() - start, 2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.export_side_by_side", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/export-side-by-side"))
    args = parser.parse_args(argv)
    runs = []
    for rep in range(args.reps):
        runs.append({"rep": rep, "one_alone_s": side_by_side(1, [], args.scratch),
                     "two_default_s": side_by_side(2, [], args.scratch),
                     "two_threads1_s": side_by_side(2, ["--threads", "1"], args.scratch)})
        print(runs[-1], flush=True)
    args.out.write_text(json.dumps({
        "what": "wall seconds of tiny full exports (" + " ".join(EXPORT[1:]) + "): one alone; two side by side "
                "taking every CPU; two side by side with --threads 1 each",
        "cpus": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "load_average_after": os.getloadavg(), "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
