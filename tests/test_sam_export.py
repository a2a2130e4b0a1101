"""SAM -> ONNX: graph I/O, parity with the official modules at several box counts, parity failures raise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from segment_anything import SamPredictor

import export.sam as sam_export
from export.common import ParityError, ort_session
from export.sam import build_sam, export_sam_decoder, export_tiny_sam, gather_external_data, parity_boxes, parity_image, preprocess_record
from runtime import manifest as M

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("sam_engines")
    models, preprocess = export_tiny_sam(out_dir)
    return out_dir, {m.name: m for m in models}, preprocess


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny", random_init=True)  # the same seeded weights export_tiny_sam used


def test_graph_io(exported) -> None:
    out_dir, models, _ = exported
    assert sorted(models) == [M.SAM_DECODER, M.SAM_ENCODER]
    encoder, decoder = models[M.SAM_ENCODER], models[M.SAM_DECODER]
    assert (out_dir / encoder.file).is_file() and (out_dir / decoder.file).is_file()
    assert encoder.inputs == [{"name": "image", "shape": [1, 3, M.SAM_IMAGE_SIZE, M.SAM_IMAGE_SIZE], "dtype": "float32"}]
    assert encoder.outputs == [{"name": "image_embeddings", "shape": [1, 32, 64, 64], "dtype": "float32"}]
    assert decoder.inputs == [
        {"name": "image_embeddings", "shape": [1, 32, 64, 64], "dtype": "float32"},
        {"name": "boxes", "shape": ["num_boxes", 4], "dtype": "float32"},
    ]
    assert decoder.outputs == [
        {"name": "low_res_masks", "shape": ["num_boxes", 1, M.SAM_MASK_SIZE, M.SAM_MASK_SIZE], "dtype": "float32"},
        {"name": "iou_predictions", "shape": ["num_boxes", 1], "dtype": "float32"},
    ]
    assert encoder.source["variant"] == "tiny" and encoder.source["checkpoint"]["kind"] == "random_init"
    assert "external_data" not in encoder.source


def test_parity_records_cover_other_box_counts(exported) -> None:
    _, models, _ = exported
    for model in models.values():
        assert model.parity["passed"] and model.parity["max_abs_diff"] <= model.parity["tolerance"]
    cases = [c["case"] for c in models[M.SAM_DECODER].parity["cases"]]
    assert any(c.startswith("N=1 ") for c in cases) and any(c.startswith("N=5 ") for c in cases)


def test_graphs_match_the_predictor_on_new_inputs(exported, sam) -> None:
    """Independent of the export's own check: new image, N=4, against SamPredictor.predict_torch."""
    out_dir, models, _ = exported
    generator = torch.Generator().manual_seed(5)
    resized = torch.randint(0, 256, (1, 3, 700, M.SAM_IMAGE_SIZE), generator=generator).float()  # a 700x1024 input
    predictor = SamPredictor(sam)
    predictor.set_torch_image(resized, (700, M.SAM_IMAGE_SIZE))
    normalised = sam.preprocess(resized)  # what the predictor fed its encoder: normalised, zero-padded
    (embedding,) = ort_session(out_dir / models[M.SAM_ENCODER].file).run(None, {"image": normalised.numpy()})
    assert np.abs(embedding - predictor.features.numpy()).max() <= models[M.SAM_ENCODER].parity["tolerance"]

    boxes = parity_boxes(4, seed=99)
    _, scores, low_res = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    decoder = ort_session(out_dir / models[M.SAM_DECODER].file)
    got_masks, got_scores = decoder.run(None, {"image_embeddings": predictor.features.numpy(), "boxes": boxes.numpy()})
    assert np.abs(got_masks - low_res.numpy()).max() < 1e-4  # measured ~1e-7
    assert np.abs(got_scores - scores.numpy()).max() < 1e-4


