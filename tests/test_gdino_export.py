"""GroundingDINO export: the three graphs, their parity records, and the split's PyTorch glue.

Parity (onnxruntime CPU vs PyTorch, same inputs, P and L other than the traced ones, a padded
image) runs inside export_grounding_dino; these tests check what it recorded and that it fails
when it should. The split's glue code is checked against transformers' full forward.
"""
from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest
import torch

from export import gdino as G
from export import gdino_forms as F
from export.common import ExportError, ParityError
from runtime.manifest import GDINO_HEAD, GDINO_IMAGE, GDINO_TEXT
from runtime.stages.text import GdinoTokenizer, encode_captions

CAPTIONS = ["bottle,", "crack. flawed golden wire. black hole.", "scratch"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gdino_export")
    models, preprocess = G.export_tiny_gdino(out)
    return out, {m.name: m for m in models}, preprocess


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return G.tiny_test_model(0)


@pytest.fixture(scope="module")
def tokenizer(exported) -> GdinoTokenizer:
    return GdinoTokenizer(exported[0] / "tokenizer.json")


def test_files_and_io(exported):
    out, models, _ = exported
    assert sorted(p.name for p in out.iterdir()) == ["gdino_head.onnx", "gdino_image.onnx", "gdino_text.onnx", "tokenizer.json"]
    text, image, head = models[GDINO_TEXT], models[GDINO_IMAGE], models[GDINO_HEAD]
    assert [(i["name"], i["shape"], i["dtype"]) for i in text.inputs] == [
        ("input_ids", ["prompts", "tokens"], "int64"),
        ("position_ids", ["prompts", "tokens"], "int64"),
        ("text_self_attention_masks", ["prompts", "tokens", "tokens"], "bool"),
    ]
    assert text.outputs[0]["shape"] == ["prompts", "tokens", 32]
    assert [i["shape"] for i in image.inputs] == [[1, 3, 224, 224], [1, 224, 224]]
    assert [o["name"] for o in image.outputs] == list(G.IMAGE_OUTPUTS)
    assert image.outputs[0]["shape"] == [1, 1045, 32]  # 28^2 + 14^2 + 7^2 + 4^2 positions
    assert [i["name"] for i in head.inputs] == list(G.HEAD_INPUTS)
    assert {o["name"]: o["shape"] for o in head.outputs} == {
        "logits": ["prompts", 900, "tokens"], "boxes": ["prompts", 900, 4], "query_index": ["prompts", 900]}
    assert image.source["image_hw"] == head.source["image_hw"] == [224, 224]


def test_parity_was_checked_on_other_prompt_counts_lengths_and_padding(exported):
    _, models, _ = exported
    for name, model in models.items():
        parity = model.parity
        assert parity["passed"] and parity["tolerance"] == G.TOLERANCES[name]
        assert 0 <= parity["max_abs_diff"] <= parity["tolerance"]
        assert len(parity["cases"]) == 3
    text_cases = [c["case"] for c in models[GDINO_TEXT].parity["cases"]]
    assert text_cases[0] == "P=2 L=11" and {"P=1 L=5", "P=3 L=12"} <= set(text_cases)
    assert "padded right quarter" in [c["case"] for c in models[GDINO_IMAGE].parity["cases"]]
    assert all("reordered_queries" in c for c in models[GDINO_HEAD].parity["cases"])


def test_preprocess_record(exported, model):
    _, _, preprocess = exported
    assert preprocess == {"height": 224, "width": 224, "short_side": 224, "max_side": 373, "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225], "max_text_len": 256, "num_queries": 900}
    reference = G.preprocess_record((800, 800))
    assert (reference["short_side"], reference["max_side"]) == (800, 1333)  # the reference's resize
    assert G.preprocess_record((800, 1216), model)["short_side"] == 800
    assert G.preprocess_record((512, 640), short_side=480, max_side=640)["max_side"] == 640
    with pytest.raises(ExportError, match="impossible"):
        G.preprocess_record((800, 800), short_side=800, max_side=700)


def _split_run(model, tokenizer, captions, pixels, mask):
    """The three PyTorch wrappers chained as the runtime chains the graphs."""
    shapes = G._spatial_shapes(model, tuple(pixels.shape[-2:]))
    encoded = encode_captions(tokenizer, captions)
    with torch.no_grad():
        vision = G.GdinoImageEncoder(model)(pixels, mask)
        text = G.GdinoTextEncoder(model)(*(torch.from_numpy(getattr(encoded, n)) for n in G.TEXT_INPUTS))
        head = G.GdinoHead(model, shapes)
        out = head(*vision, text, torch.from_numpy(encoded.attention_mask), torch.from_numpy(encoded.position_ids),
                   torch.from_numpy(encoded.text_self_attention_masks))
    return encoded, head, out


def test_split_modules_equal_the_full_forward(model, tokenizer):
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 224, 224)
    encoded, _, (logits, boxes, _) = _split_run(model, tokenizer, CAPTIONS, pixels, torch.ones(1, 224, 224, dtype=torch.long))
    for row, caption in enumerate(encoded.captions):
        n = int(encoded.lengths[row])
        ids = torch.from_numpy(encoded.token_ids(row))[None]
        with torch.no_grad():
            full = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))
        torch.testing.assert_close(logits[row, :, :n], full.logits[0, :, :n], atol=1e-5, rtol=1e-5)  # raw logits reach ~20
        torch.testing.assert_close(boxes[row], full.pred_boxes[0], atol=1e-5, rtol=0)


