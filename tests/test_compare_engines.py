"""bench/compare_engines.py: two engine set-ups on the same parts, compared as the line sees them."""
import json
import os
from pathlib import Path

import pytest

from bench import compare_engines as C
from runtime.stages.regions import Region

BOTTLE = Path(__file__).resolve().parent / "data" / "bottle_demo.png"


def _region(prompt, box, fused=True):
    return Region(box=box, detector_score=0.5, phrase=prompt, prompt_index=0, prompt=prompt, box_area=0.1, in_top_k=fused)


def test_regions_match_one_to_one_within_a_prompt_by_iou():
    faithful = [_region("crack", (0, 0, 10, 10)), _region("hole", (20, 20, 30, 30)), _region("crack", (50, 50, 60, 60)),
                _region("crack", (0, 0, 10, 10), fused=False)]
    other = [_region("crack", (1, 1, 10, 10)), _region("scratch", (20, 20, 30, 30)), _region("crack", (55, 55, 70, 70))]
    # crack 1 matches (IoU 0.81); hole has no hole to match; the second crack overlaps too little (IoU 0.14)
    assert C.match_regions(faithful, other) == {"matched": 1, "only_faithful": 2, "only_other": 2}
    assert C.match_regions([], other) == {"matched": 0, "only_faithful": 0, "only_other": 3}


def test_the_same_engines_under_a_switch_that_changes_nothing_agree_exactly(full_tiny_engine_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SAA_STATIC_SHAPES", raising=False)
    out = tmp_path / "same.json"
    code = C.main([str(BOTTLE), "--engine-dir", str(full_tiny_engine_dir), "--other-env", "SAA_STATIC_SHAPES=0",
                   "--dataset", "mvtec", "--category", "bottle", "--image-threshold", "0.5", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["images"] == 1 and summary["map_max_abs_diff"] == 0.0 and summary["labels_agree"] == 1
    assert summary["map_differing_pixel_share_max"] == 0.0
    assert summary["regions_only_faithful"] == summary["regions_only_other"] == 0 and summary["regions_matched"] > 0
    assert report["other_env"] == {"SAA_STATIC_SHAPES": "0"} and "SAA_STATIC_SHAPES" not in os.environ


def test_an_fp16_head_is_compared_on_what_the_line_sees(full_tiny_engine_dir, tmp_path, capsys):
    from bench.experiments import fp16_head

    variant = tmp_path / "head16"
    assert fp16_head.main(["--engine-dir", str(full_tiny_engine_dir), "--write-engines", str(variant)]) == 0
    out = tmp_path / "head16.json"
    assert C.main([str(BOTTLE), "--engine-dir", str(full_tiny_engine_dir), "--other", str(variant),
                   "--dataset", "mvtec", "--category", "bottle", "--out", str(out)]) == 0
    (image,) = json.loads(out.read_text())["images"]
    assert image["map_max_abs_diff"] > 0  # random tiny weights: the fp16 head moves the detections
    fused = image["regions"]["matched"] + image["regions"]["only_faithful"]
    assert fused > 0 and "label" not in image


def test_joined_captions_are_compared_with_the_reference_algorithm(full_tiny_engine_dir, tmp_path):
    out = tmp_path / "joined.json"
    assert C.main([str(BOTTLE), "--engine-dir", str(full_tiny_engine_dir), "--other-option", "joined_captions=true",
                   "--dataset", "mvtec", "--category", "bottle", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["other_options"] == {"joined_captions": True}
    (image,) = report["images"]
    assert image["map_max_abs_diff"] > 0  # another algorithm: other detections
    assert 0 < image["map_differing_pixel_share"] <= 1


def test_a_bad_other_option_is_one_line(full_tiny_engine_dir, capsys):
    assert C.main([str(BOTTLE), "--engine-dir", str(full_tiny_engine_dir), "--other-option", "joined_captions=2",
                   "--dataset", "mvtec", "--category", "bottle"]) == 2
    assert "joined_captions must be true or false" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ([], "nothing to compare"),
    (["--other-env", "SAA_CUDA_TF32"], "--other-env takes KEY=VALUE"),
    (["--other-option", "joined_captions"], "--other-option expects KEY=VALUE"),
])
def test_bad_requests_are_one_line(full_tiny_engine_dir, capsys, args, message):
    with pytest.raises(SystemExit):
        C.main([str(BOTTLE), "--engine-dir", str(full_tiny_engine_dir), "--dataset", "mvtec", "--category", "bottle", *args])
    assert message in capsys.readouterr().err
