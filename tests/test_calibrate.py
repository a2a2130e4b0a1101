"""Calibration: the threshold rules on fixed scores, the CLI on real MTD images (thresholds
reproduce, infer uses them), and refusal of a calibration made for other engines, config or memory."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from runtime import calibrate as calibrate_cli
from runtime.inputs import list_parts
from runtime.lineside import calibration as cal
from runtime import infer
from runtime.errors import ConfigError
from runtime.lineside.normal_memory import MemorySettings, NormalMemory
from runtime.pipeline import Pipeline
from runtime.outputs.summary import COLUMNS


# ---------------------------------------------------------------- rules


def test_false_reject_rule_on_fixed_scores():
    scores = [0.3, 0.1, 0.5, 0.2, 0.4, 0.9, 0.6, 0.7, 0.8, 0.35]
    threshold, how = cal.false_reject_threshold(scores, 0.0)
    assert threshold == 0.9 and "largest of 10" in how  # nothing good rejected
    threshold, _ = cal.false_reject_threshold(scores, 0.1)  # one of ten may fail
    assert threshold == pytest.approx((0.8 + 0.9) / 2)
    threshold, _ = cal.false_reject_threshold(scores, 0.25)  # floor(2.5) = 2 may fail
    assert threshold == pytest.approx((0.7 + 0.8) / 2) and sum(s > threshold for s in scores) == 2
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="false-reject rate"):
            cal.false_reject_threshold(scores, bad)
    with pytest.raises(ConfigError, match="no good parts"):
        cal.false_reject_threshold([], 0.0)


def brute_force_f1(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    predicted = scores > threshold
    tp = np.sum(predicted & labels)
    return 2 * tp / (predicted.sum() + labels.sum())


def test_max_f1_rule_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.random(60) < 0.3
        labels[0] = True
        scores = np.round(rng.random(60) + labels * rng.random(60), 2)  # rounding makes ties
        threshold, f1 = cal.max_f1_threshold(scores, labels)
        candidates = np.r_[np.unique(scores) - 1e-9, np.unique(scores)]
        best = max(brute_force_f1(scores, labels, t) for t in candidates)
        assert f1 == pytest.approx(best) and brute_force_f1(scores, labels, threshold) == pytest.approx(best)
    with pytest.raises(ConfigError, match="at least one defect"):
        cal.max_f1_threshold(np.array([0.1, 0.2]), np.array([False, False]))


def test_list_parts_skips_masks(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    for name in ("a.jpg", "a.png", "b.png", "b_mask.png", "c.jpg"):  # MTD: a.png is a.jpg's mask
        cv2.imwrite(str(tmp_path / name), image)
    parts = list_parts(tmp_path)
    assert [(p.name, m.name if m else None) for p, m in parts] == [
        ("a.jpg", "a.png"), ("b.png", "b_mask.png"), ("c.jpg", None)]
    folder = tmp_path / "layout"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    cv2.imwrite(str(folder / "images" / "x.png"), image)
    cv2.imwrite(str(folder / "masks" / "x.png"), image)
    assert list_parts(folder) == [(folder / "images" / "x.png", folder / "masks" / "x.png")]
    # subfolders are read, as runtime.infer reads them (MTD keeps its images in <class>/Imgs/)
    nested = tmp_path / "nested"
    for sub in ("MT_Free/Imgs", "MT_Crack/Imgs", ".hidden"):
        (nested / sub).mkdir(parents=True)
    for name in ("MT_Free/Imgs/f.jpg", "MT_Free/Imgs/f.png", "MT_Crack/Imgs/c.jpg", "MT_Crack/Imgs/c.png", ".hidden/h.jpg"):
        cv2.imwrite(str(nested / name), image)
    (nested / "results").mkdir()  # an earlier runtime.infer run's outputs
    cv2.imwrite(str(nested / "results" / "f_overlay.png"), image)
    (nested / "results" / "summary.csv").write_text(",".join(COLUMNS) + "\n")
    assert [(str(p.relative_to(nested)), m.name) for p, m in list_parts(nested)] == [
        ("MT_Crack/Imgs/c.jpg", "c.png"), ("MT_Free/Imgs/f.jpg", "f.png")]
    with pytest.raises(ConfigError, match="not a folder"):
        list_parts(tmp_path / "missing")


# ---------------------------------------------------------------- the CLI on real images


@pytest.fixture(scope="module")
def parts(tmp_path_factory, data_dir):
    """mtd-mini as calibration folders: good (MT_Free) and defects (blowhole + crack, masks beside)."""
    root = tmp_path_factory.mktemp("parts")
    shutil.copytree(data_dir / "mtd-mini" / "MT_Free" / "Imgs", root / "good")
    (root / "defects").mkdir()
    for kind in ("MT_Blowhole", "MT_Crack"):
        for file in (data_dir / "mtd-mini" / kind / "Imgs").iterdir():
            shutil.copy(file, root / "defects" / file.name)
    return root


def run_calibrate(engine_dir, out, *extra):
    return calibrate_cli.main(["--engine-dir", str(engine_dir), "--dataset", "mtd", "--category", "mtd", "--out", str(out),
                     *map(str, extra)])


def test_calibration_reproduces_and_infer_uses_it(lite_engine_dir, parts, tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert run_calibrate(lite_engine_dir, first, "--good", parts / "good", "--defects", parts / "defects") == 0
    assert run_calibrate(lite_engine_dir, second, "--good", parts / "good", "--defects", parts / "defects") == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["thresholds"] == b["thresholds"] and a["scores"] == b["scores"]  # same images, same thresholds
    assert len(a["images"]["good"]) == 2 and len(a["images"]["defects"]) == 2  # the .png masks are not parts
    assert "max image F1" in a["rules"]["image"] and "max pixel F1" in a["rules"]["pixel"]
    assert a["fingerprint"]["engines"]["saliency"] == json.loads(
        (lite_engine_dir / "manifest.json").read_text())["models"]["saliency"]["sha256"]
    # the recorded scores and the rule give the recorded threshold
    scores = np.r_[a["scores"]["good"], a["scores"]["defects"]]
    labels = np.r_[np.zeros(2, bool), np.ones(2, bool)]
    assert cal.max_f1_threshold(scores, labels)[0] == a["thresholds"]["image"]

    good_only = tmp_path / "good_only.json"
    assert run_calibrate(lite_engine_dir, good_only, "--good", parts / "good", "--false-reject-rate", "0") == 0
    record = json.loads(good_only.read_text())
    assert record["thresholds"]["image"] == max(record["scores"]["good"]) == record["thresholds"]["pixel"]
    assert record["measured"]["good_rejected"] == 0

    out = tmp_path / "out"
    images = sorted((parts / "defects").glob("*.jpg")) + sorted((parts / "good").glob("*.jpg"))
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                       "--calibration", str(first), "--no-progress", *map(str, images), "--out", str(out)])
    assert code == 0
    for image in images:
        report = json.loads((out / f"{image.stem}_regions.json").read_text())
        assert report["thresholds"] == a["thresholds"]
        assert report["pred_label"] == int(report["pred_score"] > a["thresholds"]["image"])
        mask = cv2.imread(str(out / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        values = np.load(out / f"{image.stem}_map.npy")
        np.testing.assert_array_equal(mask > 0, values > a["thresholds"]["pixel"])
    assert "NG" in capsys.readouterr().err
    # an explicit threshold overrides the calibration's
    pipe = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=first, image_threshold=123.0)
    assert pipe.thresholds.image == 123.0 and pipe.thresholds.pixel == a["thresholds"]["pixel"]


def test_masks_that_mark_nothing_and_unwritable_outputs_are_named_first(lite_engine_dir, parts, tmp_path, capsys):
    blank = tmp_path / "blank"
    shutil.copytree(parts / "defects", blank)
    for mask in blank.glob("*.png"):
        cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)))
    assert run_calibrate(lite_engine_dir, tmp_path / "c.json", "--good", parts / "good", "--defects", blank) == 2
    assert "the 2 defect masks given mark no pixel as defect" in capsys.readouterr().err
    assert run_calibrate(lite_engine_dir, tmp_path / "nope" / "c.json", "--good", parts / "good") == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'nope' / 'c.json'}: the folder {tmp_path / 'nope'} does not exist" in err


def test_calibration_for_other_engines_config_or_memory_is_refused(lite_engine_dir, parts, tmp_path, capsys):
    path = tmp_path / "calibration.json"
    assert run_calibrate(lite_engine_dir, path, "--good", parts / "good") == 0
    record = json.loads(path.read_text())

    other = dict(record, fingerprint={**record["fingerprint"], "engines": {"saliency": "0" * 64}})
    (tmp_path / "other_engines.json").write_text(json.dumps(other))
    with pytest.raises(cal.CalibrationError, match="made for other engines"):
        Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=tmp_path / "other_engines.json")
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd",
                       "--calibration", str(tmp_path / "other_engines.json"), str(parts / "good"),
                       "--out", str(tmp_path / "out")])
    assert code == 2 and "made for other engines" in capsys.readouterr().err

    with pytest.raises(cal.CalibrationError, match="another prompt config"):
        Pipeline.open(lite_engine_dir, dataset="mvtec", category="bottle", calibration=path)
    with pytest.raises(cal.CalibrationError, match="another prompt config"):
        Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=path, options={"saliency_n": 10})

    pipe = Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd")
    memory = NormalMemory.from_images(pipe.saliency, pipe.manifest,
                                      [(p.name, cv2.imread(str(p))) for p in sorted((parts / "good").glob("*.jpg"))],
                                      MemorySettings(capacity=512))
    memory.save(tmp_path / "memory.npz")
    with pytest.raises(cal.CalibrationError, match="made with no memory"):
        Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=path, memory=tmp_path / "memory.npz")
    with pytest.raises(cal.CalibrationError, match="streaming memory"):
        Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=path, stream_memory=512)

    with_memory = tmp_path / "with_memory.json"
    assert run_calibrate(lite_engine_dir, with_memory, "--good", parts / "good", "--memory", tmp_path / "memory.npz") == 0
    Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=with_memory,
                  memory=tmp_path / "memory.npz")  # the same memory: accepted
    with pytest.raises(cal.CalibrationError, match="this pipeline has none"):
        Pipeline.open(lite_engine_dir, dataset="mtd", category="mtd", calibration=with_memory)

    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(cal.CalibrationError, match="not a calibration file"):
        cal.load_calibration(tmp_path / "junk.json")
    for damage, message in (({"config_sha256": None}, "lacks config_sha256"), ({"engines": ["x"]}, "lacks engines")):
        data = json.loads(path.read_text())
        for key, value in damage.items():
            if value is None:
                del data["fingerprint"][key]
            else:
                data["fingerprint"][key] = value
        (tmp_path / "damaged.json").write_text(json.dumps(data))
        with pytest.raises(cal.CalibrationError, match=message):
            cal.load_calibration(tmp_path / "damaged.json")


def test_config_hash_is_the_one_earlier_calibration_files_hold():
    """A new option at its default leaves the hash alone (files calibrated before it stay valid);
    the value is what runtime.calibrate wrote for mvtec/bottle before joined_captions existed.
    Another option added later belongs in calibrate.LATER_OPTIONS, or this fails."""
    from runtime.config import load_shipped_config

    assert cal.config_sha256(load_shipped_config("mvtec", "bottle")) == \
        "563d4552c433ac0b74f881c179bc8c0bd5882bab7fc18015b1b99f368b5d52ca"
    joined = cal.config_sha256(load_shipped_config("mvtec", "bottle", {"joined_captions": True}))
    assert joined != "563d4552c433ac0b74f881c179bc8c0bd5882bab7fc18015b1b99f368b5d52ca"  # other detections: calibrate again
