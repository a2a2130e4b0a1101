"""Loading GroundingDINO weights: the official .pth (converted) and a transformers copy (directory).

How strong these tests are:
- With the authors' package installed (`pip install --no-deps groundingdino-py==0.4.0 addict
  yapf platformdirs`; pure Python, no C++ extension), their own `GroundingDINO` classes are
  built at tiny sizes with random weights, saved the way groundingdino_swint_ogc.pth is
  ({"model": state dict, "module." prefixes}), loaded through our converter, and the two models'
  forward outputs are compared (their CPU code path vs transformers'): that checks every
  renamed and split weight by its effect, not only by its name.
- Without it, the official key names and shapes come from tests/data/gdino_official_keys.json,
  recorded from those same classes (Swin-T OGC size and the tiny preset; regenerate with
  write_official_key_fixture()). Random tensors under those names must convert to exactly the
  transformers model's keys and shapes, and land where expected (q/k/v splits).
Neither has the real 694 MB checkpoint; the buffers it is known to carry beyond the model's
state dict (BERT position_ids) are added by hand.
"""
from __future__ import annotations

import argparse
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, GroundingDinoForObjectDetection

from bench.reference.detector import load_reference_tokenizer, query_selection
from export.common import ExportError
from export.gdino import build_grounding_dino, copy_tokenizer, grounding_dino_config, perturb_weights
from export.gdino_checkpoint import (
    check_converted,
    convert_official_state_dict,
    load_official_checkpoint,
    read_official_state_dict,
)

from official_gdino import official_groundingdino  # tests/official_gdino.py

DATA = Path(__file__).parent / "data"
KEY_FIXTURE = DATA / "gdino_official_keys.json"

# The authors' hyperparameters (groundingdino/config/GroundingDINO_SwinT_OGC.py) and two tiny
# variants: "tiny" mirrors our preset; "forward" keeps d_model 256, which the authors' code
# hard-codes in its sine embeddings, so that their forward runs.
OFFICIAL_ARGS = dict(
    hidden_dim=256, dropout=0.0, nheads=8, num_queries=900, dim_feedforward=2048, enc_layers=6, dec_layers=6,
    pre_norm=False, query_dim=4, transformer_activation="relu", num_patterns=0, num_feature_levels=4,
    enc_n_points=4, dec_n_points=4, two_stage_type="standard", embed_init_tgt=True, use_text_enhancer=True,
    use_fusion_layer=True, use_checkpoint=False, use_transformer_ckpt=False, use_text_cross_attention=True,
    text_dropout=0.0, fusion_dropout=0.0, fusion_droppath=0.1, position_embedding="sine", pe_temperatureH=20,
    pe_temperatureW=20, return_interm_indices=[1, 2, 3], two_stage_bbox_embed_share=False,
    two_stage_class_embed_share=False, dec_pred_bbox_embed_share=True, sub_sentence_present=True, max_text_len=256,
)
VARIANTS = {
    "swin-t": dict(args={}, swin={}, bert={}),
    "tiny": dict(
        args=dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2),
        swin=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2]),
        bert=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    ),
    "forward": dict(
        args=dict(dim_feedforward=256, enc_layers=1, dec_layers=2),
        swin=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2]),
        bert=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    ),
}


def _import_official():
    """The authors' model classes (skip when groundingdino-py is not installed)."""
    with official_groundingdino():
        import groundingdino.util.get_tokenlizer as get_tokenlizer
        from groundingdino.models.GroundingDINO import groundingdino
        from groundingdino.models.GroundingDINO.backbone.backbone import Joiner
        from groundingdino.models.GroundingDINO.backbone.position_encoding import build_position_encoding
        from groundingdino.models.GroundingDINO.backbone.swin_transformer import build_swin_transformer
        from groundingdino.models.GroundingDINO.transformer import build_transformer
    return get_tokenlizer, groundingdino, Joiner, build_position_encoding, build_swin_transformer, build_transformer


