"""export --sam-attention mha|augmented: SAM's encoder attention in other forms, same numbers."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("segment_anything")

from export import precision  # noqa: E402
from export.sam import build_sam, export_sam, parity_image  # noqa: E402
from export.sam_forms import AugmentedRelPosAttention, FusedRelPosAttention, sam_attention_form  # noqa: E402
from segment_anything.modeling.image_encoder import Attention  # noqa: E402


def _random_rel_pos(module: torch.nn.Module, seed: int = 0) -> None:
    """Relative-position tables of other values (official checkpoints carry learned ones;
    segment_anything starts them at zero, which would make the bias vanish and any form of it pass)."""
    generator = torch.Generator().manual_seed(seed)
    for attention in (m for m in module.modules() if isinstance(m, Attention) and m.use_rel_pos):
        for table in (attention.rel_pos_h, attention.rel_pos_w):
            table.data = torch.randn(table.shape, generator=generator) * 0.5


def _attention_and_input(size: tuple[int, int]) -> tuple[Attention, torch.Tensor]:
    """A 4-head attention with relative positions of other values, and a batch of 3 inputs."""
    torch.manual_seed(0)
    attention = Attention(64, num_heads=4, use_rel_pos=True, input_size=size)
    _random_rel_pos(attention)
    return attention, torch.randn(3, *size, 64)


@pytest.mark.parametrize("size", [(14, 14), (8, 8)])
def test_the_fused_form_computes_the_same_attention(size):
    attention, x = _attention_and_input(size)
    with torch.no_grad():
        expected = attention(x)
        attention.__class__ = FusedRelPosAttention
        got = attention(x)
    assert 0 < float((got - expected).abs().max()) < 1e-5  # another order of the same sums


@pytest.mark.parametrize("size", [(14, 14), (8, 8), (6, 10)])
def test_the_augmented_form_computes_the_same_attention(size):
    attention, x = _attention_and_input(size)
    with torch.no_grad():
        expected = attention(x)
        without = Attention(64, num_heads=4, use_rel_pos=False)
        without.load_state_dict({k: v for k, v in attention.state_dict().items() if "rel_pos" not in k})
        attention.__class__ = AugmentedRelPosAttention
        got = attention(x)
        without.__class__ = AugmentedRelPosAttention  # no relative positions: nothing widened
        assert float((without(x) - expected).abs().max()) > 1e-2  # the terms matter
    assert float((got - expected).abs().max()) < 1e-5


def test_an_augmented_encoder_exports_with_parity(tmp_path):
    sam, graph = _exported_encoder(tmp_path, "augmented")
    adds_plain = _count_ops(tmp_path, sam, "plain", "Add")
    assert sum(n.op_type == "Add" for n in graph.graph.node) < adds_plain  # the two broadcast Adds a block are gone
    _assert_export_matches_the_plain_module(sam, tmp_path)


def _exported_encoder(tmp_path, form: str):
    """A tiny random SAM (relative positions of other values) and its encoder exported in `form`,
    parity passed at export."""
    sam = build_sam("tiny", random_init=True)
    _random_rel_pos(sam.image_encoder)
    models = export_sam(sam, tmp_path, {"variant": "tiny"}, attention=form)
    encoder = next(m for m in models if m.name == "sam_encoder")
    assert encoder.source["attention"] == form and encoder.parity["passed"]
    return sam, onnx.load(str(tmp_path / "sam_encoder.onnx"))


def _assert_export_matches_the_plain_module(sam, tmp_path) -> np.ndarray:
    """The exported sam_encoder.onnx against the unmodified module on the parity image (returned)."""
    image = parity_image().numpy()
    with torch.no_grad():
        plain = sam.image_encoder(torch.from_numpy(image)).numpy()
    (got,) = ort.InferenceSession(str(tmp_path / "sam_encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image})
    assert np.abs(got - plain).max() < 1e-4 and np.abs(plain).max() > 0.5
    return image


def _count_ops(tmp_path, sam, form: str, op_type: str) -> int:
    out = tmp_path / form
    export_sam(sam, out, {"variant": "tiny"}, attention=form)
    return sum(n.op_type == op_type for n in onnx.load(str(out / "sam_encoder.onnx")).graph.node)


def test_an_mha_encoder_exports_with_parity_and_converts_to_fp16(tmp_path):
    sam, graph = _exported_encoder(tmp_path, "mha")
    fused = [n for n in graph.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(fused) == len(sam.image_encoder.blocks) and all(n.domain == "com.microsoft" for n in fused)
    assert not [n for n in graph.graph.node if n.op_type == "Softmax"]
    image = _assert_export_matches_the_plain_module(sam, tmp_path)
    with sam_attention_form(sam.image_encoder, "plain"):
        pass  # "plain" leaves the modules alone
    assert all(type(m) is Attention for m in sam.image_encoder.modules() if isinstance(m, Attention))
    feeds = [{"image": image}]
    expected = precision._run_all(tmp_path / "sam_encoder.onnx", feeds, "CPUExecutionProvider")
    record = precision.convert_to_fp16(tmp_path / "sam_encoder.onnx", precision.fp32_ops("sam_encoder"))
    assert record["precision"] == "fp16"
    try:
        parity = precision.fp16_parity(expected, tmp_path / "sam_encoder.onnx", feeds)
    except precision._OrtNotImplemented:  # no CPU fp16 MultiHeadAttention in this onnxruntime
        return
    assert parity["relative"] < 5e-3


def test_an_unknown_form_is_refused():
    sam = build_sam("tiny", random_init=True)
    with pytest.raises(ValueError, match="must be one of"):
        with sam_attention_form(sam.image_encoder, "flash"):
            pass


def test_the_plain_export_keeps_learned_relative_positions(tmp_path):
    """segment_anything starts its relative-position tables at zero; build_sam's random init gives
    them values (RANDOM_REL_POS_STD), and the export follows them when they change."""
    from export.sam import RANDOM_REL_POS_STD

    assert RANDOM_REL_POS_STD > 0
    sam = build_sam("tiny", random_init=True)
    image = parity_image()
    with torch.no_grad():
        without = sam.image_encoder(image).numpy()
        _random_rel_pos(sam.image_encoder)
        expected = sam.image_encoder(image).numpy()
    assert np.abs(expected - without).max() > 1e-2  # the terms matter
    (encoder, _) = export_sam(sam, tmp_path, {"variant": "tiny"})
    assert encoder.source["attention"] == "plain" and encoder.parity["passed"]
    (got,) = ort.InferenceSession(str(tmp_path / "sam_encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": image.numpy()})
    assert np.abs(got - expected).max() < 1e-4
