"""Importing the authors' groundingdino-py package in tests (skipped where it is not installed).

The package's visualiser imports pycocotools at import time; the tests never use it, so an
empty stand-in is put in sys.modules for the duration of the import when it is missing.
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import Iterator

import pytest


@contextmanager
def official_groundingdino() -> Iterator[None]:
    """Skip the test unless groundingdino is importable; inside the block its modules import."""
    pytest.importorskip("groundingdino")
    stubbed = []
    try:
        import pycocotools.mask  # noqa: F401  (imported by the package's visualizer only)
    except ImportError:
        for name in ("pycocotools", "pycocotools.mask"):
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    try:
        yield
    finally:
        for name in stubbed:
            del sys.modules[name]
