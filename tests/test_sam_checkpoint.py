"""SAM weights: the presets are the official architectures, both checkpoint layouts load, bad files fail clearly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from segment_anything import sam_model_registry

import export.sam as sam_export
from export.common import ExportError
from export.sam import PRESETS, build_sam, make_sam, official_decode, parity_image
from export.sam_checkpoint import hf_to_official

torch.set_num_threads(1)


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_presets_are_the_official_builders(variant: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = make_sam(PRESETS[variant]).state_dict()
        official = sam_model_registry[variant]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_tiny_preset_keeps_the_architecture() -> None:
    with torch.device("meta"):
        tiny = make_sam(PRESETS["tiny"]).state_dict()
        vit_b = make_sam(PRESETS["vit_b"]).state_dict()
    # Same module tree, fewer blocks: every tiny key exists in vit_b.
    assert set(tiny) <= set(vit_b)
    assert not any(k.startswith("image_encoder.blocks.2.") for k in tiny)


def _perturbed_tiny_state(seed: int = 7) -> dict[str, torch.Tensor]:
    """Tiny weights unlike the seeded random init, so a load that did nothing cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    base = build_sam("tiny", random_init=True).state_dict()
    return {k: v + torch.randn(v.shape, generator=generator) * 0.05 for k, v in base.items()}


def test_official_checkpoint_round_trip(tmp_path: Path) -> None:
    state = _perturbed_tiny_state()
    path = tmp_path / "sam_tiny.pth"
    torch.save(state, path)
    sam = build_sam("tiny", checkpoint=path)
    loaded = sam.state_dict()
    fresh = build_sam("tiny", random_init=True).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not torch.equal(loaded["mask_decoder.iou_token.weight"], fresh["mask_decoder.iou_token.weight"])
    # The buffers checkpoints do not carry are set as segment-anything's constructor sets them.
    reference = build_sam("tiny", random_init=True)
    assert torch.equal(sam.pixel_mean, reference.pixel_mean) and torch.equal(sam.pixel_std, reference.pixel_std)
    assert not any(t.is_meta for t in [*sam.parameters(), *sam.buffers()])


