"""The saliency study's machinery and the one-object saliency options it tunes.

- the TUNE / HELD-OUT split is stratified, disjoint and fixed by its seed;
- `knn_means` (every n and mode from one partition) equals the kernels' numpy twin;
- `Scorer` (metrics over cached grids) equals bench.evaluate.evaluate_category;
- the study's grids equal the runtime's `single_object_grid` for settings with every option on;
- the options (layers, contrast, padding, blur) and presets do what they say and reject bad values;
- `python -m bench.experiments.saliency_study` runs end to end on a small MTD folder with a tiny grid.

Uses the real EfficientNet-Lite0 `lite` engines (exported once per session, see conftest_engines).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest_engines import lite_engine_dir  # noqa: F401

from bench.experiments import saliency_study as study
from bench.datasets import Sample, list_samples
from bench.evaluate import evaluate_category
from runtime import manifest as mf
from runtime.errors import ConfigError, ManifestError
from runtime.stages.saliency import (
    TUNED,
    SaliencyExtractor,
    SaliencySettings,
    adjust_contrast,
    preset_settings,
    smooth_grid,
)
from runtime.stages.saliency_kernels import knn_distance_mean_twin

MINI = Path(__file__).parent / "data" / "mtd-mini"


@pytest.fixture(scope="module")
def mtd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mtd-mini's crack and first good image, each with a mirrored copy (and mask): two images per
    class, so both halves of the split hold a defect and a good image."""
    root = tmp_path_factory.mktemp("mtd")
    for image_path in sorted(MINI.glob("MT_Crack/Imgs/*.jpg")) + sorted(MINI.glob("MT_Free/Imgs/*.jpg"))[:1]:
        folder = root / image_path.parent.relative_to(MINI)
        folder.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(str(image_path))
        mask = cv2.imread(str(image_path.with_suffix(".png")), cv2.IMREAD_GRAYSCALE)
        for suffix, flip in (("", False), ("_mirrored", True)):
            cv2.imwrite(str(folder / f"{image_path.stem}{suffix}.jpg"), cv2.flip(image, 1) if flip else image)
            cv2.imwrite(str(folder / f"{image_path.stem}{suffix}.png"), cv2.flip(mask, 1) if flip else mask)
    return root


@pytest.fixture(scope="module")
def manifest(lite_engine_dir: Path) -> mf.Manifest:  # noqa: F811
    return mf.load_manifest(lite_engine_dir)


@pytest.fixture(scope="module")
def extractor(manifest: mf.Manifest) -> SaliencyExtractor:
    return SaliencyExtractor(manifest)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return cv2.imread(str(next(MINI.glob("MT_Crack/Imgs/*.jpg"))))


# ---- split -----------------------------------------------------------------------------------------------


def fake_samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/x/{kind}/{i:03d}.jpg"), None, int(kind != "good"), kind)
            for kind, count in counts.items() for i in range(count)]


def test_split_is_stratified_disjoint_and_fixed_by_its_seed() -> None:
    samples = fake_samples({"good": 40, "crack": 7, "break": 4, "fray": 1})
    tune, held = study.split_samples(samples, seed=3, good_limit=20)
    assert not {s.image_path for s in tune} & {s.image_path for s in held}
    for kind, in_tune, in_held in (("good", 10, 10), ("crack", 4, 3), ("break", 2, 2), ("fray", 1, 0)):
        assert sum(s.defect_type == kind for s in tune) == in_tune
        assert sum(s.defect_type == kind for s in held) == in_held
    assert study.split_samples(list(reversed(samples)), seed=3, good_limit=20) == (tune, held)
    other_tune, _ = study.split_samples(samples, seed=4, good_limit=20)
    assert other_tune != tune
    everything, rest = study.split_samples(samples, seed=3, good_limit=None)
    assert len(everything) + len(rest) == len(samples)


def test_split_refuses_a_half_without_defects() -> None:
    with pytest.raises(ValueError, match="anomalous"):
        study.split_samples(fake_samples({"good": 6, "crack": 1}))
    with pytest.raises(ValueError, match="good_limit"):
        study.split_samples(fake_samples({"good": 6, "crack": 4}), good_limit=1)


# ---- kNN for many n at once ------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [2, 3, 9, 70])
def test_knn_means_equals_the_kernel_twin_for_every_n_and_mode(positions: int) -> None:
    rng = np.random.default_rng(positions)
    features = rng.standard_normal((6, positions)).astype(np.float32)
    features /= np.linalg.norm(features, axis=0)
    ns = (1, 2, 5, positions - 1, positions, positions + 3, 400)
    got = study.knn_means(features, ns, block_bytes=8 * positions * 4)  # several row blocks
    assert len(got) == 4 * len(set(ns))
    for (mode, n, exclude), scores in got.items():
        expected = knn_distance_mean_twin(features, n, mode, exclude)
        np.testing.assert_allclose(scores, expected, atol=1e-6, err_msg=f"{mode} {n} exclude={exclude}")