def test_boxes_are_relative_to_the_unpadded_image(tokenizer):
    # With zero box heads, every box is its query's proposal: the centre of its feature cell
    # divided by the VALID size of that level. So boxes need no rescaling from canvas to image.
    model = G.tiny_test_model(0)
    with torch.no_grad():
        for head in [*model.bbox_embed, model.model.encoder_output_bbox_embed]:
            head.layers[-1].weight.zero_()
            head.layers[-1].bias.zero_()
    mask = torch.zeros(1, 320, 320, dtype=torch.long)
    mask[:, :224] = 1  # image in the top 224 rows of a 320x320 canvas (enough positions for 900 queries)
    pixels = torch.randn(1, 3, 320, 320) * mask[:, None]
    _, head, (_, boxes, selected) = _split_run(model, tokenizer, ["crack"], pixels, mask)
    expected = []
    for level, (h, w) in enumerate(head.spatial_shapes_list):
        valid_h = int(torch.nn.functional.interpolate(mask[None].float(), size=(h, w))[0, 0, :, 0].sum())
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        size = np.full(h * w, 0.05 * 2**level)
        expected.append(np.stack([(xs.ravel() + 0.5) / w, (ys.ravel() + 0.5) / valid_h, size, size], 1))
    expected = np.concatenate(expected)[selected[0].numpy()]
    np.testing.assert_allclose(boxes[0].numpy(), expected, atol=1e-5)
    assert mask.flatten()[0] == 1 and boxes[0, :, 1].max() > 0.95  # in canvas units it would be < 0.7


def test_head_parity_accepts_near_tie_reordering_only(model, tokenizer):
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 224, 224)
    mask = torch.ones(1, 224, 224, dtype=torch.long)
    encoded, head, out = _split_run(model, tokenizer, ["scratch"], pixels, mask)
    with torch.no_grad():
        vision = [t.numpy() for t in G.GdinoImageEncoder(model)(pixels, mask)]
        text = G.GdinoTextEncoder(model)(*(torch.from_numpy(getattr(encoded, n)) for n in G.TEXT_INPUTS)).numpy()
    feeds = [*vision, text, encoded.attention_mask, encoded.position_ids, encoded.text_self_attention_masks]
    same = [t.numpy() for t in out]
    assert G._head_parity(head, feeds, same, 1e-4, "same")["reordered_queries"] == 0
    wrong = [same[0] + 0.5, same[1], same[2]]
    with pytest.raises(ParityError, match="differs"):
        G._head_parity(head, feeds, wrong, 1e-4, "wrong logits")

    scores = head.last_scores[0].numpy()
    order = same[2][0]
    ranked = scores[order]
    tight = int(np.argmin(ranked[:-1] - ranked[1:]))  # adjacent ranks with the closest scores
    loose = int(np.argmax(ranked[:-1] - ranked[1:]))
    for rank, ok in ((tight, True), (loose, False)):
        swapped = order.copy()
        swapped[[rank, rank + 1]] = swapped[[rank + 1, rank]]
        head.forced_index = torch.from_numpy(swapped[None])
        try:
            other = G._torch_run(head, feeds)  # what a graph that ranked this pair the other way outputs
        finally:
            head.forced_index = None
        gap = float(ranked[rank] - ranked[rank + 1])
        if ok:
            record = G._head_parity(head, feeds, other, gap + 1e-6, "near tie")
            assert record["reordered_queries"] == 2 and record["max_abs_diff"] < 1e-5
        else:
            with pytest.raises(ParityError, match="selected other queries"):
                G._head_parity(head, feeds, other, gap / 2, "real disagreement")


