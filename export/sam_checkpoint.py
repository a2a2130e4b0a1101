"""SAM weights from disk into the official segment-anything key layout.

Two layouts exist in the wild: Meta's own `sam_vit_*.pth` (a plain state dict,
keys `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) and the
transformers copies (`facebook/sam-vit-*`, a `model.safetensors` with SamModel's
keys `vision_encoder.*`, ...). Both are read here and returned in the official
layout; the key renames are the inverse of transformers' own conversion script.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .common import ExportError

OFFICIAL_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
HF_PREFIXES = ("vision_encoder.", "prompt_encoder.", "mask_decoder.", "shared_image_embedding.")
_HF_POSITIONAL = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_OFFICIAL_POSITIONAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# transformers name -> official name, applied in order to every key (regex, replacement).
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)
# transformers splits the decoder MLPs into proj_in / layers.k / proj_out; the official MLP is layers.0..L-1.
_HF_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth/.pt/.bin/.safetensors file or a transformers model directory, as saved."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise ExportError(f"{path} is a directory without model.safetensors or pytorch_model.bin: not a transformers SAM copy")
    if not path.is_file():
        raise ExportError(f"SAM checkpoint {path} does not exist")
    try:
        if path.name.endswith(".index.json"):
            # A sharded transformers save: the index maps every key to its shard file.
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(path.parent / shard))
            return state
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except ExportError:
        raise
    except Exception as err:  # corrupt file, pickle with code, truncated download
        raise ExportError(f"cannot read SAM checkpoint {path}: {type(err).__name__}: {err}") from None
    # Some re-saves wrap the state dict; the official files do not.
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} does not hold a state dict of tensors: not a SAM checkpoint")
    return state


def checkpoint_layout(state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> str:
    """"official" or "transformers"; ExportError when the keys are neither SAM layout."""
    keys = list(state)
    if any(k.startswith("image_encoder.") for k in keys):
        return "official"
    if any(k.startswith("vision_encoder.") for k in keys):
        return "transformers"
    shown = ", ".join(keys[:3]) if keys else "no keys"
    raise ExportError(f"{source} is not a SAM checkpoint: no image_encoder.* or vision_encoder.* keys (found {shown}, ...)")


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers SamModel state dict to segment-anything's layout.

    Keys outside SamModel's known prefixes raise ExportError; keys with a valid prefix but
    no official counterpart come through renamed and are caught by the model load.
    """
    stray = [k for k in state if not k.startswith(HF_PREFIXES)]
    if stray:
        raise ExportError(f"transformers SAM checkpoint has unexpected keys {stray[:5]} (is it a SamModel save?)")
    # The prompt encoder and the image-wide embedding share one random Fourier matrix (tied weights).
    positional = [state[k] for k in _HF_POSITIONAL if k in state]
    if not positional:
        raise ExportError(f"transformers SAM checkpoint lacks the positional embedding ({_HF_POSITIONAL[0]})")
    if len(positional) == 2 and not torch.equal(positional[0], positional[1]):
        raise ExportError("transformers SAM checkpoint has two different positional embeddings; they must be tied")

    mlp_depth: dict[str, int] = {}
    for key in state:
        match = _HF_MLP.match(key)
        if match and match.group(3) is not None:
            mlp_depth[match.group(1)] = max(mlp_depth.get(match.group(1), 0), int(match.group(3)) + 1)

    out: dict[str, torch.Tensor] = {_OFFICIAL_POSITIONAL: positional[0]}
    for key, value in state.items():
        if key in _HF_POSITIONAL:
            continue
        match = _HF_MLP.match(key)
        if match:
            prefix, part, hidden, kind = match.groups()
            if part == "proj_in":
                index = 0
            elif part == "proj_out":
                index = mlp_depth.get(prefix, 0) + 1  # proj_in + hidden layers come before it
            else:
                index = int(hidden) + 1
            out[f"{prefix}.layers.{index}.{kind}"] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint of either layout and return it in the official layout."""
    state = read_state_dict(path)
    layout = checkpoint_layout(state, path)
    if layout == "transformers":
        state = hf_to_official(state)
    # pixel_mean/std are non-persistent buffers in segment-anything; older saves may carry them.
    return {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}


def describe_encoder(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(embed_dim, depth) of the image encoder in an official-layout state dict."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise ExportError("SAM checkpoint lacks image_encoder.patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    return int(weight.shape[0]), len(blocks)