def test_knn_means_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        study.knn_means(np.ones((3, 5), np.float32), [0])
    with pytest.raises(ValueError, match="two positions"):
        study.knn_means(np.ones((3, 1), np.float32), [1])


# ---- scoring ---------------------------------------------------------------------------------------------


def test_scorer_equals_the_harness(mtd_root: Path) -> None:
    samples = list_samples("mtd", mtd_root)["mtd"]
    rng = np.random.default_rng(0)
    grids = [cv2.GaussianBlur(rng.random((20, 20)).astype(np.float32), (0, 0), 2) for _ in samples]
    scorer = study.Scorer(samples)
    for sigma in (0.0, 1.5):
        maps = iter(grids)

        def predict(image: np.ndarray) -> tuple[np.ndarray, None]:
            height, width = image.shape[:2]
            return cv2.resize(smooth_grid(next(maps), sigma), (width, height)), None

        expected = evaluate_category(samples, predict, progress=False)
        got = scorer.metrics(grids, sigma)
        for key, value in got.items():
            assert value == pytest.approx(expected[key], abs=1e-9, nan_ok=True), key
    with pytest.raises(ValueError, match="grid maps"):
        scorer.metrics(grids[:-1])


def test_scorer_subset_scores_only_those_images(mtd_root: Path) -> None:
    samples = list_samples("mtd", mtd_root)["mtd"]
    rng = np.random.default_rng(1)
    grids = [rng.random((16, 16)).astype(np.float32) for _ in samples]
    scorer = study.Scorer(samples)
    assert scorer.metrics(grids, 1.0, subset=range(len(samples))) == scorer.metrics(grids, 1.0)
    defects = [i for i, s in enumerate(samples) if s.label]
    only_defects = scorer.metrics(grids, 1.0, subset=defects)
    assert np.isnan(only_defects["image_auroc"])  # one class only
    assert only_defects["pixel_max_f1"] >= scorer.metrics(grids, 1.0)["pixel_max_f1"]  # no good images' pixels


# ---- selection rules ---------------------------------------------------------------------------------------


class StubCache:
    """Grids are just the variant; the stub scorer looks its metrics up."""

    class extractor:  # noqa: N801 - stands in for the attribute
        single_size = 256

    def grids(self, split, samples, settings):
        return {v: v for v in study.knn_choices([10, 400], True)}


class StubScorer:
    def __init__(self, table: dict) -> None:
        self.table = table

    def metrics(self, grids, sigma=0.0):
        f1, aupro = self.table.get((grids, sigma), (1.0, 50.0))
        return {"pixel_max_f1": f1, "pixel_auroc": 50.0, "image_auroc": 50.0, "aupro": aupro}


def test_selection_prefers_defaults_on_near_ties_and_respects_the_guard() -> None:
    near_in, near_ex = ("nearest", 400, False), ("nearest", 400, True)
    variants = study.knn_choices([10, 400], True)
    base = SaliencySettings()
    # Self included is 0.3 points better than the default (excluded): below MIN_GAIN, default kept.
    scorer = StubScorer({(near_in, 0.0): (20.3, 50.0), (near_ex, 0.0): (20.0, 50.0)})
    settings, result = study.best_knn(StubCache(), scorer, [], base, variants, (0.0,), [])
    assert study.variant_of(settings) == near_ex and result["pixel_max_f1"] == 20.0
    # A clear win keeps the non-default choice.
    scorer = StubScorer({(near_in, 0.0): (25.0, 50.0), (near_ex, 0.0): (20.0, 50.0)})
    settings, _ = study.best_knn(StubCache(), scorer, [], base, variants, (0.0,), [])
    assert study.variant_of(settings) == near_in
    # The guard drops the best-F1 setting when its AUPRO falls below the floor.
    scorer = StubScorer({(near_ex, 8.0): (30.0, 40.0), (near_ex, 2.0): (24.0, 60.0)})
    settings, _ = study.best_knn(StubCache(), scorer, [], base, variants, (2.0, 8.0), [], guard=45.0)
    assert settings.blur_sigma == 2.0
    settings, _ = study.best_knn(StubCache(), scorer, [], base, variants, (2.0, 8.0), [], guard=None)
    assert settings.blur_sigma == 8.0
    assert study.best_knn(StubCache(), scorer, [], base, variants, (2.0, 8.0), [], guard=99.0) is None