def test_quick_parity_checks_the_image_graph_and_head_on_the_other_input_only(model, exported, tmp_path):
    tokenizer_json = exported[0] / "tokenizer.json"
    models = {m.name: m for m in G.export_grounding_dino(model, tmp_path / "quick", G.TINY_IMAGE_HW, tokenizer_json,
                                                          parity="quick")}
    cases = {name: [c["case"] for c in m.parity["cases"]] for name, m in models.items()}
    assert cases[GDINO_IMAGE] == ["padded right quarter"] and cases[GDINO_HEAD] == ["P=3 L=12"]
    assert len(cases[GDINO_TEXT]) == 3 and all(m.parity["passed"] for m in models.values())
    with pytest.raises(ExportError, match="parity must be one of"):
        G.export_grounding_dino(model, tmp_path / "none", G.TINY_IMAGE_HW, tokenizer_json, parity="none")


def test_engine_too_small_for_900_queries(model, exported):
    with pytest.raises(ExportError, match="fewer than the 900 queries"):
        G.export_grounding_dino(model, exported[0] / "small", (160, 160), exported[0] / "tokenizer.json")


def test_copy_tokenizer_checks_the_vocabulary(tmp_path):
    written = json.loads(G.copy_tokenizer(tmp_path / "ok").read_text())
    assert written["truncation"] is None and written["padding"] is None  # sentence-transformers' 128 removed
    assert len(written["model"]["vocab"]) == 30522
    written["model"]["vocab"] = dict(list(written["model"]["vocab"].items())[:1000])
    bad_zip = tmp_path / "model.zip"
    with zipfile.ZipFile(bad_zip, "w") as archive:
        archive.writestr("tokenizer.json", json.dumps(written))
    with pytest.raises(ExportError, match="not bert-base-uncased"):
        G.copy_tokenizer(tmp_path / "bad", source_zip=bad_zip)
    with pytest.raises(ExportError, match="cannot read"):
        G.copy_tokenizer(tmp_path / "bad", source_zip=tmp_path / "missing.zip")


def test_build_errors_are_clear(tmp_path):
    with pytest.raises(ExportError, match="unknown GroundingDINO size"):
        G.build_grounding_dino("swin-b", random_init=True)
    with pytest.raises(ExportError, match="not both"):
        G.build_grounding_dino("tiny", tmp_path, random_init=True)
    with pytest.raises(ExportError, match="no official weights"):
        G.build_grounding_dino("tiny")
    with pytest.raises(ExportError, match="does not exist"):
        G.build_grounding_dino("swin-t", tmp_path / "nothing.pth")


def test_swin_t_preset_is_the_official_architecture():
    config = G.grounding_dino_config("swin-t")
    backbone, text = config.backbone_config, config.text_config
    assert (backbone.embed_dim, list(backbone.depths), list(backbone.num_heads), backbone.window_size) == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    assert list(backbone.out_indices) == [2, 3, 4]
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (30522, 768, 12, 12)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries, config.max_text_len) == (256, 6, 6, 900, 256)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim, config.num_feature_levels, config.two_stage) == (2048, 2048, 4, True)
    with torch.device("meta"):
        params = sum(p.numel() for p in G.GroundingDinoForObjectDetection(config).parameters())
    assert 170e6 < params < 175e6  # the official checkpoint holds ~172M weights (694 MB in fp32)


