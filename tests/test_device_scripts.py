"""The GPU session's shell steps (bench/device/*.sh): a broken one costs a lent GPU's minutes.

Default suite: bash parses each. Slow (`pytest -m slow`): the prepare and measure steps
rehearsed on this CPU with tiny engines, as docs/latency.md ("GPU session") describes, and
what comes back fits the device tool's 8 files a call.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "bench" / "device").glob("*.sh"))
MAX_FILES_BACK = 8  # the device tool returns at most this many files from $OUT per call


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_the_script(script):
    assert shutil.which("bash")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_session_scripts_are_there():
    assert {p.name for p in SCRIPTS} >= {"session.sh", "run.sh", "prepare.sh"}


@pytest.mark.slow
def test_prepare_and_measure_rehearse_on_the_cpu(tmp_path):
    if not (REPO / ".device" / "tokenizer.zip").exists():
        pytest.skip("no .device/tokenizer.zip: run bench/device/prepare.sh first")
    env = {**os.environ, "SAA_DEVICE": "cpu", "PYTHON": sys.executable, "ENGINES_ROOT": str(tmp_path / "engines"),
           "SAA_EXPORT_ARGS": "--tiny --detector-size 224x224", "ITERS": "2", "REF_ITERS": "1", "BUDGET_S": "900"}
    (tmp_path / "engines").mkdir()
    for step in ("prepare", "measure"):
        out = tmp_path / step
        result = subprocess.run(["bash", str(REPO / "bench" / "device" / "session.sh"), step], cwd=REPO,
                                env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        back = [p for p in out.rglob("*") if p.is_file()]
        assert 0 < len(back) <= MAX_FILES_BACK, sorted(p.name for p in back)
    assert (tmp_path / "measure" / "ab-fp16.json").exists()
