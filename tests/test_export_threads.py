"""`export --threads N`: exports sharing a machine each keep to their share of the CPUs."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from export import common  # noqa: E402  (after the torch check)
from export.__main__ import main  # noqa: E402


@pytest.fixture
def restored_threads():
    """The limit is process-wide (torch's pool, the exporter's sessions): put it back after."""
    before = torch.get_num_threads(), common._CPU_THREADS
    yield
    torch.set_num_threads(before[0])
    common._CPU_THREADS = before[1]


def test_parity_sessions_never_spin_and_take_every_cpu_by_default(restored_threads):
    common._CPU_THREADS = 0
    options = common.cpu_session_options()
    assert options.intra_op_num_threads == 0  # onnxruntime's default: every core
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_threads_limit_torch_and_the_parity_sessions(tmp_path, restored_threads):
    out = tmp_path / "engines"
    assert main(["--profile", "lite", "--threads", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1
    assert common.cpu_session_options().intra_op_num_threads == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["saliency"]["parity"]["passed"]


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_below_one_stop_before_any_work(tmp_path, capsys, value):
    out = tmp_path / "engines"
    with pytest.raises(SystemExit) as stop:
        main(["--profile", "lite", "--threads", value, "--out", str(out)])
    assert stop.value.code == 2
    assert f"--threads: expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err
    assert not out.exists()


def test_limit_cpu_threads_refuses_zero(restored_threads):
    with pytest.raises(common.ExportError, match="at least 1, got 0"):
        common.limit_cpu_threads(0)


def test_the_parity_level_is_recorded_in_the_manifest(tmp_path, restored_threads):
    out = tmp_path / "engines"
    assert main(["--profile", "lite", "--parity", "quick", "--threads", "1", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["parity_checks"] == "quick"
