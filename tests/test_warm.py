"""python -m runtime.warm (run by python -m export) compiles every numba kernel a first image needs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cache_entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


def run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_warm_compiles_what_the_first_images_need(full_tiny_engine_dir, lite_engine_dir, data_dir, tmp_path):
    cache = tmp_path / "numba"
    done = run(["runtime.warm", "--engine-dir", str(full_tiny_engine_dir)], cache)
    assert done.returncode == 0 and "compiled the runtime's kernels" in done.stderr, done.stderr
    warmed = cache_entries(cache)
    assert warmed
    memory = tmp_path / "memory.npz"
    good = str(data_dir / "mtd-mini" / "MT_Free" / "Imgs")
    for args in (["runtime.infer", "--engine-dir", str(full_tiny_engine_dir), "--dataset", "mvtec", "--category",
                  "bottle", str(data_dir / "bottle_demo.png"), "--out", str(tmp_path / "full"), "--no-progress"],
                 ["runtime.memory", "--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                  "--good", good, "--out", str(memory)],
                 ["runtime.infer", "--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                  good, "--memory", str(memory), "--out", str(tmp_path / "lite"), "--no-progress"],
                 ["runtime.infer", "--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                  good, "--stream-memory", "300", "--out", str(tmp_path / "stream"), "--no-progress"]):
        done = run(args, cache)
        assert done.returncode == 0, done.stderr
    assert cache_entries(cache) == warmed  # nothing was left to compile on a first image
