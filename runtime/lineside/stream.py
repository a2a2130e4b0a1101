"""Streaming memory: a line that starts with few or no good images learns normal parts as it runs.

After each part is scored, `StreamingMemory.observe` decides whether to add its features to
the bounded NormalMemory. What keeps defects out (the guard), in order:

1. warm-up: nothing is learned until the gate's window holds `warmup` comparable scores. Scores
   of the zero-shot map (memory still empty) and of the memory map have different scales, so
   the window restarts (and so does the warm-up) when the first features are learned.
2. image gate: a part is learned only when its pred_score is at or below the `quantile`
   (default: the median) of the last `window` scores: a line is mostly good, so a part in
   the quieter half is very likely good. With an image threshold set, its score must also be
   below threshold * (1 - margin): clearly OK, not just OK.
3. position guard: in a learned part, positions whose saliency is above the part's own
   `pixel_quantile` (or whose anomaly map exceeds pixel threshold * (1 - margin), when one is
   set) are suspicious; they and every position within `radius` grid cells of them are
   never learned.

Learning is bounded: the memory's coreset keeps at most its capacity (see runtime.memory).
The stream's state (memory, window, counters) saves to one .npz and resets through
Pipeline.reset_memory().
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .. import manifest as mf
from .decision import Thresholds
from ..errors import ConfigError
from .normal_memory import MemorySettings, NormalMemory, SaliencyGrids, as_rows

STREAM_STATE = "saa-stream-state"


@dataclass(frozen=True)
class StreamSettings:
    warmup: int = 16  # parts only scored before anything is learned
    window: int = 64  # recent scores the image gate compares with
    quantile: float = 0.5  # image gate: score <= this quantile of the window
    margin: float = 0.1  # with thresholds: score < image * (1 - margin); positions > pixel * (1 - margin) guarded
    pixel_quantile: float = 0.9  # positions above this quantile of the part's saliency are never learned
    radius: int = 2  # ... nor positions within this many grid cells of a guarded one

    def checked(self) -> "StreamSettings":
        checks = [
            (isinstance(self.warmup, int) and self.warmup >= 1, "warmup must be an integer >= 1"),
            (isinstance(self.window, int) and self.window >= 1, "window must be an integer >= 1"),
            (isinstance(self.quantile, (int, float)) and 0.0 < self.quantile <= 1.0, "quantile must be in (0, 1]"),
            (isinstance(self.margin, (int, float)) and 0.0 <= self.margin < 1.0, "margin must be in [0, 1)"),
            (isinstance(self.pixel_quantile, (int, float)) and 0.0 < self.pixel_quantile <= 1.0,
             "pixel_quantile must be in (0, 1]"),
            (isinstance(self.radius, int) and self.radius >= 0, "radius must be an integer >= 0"),
        ]
        for ok, rule in checks:
            if not ok:
                raise ConfigError(f"stream memory: {rule}")
        return self


@dataclass
class StreamEvent:
    """What the stream did with one part (AnomalyResult.stream and the regions JSON)."""

    serial: int  # the part's number in the stream (1-based)
    learned: int  # features added to the memory
    reason: str  # why (not) learned
    memory_serial: int | None = None  # the image serial its features carry in memory.sources

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StreamingMemory:
    """A NormalMemory that grows from the parts judged normal, behind the guard above."""

    def __init__(self, memory: NormalMemory, settings: StreamSettings | None = None) -> None:
        self.memory = memory
        self.settings = (settings or StreamSettings()).checked()
        self._lock = threading.Lock()
        self.seen = 0
        self.learned_parts = 0
        self.scores: deque[float] = deque(maxlen=self.settings.window)
        self.scale = "memory" if len(memory) else "zero-shot"  # which map the window's scores come from

    @classmethod
    def empty(cls, manifest: mf.Manifest, extractor: Any, capacity: int,
              settings: StreamSettings | None = None) -> "StreamingMemory":
        return cls(NormalMemory.empty(manifest, extractor, MemorySettings(capacity=capacity)), settings)

    # ------------------------------------------------------------------ the guard

    def gate(self, score: float, thresholds: Thresholds) -> str | None:
        """None when the part may be learned, else the reason it may not (the window holds earlier
        scores of the same map, not this one)."""
        if len(self.scores) < self.settings.warmup:
            return f"warm-up ({len(self.scores) + 1} of {self.settings.warmup} {self.scale} scores)"
        if thresholds.image is not None and not score < thresholds.image * (1.0 - self.settings.margin):
            return "score not clearly below the image threshold"
        recent = np.asarray(self.scores, np.float64)
        if len(recent) and score > np.quantile(recent, self.settings.quantile):
            return f"score above the {self.settings.quantile:g} quantile of the last {len(recent)} parts"
        return None

    def learnable(self, grids: SaliencyGrids, anomaly_map: np.ndarray | None, thresholds: Thresholds) -> np.ndarray:
        """bool [h, w]: grid positions far from anything suspicious in this part."""
        grid = grids.grid
        suspicious = grid > np.quantile(grid, self.settings.pixel_quantile)
        if thresholds.pixel is not None and anomaly_map is not None:
            above = (np.asarray(anomaly_map) > thresholds.pixel * (1.0 - self.settings.margin)).astype(np.float32)
            # a grid cell is suspicious when any pixel under it is (area average > 0)
            suspicious |= cv2.resize(above, grid.shape[::-1], interpolation=cv2.INTER_AREA) > 0
        if self.settings.radius:
            side = 2 * self.settings.radius + 1
            suspicious = cv2.dilate(suspicious.astype(np.uint8), np.ones((side, side), np.uint8)) > 0
        return ~suspicious

    def observe(self, score: float, grids: SaliencyGrids, anomaly_map: np.ndarray | None,
                thresholds: Thresholds) -> StreamEvent:
        """Record a scored part and learn from it if the guard lets it through."""
        with self._lock:
            self.seen += 1
            serial = self.seen
            scale = "zero-shot" if grids.memory_grid is None else "memory"
            if scale != self.scale:  # the map changed: earlier scores are not comparable
                self.scores.clear()
                self.scale = scale
            reason = self.gate(score, thresholds)
            self.scores.append(float(score))
            if reason is not None:
                return StreamEvent(serial, 0, reason)
            keep = self.learnable(grids, anomaly_map, thresholds).reshape(-1)
            positions = np.flatnonzero(keep)
            rows = as_rows(grids.features)[positions]
            memory_serial = self.memory.new_serial()
            self.memory.add(rows, memory_serial, positions)
            self.learned_parts += 1
            return StreamEvent(serial, int(len(positions)), "learned", memory_serial)

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Memory back to where it started (loaded or empty); window and counters cleared."""
        with self._lock:
            self.memory.reset()
            self.seen = self.learned_parts = 0
            self.scores.clear()
            self.scale = "memory" if len(self.memory) else "zero-shot"

    def state(self) -> dict[str, Any]:
        return {"format": STREAM_STATE, "settings": asdict(self.settings), "seen": self.seen,
                "learned_parts": self.learned_parts, "scores": list(self.scores), "scale": self.scale}

    def save(self, path: str | Path) -> str:
        """Memory and stream state in one .npz; returns the memory's content sha256."""
        return self.memory.save(path, extra=self.state())

    @classmethod
    def load(cls, path: str | Path, capacity: int | None = None,
             settings: StreamSettings | None = None) -> "StreamingMemory":
        """A saved stream (or a plain memory file, to start a stream from it). `capacity` replaces
        the memory's; `settings` replaces the saved stream settings."""
        memory, extra, _ = NormalMemory.load_with_state(path)
        if capacity is not None:
            if len(memory) > capacity:
                raise ConfigError(f"{path}: the memory holds {len(memory)} features, more than --stream-memory "
                                  f"{capacity}")
            memory.settings = MemorySettings(**{**asdict(memory.settings), "capacity": capacity}).checked()
            memory.mark_initial()
        state = extra if isinstance(extra, dict) and extra.get("format") == STREAM_STATE else None
        if settings is None and state is not None:
            settings = StreamSettings(**state["settings"])
        stream = cls(memory, settings)
        if state is not None:
            stream.seen, stream.learned_parts = int(state["seen"]), int(state["learned_parts"])
            stream.scores.extend(float(v) for v in state["scores"])
            stream.scale = state.get("scale", stream.scale)
        return stream


__all__ = ["StreamEvent", "StreamSettings", "StreamingMemory"]
