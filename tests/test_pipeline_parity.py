"""The main proof: the runtime's SAA+ equals the PyTorch reference algorithm on the same weights.

Tiny random-weight GroundingDINO + SAM + WideResNet (full profile) and the real
EfficientNet-Lite0 (lite profile), exported by `python -m export`, against
bench.reference rebuilt from the manifest. Square images, so the detector's fixed
224x224 input holds them without the extra scaling a non-square image would need.
"""
import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.reference.load import build_reference, load_reference_models  # noqa: E402
from runtime import manifest as mf  # noqa: E402
from runtime.config import load_shipped_config  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402

# Random SAM weights put many mask logits near 0: a last-bit difference flips such a pixel,
# which changes the fused map there by up to a region's score. Allowed: this fraction of pixels.
MAX_DIFFERING_PIXELS = 1e-3


def square_images(data_dir):
    bottle = cv2.imread(str(data_dir / "bottle_demo.png"))
    tile = cv2.imread(str(data_dir / "mtd_break_exp6_num_348888.jpg"))
    side = min(tile.shape[:2])
    return {"mvtec bottle": bottle, "mtd tile crop": np.ascontiguousarray(tile[:side, :side])}


@pytest.fixture(scope="module")
def full_models(full_tiny_engine_dir):
    torch.set_num_threads(2)
    return load_reference_models(full_tiny_engine_dir)


@pytest.mark.parametrize("dataset, category", [("mvtec", "bottle"), ("mtd", "mtd")])
def test_full_pipeline_matches_reference(full_models, full_tiny_engine_dir, data_dir, dataset, category):
    config = load_shipped_config(dataset, category)
    assert_matches(build_reference(full_models, config), Pipeline(mf.load_manifest(full_tiny_engine_dir), config), data_dir)


def test_joined_captions_match_the_reference_joined(full_models, full_tiny_engine_dir, data_dir):
    """The joined_captions option (one head run for every caption) on both sides."""
    config = load_shipped_config("mvtec", "bottle", {"joined_captions": True})
    pipeline = Pipeline(mf.load_manifest(full_tiny_engine_dir), config)
    assert pipeline.text_features.encoded.input_ids.shape[0] == 1 < len(pipeline.captions)  # one joined caption
    assert_matches(build_reference(full_models, config), pipeline, data_dir)


def test_full_tiny_head_uses_the_fused_op_by_default(full_tiny_engine_dir):
    head = mf.load_manifest(full_tiny_engine_dir).models["gdino_head"]
    assert head["source"]["deformable_attention"] == "fused"
    assert head["source"]["custom_ops"] == ["saa.edge::MultiScaleDeformableAttention"]


def test_standard_deformable_attention_matches_the_reference(full_tiny_standard_engine_dir, data_dir):
    """A head exported with --deformable-attention standard (grid_sample per level and point,
    no custom op) against transformers' own deformable attention in the reference."""
    manifest = mf.load_manifest(full_tiny_standard_engine_dir)
    assert manifest.models["gdino_head"]["source"]["deformable_attention"] == "standard"
    assert "custom_ops" not in manifest.models["gdino_head"]["source"]
    config = load_shipped_config("mvtec", "bottle")
    models = load_reference_models(full_tiny_standard_engine_dir)
    assert_matches(build_reference(models, config), Pipeline(manifest, config), data_dir)


def assert_matches(reference, pipeline, data_dir, images=None) -> None:
    """images: name -> BGR image (default: the square ones, which the 224x224 engines take exactly)."""
    for name, image in (images or square_images(data_dir)).items():
        expected = reference(image)
        got = pipeline(image)
        boxes = np.array([r.box for r in got.regions], np.float32).reshape(-1, 4)
        assert len(boxes) == len(expected.defect_boxes) > 0, name  # the same boxes survive P^P, in the same order
        np.testing.assert_allclose(boxes, expected.defect_boxes, atol=1e-2, err_msg=name)
        # scores: detector score x exp(3 x mean saliency in the mask); mask-edge flips move the mean slightly
        np.testing.assert_allclose([r.score for r in got.regions], expected.defect_scores, rtol=1e-3, err_msg=name)
        assert got.object_regions and max(r.box_area for r in got.object_regions) == pytest.approx(expected.object_area, rel=1e-5)
        np.testing.assert_allclose(got.saliency_map, expected.saliency_map, atol=1e-5, err_msg=name)
        assert got.anomaly_map.shape == expected.anomaly_map.shape
        differing = np.abs(got.anomaly_map - expected.anomaly_map) > 1e-4
        assert differing.mean() < MAX_DIFFERING_PIXELS, (name, differing.mean())
        assert expected.anomaly_map.max() > 0  # a map with regions in it, so agreement means something


