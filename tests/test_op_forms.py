"""bench/gpu/op_forms.py: each case's forms export, agree, and are timed (small shapes here)."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from bench.gpu import op_forms  # noqa: E402


def test_every_case_exports_agreeing_forms_and_times_them(monkeypatch, tmp_path):
    monkeypatch.setattr(op_forms, "LEVELS", ((8, 8), (4, 4), (2, 2), (1, 1)))
    small = {
        "window_pad": lambda captions, device: op_forms._window_pad_case(channels=16, size=20, window=14),
        "sam_attention": lambda captions, device: op_forms._sam_attention_case(dim=32, heads=2, size=8),
        "deformable_sum": op_forms._deformable_case,
    }
    monkeypatch.setattr(op_forms, "CASES", small)
    out = tmp_path / "forms.json"
    assert op_forms.main(["--device", "cpu", "--captions", "2", "--iters", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["cases"]) == set(small)
    expected_forms = {"window_pad": {"pad", "concat"}, "sam_attention": {"plain", "mha", "augmented"},
                      "deformable_sum": {"per_point", "per_level", "fused"}}  # fused: the op library is built
    for case, record in report["cases"].items():
        assert set(record["forms"]) == expected_forms[case]
        assert all(form["p50_ms"] > 0 for form in record["forms"].values())
        # forms of one case compute the same thing
        assert record["max_abs_diff_between_forms"] <= 1e-4 * max(1.0, record["output_scale"]), case
        first = next(iter(record["forms"].values()))
        assert first["max_abs_diff"] == 0.0 and all(form["cuda_graph"] is None for form in record["forms"].values())
    check = report["cases"]["deformable_sum"]["kernel_check"]  # the pipeline's own check: no CUDA kernel on a CPU
    assert check["checked"] is False and check["fallback"] is None and "CPU" in check["library"]
    assert report["small"] is False


def test_small_layers_rehearse_the_deformable_case(tmp_path):
    """`--small` (the rehearsal of `python -m bench.gpu` on a CPU): the same forms, small levels."""
    out = tmp_path / "forms.json"
    assert op_forms.main(["--device", "cpu", "--small", "--case", "deformable_sum", "--iters", "1", "--captions", "1",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["small"] and set(report["cases"]["deformable_sum"]["forms"]) == {"per_point", "per_level", "fused"}
