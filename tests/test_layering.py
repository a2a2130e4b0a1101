"""The layering in .importlinter holds: the runtime without torch, export or bench; doors over
outputs over the pipeline over the line side over the stages over the engine; no import circles."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    # lint-imports beside this interpreter: the one the test extra installed
    command = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(command), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "0 broken" in report, report[-4000:]
    assert report.count("KEPT") == 6, report[-4000:]  # every contract was read and checked


def test_importing_the_runtime_loads_no_torch():
    code = "import sys, runtime.infer, runtime.capi._host; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
