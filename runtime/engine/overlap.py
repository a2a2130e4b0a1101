"""A second thread for stages that need only the image, started once enough calls have run.

With EngineSettings.overlap, SAM's image encoding and the one-object saliency run here while
GroundingDINO's head runs: on a GPU their host work and kernels hide behind the head's device time.
Calls before `after_calls` full calls run everything in order: CUDA graphs are captured in the
first two (onnxruntime runs a graph once, then captures it), and a capture must not share the
device with another thread's launches.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

OVERLAP_AFTER_CALLS = 3


class SideThread:
    def __init__(self, enabled: bool, after_calls: int = OVERLAP_AFTER_CALLS) -> None:
        self.enabled = enabled
        self.after_calls = after_calls
        self.calls = 0
        self._executor: ThreadPoolExecutor | None = None  # started on first use

    def submit(self, work: Callable[..., Any], *args: Any) -> Future | None:
        """Counts a call; past `after_calls` (and when enabled), `work(*args)` in the second thread."""
        self.calls += 1
        if not self.enabled or self.calls <= self.after_calls:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saa-overlap")
        return self._executor.submit(work, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
