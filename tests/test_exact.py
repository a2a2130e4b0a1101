"""Images of any shape: every door says when GroundingDINO did not see an image as the reference
does, names the detector size that would, and engines of that size equal the reference."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from conftest_engines import FULL_TINY_ARGS, session_engines
from runtime import manifest as mf
from runtime.config import load_shipped_config
from runtime.engine.resize import shorter_side_shape
from runtime.pipeline import Pipeline

CRACK = "mtd-mini/MT_Crack/Imgs/exp1_num_32128.jpg"  # 285x122: a tall tile, far from the tiny engine's 224x224
TINY_SIDES = (224, 373)  # the tiny GroundingDINO's resize: shorter side 224, longer at most 373


def crack(data_dir) -> np.ndarray:
    return cv2.imread(str(data_dir / CRACK))


@pytest.fixture(scope="module")
def sized_engine_dir(tmp_path_factory, data_dir):
    """Tiny full engines for frames of the crack image's size (export --image-size WIDTHxHEIGHT)."""
    height, width = crack(data_dir).shape[:2]
    position = FULL_TINY_ARGS.index("--detector-size")
    args = FULL_TINY_ARGS[:position] + ("--image-size", f"{width}x{height}") + FULL_TINY_ARGS[position + 2:]
    return session_engines(tmp_path_factory, args, "full_tiny_sized", "SAA_TEST_FULL_TINY_SIZED_ENGINES")


def test_a_non_square_image_on_a_square_engine_is_named_not_exact(full_tiny_engine_dir, data_dir):
    config = load_shipped_config("mtd", "mtd")
    image = crack(data_dir)
    with Pipeline(mf.load_manifest(full_tiny_engine_dir), config) as pipeline:
        result = pipeline(image)
        square = pipeline(cv2.imread(str(data_dir / "bottle_demo.png")))
    expected = shorter_side_shape(*image.shape[:2], *TINY_SIDES)
    assert result.exact is False and result.exact_detector_hw == expected == (373, 160)
    note = next(n for n in result.notes if n.startswith("not exact"))
    assert "285x122 image resized to 373x160" in note and "--detector-size 373x160" in note
    payload = result.regions_json()
    assert payload["exact"] is False and payload["exact_detector_size"] == [373, 160]
    assert square.exact is True and "exact_detector_size" not in square.regions_json()  # 900x900 resizes to 224x224


def test_an_engine_of_the_reference_size_equals_the_reference(sized_engine_dir, data_dir):
    torch = pytest.importorskip("torch")
    from bench.reference.load import build_reference, load_reference_models

    from test_pipeline_parity import assert_matches

    torch.set_num_threads(2)
    config = load_shipped_config("mtd", "mtd")
    pipeline = Pipeline(mf.load_manifest(sized_engine_dir), config)
    image = crack(data_dir)
    assert (pipeline.detector.height, pipeline.detector.width) == shorter_side_shape(*image.shape[:2], *TINY_SIDES)
    assert pipeline(image).exact is True
    reference = build_reference(load_reference_models(sized_engine_dir), config)
    assert_matches(reference, pipeline, data_dir, {"mtd crack 285x122": image})


def test_the_cli_says_it_once_and_the_table_per_image(full_tiny_engine_dir, data_dir, tmp_path, capsys):
    from runtime import infer

    code = infer.main(["--engine-dir", str(full_tiny_engine_dir), "--dataset", "mtd", "--category", "mtd",
                       str(data_dir / "mtd-mini"), str(data_dir / "bottle_demo.png"), "--out", str(tmp_path),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("not exact: the reference gives GroundingDINO") == 1
    assert "4 of them not run exactly as the reference algorithm takes them" in err
    rows = {row["outputs"]: row["exact"] for row in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert rows["bottle_demo"] == "yes" and list(rows.values()).count("no") == 4
    assert json.loads((tmp_path / "exp1_num_32128_regions.json").read_text())["exact_detector_size"] == [373, 160]


def test_the_c_abi_gives_the_flag_and_the_size(full_tiny_engine_dir, lite_engine_dir, data_dir):
    from runtime.capi import CapiError, CPipeline

    with CPipeline.open(str(full_tiny_engine_dir), dataset="mtd", category="mtd") as pipe:
        with pytest.raises(CapiError, match="no successful saa_infer"):
            pipe.last_exact()
        pipe(crack(data_dir))
        assert pipe.last_exact() == (False, (373, 160))
        pipe(cv2.imread(str(data_dir / "bottle_demo.png")))
        assert pipe.last_exact() == (True, None)
    with CPipeline.open(str(lite_engine_dir), dataset="mtd", category="mtd") as pipe:
        pipe(crack(data_dir))
        assert pipe.last_exact() == (True, None)  # lite: the saliency takes any shape as the reference does