def _bert_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **_):
    """BertModelWarper.forward for transformers 5 (the original calls APIs removed since):
    same computation, the [B, L, L] sub-sentence mask made additive as get_extended_attention_mask did."""
    embedded = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids)
    additive = (1.0 - attention_mask[:, None].to(embedded.dtype)) * torch.finfo(embedded.dtype).min
    hidden = self.encoder(embedded, attention_mask=additive)
    return {"last_hidden_state": hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state}


def official_model(variant: str, tokenizer_json: Path):
    """The authors' GroundingDINO built by their own classes, random weights, eval mode."""
    get_tokenlizer, groundingdino, Joiner, build_position_encoding, build_swin_transformer, build_transformer = _import_official()
    spec = VARIANTS[variant]
    args = argparse.Namespace(**{**OFFICIAL_ARGS, **spec["args"]})
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), unk_token="[UNK]", sep_token="[SEP]",
                                        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")

    def language_model(_name):  # BertModel.from_pretrained("bert-base-uncased") without the download
        bert = BertModel(BertConfig(**spec["bert"]))
        for attr in ("get_extended_attention_mask", "invert_attention_mask", "get_head_mask"):
            object.__setattr__(bert, attr, None)  # read by BertModelWarper.__init__ only
        return bert

    saved = get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model
    get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model = (lambda _name: tokenizer), language_model
    try:
        swin = build_swin_transformer("swin_T_224_1k", 224, out_indices=tuple(args.return_interm_indices),
                                      dilation=False, use_checkpoint=False, **spec["swin"])
        backbone = Joiner(swin, build_position_encoding(args))
        backbone.num_channels = swin.num_features[4 - len(args.return_interm_indices):]
        model = groundingdino.GroundingDINO(
            backbone, build_transformer(args), num_queries=args.num_queries, aux_loss=True, iter_update=True,
            query_dim=4, num_feature_levels=args.num_feature_levels, nheads=args.nheads,
            dec_pred_bbox_embed_share=args.dec_pred_bbox_embed_share, two_stage_type=args.two_stage_type,
            two_stage_bbox_embed_share=args.two_stage_bbox_embed_share,
            two_stage_class_embed_share=args.two_stage_class_embed_share, num_patterns=args.num_patterns,
            dn_number=0, text_encoder_type="bert-base-uncased", sub_sentence_present=args.sub_sentence_present,
            max_text_len=args.max_text_len,
        )
    finally:
        get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model = saved
    model.bert.forward = types.MethodType(_bert_forward, model.bert)
    return model.eval()


def write_official_key_fixture(tokenizer_json: Path, path: Path = KEY_FIXTURE) -> None:
    """Record the official key names and shapes (needs groundingdino-py; run by hand)."""
    record = {v: {k: list(t.shape) for k, t in official_model(v, tokenizer_json).state_dict().items()} for v in ("swin-t", "tiny")}
    path.write_text(json.dumps(record))


def save_official(state_dict: dict, path: Path, extra: dict | None = None) -> Path:
    """As groundingdino_swint_ogc.pth is laid out: {"model": ...} with DataParallel's "module." prefix."""
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}, **(extra or {})}, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def official_keys() -> dict:
    return json.loads(KEY_FIXTURE.read_text())


