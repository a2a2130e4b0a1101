"""bench.evaluate end to end on real MTD images with a fake pipeline of the runtime's interface."""
from __future__ import annotations

import json
import math
import resource
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from bench import evaluate as ev
from bench import metrics as mt
from bench.datasets import Sample, list_samples
from runtime.errors import ImageError, SaaError

SIX = {"pixel_max_f1", "pixel_auroc", "pixel_ap", "image_auroc", "image_max_f1", "aupro"}


class FakeResult:
    def __init__(self, anomaly_map: np.ndarray, saliency_map: np.ndarray) -> None:
        self.anomaly_map, self.saliency_map, self.saliency_only = anomaly_map, saliency_map, False


class FakePipeline:
    """Same interface as runtime.pipeline.Pipeline; scores dark blemishes (MTD defects are dark)."""

    def __init__(self) -> None:
        self.closed = False
        self.calls = 0

    def __call__(self, image_bgr: np.ndarray) -> FakeResult:
        assert image_bgr.dtype == np.uint8 and image_bgr.ndim == 3 and image_bgr.shape[2] == 3
        self.calls += 1
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
        darkness = np.clip(cv2.GaussianBlur(gray, (0, 0), 15) - gray, 0, None)
        anomaly = cv2.GaussianBlur(darkness, (0, 0), 2)
        return FakeResult(anomaly, gray / 255.0)

    def close(self) -> None:
        self.closed = True


def reference_protocol(samples: list[Sample], pipe: FakePipeline) -> dict[str, float]:
    """The reference's evaluation written out in memory with sklearn (model out_size resize is bilinear,
    the eval's cubic 400->400 resize a copy; masks nearest; min-max over the category)."""
    maps, masks = [], []
    for sample in samples:
        image = cv2.imread(str(sample.image_path), cv2.IMREAD_COLOR)
        maps.append(cv2.resize(pipe(image).anomaly_map, (400, 400)))
        raw = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
        masks.append(cv2.resize(((raw > 127) * 255).astype(np.uint8), (400, 400),
                                interpolation=cv2.INTER_NEAREST) > 0)
    scores, gt = np.array(maps, np.float64), np.array(masks)
    scores = (scores - scores.min()) / (scores.max() - scores.min())
    labels = np.array([s.label for s in samples])
    image_scores = scores.reshape(len(samples), -1).max(axis=1)

    def max_f1(y, s):
        p, r, _ = precision_recall_curve(y, s)
        return np.max(np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=p + r > 0))

    return {"pixel_max_f1": 100 * max_f1(gt.ravel(), scores.ravel()),
            "pixel_auroc": 100 * roc_auc_score(gt.ravel(), scores.ravel()),
            "pixel_ap": 100 * average_precision_score(gt.ravel(), scores.ravel()),
            "image_auroc": 100 * roc_auc_score(labels, image_scores),
            "image_max_f1": 100 * max_f1(labels, image_scores),
            "aupro": 100 * mt.aupro(scores, gt)}


@pytest.fixture
def mtd_samples(data_dir: Path) -> list[Sample]:
    return list_samples("mtd", data_dir / "mtd-mini")["mtd"]


def test_evaluate_category_matches_the_reference_protocol(mtd_samples: list[Sample], tmp_path: Path) -> None:
    pipe = FakePipeline()
    result = ev.evaluate_category(mtd_samples, ev.pipeline_predictor(pipe), category="mtd", progress=False,
                                  plot_dir=tmp_path / "mtd")
    assert pipe.calls == len(mtd_samples)
    expected = reference_protocol(mtd_samples, FakePipeline())
    for key in SIX:
        assert abs(result[key] - expected[key]) < 0.01, (key, result[key], expected[key])
    assert result["n_images"] == 4 and result["n_anomalous"] == 2
    assert 50 < result["pixel_auroc"] <= 100  # the dark-blemish fake does find the dark defects
    for picture in ("cases.png", "pr_curve.png"):
        loaded = cv2.imread(str(tmp_path / "mtd" / picture))
        assert loaded is not None and loaded.shape[0] > 200
    rows = (tmp_path / "mtd" / "scores.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("image,label")


def test_a_constant_predictor_scores_chance(mtd_samples: list[Sample]) -> None:
    result = ev.evaluate_category(mtd_samples, lambda image: (np.ones(image.shape[:2], np.float32), None),
                                  progress=False)
    assert result["pixel_auroc"] == pytest.approx(50.0) and result["image_auroc"] == pytest.approx(50.0)
    assert result["image_max_f1"] == pytest.approx(100 * 2 * 0.5 / 1.5)  # everything flagged: P 0.5, R 1


def test_protocol_functions() -> None:
    values = np.zeros((30, 50), np.float32)
    values[10:20, 10:20] = 1.0
    assert ev.to_eval_size(values).shape == (400, 400)
    assert np.array_equal(ev.to_eval_size(ev.to_eval_size(values), cv2.INTER_CUBIC), ev.to_eval_size(values))
    mask = ev.mask_to_eval_size(values > 0)
    assert mask.dtype == bool and set(np.unique(mask)) == {False, True}
    assert np.array_equal(ev.normalise(np.array([2.0, 4.0]), 2.0, 4.0), [0.0, 1.0])
    assert np.array_equal(ev.normalise(np.array([3.0, 3.0]), 3.0, 3.0), [0.0, 0.0])


def test_bad_predictor_output_names_the_image(mtd_samples: list[Sample]) -> None:
    with pytest.raises(SaaError, match=r"exp1_num_40410.jpg: the pipeline's anomaly map is \(4, 4\)"):
        ev.evaluate_category(mtd_samples, lambda image: (np.zeros((4, 4), np.float32), None), progress=False)
    with pytest.raises(SaaError, match="NaN"):
        ev.evaluate_category(mtd_samples, lambda image: (np.full(image.shape[:2], np.nan), None), progress=False)

    def failing(image: np.ndarray):
        raise ImageError("engine refused it")

    with pytest.raises(ImageError, match="exp1_num_40410.jpg: engine refused it"):
        ev.evaluate_category(mtd_samples, failing, progress=False)


def run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, list[tuple[FakePipeline, str]]]:
    opened: list[tuple[FakePipeline, str]] = []

    def fake_open(args, category):
        opened.append((FakePipeline(), category))
        return opened[-1][0]

    monkeypatch.setattr(ev, "_open_pipeline", fake_open)
    return ev.main(argv), opened


