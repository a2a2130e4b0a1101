"""`python -m runtime.infer` on real MTD images with the real EfficientNet-Lite0 engines."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from runtime import infer

MINI = "tests/data/mtd-mini"


def defect_images(data_dir):
    return sorted(p for p in (data_dir / "mtd-mini").glob("MT_[!F]*/Imgs/*.jpg"))


def test_lite_cli_gives_real_saliency_maps(lite_engine_dir, data_dir, tmp_path, capsys):
    images = sorted((data_dir / "mtd-mini").glob("*/Imgs/*.jpg"))
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       *map(str, images), "--out", str(tmp_path)])
    assert code == 0
    assert "saliency-only" in capsys.readouterr().err
    for image in images:
        values = np.load(tmp_path / f"{image.stem}_map.npy")
        picture = cv2.imread(str(image))
        assert values.shape == picture.shape[:2] and values.dtype == np.float32 and np.isfinite(values).all()
        report = json.loads((tmp_path / f"{image.stem}_regions.json").read_text())
        assert report["saliency_only"] is True and report["regions"] == []
        assert report["image_shape"] == list(picture.shape[:2]) and report["random_weights"] is False
        # the saliency stage's time, and the part of it inside onnxruntime (the CNN, the kNN products)
        assert 0 < report["engine_ms"]["saliency"] <= report["timings_ms"]["saliency"]
        png = cv2.imread(str(tmp_path / f"{image.stem}_map.png"), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png.max() == 65535
        assert cv2.imread(str(tmp_path / f"{image.stem}_overlay.png")).shape == picture.shape
    # a real map: defect pixels score higher than the rest of the tile
    for image in defect_images(data_dir):
        truth = cv2.imread(str(image.with_suffix(".png")), cv2.IMREAD_GRAYSCALE) > 127
        assert roc_auc_score(truth.ravel(), np.load(tmp_path / f"{image.stem}_map.npy").ravel()) > 0.65


def test_folder_run_reports_bad_files_and_goes_on(lite_engine_dir, data_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    good = defect_images(data_dir)[0]
    shutil.copy(good, folder / "good.jpg")
    cv2.imwrite(str(folder / "good_ppm.ppm"), cv2.imread(str(good)))  # PPM, as line-side programs write
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "empty.jpg").write_bytes(b"")
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       str(folder), str(tmp_path / "missing.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.png: not a readable image" in err and "empty.jpg: empty file" in err and "missing.png: no such file" in err
    assert (tmp_path / "out" / "good_map.npy").is_file() and (tmp_path / "out" / "good_ppm_map.npy").is_file()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "good_map.npy"), np.load(tmp_path / "out" / "good_ppm_map.npy"))
    # the run's table: a row per input, failures with their reason
    with open(tmp_path / "out" / "summary.csv", newline="") as table:
        rows = {Path(row["image"]).name: row for row in csv.DictReader(table)}
    assert set(rows) == {"good.jpg", "good_ppm.ppm", "broken.png", "empty.jpg", "missing.png"}
    assert rows["good.jpg"]["status"] == "ok" and rows["good.jpg"]["outputs"] == "good" and rows["good.jpg"]["label"] == ""
    score = float(rows["good.jpg"]["image_score"])
    assert score == pytest.approx(float(np.load(tmp_path / "out" / "good_map.npy").max()), rel=1e-5)
    assert float(rows["good.jpg"]["end_to_end_ms"]) > 0 and rows["good.jpg"]["fused_regions"] == "0"  # lite: no regions
    assert rows["broken.png"]["status"] == "failed" and "not a readable image" in rows["broken.png"]["error"]
    assert rows["missing.png"]["status"] == "failed" and "no such file" in rows["missing.png"]["error"]
    assert "(table: summary.csv, overlays by score: index.html)" in err
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<img ") == 2 and "3 failed" in page and "not a readable image" in page
    assert "<h1>SAA+ saliency-only maps (lite engines): mtd</h1>" in page
    by_score = sorted(("good.jpg", "good_ppm.ppm"), key=lambda name: -float(rows[name]["image_score"]))
    stems = [rows[name]["outputs"] for name in by_score]
    assert page.index(f'src="{stems[0]}_overlay.png"') < page.index(f'src="{stems[1]}_overlay.png"')


def test_the_table_labels_parts_at_the_image_threshold_and_a_table_in_the_way_is_one_line(lite_engine_dir, data_dir,
                                                                                         tmp_path, capsys):
    images = sorted((data_dir / "mtd-mini").glob("*/Imgs/*.jpg"))[:3]
    args = ["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress", *map(str, images)]
    assert infer.main([*args, "--out", str(tmp_path / "first")]) == 0
    with open(tmp_path / "first" / "summary.csv", newline="") as table:
        scores = sorted(float(row["image_score"]) for row in csv.DictReader(table))
    threshold = (scores[0] + scores[1]) / 2  # one part below it, two above
    assert infer.main([*args, "--image-threshold", str(threshold), "--out", str(tmp_path / "second")]) == 0
    with open(tmp_path / "second" / "summary.csv", newline="") as table:
        labels = sorted(row["label"] for row in csv.DictReader(table))
    assert labels == ["NG", "NG", "OK"]
    (tmp_path / "third" / "summary.csv").mkdir(parents=True)
    capsys.readouterr()
    assert infer.main([*args, "--out", str(tmp_path / "third")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and last.endswith("summary.csv: Is a directory") and "Traceback" not in err


def test_a_table_that_stops_mid_run_is_reported_and_the_maps_go_on(lite_engine_dir, data_dir, tmp_path, capsys,
                                                                    monkeypatch):
    from runtime.outputs import summary

    real_add = summary.RunSummary.add

    class FullDisk:
        def writerow(self, values):
            raise OSError(28, "No space left on device")

    def full_disk_after_the_first(self, image, stem, result):
        real_add(self, image, stem, result)
        self._writer = FullDisk()

    monkeypatch.setattr(summary.RunSummary, "add", full_disk_after_the_first)
    images = sorted((data_dir / "mtd-mini").glob("*/Imgs/*.jpg"))[:3]
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       *map(str, images), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "summary.csv: No space left on device; its rows stop there" in err
    assert "3 of 3 images written" in err and all((tmp_path / f"{p.stem}_map.npy").is_file() for p in images)


def test_folders_skip_masks_and_earlier_outputs_and_names_need_not_be_utf8(lite_engine_dir, data_dir, tmp_path, capsys):
    """MTD keeps each defect's mask beside its image (<stem>.png); an earlier run's maps sit in
    the output folder, which may be inside the input. A file name that is not UTF-8 (an old
    camera's Latin-1) crashed OpenCV's own file functions; the outputs take a readable name."""
    folder = tmp_path / "in"
    shutil.copytree(data_dir / "mtd-mini" / "MT_Blowhole" / "Imgs", folder)
    odd = folder / (b"\xffpart".decode("utf-8", "surrogateescape") + ".jpg")
    shutil.copy(defect_images(data_dir)[0], odd)
    parts = sorted(p.stem for p in folder.glob("*.jpg"))
    args = ["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress", str(folder)]
    assert infer.main([*args, "--out", str(folder / "out")]) == 0
    written = sorted(p.name[:-len("_map.npy")] for p in (folder / "out").glob("*_map.npy"))
    assert written == sorted(stem.encode("utf-8", "replace").decode() for stem in parts) and "?part" in written
    assert infer.main([*args, "--out", str(folder / "out")]) == 0  # again: the first run's maps are not parts
    assert f"{len(parts)} of {len(parts)} images written" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_reported_and_the_batch_goes_on(lite_engine_dir, data_dir, tmp_path, capsys):
    images = defect_images(data_dir)[:2]
    out = tmp_path / "out"
    (out / f"{images[0].stem}_overlay.png").mkdir(parents=True)  # in the way of the first image's overlay
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       *map(str, images), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"{images[0].stem}_overlay.png: cannot write" in err and "1 of 2 images written" in err
    assert (out / f"{images[1].stem}_regions.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--engine-dir", "/nonexistent/engines", "--dataset", "mtd", "--category", "mtd"], "does not exist"),
    (["--dataset", "mtd", "--category", "nope"], "no category 'nope'"),
    (["--dataset", "mtd"], "--category C is missing"),
    (["--category", "mtd"], "--dataset D is missing"),
    (["--dataset", "mtd", "--category", "mtd", "--threads", "-1"], "threads must be an integer from 0"),
    (["--dataset", "mtd", "--category", "mtd", "--stream-memory", "50", "--save-memory", "/nonexistent/m.npz"],
     "the folder /nonexistent does not exist"),
])
def test_bad_setup_is_one_line(lite_engine_dir, data_dir, tmp_path, capsys, args, message):
    if "--engine-dir" not in args:
        args = ["--engine-dir", str(lite_engine_dir), *args]
    code = infer.main([*args, str(defect_images(data_dir)[0]), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--out-size", "0"], "--out-size must be from 1 to 16384"),
    (["--out-size", "100000"], "--out-size must be from 1 to 16384"),
    (["--save-memory", "m.npz"], "--save-memory needs a memory to save"),
])
def test_bad_options_are_refused_before_any_work(lite_engine_dir, data_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", *args,
                    str(defect_images(data_dir)[0]), "--out", str(tmp_path)])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_tampered_engine_is_refused(lite_engine_dir, data_dir, tmp_path, capsys):
    copy = tmp_path / "engines"
    shutil.copytree(lite_engine_dir, copy)
    with open(copy / "saliency.onnx", "ab") as handle:
        handle.write(b"\0")
    code = infer.main(["--engine-dir", str(copy), "--dataset", "mtd", "--category", "mtd",
                       str(defect_images(data_dir)[0]), "--out", str(tmp_path / "out")])
    assert code == 2 and "fails its sha256 check" in capsys.readouterr().err


def test_runtime_imports_no_torch():
    code = "import sys, runtime.infer, runtime.pipeline, runtime.stages.detector, runtime.stages.segmenter, runtime.stages.saliency; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_ctrl_c_in_a_batch_keeps_the_table_and_page_of_what_was_done(lite_engine_dir, data_dir, tmp_path, capsys,
                                                                       monkeypatch):
    from runtime.pipeline import Pipeline

    real_call, calls = Pipeline.__call__, []

    def interrupted_on_the_second(self, image, out_size=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, image, out_size)

    monkeypatch.setattr(Pipeline, "__call__", interrupted_on_the_second)
    images = sorted((data_dir / "mtd-mini").glob("*/Imgs/*.jpg"))[:3]
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       *map(str, images), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted after 1 image\n" in err and "1 of 1 images written" in err
    with open(tmp_path / "summary.csv", newline="") as table:
        assert [row["outputs"] for row in csv.DictReader(table)] == [images[0].stem]
    assert (tmp_path / "index.html").read_text().count("<img ") == 1


def test_joined_captions_flag_runs_the_full_pipeline_with_one_head_run(full_tiny_engine_dir, data_dir, tmp_path, capsys):
    assert infer.options_from_args(infer.build_parser().parse_args(
        ["--engine-dir", "e", "--out", "o", "--joined-captions", "x.png"])) == {"joined_captions": True}
    image = data_dir / "bottle_demo.png"
    maps = {}
    for flag in ([], ["--joined-captions"]):
        out = tmp_path / ("joined" if flag else "plain")
        assert infer.main(["--engine-dir", str(full_tiny_engine_dir), "--dataset", "mvtec", "--category", "bottle",
                           "--no-progress", *flag, str(image), "--out", str(out)]) == 0
        report = json.loads((out / "bottle_demo_regions.json").read_text())
        assert report["regions"]
        assert any(note.startswith("joined_captions:") for note in report["notes"]) == bool(flag)  # said in the JSON
        err = capsys.readouterr().err
        assert ("joined_captions: GroundingDINO ran once" in err) == bool(flag)  # and at the start
        # random test weights are said too: in the JSON, at the start and on the overlay's label
        assert report["random_weights"] is True and report["notes"][0].startswith("random weights:")
        assert "warning: " in err and "exported with --random-init" in err
        maps[bool(flag)] = np.load(out / "bottle_demo_map.npy")
    assert np.abs(maps[True] - maps[False]).max() > 1e-3  # the joined run is another algorithm, not a relabelling


def test_earlier_output_folders_among_the_inputs_are_not_parts(lite_engine_dir, data_dir, tmp_path, capsys):
    folder = tmp_path / "parts"
    folder.mkdir()
    shutil.copy(defect_images(data_dir)[0], folder / "part.jpg")
    common = ["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress"]
    assert infer.main([*common, str(folder), "--out", str(folder / "results")]) == 0  # outputs inside the input folder
    capsys.readouterr()
    assert infer.main([*common, str(folder), "--out", str(tmp_path / "second")]) == 0
    err = capsys.readouterr().err
    assert f"left out 1 earlier output folder(s) among the inputs (they hold a runtime.infer summary.csv): {folder / 'results'}" in err
    assert "1 of 1 images written" in err  # part.jpg only, not the first run's map and overlay PNGs
    with open(tmp_path / "second" / "summary.csv", newline="") as table:
        assert [row["image"] for row in csv.DictReader(table)] == [str(folder / "part.jpg")]


@pytest.mark.parametrize("where", ["the input folder", "an engines dir"])
def test_an_output_folder_that_would_hide_the_inputs_or_mix_with_engines_is_refused(lite_engine_dir, tmp_path, capsys, where):
    folder = tmp_path / "parts"
    folder.mkdir()
    out = folder if where == "the input folder" else lite_engine_dir
    with pytest.raises(SystemExit) as stop:
        infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert ("is the output folder" in err) if where == "the input folder" else ("is an engines dir" in err)


def test_a_page_that_cannot_be_written_is_not_announced(lite_engine_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "index.html").mkdir(parents=True)  # a folder where the page should go
    code = infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       str(defect_images(data_dir)[0]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"error: cannot write {out / 'index.html'}" in err
    assert "1 of 1 images written" in err and "(table: summary.csv)" in err and "overlays by score" not in err


def test_warnings_print_as_one_line_without_the_source(lite_engine_dir, tmp_path, capsys):
    image = tmp_path / "twelve_bit.png"
    cv2.imwrite(str(image), (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096))  # a 12-bit camera's frame
    assert infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       str(image), "--out", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "12 bits" in line or "image_io.py" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: {image}: 16-bit image uses only 12 bits")


def test_lite_says_which_requests_change_nothing_or_are_capped(lite_engine_dir, data_dir, tmp_path, capsys):
    assert infer.main(["--engine-dir", str(lite_engine_dir), "--dataset", "mtd", "--category", "mtd", "--no-progress",
                       "--joined-captions", "--saliency-n", "100000", str(defect_images(data_dir)[0]),
                       "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: --joined-captions changes nothing with lite engines" in err
    assert "warning: saliency_n 100000 is at least the 4096 positions of the saliency grid" in err
