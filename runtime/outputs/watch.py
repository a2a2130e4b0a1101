"""Watching a folder for new parts (`python -m runtime.infer --watch`): camera software that saves
each frame into a folder (a network share, say) feeds the runtime without a line of code.

Only images that arrive after the watch starts are taken (a camera folder can hold years of old
frames; run the batch mode for those). A file is taken once two polls in a row saw the same size
and modification time, so a frame still being written is not read half-way. The watch ends on
Ctrl-C, after `stop_after` images, or after `idle_s` seconds without a new one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

from ..inputs import list_images

POLL_S = 0.5


class FolderWatch:
    """Iterates over the new, completely written images under `folder` as they arrive."""

    def __init__(self, folder: Path, exclude: Path | None = None, poll_s: float = POLL_S, idle_s: float | None = None,
                 stop_after: int | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.folder, self.exclude = Path(folder), exclude
        self.poll_s, self.idle_s, self.stop_after = poll_s, idle_s, stop_after
        self._clock, self._sleep = clock, sleep
        self.existing = set(self._images())  # there before the watch: left alone
        self.taken = 0

    def _images(self) -> list[Path]:
        return list_images([self.folder], exclude=self.exclude)

    def __iter__(self) -> Iterator[Path]:
        done = set(self.existing)
        last_seen: dict[Path, tuple[int, int]] = {}  # new files still settling: their size and mtime
        last_new = self._clock()
        while self.stop_after is None or self.taken < self.stop_after:
            for path in self._images():
                if path in done:
                    continue
                try:
                    stat = path.stat()
                except OSError:  # gone again (a camera's temporary file)
                    last_seen.pop(path, None)
                    continue
                state = (stat.st_size, stat.st_mtime_ns)
                if state[0] > 0 and last_seen.get(path) == state:
                    done.add(path)
                    last_seen.pop(path)
                    self.taken += 1
                    yield path
                    last_new = self._clock()
                    if self.stop_after is not None and self.taken >= self.stop_after:
                        return
                else:
                    last_seen[path] = state
            if self.idle_s is not None and self._clock() - last_new >= self.idle_s:
                return
            self._sleep(self.poll_s)