def test_cli_writes_metrics_json_table_and_pictures(monkeypatch: pytest.MonkeyPatch, data_dir: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, opened = run_cli(monkeypatch, ["--engine-dir", str(tmp_path), "--dataset", "mtd",
                                         "--root", str(data_dir / "mtd-mini"), "--out", str(out)])
    assert code == 0
    assert [category for _, category in opened] == ["mtd"] and all(pipe.closed for pipe, _ in opened)
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) == {"mtd", "mean"}
    assert SIX <= set(report["mtd"]) and set(report["mean"]) == SIX
    assert all(report["mean"][key] == pytest.approx(report["mtd"][key]) for key in SIX)
    table = (out / "metrics.md").read_text()
    assert table in capsys.readouterr().out
    assert "| mtd | 4 |" in table and "AUPRO@0.3" in table
    assert (out / "mtd" / "cases.png").is_file() and (out / "mtd" / "pr_curve.png").is_file()
    assert json.loads((out / "run.json").read_text())["dataset"] == "mtd"


def test_cli_limit_and_no_plots(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path) -> None:
    code, _ = run_cli(monkeypatch, ["--engine-dir", str(tmp_path), "--dataset", "mtd", "--root",
                                    str(data_dir / "mtd-mini"), "--out", str(tmp_path / "o"), "--limit", "2",
                                    "--seed", "3", "--no-plots"])
    assert code == 0
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert report["mtd"]["n_images"] == 2 and report["mtd"]["n_anomalous"] == 1
    assert not (tmp_path / "o" / "mtd").exists()


def test_cli_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    code, _ = run_cli(monkeypatch, ["--engine-dir", str(tmp_path), "--dataset", "mvtec", "--root",
                                    str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    expected = f"error: {tmp_path / 'nowhere'}: dataset root is not a folder"
    assert code == 2 and capsys.readouterr().err.strip() == expected
    code, _ = run_cli(monkeypatch, ["--engine-dir", str(tmp_path), "--dataset", "folder", "--root",
                                    str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "--dataset folder needs --config" in capsys.readouterr().err


def test_report_handles_undefined_metrics(tmp_path: Path) -> None:
    rows = {"a": {**{k: 50.0 for k in SIX}, "n_images": 3}, "b": {**{k: 70.0 for k in SIX}, "n_images": 2}}
    rows["b"]["image_auroc"] = math.nan  # e.g. a folder with only defective parts
    table = ev.write_report(tmp_path, rows, {"dataset": "folder"})
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["b"]["image_auroc"] is None and report["mean"]["image_auroc"] == 50.0
    assert report["mean"]["pixel_auroc"] == 60.0
    assert "n/a" in table and "| **mean** | 5 |" in table


@pytest.mark.slow
def test_memory_and_time_on_500_maps(tmp_path: Path) -> None:
    """Not asserted as timing: prints seconds and peak memory for 500 maps of 400x400 (250 with defects)."""
    rng = np.random.default_rng(0)
    samples = []
    for index in range(500):
        path = tmp_path / f"{index:03d}.png"
        if index % 2:
            mask = np.zeros((400, 400), np.uint8)
            y, x = rng.integers(40, 360, 2)
            cv2.circle(mask, (int(x), int(y)), int(rng.integers(5, 40)), 255, -1)
            cv2.imwrite(str(path), mask)
            samples.append(Sample(path, path, 1, "defect"))
        else:
            samples.append(Sample(path, None, 0, "good"))

    def read_image(path: Path) -> np.ndarray:  # the "image" is its own mask, darkened where defective
        if not path.is_file():
            return np.full((400, 400, 3), 200, np.uint8)
        return cv2.cvtColor(200 - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) // 2, cv2.COLOR_GRAY2BGR)

    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        darkness = 200.0 - image[:, :, 0].astype(np.float32)
        noisy = darkness * rng.uniform(0.2, 1.0) + rng.normal(0, 3, darkness.shape).astype(np.float32)
        return cv2.GaussianBlur(noisy, (0, 0), 4), darkness

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    result = ev.evaluate_category(samples, predict, read_image=read_image, progress=False,
                                  plot_dir=tmp_path / "plots")
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\n500 maps of 400x400: {seconds:.1f} s, peak traced {peak / 2**20:.0f} MiB, "
          f"max RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; pixel AUROC {result['pixel_auroc']:.2f}")
    assert result["n_images"] == 500 and peak < 500 * 400 * 400 * 4  # far below holding the maps in RAM
