"""The PyTorch reference in a process of its own, for timing it beside the runtime.

    with ReferenceProcess(engine_dir, config, device="cpu", threads=2) as reference:
        reference.ready             # {"parity": ..., "notes": [...]} (ReferenceLoadError text on failure)
        out = reference(image)      # {"timings_ms": {...}, "anomaly_map": ..., "saliency_map": ..., "defect_boxes": ...}

Why a process (a fresh interpreter): torch ships its own libgomp and numba's OpenMP threading layer loads the
system's; with both in one process the reference's GroundingDINO ran ~10x slower after a single
numba saliency call (tiny engines: 195 ms alone, 1.9 s after; the full-size ViT-B run: 215 s
instead of 35 s), which would flatter the runtime. Each side in its own process keeps its own
thread pools; bench.latency alternates calls between them.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from runtime.config import PromptConfig


class ReferenceProcessError(RuntimeError):
    """The reference could not be built or failed in its process; the message says why."""


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss survives exec, so a spawned child
    would report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


REPO = Path(__file__).resolve().parents[2]


def _serve(conn: Connection) -> None:
    try:
        engine_dir, config, device, threads, check_parity = conn.recv()
        import torch

        from bench.reference.load import ReferenceLoadError, build_reference, check_parity as parity_of, load_reference_models

        if threads:
            torch.set_num_threads(threads)
        try:
            models = load_reference_models(engine_dir)
            parity = parity_of(models) if check_parity else {}
            if device != "cpu":
                models = load_reference_models(engine_dir, device=device)
        except ReferenceLoadError as err:
            conn.send(("error", str(err)))
            return
        reference = build_reference(models, config)
        conn.send(("ready", {"parity": parity, "notes": list(models.notes)}))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            if message[0] == "stats":
                gpu = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" and torch.cuda.is_available() else None
                conn.send(("stats", {"peak_rss_mb": _peak_rss_mb(), "gpu_memory_peak_mb": gpu}))
                continue
            with torch.inference_mode():
                out = reference(message[1])
            conn.send(("done", {"timings_ms": dict(out.timings_ms), "anomaly_map": getattr(out, "anomaly_map", None),
                                "saliency_map": out.saliency_map, "defect_boxes": getattr(out, "defect_boxes", None),
                                "defect_scores": getattr(out, "defect_scores", None)}))
    except Exception:  # anything else: the parent gets the traceback as text, not a hung pipe
        conn.send(("error", traceback.format_exc()))


class ReferenceProcess:
    """A spawned process holding the reference models; call it with an image (uint8 HxWx3 BGR)."""

    def __init__(self, engine_dir: str | Path, config: PromptConfig, device: str = "cpu", threads: int = 0,
                 check_parity: bool = True) -> None:
        # A fresh interpreter (`python -m bench.reference.worker FD`), not multiprocessing's spawn,
        # which would re-run the caller's main script in the child.
        self._conn, child = multiprocessing.Pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen([sys.executable, "-m", "bench.reference.worker", str(child.fileno())],
                                         pass_fds=[child.fileno()], cwd=REPO, env=env)
        child.close()
        self._conn.send((str(Path(engine_dir).resolve()), config, device, threads, check_parity))
        self.ready = self._receive("ready")

    def _receive(self, expected: str) -> Any:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise ReferenceProcessError(f"the reference process exited (code {self._process.wait()})") from None
        if kind == "error":
            self.close()
            raise ReferenceProcessError(payload)
        if kind != expected:
            raise ReferenceProcessError(f"reference process answered {kind!r}, expected {expected!r}")
        return payload

    def __call__(self, image: np.ndarray) -> dict[str, Any]:
        self._conn.send(("call", image))
        return self._receive("done")

    def stats(self) -> dict[str, Any]:
        self._conn.send(("stats",))
        return self._receive("stats")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._conn.send(("stop",))
                self._process.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._conn.close()

    def __enter__(self) -> "ReferenceProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