def test_lite_pipeline_matches_reference(lite_engine_dir, data_dir):
    config = load_shipped_config("mtd", "mtd", {"saliency_preset": "reference"})  # lite's default is the tuned map
    reference = build_reference(load_reference_models(lite_engine_dir), config)
    pipeline = Pipeline(mf.load_manifest(lite_engine_dir), config)
    image = cv2.imread(str(data_dir / "mtd_break_exp6_num_348888.jpg"))  # non-square: lite has no fixed input
    expected = reference(image).saliency_map
    got = pipeline(image)
    assert got.saliency_only
    np.testing.assert_allclose(got.anomaly_map, expected, atol=1e-5)
    # the lite default is the tuned preset (docs/saliency-study.md), a different map
    tuned = Pipeline(mf.load_manifest(lite_engine_dir), load_shipped_config("mtd", "mtd"))(image).anomaly_map
    assert np.abs(tuned - expected).max() > 1e-2


def test_no_object_box_takes_the_whole_image(full_models, full_tiny_engine_dir, data_dir):
    """The reference crashes when no object box survives; both treat the image as the object."""
    from runtime.config import config_from_dict

    # object boxes must be smaller than 1/1000 of the image: none is
    config = config_from_dict({"object_prompt": "tile", "object_count": 1000, "defect_prompts": ["crack"],
                               "top_k": 5, "defect_area_ratio": 0.9})
    image = square_images(data_dir)["mtd tile crop"]
    got = Pipeline(mf.load_manifest(full_tiny_engine_dir), config)(image)
    expected = build_reference(full_models, config)(image)
    assert got.object_regions == [] and expected.object_area == 1.0
    assert any("no object box" in note for note in got.notes)
    assert len(got.regions) == len(expected.defect_boxes)
    assert (np.abs(got.anomaly_map - expected.anomaly_map) > 1e-4).mean() < MAX_DIFFERING_PIXELS


def test_regions_of_one_box_share_one_sam_decode(full_tiny_engine_dir, data_dir, monkeypatch):
    """Joined captions keep a query once for every caption it passes: SAM decodes each box once,
    and the map is the one decoding every region's box gives."""
    from runtime.stages import segmenter as segmenter_module
    from runtime.stages.regions import Region, distinct_boxes

    regions = [Region((1, 2, 3, 4), 0.5, "a", 0, "a", 0.1), Region((0, 0, 9, 9), 0.4, "b", 1, "b", 0.2),
               Region((1, 2, 3, 4), 0.3, "c", 2, "c", 0.1)]
    boxes, mask_of_region = distinct_boxes(regions)
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4], [0, 0, 9, 9]])  # first-seen order
    assert mask_of_region.tolist() == [0, 1, 0]

    config = load_shipped_config("mvtec", "bottle", {"joined_captions": True})
    image = square_images(data_dir)["mvtec bottle"]
    pipeline = Pipeline(mf.load_manifest(full_tiny_engine_dir), config)
    decoded = []
    real = pipeline.segmenter.predict_boxes
    monkeypatch.setattr(pipeline.segmenter, "predict_boxes", lambda boxes, **kw: decoded.append(len(boxes)) or real(boxes, **kw))
    shared = pipeline(image)
    every = np.array([r.box for r in shared.regions], np.float32)
    assert len(np.unique(every, axis=0)) == decoded[0] < len(shared.regions)  # duplicates were there, and decoded once
    monkeypatch.setattr(segmenter_module, "distinct_boxes",  # each region its own decode, as the reference does
                        lambda rs: (np.array([r.box for r in rs], np.float32), np.arange(len(rs))))
    alone = pipeline(image)
    assert decoded[1] == len(alone.regions)
    np.testing.assert_allclose([r.score for r in shared.regions], [r.score for r in alone.regions], rtol=1e-6)
    assert (np.abs(shared.anomaly_map - alone.anomaly_map) > 1e-4).mean() < MAX_DIFFERING_PIXELS