def synthetic_official(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names; shared heads get shared values as in the real file."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=generator) for k, shape in keys.items()}
    for key in keys:  # the authors' decoder box heads are one module, listed per layer, twice
        shared = re.match(r"^(?:transformer\.decoder\.)?bbox_embed\.\d+\.(.*)$", key)
        if shared:
            state[key] = state["bbox_embed.0." + shared[1]]
    return state


# -- always run: official names from the recorded fixture -------------------------------------


def test_fixture_has_the_official_layout(official_keys):
    swin_t = official_keys["swin-t"]
    assert len(swin_t) == 938
    assert swin_t["backbone.0.layers.2.blocks.5.attn.qkv.weight"] == [1152, 384]  # Swin-T stage 3: 6 blocks, C=384
    assert swin_t["transformer.encoder.text_layers.5.self_attn.in_proj_weight"] == [768, 256]
    assert swin_t["bert.encoder.layer.11.output.dense.weight"] == [768, 3072]
    assert swin_t["transformer.tgt_embed.weight"] == [900, 256]


def test_swin_t_official_names_convert_to_exactly_the_transformers_model(official_keys):
    keys = {k: torch.empty(shape, device="meta") for k, shape in official_keys["swin-t"].items()}
    keys["bert.embeddings.position_ids"] = torch.empty(1, 512, device="meta")  # saved by the transformers of 2023
    converted, unknown = convert_official_state_dict({f"module.{k}": v for k, v in keys.items()})
    assert unknown == []
    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(grounding_dino_config("swin-t"))
    check_converted(model, converted, unknown, "swin-t key list")  # raises on any missing/extra/misshaped key
    expected = set(model.state_dict())
    assert expected - set(converted) == {"model.backbone.conv_encoder.model.swin.layernorm.weight",
                                         "model.backbone.conv_encoder.model.swin.layernorm.bias"}


def test_tiny_official_checkpoint_loads_with_splits_in_place(official_keys, tmp_path):
    state = synthetic_official(official_keys["tiny"])
    path = save_official(state, tmp_path / "groundingdino_tiny.pth", {"args": argparse.Namespace(modelname="groundingdino")})
    model = build_grounding_dino("tiny", path)
    loaded = model.state_dict()
    swin = "model.backbone.conv_encoder.model.swin.encoder.layers.1.blocks.0.attention."
    qkv = state["backbone.0.layers.1.blocks.0.attn.qkv.weight"]
    assert torch.equal(torch.cat([loaded[swin + p + "_proj.weight"] for p in "qkv"]), qkv)
    in_proj = state["transformer.decoder.layers.1.ca_text.in_proj_bias"]
    text_attn = "model.decoder.layers.1.encoder_attn_text."
    assert torch.equal(torch.cat([loaded[text_attn + p + ".bias"] for p in ("query", "key", "value")]), in_proj)
    assert torch.equal(loaded["model.backbone.conv_encoder.model.hidden_states_norms.stage2.weight"], state["backbone.0.norm1.weight"])
    assert torch.equal(loaded["model.encoder.layers.0.fusion_layer.vision_param"], state["transformer.encoder.fusion_layers.0.gamma_v"])
    assert torch.equal(loaded["bbox_embed.1.layers.2.weight"], state["bbox_embed.0.layers.2.weight"])
    assert torch.equal(loaded["model.query_position_embeddings.weight"], state["transformer.tgt_embed.weight"])


def test_bad_official_checkpoints_name_the_problem(official_keys, tmp_path):
    state = synthetic_official(official_keys["tiny"])

    def load(sd, name, **extra):
        return build_grounding_dino("tiny", save_official(sd, tmp_path / name, extra or None))

    with pytest.raises(ExportError, match="not an official GroundingDINO checkpoint.*image_encoder"):
        load({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, "sam.pth")
    with pytest.raises(ExportError, match="1 missing keys: model.decoder.layers.0.final_layer_norm.weight"):
        load({k: v for k, v in state.items() if k != "transformer.decoder.layers.0.norm3.weight"}, "missing.pth")
    with pytest.raises(ExportError, match="unexpected keys: transformer.dn_embed.weight"):
        load({**state, "transformer.dn_embed.weight": torch.zeros(3)}, "extra.pth")
    with pytest.raises(ExportError, match=r"another shape: model.text_projection.weight \(checkpoint \(256, 768\)"):
        load({**state, "feat_map.weight": torch.zeros(256, 768)}, "swin_t_sized.pth")
    untied = dict(state, **{"bbox_embed.1.layers.0.bias": state["bbox_embed.1.layers.0.bias"] + 1})
    with pytest.raises(ExportError, match="shares differ"):
        load(untied, "untied.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot read"):
        build_grounding_dino("tiny", tmp_path / "broken.pth")
    torch.save({"model": state, "hook": types.SimpleNamespace(x=1)}, tmp_path / "pickled.pth")  # refused, not unpickled
    with pytest.raises(ExportError, match="cannot read"):
        build_grounding_dino("tiny", tmp_path / "pickled.pth")
    # tolerated extras of the real file load fine and are reported nowhere
    extras = {"bert.embeddings.position_ids": torch.arange(512)[None], "bert.pooler.dense.weight": torch.zeros(32, 32)}
    load({**state, **extras}, "extras.pth")
    assert "bert.embeddings.position_ids" in read_official_state_dict(tmp_path / "extras.pth")


# -- transformers copies (IDEA-Research/grounding-dino-tiny saved locally) ---------------------


def test_transformers_directory_loads_and_is_checked(tmp_path):
    torch.manual_seed(0)
    source = GroundingDinoForObjectDetection(grounding_dino_config("tiny"))
    perturb_weights(source, 3)
    source.save_pretrained(tmp_path / "copy")
    loaded = build_grounding_dino("tiny", tmp_path / "copy")
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ExportError, match="is not the 'swin-t' GroundingDINO: d_model=32"):
        build_grounding_dino("swin-t", tmp_path / "copy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        build_grounding_dino("tiny", tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="'bert' model, not grounding-dino"):
        build_grounding_dino("tiny", tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "grounding-dino"}))
    with pytest.raises(ExportError, match="no weights"):
        build_grounding_dino("tiny", tmp_path / "empty")