def test_mask_downsampling_is_torch_nearest_exactly():
    for height in (224, 230, 480, 512, 800, 801, 1024, 1333):
        for size in sorted({height // 8, (height + 7) // 8, (height + 15) // 16, (height + 31) // 32, (height + 63) // 64, 13, 7}):
            for content in (1, height // 3, height // 2, height * 3 // 4, height - 1):
                mask = torch.zeros(1, height, 9, dtype=torch.long)
                mask[:, :content] = 1
                expected = torch.nn.functional.interpolate(mask[None].float(), size=(size, 3)).to(torch.bool)[0]
                assert torch.equal(G.downsample_mask(mask, (size, 3)), expected), (height, size, content)


def test_image_graph_is_exact_on_padded_images_at_awkward_sizes(model, tmp_path):
    # 480 -> 8 at the stride-64 level: a traced F.interpolate of the mask kept one padded column
    # too many in onnxruntime (valid ratio 7/8 instead of 6/8); the gather indices do not.
    from export.common import export_onnx, ort_session

    path = tmp_path / "image.onnx"
    module = G.GdinoImageEncoder(model)
    trace = G._image_case((480, 480), seed=0)
    export_onnx(module, tuple(torch.from_numpy(trace[n]) for n in G.IMAGE_INPUTS), path, G.IMAGE_INPUTS, G.IMAGE_OUTPUTS)
    session = ort_session(path)
    for content in ((480, 360), (300, 480), (481 // 3, 200)):
        case = G._image_case((480, 480), seed=1, content_hw=content)
        expected = G._torch_run(module, [case[n] for n in G.IMAGE_INPUTS])
        got = session.run(None, case)
        np.testing.assert_array_equal(got[1], expected[1])  # vision_mask
        np.testing.assert_array_equal(got[3], expected[3])  # valid_ratios
        np.testing.assert_allclose(got[2], expected[2], atol=1e-4)  # vision_pos
        np.testing.assert_allclose(got[0], expected[0], atol=1e-3)


def _token_logits(model, seed: int = 0) -> torch.Tensor:
    image = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 3, 224, 224)).astype(np.float32))
    ids = torch.tensor([[101, 2304, 2006, 5835, 1012, 102]])  # "[CLS] defect on bottle. [SEP]"
    with torch.no_grad():
        out = model(pixel_values=image, input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits[0, :, 1:5]


def test_damp_scores_shrinks_and_lowers_the_token_logits():
    # A plain transformers-initialised model (what random full-size exports start from) at tiny size.
    torch.manual_seed(0)
    plain = G.GroundingDinoForObjectDetection(G.grounding_dino_config("tiny")).eval()
    damped = G.GroundingDinoForObjectDetection(G.grounding_dino_config("tiny")).eval()
    damped.load_state_dict(plain.state_dict())
    G.damp_scores(damped, shift=2.0, gain=0.5)
    before, after = _token_logits(plain), _token_logits(damped)
    assert after.mean() < before.mean() - 3.0  # shifted down by about shift^2
    assert after.std() < 0.75 * before.std()   # spread scaled by about gain
    assert (after.sigmoid() > 0.1).float().mean() < (before.sigmoid() > 0.1).float().mean()


def test_random_swin_t_is_damped_and_the_reference_insists_on_it(monkeypatch):
    from types import SimpleNamespace

    from bench.reference import load as L
    from runtime import manifest as mf

    built = {}
    monkeypatch.setattr(G, "GroundingDinoForObjectDetection", lambda config: SimpleNamespace(eval=lambda: "model"))
    monkeypatch.setattr(G, "damp_scores", lambda model, **kw: built.setdefault("damping", kw))
    assert G.build_grounding_dino("swin-t", random_init=True) == "model"
    assert built["damping"] == G.RANDOM_FULL_SIZE_DAMPING

    # An engines dir exported before the damping existed cannot be rebuilt as the same weights.
    old = SimpleNamespace(random_init=True, data={"size": "full"},
                          models={mf.GDINO_IMAGE: {"source": {"size": "swin-t", "random_init": True, "seed": 0}}})
    with pytest.raises(L.ReferenceLoadError, match="re-export"):
        L.load_gdino(old)


@pytest.mark.parametrize("weighted_sum", ["per_point", "per_level"])
@pytest.mark.parametrize("coordinates", [2, 4])
def test_folded_deformable_attention_equals_transformers(model, coordinates, weighted_sum, monkeypatch):
    """Encoder form (point references, padded positions) and decoder form (box references), with
    the weighted sum taken either way."""
    monkeypatch.setattr(F.FoldedDeformableAttention, "WEIGHTED_SUM", weighted_sum)
    attention = copy.deepcopy(model.model.encoder.layers[0].deformable_layer.self_attn if coordinates == 2
                              else model.model.decoder.layers[0].encoder_attn)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # offsets large enough to sample across cells and outside the map
        attention.sampling_offsets.weight.mul_(20)
        attention.sampling_offsets.bias.copy_(torch.randn(attention.sampling_offsets.bias.shape, generator=generator) * 3)
    shapes = [(12, 10), (6, 5), (3, 3), (2, 2)][:attention.n_levels]
    shape_tensor = torch.tensor(shapes)
    start = torch.cat([torch.zeros(1, dtype=torch.long), (shape_tensor[:, 0] * shape_tensor[:, 1]).cumsum(0)[:-1]])
    batch, queries, positions = 2, 37, sum(h * w for h, w in shapes)
    hidden = torch.randn(batch, queries, attention.d_model, generator=generator)
    memory = torch.randn(batch, positions, attention.d_model, generator=generator)
    position = torch.randn(batch, queries, attention.d_model, generator=generator)
    mask = torch.ones(batch, positions, dtype=torch.bool)
    mask[1, start[1] - 20:start[1]] = False  # padding (False) in the first level of prompt 1
    references = torch.rand(batch, queries, attention.n_levels, coordinates, generator=generator)
    kwargs = dict(hidden_states=hidden, attention_mask=mask, encoder_hidden_states=memory, position_embeddings=position,
                  reference_points=references, spatial_shapes=shape_tensor, spatial_shapes_list=shapes, level_start_index=start)
    with torch.no_grad():
        expected = attention(**kwargs)
        with F.trace_forms(attention):
            assert type(attention) is F.FoldedDeformableAttention
            got = attention(**kwargs)
    assert type(attention) is F.GroundingDinoMultiscaleDeformableAttention
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_reassociated_bi_attention_equals_transformers(model, masked):
    """The folded image-text attention gives transformers' outputs and weights, masks included."""
    attention = copy.deepcopy(model.model.encoder.layers[0].fusion_layer.attn)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # large random biases, so that a dropped bias term shows
        for linear in (attention.vision_proj, attention.values_vision_proj, attention.out_vision_proj, attention.text_proj):
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=generator))
    batch, positions, tokens, dim = 2, 50, 7, attention.vision_dim
    vision = torch.randn(batch, positions, dim, generator=generator)
    text = torch.randn(batch, tokens, dim, generator=generator)
    vision_mask = text_mask = None
    if masked:  # True = padding: the last image positions of prompt 1, the last tokens of prompt 0
        vision_mask = torch.zeros(batch, positions, dtype=torch.bool)
        vision_mask[1, -9:] = True
        text_mask = torch.zeros(batch, tokens, dtype=torch.bool)
        text_mask[0, -3:] = True
    with torch.no_grad():
        expected = attention(vision, text, vision_mask, text_mask)
        with F.trace_forms(attention):
            assert type(attention) is F.ReassociatedBiAttention
            got = attention(vision, text, vision_mask, text_mask)
    assert type(attention) is F.GroundingDinoBiMultiHeadAttention
    for (got_out, got_weights), (want_out, want_weights) in zip(got, expected):
        torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_weights, want_weights, rtol=1e-5, atol=1e-6)


