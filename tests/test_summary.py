"""runtime/outputs/summary.py: the run's table, one row per input."""
import csv

import numpy as np

from runtime.pipeline import AnomalyResult
from runtime.stages.regions import Region
from runtime.outputs.summary import COLUMNS, RunSummary


def _region(phrase, score, fused):
    return Region(box=(0, 0, 4, 4), detector_score=0.5, phrase=phrase, prompt_index=0, prompt=f"{phrase} prompt", box_area=0.1,
                  score=score, in_top_k=fused)


def test_rows_name_the_best_fused_region_and_the_label(tmp_path):
    result = AnomalyResult(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32),
                           [_region("crack", 0.9, False), _region("black hole", 0.4, True), _region("scratch", 0.7, True)],
                           [], False, timings_ms={"end_to_end": 12.345}, pred_score=0.71234567, pred_label=1)
    with RunSummary(tmp_path) as summary:
        summary.add(tmp_path / "a.png", "a", result)
        result.pred_label, result.regions = 0, []
        summary.add(tmp_path / "b.png", "b", result)
        summary.add_failure(tmp_path / "c.png", "c", "c.png: not a readable image")
    with open(tmp_path / "summary.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert tuple(rows[0]) == COLUMNS
    assert rows[0] == {"image": str(tmp_path / "a.png"), "outputs": "a", "status": "ok", "image_score": "0.712346",
                       "label": "NG", "exact": "yes", "fused_regions": "2", "top_prompt": "scratch prompt", "top_phrase": "scratch", "top_score": "0.7",
                       "end_to_end_ms": "12.3", "error": ""}
    assert rows[1]["label"] == "OK" and rows[1]["fused_regions"] == "0" and rows[1]["top_phrase"] == ""
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "c.png: not a readable image" and rows[2]["image_score"] == ""
    assert summary.error is None


def test_a_long_watch_keeps_the_highest_parts_and_latest_failures_in_memory(tmp_path, monkeypatch):
    from runtime.outputs import summary as summary_module

    monkeypatch.setattr(summary_module, "KEEP_ROWS", 3)
    with RunSummary(tmp_path) as summary:
        for index in range(20):
            result = AnomalyResult(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), [], [], True,
                                   pred_score=float(index % 7))
            summary.add(tmp_path / f"{index}.png", str(index), result)
            summary.add_failure(tmp_path / f"bad{index}.png", f"bad{index}", "empty file")
    assert summary.counts == {"ok": 20, "failed": 20} and len(summary.rows) <= 12
    kept = [float(r["image_score"]) for r in summary.rows if r["status"] == "ok"]
    assert sorted(kept, reverse=True)[:3] == [6.0, 6.0, 5.0]
    assert [r["outputs"] for r in summary.rows if r["status"] == "failed"][-1] == "bad19"
    with open(tmp_path / "summary.csv", newline="") as table:
        assert len(list(csv.DictReader(table))) == 40  # the table keeps every row
