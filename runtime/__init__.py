"""SAA+ edge runtime: zero-shot industrial anomaly segmentation on onnxruntime (no torch).

    from runtime import Pipeline, read_image
    with Pipeline.open("engines/", dataset="mtd", category="mtd") as pipeline:
        result = pipeline(read_image("part.png"))      # AnomalyResult: map, regions, score, OK/NG

The names below are loaded on first use, so that `import runtime.errors` (or the C ABI's build
helpers) does not pull in onnxruntime, OpenCV and numba.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "Pipeline": "runtime.pipeline",
    "AnomalyResult": "runtime.result",
    "EngineSettings": "runtime.settings",
    "read_image": "runtime.image_io",
    "SaaError": "runtime.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