# ---- the runtime options the study tunes -----------------------------------------------------------------


def test_study_grids_are_the_runtime_grids(extractor: SaliencyExtractor, mtd_root: Path, tmp_path: Path) -> None:
    samples = list_samples("mtd", mtd_root)["mtd"][:1]
    cache = study.GridCache(extractor, tmp_path, ns=(30, 400), progress=False, engine_id="x")
    for settings in (study.REFERENCE,
                     SaliencySettings(n=30, mode="nearest", layers=(2, 3), contrast="clahe", pad=16, blur_sigma=2.0),
                     SaliencySettings(n=400, mode="farthest", exclude_self=True, single_size=192, pad=8)):
        grids = cache.grids("tune", samples, settings)[study.variant_of(settings)]
        runner = extractor.with_settings(settings)
        for sample, grid in zip(samples, grids):
            expected = runner.single_object_grid(cv2.imread(str(sample.image_path)))
            np.testing.assert_allclose(smooth_grid(grid, settings.blur_sigma), expected, atol=1e-5)
    reloaded = study.GridCache(extractor, tmp_path, ns=(30, 400), progress=False, engine_id="x")
    assert reloaded._load("tune", study.feature_key(study.REFERENCE, 256), samples) is not None
    assert study.GridCache(extractor, tmp_path, ns=(30, 400), engine_id="y")._load(
        "tune", study.feature_key(study.REFERENCE, 256), samples) is None  # other weights: not reused


def test_default_settings_are_the_reference_features(extractor: SaliencyExtractor, image: np.ndarray) -> None:
    np.testing.assert_array_equal(extractor.single_object_features(image), extractor.features(image, 256))


def test_layers_are_the_renormalised_channels(extractor: SaliencyExtractor, image: np.ndarray) -> None:
    full = extractor.features(image, 256)
    sub = extractor.with_settings(SaliencySettings(layers=(3, 2))).single_object_features(image)
    widths = extractor.layer_channels
    assert widths == (24, 40, 112) and sub.shape == (152, 64, 64)
    expected = full[widths[0]:] / np.linalg.norm(full[widths[0]:], axis=0, keepdims=True)
    np.testing.assert_allclose(sub, expected, atol=1e-6)
    assert extractor.settings.layers is None  # with_settings leaves the original alone


def test_padding_reflects_the_image_and_crops_the_grid(extractor: SaliencyExtractor, image: np.ndarray) -> None:
    got = extractor.with_settings(SaliencySettings(pad=16)).single_object_features(image)
    padded = cv2.copyMakeBorder(cv2.resize(image, (256, 256)), 16, 16, 16, 16, cv2.BORDER_REFLECT_101)
    expected = extractor._run(padded)[:, 4:-4, 4:-4]
    assert got.shape == (176, 64, 64)
    np.testing.assert_array_equal(got, expected)
    # The border row no longer sees zero padding: it moves toward the interior rows' features.
    plain = extractor.features(image, 256)
    gap_plain = np.linalg.norm(plain[:, 0] - plain[:, 1], axis=0).mean()
    gap_padded = np.linalg.norm(got[:, 0] - got[:, 1], axis=0).mean()
    assert gap_padded < gap_plain


def test_blur_is_applied_to_the_grid(extractor: SaliencyExtractor, image: np.ndarray) -> None:
    plain = extractor.single_object_grid(image)
    blurred = extractor.with_settings(SaliencySettings(blur_sigma=3.0)).single_object_grid(image)
    np.testing.assert_allclose(blurred, smooth_grid(plain, 3.0), atol=1e-7)
    assert blurred.std() < plain.std()
    assert smooth_grid(plain, 0.0) is plain


def test_contrast_equalises_the_luminance(image: np.ndarray) -> None:
    grey = image[:, :, :1].repeat(3, axis=2)
    clahe = adjust_contrast(grey, "clahe")
    assert clahe.dtype == np.uint8 and clahe.shape == grey.shape
    assert (clahe == clahe[:, :, :1]).all()  # a grey image stays grey
    np.testing.assert_array_equal(clahe[:, :, 0], cv2.createCLAHE(2.0, (8, 8)).apply(np.ascontiguousarray(grey[:, :, 0])))
    equalised = adjust_contrast(grey, "equalize")
    assert equalised.min() == 0 and equalised.max() == 255
    colour = grey.copy()
    colour[:, :, 2] = 200  # not grey: the luminance path
    out = adjust_contrast(colour, "equalize")
    assert out.shape == colour.shape and not np.array_equal(out, colour)
    assert adjust_contrast(grey, "none") is grey
    with pytest.raises(ConfigError, match="contrast"):
        adjust_contrast(grey, "gamma")