def test_trace_forms_swap_every_module_and_restore_it(model):
    originals = {m: type(m) for m in model.modules() if type(m) in F.TRACE_FORMS}
    assert set(originals.values()) == set(F.TRACE_FORMS)  # the tiny model has each kind
    with F.trace_forms(model):
        assert all(type(m) is F.TRACE_FORMS[kind] for m, kind in originals.items())
    assert all(type(m) is kind for m, kind in originals.items())

def test_concat_padded_swin_layers_give_transformers_features_exactly(model):
    """The image graph's Swin form: window padding as Concats with zeros, the same tensors as F.pad."""
    backbone = model.model.backbone.conv_encoder.model
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))  # 64x64 tokens: padded to 70
    with torch.no_grad():
        expected = backbone(pixels).feature_maps
        with F.trace_forms(model, F.IMAGE_TRACE_FORMS):
            assert any(type(m) is F.ConcatPaddedSwinLayer for m in model.modules())
            got = backbone(pixels).feature_maps
    assert not any(type(m) is F.ConcatPaddedSwinLayer for m in model.modules())
    for got_map, want_map in zip(got, expected, strict=True):
        torch.testing.assert_close(got_map, want_map, rtol=0, atol=0)


@pytest.mark.parametrize("pads", [(0, 0), (0, 3), (6, 0), (6, 6)])
def test_pad_right_bottom_equals_f_pad(pads):
    from export.common import pad_right_bottom

    x = torch.randn(2, 5, 7, 3)
    pad_h, pad_w = pads
    torch.testing.assert_close(pad_right_bottom(x, pad_h, pad_w), torch.nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 1e5])  # 1e5: the clamps at +-50000 act
def test_shifted_logits_are_transformers_bits(scale):
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 300, 9, generator=generator) * scale
    logits[2, :, 4] -= 3 * scale  # rows far below the global max
    want_image = torch.clamp(logits - logits.max(), min=-50000, max=50000)  # transformers' code
    transposed = want_image.transpose(1, 2)
    want_text = torch.clamp(transposed - torch.max(transposed, dim=-1, keepdim=True)[0], min=-50000, max=50000)
    got_image, got_text = F.shifted_logits(logits)
    assert torch.equal(got_image, want_image) and torch.equal(got_text, want_text)