def test_random_init_is_reproducible() -> None:
    first = build_sam("tiny", random_init=True).state_dict()
    second = build_sam("tiny", random_init=True).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _tiny_transformers_sam():
    """transformers' SamModel with the tiny preset's sizes and non-trivial random weights."""
    from transformers import SamConfig, SamModel

    preset = PRESETS["tiny"]
    config = SamConfig(
        vision_config=dict(
            hidden_size=preset.encoder_embed_dim,
            output_channels=preset.prompt_embed_dim,
            num_hidden_layers=preset.encoder_depth,
            num_attention_heads=preset.encoder_num_heads,
            global_attn_indexes=list(preset.encoder_global_attn_indexes),
            num_pos_feats=preset.prompt_embed_dim // 2,
        ),
        prompt_encoder_config=dict(hidden_size=preset.prompt_embed_dim, mask_input_channels=preset.mask_in_chans),
        mask_decoder_config=dict(
            hidden_size=preset.prompt_embed_dim,
            mlp_dim=preset.decoder_mlp_dim,
            num_attention_heads=preset.decoder_num_heads,
            iou_head_hidden_dim=preset.iou_head_hidden_dim,
        ),
    )
    model = SamModel(config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        # transformers initialises the vision tower near zero; give every tensor real values.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * (0.1 if param.ndim > 1 else 0.05)
            param.copy_(noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        positional = torch.randn(model.shared_image_embedding.positional_embedding.shape, generator=generator)
        model.shared_image_embedding.positional_embedding.copy_(positional)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(positional)
    return model


def test_transformers_keys_map_onto_official_keys() -> None:
    converted = hf_to_official(_tiny_transformers_sam().state_dict())
    assert set(converted) == set(make_sam(PRESETS["tiny"]).state_dict())


@pytest.mark.parametrize("as_file", [False, True], ids=["directory", "model.safetensors"])
def test_transformers_copy_gives_the_same_masks(tmp_path: Path, as_file: bool) -> None:
    hf_model = _tiny_transformers_sam()
    hf_model.save_pretrained(tmp_path)
    sam = build_sam("tiny", checkpoint=tmp_path / "model.safetensors" if as_file else tmp_path)

    image = parity_image(seed=2)
    boxes = torch.tensor([[100.0, 120.0, 500.0, 600.0], [10.0, 20.0, 900.0, 700.0]])
    with torch.no_grad():
        hf_out = hf_model(pixel_values=image, input_boxes=boxes[None], multimask_output=False)
        masks, scores = official_decode(sam, sam.image_encoder(image), boxes)
    hf_masks = hf_out.pred_masks[0]  # [boxes, 1, 256, 256]
    hf_scores = hf_out.iou_scores[0]  # [boxes, 1]
    assert masks.shape == hf_masks.shape and scores.shape == hf_scores.shape
    assert masks.abs().max() > 0.01  # the comparison below is not between zeros
    assert torch.allclose(masks, hf_masks, atol=1e-4, rtol=0)  # measured 8e-6 on logits up to 0.1
    assert torch.allclose(scores, hf_scores, atol=1e-4, rtol=0)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_checkpoint_of_another_variant_is_named(tmp_path: Path) -> None:
    path = _save(_perturbed_tiny_state(), tmp_path / "tiny.pth")
    with pytest.raises(ExportError, match=r"holds SAM tiny .*not vit_b: pass variant 'tiny'"):
        build_sam("vit_b", checkpoint=path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = _perturbed_tiny_state()
    del state["mask_decoder.iou_token.weight"]
    with pytest.raises(ExportError, match=r"lacks 1 SAM tiny keys.*mask_decoder\.iou_token\.weight"):
        build_sam("tiny", checkpoint=_save(state, tmp_path / "t.pth"))


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    state = {**_perturbed_tiny_state(), "mask_decoder.extra.weight": torch.zeros(2)}
    with pytest.raises(ExportError, match=r"has 1 keys SAM tiny does not.*mask_decoder\.extra\.weight"):
        build_sam("tiny", checkpoint=_save(state, tmp_path / "t.pth"))


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = {**_perturbed_tiny_state(), "mask_decoder.iou_token.weight": torch.zeros(1, 16)}
    with pytest.raises(ExportError, match=r"does not fit SAM tiny.*iou_token"):
        build_sam("tiny", checkpoint=_save(state, tmp_path / "t.pth"))


def test_other_model_is_not_a_sam_checkpoint(tmp_path: Path) -> None:
    path = _save({"model": {"backbone.0.body.conv1.weight": torch.zeros(2)}}, tmp_path / "groundingdino.pth")
    with pytest.raises(ExportError, match="not a SAM checkpoint"):
        build_sam("vit_h", checkpoint=path)


def test_transformers_checkpoint_with_foreign_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _tiny_transformers_sam().state_dict().items()}
    state.pop("prompt_encoder.shared_embedding.positional_embedding")
    state["text_encoder.embeddings.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ExportError, match=r"unexpected keys \['text_encoder"):
        build_sam("tiny", checkpoint=tmp_path)


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        build_sam("tiny", checkpoint=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot read SAM checkpoint"):
        build_sam("tiny", checkpoint=junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="without model.safetensors"):
        build_sam("tiny", checkpoint=empty)


def test_argument_errors() -> None:
    with pytest.raises(ExportError, match="unknown SAM variant 'vit_x'"):
        build_sam("vit_x", random_init=True)
    with pytest.raises(ExportError, match="not both"):
        build_sam("tiny", checkpoint=Path("x.pth"), random_init=True)
    with pytest.raises(ExportError, match="only with random weights"):
        build_sam("tiny")


def test_default_checkpoint_is_the_official_file(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def fake_resolve(key, path=None, cache_dir=None):
        asked.append(key)
        raise ExportError("no network in tests")

    monkeypatch.setattr(sam_export, "resolve_checkpoint", fake_resolve)
    with pytest.raises(ExportError, match="no network"):
        build_sam("vit_b")
    assert asked == ["sam_vit_b"]