@pytest.mark.parametrize("changes, message", [
    ({"layers": ()}, "layers"),
    ({"layers": (2, 2)}, "layers"),
    ({"layers": "23"}, "layers"),
    ({"layers": (1.5,)}, "layers"),
    ({"layers": 3}, "layers"),
    ({"layers": 2.0}, "layers"),
    ({"contrast": "gamma"}, "contrast"),
    ({"pad": 4}, "pad"),
    ({"pad": -8}, "pad"),
    ({"blur_sigma": -1.0}, "blur_sigma"),
    ({"blur_sigma": float("nan")}, "blur_sigma"),
    ({"blur_sigma": True}, "blur_sigma"),
])
def test_bad_options_are_one_line_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SaliencySettings(**changes).checked()


def test_layer_choice_needs_known_layers_and_their_widths(manifest: mf.Manifest) -> None:
    assert SaliencySettings(layers=[3, 2], blur_sigma=2).checked().layers == (2, 3)
    with pytest.raises(ConfigError, match=r"\[4\] are not in the exported layers"):
        SaliencyExtractor(manifest, settings=SaliencySettings(layers=(3, 4)))
    data = copy.deepcopy(manifest.data)
    del data["models"]["saliency"]["source"]["layer_channels"]
    bare = mf.Manifest(manifest.engine_dir, data)
    SaliencyExtractor(bare)  # every layer: no widths needed
    with pytest.raises(ManifestError, match="re-export"):
        SaliencyExtractor(bare, settings=SaliencySettings(layers=(2, 3)))


def test_tuned_preset_is_the_committed_study_result() -> None:
    results = Path(__file__).resolve().parent.parent / "bench" / "results" / "saliency_study_mtd.json"
    best = json.loads(results.read_text())["best"]
    best["layers"] = tuple(best["layers"]) if best["layers"] else None
    assert TUNED["efficientnet_lite0"] == SaliencySettings(**best).checked()


def test_presets_follow_the_profile(manifest: mf.Manifest) -> None:
    assert preset_settings(manifest) == TUNED["efficientnet_lite0"]
    assert preset_settings(manifest, "reference") == SaliencySettings()
    assert preset_settings(manifest, "tuned", n=50, mode="farthest") == SaliencySettings(
        **{**vars(TUNED["efficientnet_lite0"]), "n": 50, "mode": "farthest"})
    data = copy.deepcopy(manifest.data)
    data["profile"] = "full"
    data["preprocess"]["saliency"]["backbone"] = "wide_resnet50_2"
    full = mf.Manifest(manifest.engine_dir, data)
    assert preset_settings(full) == SaliencySettings()
    with pytest.raises(ConfigError, match="no tuned saliency setting"):
        preset_settings(full, "tuned")
    with pytest.raises(ConfigError, match="preset"):
        preset_settings(manifest, "best")


# ---- the command ------------------------------------------------------------------------------------------


def test_study_command_end_to_end(lite_engine_dir: Path, mtd_root: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "study"
    results = tmp_path / "results.json"
    argv = ["--engine-dir", str(lite_engine_dir), "--root", str(mtd_root), "--out", str(out),
            "--results", str(results), "--n", "10", "400", "--sigmas", "0", "2",
            "--steps", "knn", "blur_sigma", "pad"]  # the tiny grid: 2 n, 2 sigmas, 2 feature settings
    assert study.main(argv) == 0
    data = json.loads(results.read_text())
    assert data == json.loads((out / "saliency_study_mtd.json").read_text())
    assert [row["step"] for row in data["rows"]][1:] == [s.name for s in study.STEPS[:3]]
    assert len(data["split"]["tune"]) == len(data["split"]["held"]) == 2
    assert not set(data["split"]["tune"]) & set(data["split"]["held"])
    reference = data["rows"][0]
    assert reference["settings"]["mode"] == "farthest" and reference["settings"]["n"] == 400
    tune_f1 = [row["tune"]["pixel_max_f1"] for row in data["rows"]]
    assert tune_f1 == sorted(tune_f1)  # a step only keeps a change that beats the current best
    for check in data["runtime_check"].values():
        assert check["max_abs_diff_points"] <= study.AGREEMENT_POINTS
    assert (out / "pictures" / "best_held" / "cases.png").is_file()
    assert "| reference" in (out / "table.md").read_text()
    assert study.main(argv) == 0  # second run: grids from the cache