def test_boxes_are_decoded_independently(exported, sam) -> None:
    """Boxes on the batch axis: a box's mask does not depend on the other boxes in the call."""
    out_dir, models, _ = exported
    decoder = ort_session(out_dir / models[M.SAM_DECODER].file)
    with torch.no_grad():
        embedding = sam.image_encoder(parity_image(seed=1)).numpy()
    boxes = parity_boxes(4, seed=3).numpy()
    together, _ = decoder.run(None, {"image_embeddings": embedding, "boxes": boxes})
    for index in range(len(boxes)):
        alone, _ = decoder.run(None, {"image_embeddings": embedding, "boxes": boxes[index : index + 1]})
        np.testing.assert_allclose(together[index], alone[0], atol=1e-6, rtol=0)
    assert np.abs(together[0] - together[1]).max() > 1e-4  # different boxes, different masks


def test_parity_failure_raises(tmp_path: Path, sam, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sam_export, "DECODER_ATOL", -1.0)  # no difference can pass a negative tolerance
    with torch.no_grad():
        embedding = sam.image_encoder(parity_image())
    with pytest.raises(ParityError, match="sam_decoder: ONNX differs from PyTorch"):
        export_sam_decoder(sam, tmp_path, embedding)


def test_preprocess_record() -> None:
    record = preprocess_record("vit_h")
    assert record == {
        "variant": "vit_h",
        "image_size": M.SAM_IMAGE_SIZE,
        "mask_size": M.SAM_MASK_SIZE,
        "pixel_mean": list(M.SAM_PIXEL_MEAN),
        "pixel_std": list(M.SAM_PIXEL_STD),
        "mask_threshold": 0.0,
    }
    with pytest.raises(sam_export.ExportError, match="unknown SAM variant"):
        preprocess_record("vit_q")


def test_external_data_is_gathered_into_one_file(exported, tmp_path: Path) -> None:
    """Graphs over 2 GB (ViT-H) come out of torch as one file per tensor; export keeps one .data file."""
    out_dir, models, _ = exported
    source = out_dir / models[M.SAM_ENCODER].file
    model = onnx.load(str(source))
    scattered = tmp_path / "sam_encoder.onnx"
    onnx.save_model(model, str(scattered), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) > 10
    assert gather_external_data(scattered) == "sam_encoder.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam_encoder.onnx", "sam_encoder.onnx.data"]
    feed = {"image": parity_image(seed=4).numpy()}
    (expected,) = ort_session(source).run(None, feed)
    (got,) = ort_session(scattered).run(None, feed)
    np.testing.assert_array_equal(got, expected)
    assert gather_external_data(scattered) == "sam_encoder.onnx.data"  # idempotent


@pytest.mark.slow
def test_vit_b_random_weights_export(tmp_path: Path) -> None:
    """Full-size architecture (random weights): parity holds at the real sizes."""
    models = sam_export.export_sam(build_sam("vit_b", random_init=True), tmp_path)
    assert [m.outputs[0]["shape"] for m in models] == [[1, 256, 64, 64], ["num_boxes", 1, 256, 256]]
    assert all(m.parity["passed"] for m in models)


def test_window_padding_is_written_as_concats(exported) -> None:
    """onnxruntime's CUDA Pad was the slow kernel (export.common.pad_right_bottom); the tiny encoder
    has a windowed block (14 on 64x64 tokens, padded to 70), whose padding must be Concats."""
    out_dir, models, _ = exported
    ops = [node.op_type for node in onnx.load(str(out_dir / models[M.SAM_ENCODER].file)).graph.node]
    assert "Pad" not in ops and "Concat" in ops


@pytest.mark.parametrize("size", [(64, 64), (14, 14), (20, 9)])
def test_window_partition_by_concat_equals_segment_anythings(size) -> None:
    from segment_anything.modeling.image_encoder import window_partition

    from export.sam_forms import window_partition_by_concat

    x = torch.randn(2, *size, 8)
    (got, got_hw), (want, want_hw) = window_partition_by_concat(x, 14), window_partition(x, 14)
    assert got_hw == want_hw
    torch.testing.assert_close(got, want, rtol=0, atol=0)