# -- with the authors' package: their model, our loader, same outputs ---------------------------


@pytest.mark.slow  # builds the full-size official model (~1.5 GB, several seconds)
def test_official_key_fixture_is_current(tokenizer_json, official_keys):
    for variant in ("tiny", "swin-t"):
        live = {k: list(v.shape) for k, v in official_model(variant, tokenizer_json).state_dict().items()}
        assert live == official_keys[variant], variant


def test_official_model_and_converted_model_give_the_same_detections(tokenizer_json, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    official = official_model("forward", tokenizer_json)
    perturb_weights(official, 1)  # no zero heads, real fusion gates
    path = save_official(official.state_dict(), tmp_path / "official.pth")
    config = grounding_dino_config("tiny")
    config.d_model, config.encoder_ffn_dim, config.decoder_ffn_dim = 256, 256, 256
    config.encoder_attention_heads = config.decoder_attention_heads = 8
    ours = GroundingDinoForObjectDetection(config).eval()
    load_official_checkpoint(ours, path)
    tokenizer = load_reference_tokenizer(tokenizer_json)
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 230, 250)  # not a multiple of Swin's window: both pad inside
    for caption in ("crack. flawed golden wire. black hole.", "bottle,."):
        inputs = tokenizer(caption, return_tensors="pt")
        with torch.no_grad():
            with query_selection() as official_calls:
                theirs = official(pixels, captions=[caption])
            with query_selection() as our_calls:
                ours(pixel_values=pixels, **inputs)
            # the selections may differ only where two scores tie to rounding (see query_selection)
            (scores, mine), (_, their_selection) = our_calls[0], official_calls[0]
            differ = mine != their_selection
            gaps = (scores.gather(1, mine) - scores.gather(1, their_selection)).abs()
            assert differ.sum() <= 6 and (gaps[differ] < 1e-4).all(), caption
            with query_selection(force=their_selection):
                mine_out = ours(pixel_values=pixels, **inputs)
        n = inputs["input_ids"].shape[1]
        assert torch.isinf(theirs["pred_logits"][0, :, n:]).all()
        np.testing.assert_allclose(mine_out.logits.sigmoid()[0, :, :n].numpy(), theirs["pred_logits"].sigmoid()[0, :, :n].numpy(), atol=2e-4)
        np.testing.assert_allclose(mine_out.pred_boxes[0].numpy(), theirs["pred_boxes"][0].numpy(), atol=2e-4)
