"""The runtime's built-in graphs (runtime/data/graphs/*.onnx) are what export/builtin_graphs.py builds."""
from __future__ import annotations

import pytest

from runtime.engine import sessions as S
from runtime.errors import EngineError

onnx = pytest.importorskip("onnx")
from export import builtin_graphs as B  # noqa: E402 (needs onnx)


@pytest.mark.parametrize("name", sorted(B.BUILDERS))
def test_each_file_is_its_builders_output(name):
    assert S.builtin_graph(name) == B.BUILDERS[name](), f"run python -m export.builtin_graphs ({name} is stale)"


def test_every_file_has_a_builder():
    assert sorted(path.stem for path in S.GRAPH_DIR.glob("*.onnx")) == sorted(B.BUILDERS)
    assert B.GRAPH_DIR == S.GRAPH_DIR


def test_check_and_write_commands(tmp_path, capsys):
    assert B.main(["--check", "--out", str(tmp_path)]) == 1  # empty folder: every graph missing
    assert "differ from their builders" in capsys.readouterr().err
    assert B.main(["--out", str(tmp_path)]) == 0
    assert B.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "mask_sums.onnx").write_bytes(b"stale")
    assert B.main(["--check", "--out", str(tmp_path)]) == 1
    assert "mask_sums" in capsys.readouterr().err


def test_a_missing_graph_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "GRAPH_DIR", tmp_path)
    with pytest.raises(EngineError, match="built-in graph 'mask_upscale' is missing from this installation"):
        S.builtin_graph_session("mask_upscale", "cpu")
