"""Shared test setup: markers, thread limits, and the real images copied into tests/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two cores on CI: keep onnxruntime/numba/BLAS from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

DATA = Path(__file__).parent / "data"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; run with -m slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device and onnxruntime-gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="no CUDA execution provider on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


from conftest_engines import full_tiny_engine_dir, full_tiny_standard_engine_dir, lite_engine_dir  # noqa: E402,F401  (shared session fixtures)
