"""Engines dirs exported once per test session, for tests that need a real pipeline.

tests/conftest.py makes the fixtures visible to every test file with
    from conftest_engines import full_tiny_engine_dir, lite_engine_dir  # noqa: F401
A test file may import them too: exports are memoised per process, so two fixture
definitions still export once.

The export runs `python -m export` in a subprocess (torch stays out of the test
process, and the command is the README's). To reuse engines exported earlier, set
SAA_TEST_LITE_ENGINES / SAA_TEST_FULL_TINY_ENGINES to their folders.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LITE_ARGS = ("--profile", "lite")
# 224x224: the smallest detector input with more image positions than GroundingDINO's 900 queries.
FULL_TINY_ARGS = ("--profile", "full", "--tiny", "--random-init", "--detector-size", "224x224")

# The same, with GroundingDINO's deformable attention in standard ONNX ops instead of the runtime's custom op.
FULL_TINY_STANDARD_ARGS = FULL_TINY_ARGS + ("--deformable-attention", "standard")

_exported: dict[tuple[str, ...], Path] = {}


class ExportFailed(RuntimeError):
    """`python -m export` exited non-zero; the message ends with its stderr."""


def export_engines(out: Path, args: tuple[str, ...], timeout: float = 900) -> Path:
    """Run `python -m export ARGS --out OUT` and return OUT (its manifest is checked to exist)."""
    command = [sys.executable, "-m", "export", *args, "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not (out / "manifest.json").is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise ExportFailed(f"{' '.join(command[1:])} failed (exit {done.returncode}):\n{tail}")
    return out


def session_engines(factory: pytest.TempPathFactory, args: tuple[str, ...], name: str, env_var: str) -> Path:
    """The engines for `args`, exported on first use in this process (or taken from env_var)."""
    preset = os.environ.get(env_var)
    if preset:
        return Path(preset)
    if args not in _exported:
        try:
            _exported[args] = export_engines(factory.mktemp(name) / "engines", args)
        except ExportFailed as err:
            pytest.fail(str(err), pytrace=False)
    return _exported[args]


@pytest.fixture(scope="session")
def lite_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lite` profile: the real EfficientNet-Lite0 saliency CNN, saliency-only maps."""
    return session_engines(tmp_path_factory, LITE_ARGS, "lite", "SAA_TEST_LITE_ENGINES")


@pytest.fixture(scope="session")
def full_tiny_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`full` profile with tiny random-weight GroundingDINO and SAM: the whole pipeline, fast."""
    return session_engines(tmp_path_factory, FULL_TINY_ARGS, "full_tiny", "SAA_TEST_FULL_TINY_ENGINES")


@pytest.fixture(scope="session")
def full_tiny_standard_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`full` tiny, its head exported with --deformable-attention standard (grid_sample, no custom op)."""
    return session_engines(tmp_path_factory, FULL_TINY_STANDARD_ARGS, "full_tiny_standard",
                           "SAA_TEST_FULL_TINY_STANDARD_ENGINES")
