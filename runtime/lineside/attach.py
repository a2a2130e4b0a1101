"""Attach the line-side settings to a pipeline: memory, streaming memory, calibration, thresholds.

One function that Pipeline.open calls, so the CLI, the Python API and the C ABI resolve them
the same way: the memory first (the calibration is checked against it), then the calibration's
thresholds, then explicit thresholds, which override the calibration's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .calibration import load_calibration
from .decision import Thresholds
from ..errors import ConfigError
from .normal_memory import NormalMemory
from .stream import StreamingMemory, StreamSettings


def attach(pipeline: Any, calibration: str | Path | None = None, memory: str | Path | NormalMemory | None = None,
           stream_memory: int | None = None, image_threshold: float | None = None,
           pixel_threshold: float | None = None, stream_settings: StreamSettings | None = None) -> None:
    """Set pipeline.memory / .stream / .thresholds / .calibration (see the module doc).

    memory: a memory file or object (few-shot), or with stream_memory the memory the stream starts from.
    stream_memory: capacity (features) of a memory that learns from parts judged normal.
    """
    manifest, extractor = pipeline.manifest, pipeline.saliency
    if stream_memory is not None:
        if isinstance(stream_memory, bool) or not isinstance(stream_memory, int) or stream_memory < 1:
            raise ConfigError(f"--stream-memory must be a capacity >= 1 (features), got {stream_memory!r}")
        if memory is None:
            stream = StreamingMemory.empty(manifest, extractor, stream_memory, stream_settings)
        elif isinstance(memory, NormalMemory):
            stream = StreamingMemory(memory, stream_settings)
        else:
            stream = StreamingMemory.load(memory, stream_memory, stream_settings)
        stream.memory.check_binding(manifest, extractor, memory or "stream memory")
        pipeline.stream, pipeline.memory = stream, stream.memory
    elif memory is not None:
        loaded = memory if isinstance(memory, NormalMemory) else NormalMemory.load(memory)
        loaded.check_binding(manifest, extractor, "memory" if isinstance(memory, NormalMemory) else memory)
        pipeline.memory = loaded
    thresholds = Thresholds()
    if calibration is not None:
        loaded_calibration = load_calibration(calibration)
        loaded_calibration.check(pipeline)
        pipeline.calibration = loaded_calibration
        thresholds = loaded_calibration.thresholds
    pipeline.thresholds = Thresholds(thresholds.image if image_threshold is None else image_threshold,
                                     thresholds.pixel if pixel_threshold is None else pixel_threshold).checked()


__all__ = ["attach"]
