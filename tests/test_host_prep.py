"""bench.experiments.host_prep times the input preparation alone and appends runs to one JSON file."""
import json

from bench.experiments import host_prep


def test_runs_are_timed_and_appended(full_tiny_engine_dir, tmp_path, capsys):
    out = tmp_path / "prep.json"
    for label in ("first", "second"):
        assert host_prep.main(["--engine-dir", str(full_tiny_engine_dir), "--iters", "2", "--label", label,
                               "--out", str(out)]) == 0
    runs = json.loads(out.read_text())
    assert [run["label"] for run in runs] == ["first", "second"]
    assert all(run["gdino_input_ms"] > 0 and run["sam_input_ms"] > 0 for run in runs)
    steps = ("gdino_resize_ms", "gdino_normalise_ms", "sam_resize_ms", "sam_normalise_ms")
    assert all(run[step] > 0 for run in runs for step in steps)
    assert runs[0]["runtime"].endswith("runtime") and "SAM input" in capsys.readouterr().out
    assert host_prep.main(["--engine-dir", str(tmp_path / "missing")]) == 2
