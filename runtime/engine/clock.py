"""The engine clock: milliseconds each thread spends inside onnxruntime, and stage timing on it."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class _EngineClock(threading.local):
    """Milliseconds this thread has spent inside onnxruntime: runs, and their copies to and from the device.

    The pipeline reads it around each stage, so a stage's time splits into the engines' share and
    the host work around them (AnomalyResult.engine_ms; bench.latency prints both). On a GPU a
    run returns once its results are ready, so the share includes the device's compute."""

    def __init__(self) -> None:
        self.ms = 0.0


ENGINE_CLOCK = _EngineClock()


@contextmanager
def engine_time() -> Iterator[None]:
    """Count the enclosed onnxruntime run(s) on ENGINE_CLOCK."""
    start = time.perf_counter()
    try:
        yield
    finally:
        ENGINE_CLOCK.ms += (time.perf_counter() - start) * 1000.0


ENGINE = "engine:"  # prefix of a stage's engine share among the timings while a call collects them


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the stage's wall time to timings[stage], and its onnxruntime share to timings[ENGINE + stage]."""
    start, engine_start = time.perf_counter(), ENGINE_CLOCK.ms
    yield
    timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0
    timings[ENGINE + stage] = timings.get(ENGINE + stage, 0.0) + ENGINE_CLOCK.ms - engine_start


def split_engine_share(timings: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(wall time per stage, onnxruntime's share per stage with their end_to_end sum) of a call's timings."""
    wall = {k: v for k, v in timings.items() if not k.startswith(ENGINE)}
    engine = {k[len(ENGINE):]: v for k, v in timings.items() if k.startswith(ENGINE)}
    engine["end_to_end"] = sum(engine.values())
    return wall, engine
