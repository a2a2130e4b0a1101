"""Load GroundingDINO weights into the transformers model, from either published format.

Two formats exist for the Swin-T OGC model:
- the official `groundingdino_swint_ogc.pth` (IDEA-Research): `torch.load` gives a dict whose
  "model" entry is the state dict of the authors' `GroundingDINO` module, keys sometimes
  prefixed "module." (saved from DistributedDataParallel);
- a transformers copy (IDEA-Research/grounding-dino-tiny saved locally): a directory with
  config.json and model.safetensors, loaded with `from_pretrained(local_files_only=True)`.

The official names are converted to transformers' names here (the authors' Swin keeps q, k, v
in one `qkv` matrix and their attention layers are `nn.MultiheadAttention` with one
`in_proj_weight`; transformers has separate q/k/v Linear layers, so those are split in order
q, k, v). A checkpoint that does not convert to exactly the model's keys and shapes raises
ExportError naming the first offending keys; the only keys allowed to be absent or extra are the
buffers and unused heads listed in TOLERATED_UNEXPECTED / TOLERATED_MISSING.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from .common import ExportError

# Official keys that have no counterpart in transformers and carry no learned information:
# Swin's relative_position_index is a fixed index buffer (transformers rebuilds it), BERT's
# position_ids / token_type_ids are arange/zeros buffers saved by older transformers versions,
# and the BERT pooler is never used by GroundingDINO (transformers builds BERT without it).
TOLERATED_UNEXPECTED = (
    re.compile(r"^backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),
    re.compile(r"^backbone\.0\.layers\.\d+\.blocks\.\d+\.attn_mask$"),
    re.compile(r"^bert\.embeddings\.position_ids$"),
    re.compile(r"^bert\.embeddings\.token_type_ids$"),
    re.compile(r"^bert\.pooler\.dense\.(weight|bias)$"),
)
# transformers keys the official checkpoint cannot provide: Swin's final LayerNorm, which the
# detection backbone never applies (it normalises each returned stage with its own norm).
TOLERATED_MISSING = (re.compile(r"\.swin\.layernorm\.(weight|bias)$"),)

_SWIN = "model.backbone.conv_encoder.model.swin."
_SWIN_NORMS = "model.backbone.conv_encoder.model.hidden_states_norms."

# Plain renames, applied in order (first match wins); {n} stands for layer/block numbers.
_RENAMES: tuple[tuple[str, str], ...] = (
    # Swin backbone
    (r"^backbone\.0\.patch_embed\.proj\.", _SWIN + "embeddings.patch_embeddings.projection."),
    (r"^backbone\.0\.patch_embed\.norm\.", _SWIN + "embeddings.norm."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.", _SWIN + r"encoder.layers.\1.blocks.\2.layernorm_before."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.", _SWIN + r"encoder.layers.\1.blocks.\2.layernorm_after."),
    (
        r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
        _SWIN + r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table",
    ),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.", _SWIN + r"encoder.layers.\1.blocks.\2.attention.o_proj."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.", _SWIN + r"encoder.layers.\1.blocks.\2.mlp."),
    (r"^backbone\.0\.layers\.(\d+)\.downsample\.", _SWIN + r"encoder.layers.\1.downsample."),
    # the authors' norm{i} follows Swin stage i (0-based) = transformers' stage{i+1}
    (r"^backbone\.0\.norm(\d+)\.", None),  # handled in _rename (index arithmetic)
    # text side
    (r"^bert\.", "model.text_backbone."),
    (r"^feat_map\.", "model.text_projection."),
    # image projections
    (r"^input_proj\.", "model.input_proj_vision."),
    # encoder: deformable (image) layers
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"model.encoder.layers.\1.deformable_layer.self_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.deformable_layer.self_attn_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear1\.", r"model.encoder.layers.\1.deformable_layer.fc1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear2\.", r"model.encoder.layers.\1.deformable_layer.fc2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.deformable_layer.final_layer_norm."),
    # encoder: text enhancer layers
    (r"^transformer\.encoder\.text_layers\.(\d+)\.self_attn\.out_proj\.", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.out_proj."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.linear1\.", r"model.encoder.layers.\1.text_enhancer_layer.fc1."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.linear2\.", r"model.encoder.layers.\1.text_enhancer_layer.fc2."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_before."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_after."),
    # encoder: image-text fusion layers
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.gamma_v$", r"model.encoder.layers.\1.fusion_layer.vision_param"),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.gamma_l$", r"model.encoder.layers.\1.fusion_layer.text_param"),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_v\.", r"model.encoder.layers.\1.fusion_layer.layer_norm_vision."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_l\.", r"model.encoder.layers.\1.fusion_layer.layer_norm_text."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.vision_proj."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.text_proj."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.values_v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.values_vision_proj."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.values_l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.values_text_proj."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.out_v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.out_vision_proj."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.out_l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.out_text_proj."),
    # decoder layers
    (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_text\.out_proj\.", r"model.decoder.layers.\1.encoder_attn_text.out_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.catext_norm\.", r"model.decoder.layers.\1.encoder_attn_text_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.decoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear1\.", r"model.decoder.layers.\1.fc1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear2\.", r"model.decoder.layers.\1.fc2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layer_norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "model.decoder.reference_points_head."),
    (r"^transformer\.decoder\.bbox_embed\.", "model.decoder.bbox_embed."),
    # two-stage query selection and the rest
    (r"^transformer\.level_embed$", "model.level_embed"),
    (r"^transformer\.tgt_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.enc_output\.", "model.enc_output."),
    (r"^transformer\.enc_output_norm\.", "model.enc_output_norm."),
    (r"^transformer\.enc_out_bbox_embed\.", "model.encoder_output_bbox_embed."),
    (r"^bbox_embed\.", "bbox_embed."),
)
_COMPILED = tuple((re.compile(src), dst) for src, dst in _RENAMES)

# Fused projections split into q, k, v (rows in that order in both the Swin qkv Linear and
# nn.MultiheadAttention's in_proj).
_FUSED: tuple[tuple[re.Pattern, Callable[[re.Match], tuple[str, str, str]]], ...] = (
    (
        re.compile(r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"),
        lambda m: tuple(f"{_SWIN}encoder.layers.{m[1]}.blocks.{m[2]}.attention.{p}_proj.{m[3]}" for p in "qkv"),
    ),
    (
        re.compile(r"^transformer\.encoder\.text_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$"),
        lambda m: tuple(f"model.encoder.layers.{m[1]}.text_enhancer_layer.self_attn.{p}.{m[2]}" for p in ("query", "key", "value")),
    ),
    (
        re.compile(r"^transformer\.decoder\.layers\.(\d+)\.ca_text\.in_proj_(weight|bias)$"),
        lambda m: tuple(f"model.decoder.layers.{m[1]}.encoder_attn_text.{p}.{m[2]}" for p in ("query", "key", "value")),
    ),
    (
        re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$"),
        lambda m: tuple(f"model.decoder.layers.{m[1]}.self_attn.{p}.{m[2]}" for p in ("query", "key", "value")),
    ),
)

# Keys every official GroundingDINO checkpoint has: used to tell it from other models' files.
_SIGNATURE = ("backbone.0.patch_embed.proj.weight", "transformer.tgt_embed.weight", "bert.embeddings.word_embeddings.weight", "feat_map.weight")


def _rename(key: str) -> str | None:
    norm = re.match(r"^backbone\.0\.norm(\d+)\.(weight|bias)$", key)
    if norm:
        return f"{_SWIN_NORMS}stage{int(norm[1]) + 1}.{norm[2]}"
    for pattern, replacement in _COMPILED:
        if replacement is not None and pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return None


def is_tolerated_unexpected(key: str) -> bool:
    return any(p.search(key) for p in TOLERATED_UNEXPECTED)


def is_tolerated_missing(key: str) -> bool:
    return any(p.search(key) for p in TOLERATED_MISSING)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official GroundingDINO names -> transformers names; returns (converted, unconvertible keys).

    "module." prefixes are dropped; tolerated keys (see TOLERATED_UNEXPECTED) are left out silently.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if is_tolerated_unexpected(key):
            continue
        fused = next(((p.match(key), split) for p, split in _FUSED if p.match(key)), None)
        if fused is not None:
            match, split = fused
            if value.shape[0] % 3:
                unknown.append(f"{key} (shape {tuple(value.shape)} is not 3 equal q/k/v parts)")
                continue
            for name, part in zip(split(match), value.chunk(3, dim=0)):
                converted[name] = part
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    return converted, unknown


def _short_list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_converted(model: torch.nn.Module, converted: Mapping[str, torch.Tensor], unknown: list[str], source: str) -> None:
    """ExportError unless `converted` has exactly the model's keys and shapes (tolerated keys aside)."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in converted and not is_tolerated_missing(k))
    unexpected = sorted(unknown + [k for k in converted if k not in expected])
    wrong_shape = sorted(
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_short_list(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys of another shape: {_short_list(wrong_shape, 3)}")
    untied = _untied_keys(model, converted) if not (missing or wrong_shape) else []
    if untied:
        problems.append(f"weights the model shares differ in the checkpoint: {_short_list(untied, 3)}")
    if problems:
        raise ExportError(f"{source} does not fit this GroundingDINO model ({'; '.join(problems)})")


def load_converted(model: torch.nn.Module, converted: Mapping[str, torch.Tensor], unknown: list[str], source: str) -> None:
    """Copy converted weights into `model` after check_converted."""
    check_converted(model, converted, unknown, source)
    with torch.no_grad():
        model.load_state_dict(dict(converted), strict=False)


def _untied_keys(model: torch.nn.Module, converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of one shared parameter (e.g. the 6 decoder box heads) whose checkpoint values differ.

    Loading would silently keep only the last copy, so a checkpoint of a variant without
    sharing must be refused rather than half-loaded.
    """
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_meta:
            groups.setdefault(id(tensor), []).append(name)
    bad = []
    for names in groups.values():
        values = [converted[n] for n in names if n in converted and not converted[n].is_meta]
        if any(v.shape != values[0].shape or not torch.equal(v, values[0]) for v in values[1:]):
            bad.append(names[0])
    return bad


def read_official_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside an official .pth, without unpickling arbitrary objects."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Training checkpoints may hold their argparse.Namespace next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, not a torch file, arbitrary pickled objects
        raise ExportError(f"cannot read {path} as a PyTorch checkpoint: {str(err).splitlines()[0]}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state_dict = checkpoint["model"]
    elif isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise ExportError(f"{path} holds no state dict (expected a dict with a 'model' entry, as groundingdino_swint_ogc.pth has)")
    state_dict = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    absent = [k for k in _SIGNATURE if k not in state_dict]
    if absent:
        first = ", ".join(list(state_dict)[:3])
        raise ExportError(
            f"{path} is not an official GroundingDINO checkpoint: it lacks {', '.join(absent)} (its first keys are {first})"
        )
    return state_dict


def load_official_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Fill `model` (transformers GroundingDinoForObjectDetection) from an official .pth."""
    converted, unknown = convert_official_state_dict(read_official_state_dict(path))
    load_converted(model, converted, unknown, str(path))
