"""runtime.stages.segmenter (onnxruntime + numpy) against the reference's SAM calls (PyTorch) on a real image.

Tolerance: at most 1e-3 of a mask's pixels may differ (measured <= 1.1e-5 on this image and its
transpose, <= 1.3e-4 on another MTD image). The differences come from preprocessing:
runtime.engine.resize.resize_like_pil equals PIL's bilinear resize up to PIL's fixed-point rounding (+-1 grey level on ~0.03% of values), which moves the embedding by ~1e-2.
Random weights give mask logits of |x| ~ 0.03, so pixels whose logit lies within ~1e-4 of the
threshold flip; the test checks that every flipped pixel is such a threshold-edge pixel
(|reference logit| < 5% of the logits' std; measured < 0.002%).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench.reference.segmenter import ReferenceSegmenter, reference_masks
from export.common import ort_session
from export.sam import build_sam, export_tiny_sam
from runtime.errors import EngineError, ImageError, ManifestError
from runtime.manifest import Manifest
from runtime.stages.segmenter import Segmenter, upscale_mask_logits

torch.set_num_threads(1)

IMAGE = Path(__file__).parent / "data" / "mtd_break_exp6_num_348888.jpg"  # 488x380 (WxH) MTD tile (see data/README.md)
MAX_DIFF_FRACTION = 1e-3


def make_manifest(engine_dir: Path, models, preprocess: dict) -> Manifest:
    """A manifest object as load_manifest would return it, without writing manifest.json."""
    data = {"profile": "full", "models": {m.name: m.manifest_entry() for m in models}, "preprocess": {"sam": preprocess}}
    return Manifest(engine_dir=engine_dir, data=data)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    engine_dir = tmp_path_factory.mktemp("sam_engines")
    models, preprocess = export_tiny_sam(engine_dir)
    return make_manifest(engine_dir, models, preprocess)


@pytest.fixture(scope="module")
def segmenter(engines: Manifest) -> Segmenter:
    return Segmenter(engines, lambda path: ort_session(path, threads=1))


@pytest.fixture(scope="module")
def reference() -> ReferenceSegmenter:
    return ReferenceSegmenter(build_sam("tiny", random_init=True))  # the weights export_tiny_sam exported


@pytest.fixture(scope="module", params=["landscape", "portrait"])
def image(request) -> np.ndarray:
    bgr = cv2.imread(str(IMAGE))  # the reference hands SAM this BGR array as if it were RGB
    assert bgr is not None and bgr.shape == (380, 488, 3)
    # SAM pads a landscape image at the bottom, a portrait one (the transpose) on the right.
    return bgr if request.param == "landscape" else np.ascontiguousarray(bgr.transpose(1, 0, 2))


@pytest.fixture(scope="module")
def prepared(segmenter: Segmenter, reference: ReferenceSegmenter, image: np.ndarray):
    """Both sides with `image` encoded once (the encoders dominate the test time)."""
    segmenter.set_image(image)
    reference.set_image(image)
    return segmenter, reference, image


def sample_boxes(height: int, width: int) -> np.ndarray:
    return np.array(
        [
            [10, 20, 200, 150],
            [0, 0, width, height],  # whole image
            [width * 0.5, height * 0.3, width * 0.9, height * 0.95],
            [100.5, 50.2, 110.7, 61.9],  # small, fractional
            [-10, -5, width + 20, height / 2],  # reaching outside the image
            [width - 30, height - 30, width - 1, height - 1],
        ],
        dtype=np.float32,
    )


def test_masks_match_the_reference(prepared) -> None:
    segmenter, reference, image = prepared
    height, width = image.shape[:2]
    boxes = sample_boxes(height, width)
    got = segmenter.predict_boxes(boxes)
    expected = reference.predict_boxes(boxes)
    assert got.shape == expected.shape == (len(boxes), height, width) and got.dtype == bool
    assert 0.05 < expected.mean() < 0.95  # masks with both classes, so agreement means something

    differing = got != expected
    assert differing.mean(axis=(1, 2)).max() < MAX_DIFF_FRACTION, differing.mean(axis=(1, 2))
    # Every flip sits at the threshold: its reference logit is tiny next to the typical logit.
    predictor = reference.predictor
    transformed = predictor.transform.apply_boxes_torch(torch.from_numpy(boxes), (height, width))
    logits, _, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False, return_logits=True)
    logits = logits[:, 0].numpy()
    if differing.any():
        assert np.abs(logits[differing]).max() < 0.05 * np.abs(logits).std()


def test_reference_masks_helper(prepared) -> None:
    _, reference, image = prepared
    if image.shape[0] > image.shape[1]:
        pytest.skip("one image is enough for the one-call helper")
    boxes = sample_boxes(*image.shape[:2])[:2]
    expected = reference.predict_boxes(boxes)
    np.testing.assert_array_equal(reference_masks(reference.predictor.model, image, boxes), expected)


def test_chunked_decoding_equals_one_call(prepared) -> None:
    segmenter, _, image = prepared
    height, width = image.shape[:2]
    generator = np.random.default_rng(0)
    corners = generator.uniform(0, 1, size=(9, 2, 2)) * [width, height]
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 2], axis=1).astype(np.float32)
    whole = segmenter.predict_boxes(boxes, chunk=len(boxes))
    for chunk in (1, 4):
        np.testing.assert_array_equal(segmenter.predict_boxes(boxes, chunk=chunk), whole)


@pytest.mark.parametrize(
    "input_size, original_size",
    [((394, 1024), (154, 400)), ((1024, 1024), (1024, 1024)), ((1024, 395), (2000, 772)), ((683, 1024), (100, 150))],
)
def test_upscaling_matches_postprocess_masks(reference: ReferenceSegmenter, input_size, original_size) -> None:
    sam = reference.predictor.model
    low_res = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    expected = sam.postprocess_masks(low_res, input_size, original_size)[0, 0].numpy()
    got = upscale_mask_logits(low_res[0, 0].numpy(), input_size, original_size, 1024)
    assert got.shape == expected.shape == original_size
    # torch computes source coordinates in float32, OpenCV in double: measured <= 9e-5 on logits of std 1.
    assert np.abs(got - expected).max() < 2e-4


def test_no_boxes(prepared) -> None:
    segmenter, reference, image = prepared
    for empty in (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)):
        masks = segmenter.predict_boxes(empty)
        assert masks.shape == (0, *image.shape[:2]) and masks.dtype == bool
        assert reference.predict_boxes(empty).shape == masks.shape


def test_bad_inputs(engines: Manifest, prepared) -> None:
    segmenter, _, image = prepared
    fresh = Segmenter(engines, lambda path: ort_session(path, threads=1))
    with pytest.raises(EngineError, match="set_image"):
        fresh.predict_boxes(np.zeros((1, 4), np.float32))
    with pytest.raises(ImageError, match="uint8 HxWx3.*float32"):
        fresh.set_image(image.astype(np.float32))
    with pytest.raises(ImageError, match="uint8 HxWx3"):
        fresh.set_image(image[:, :, 0])
    with pytest.raises(ImageError, match="empty image"):
        fresh.set_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="too thin"):
        fresh.set_image(np.zeros((1, 4000, 3), np.uint8))
    with pytest.raises(EngineError, match=r"\[N, 4\]"):
        segmenter.predict_boxes(np.zeros((3,), np.float32))
    with pytest.raises(EngineError, match=r"\[N, 4\]"):
        segmenter.predict_boxes(np.array([["a", "b", "c", "d"]]))
    with pytest.raises(EngineError, match="NaN"):
        segmenter.predict_boxes(np.array([[0, 0, np.nan, 5]], np.float32))
    with pytest.raises(EngineError, match="chunk"):
        segmenter.predict_boxes(np.zeros((1, 4), np.float32), chunk=0)


def test_engine_failures_are_engine_errors(engines: Manifest, image: np.ndarray) -> None:
    class Broken:
        def run(self, names, feeds):
            raise RuntimeError("corrupt graph")

    with pytest.raises(EngineError, match="sam_encoder failed: corrupt graph"):
        Segmenter(engines, lambda path: Broken()).set_image(image)


def test_manifest_without_sam_preprocess(engines: Manifest) -> None:
    data = {**engines.data, "preprocess": {}}
    with pytest.raises(ManifestError, match="'sam'"):
        Segmenter(Manifest(engines.engine_dir, data), lambda path: None)
    data = {**engines.data, "preprocess": {"sam": {"image_size": 1024}}}
    with pytest.raises(ManifestError, match="lacks"):
        Segmenter(Manifest(engines.engine_dir, data), lambda path: None)


def test_runtime_segmenter_does_not_import_torch() -> None:
    code = "import sys, runtime.stages.segmenter; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "runtime.stages.segmenter imported torch"
