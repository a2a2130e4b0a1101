"""SAM -> two ONNX graphs: the image encoder and a box-prompt mask decoder.

sam_encoder.onnx: image [1, 3, S, S] (normalised and padded, S = 1024) -> image_embeddings [1, C, S/16, S/16].
sam_decoder.onnx: image_embeddings + boxes [N, 4] (xyxy in the resized, pre-padding frame) ->
    low_res_masks [N, 1, 256, 256], iou_predictions [N, 1]; what predict_torch(boxes=...,
    multimask_output=False) computes before upscaling.
Boxes sit on the batch axis (one prompt per box): packing N boxes as 2N points of one prompt
gives garbage masks (segment-anything#308). There is no orig_im_size input: upscaling,
cropping and thresholding stay outside the graph (runtime/stages/segmenter.py), which keeps shape
tensors out of the graph (segment-anything#425).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from runtime.manifest import SAM_DECODER, SAM_ENCODER, SAM_IMAGE_SIZE, SAM_MASK_SIZE, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from runtime.stages.segmenter import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUT, ENCODER_OUTPUT

from .checkpoints import checkpoint_record, resolve_checkpoint
from .common import ExportedModel, ExportError, compare_outputs, export_onnx, io_spec, ort_session, parity_record
from .sam_checkpoint import describe_encoder, load_official_state_dict
from .sam_forms import sam_attention_form, window_padding_by_concat


@dataclass(frozen=True)
class SamPreset:
    """The arguments of segment_anything.build_sam._build_sam, plus the decoder sizes it hard-codes."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


PRESETS: dict[str, SamPreset] = {
    "vit_b": SamPreset(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamPreset(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamPreset(1280, 32, 16, (7, 15, 23, 31)),
    # Same architecture at CI size: one windowed and one global block, a 32-wide decoder.
    "tiny": SamPreset(32, 2, 2, (1,), prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32),
}
RANDOM_INIT_SEED = 0  # random-weight exports are reproducible file for file
RANDOM_REL_POS_STD = 0.5  # random-weight relative-position tables (segment_anything's own start is zero)

# Parity tolerance: ATOL + RTOL * (largest |output| PyTorch gives), per graph.
ENCODER_ATOL, ENCODER_RTOL = 1e-4, 1e-4
DECODER_ATOL, DECODER_RTOL = 1e-4, 1e-4
DECODER_TRACE_BOXES = 3
DECODER_CHECK_BOXES = (3, 1, 5)  # the traced N, N=1 and another N


def make_sam(preset: SamPreset) -> Sam:
    """segment_anything's _build_sam for any preset (vit_* presets give the official architecture)."""
    image_size, patch_size = SAM_IMAGE_SIZE, 16
    grid = image_size // patch_size
    dim = preset.prompt_embed_dim
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=preset.encoder_depth,
            embed_dim=preset.encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=preset.encoder_num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=preset.encoder_global_attn_indexes,
            window_size=14,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=preset.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=preset.decoder_mlp_dim, num_heads=preset.decoder_num_heads),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=preset.iou_head_hidden_dim,
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    ).eval()


def variant_of(embed_dim: int, depth: int) -> str | None:
    for name, preset in PRESETS.items():
        if (preset.encoder_embed_dim, preset.encoder_depth) == (embed_dim, depth):
            return name
    return None


def sam_from_checkpoint(variant: str, checkpoint: Path) -> Sam:
    """The preset's Sam holding an official- or transformers-layout checkpoint; ExportError naming what does not fit."""
    state = load_official_state_dict(checkpoint)
    embed_dim, depth = describe_encoder(state)
    preset = PRESETS[variant]
    if (embed_dim, depth) != (preset.encoder_embed_dim, preset.encoder_depth):
        found = variant_of(embed_dim, depth)
        what = f"SAM {found}" if found else "an unknown SAM variant"
        raise ExportError(
            f"{checkpoint} holds {what} (image encoder embed_dim {embed_dim}, depth {depth}), not {variant}"
            + (f": pass variant {found!r}" if found else "")
        )
    # Built on the meta device and filled by assignment: no random init, no second copy of ViT-H's 2.5 GB.
    with torch.device("meta"):
        sam = make_sam(preset)
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ExportError(f"{checkpoint} lacks {len(missing)} SAM {variant} keys, e.g. {missing[:3]}")
    if unexpected:
        raise ExportError(f"{checkpoint} has {len(unexpected)} keys SAM {variant} does not, e.g. {unexpected[:3]}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{checkpoint} does not fit SAM {variant}: {len(wrong)} tensors have other shapes, e.g. {wrong[:2]}")
    # The graphs are fp32 whatever precision the file was saved in.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    sam.load_state_dict(state, strict=True, assign=True)
    # pixel_mean/std are not in checkpoints (non-persistent buffers): set them as Sam's constructor does.
    sam.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
    sam.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), persistent=False)
    left = [name for name, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"{checkpoint}: SAM {variant} tensors left without values: {left[:3]}")
    return sam.eval()


def build_sam(variant: str, checkpoint: Path | str | None = None, random_init: bool = False) -> Sam:
    """The official Sam for a preset, with weights from `checkpoint`, the official download, or random.

    checkpoint: an official sam_vit_*.pth, or a transformers copy (directory or model.safetensors).
    None and not random_init: the official file via export.checkpoints.resolve_checkpoint.
    """
    if variant not in PRESETS:
        raise ExportError(f"unknown SAM variant {variant!r} (expected one of {sorted(PRESETS)})")
    if random_init and checkpoint is not None:
        raise ExportError("SAM: pass a checkpoint or random_init, not both")
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            sam = make_sam(PRESETS[variant])
            # segment_anything starts the relative-position tables at zero, which would leave those
            # terms out of every random-weight export, parity check and test: give them values.
            for name, table in sam.image_encoder.named_parameters():
                if name.endswith(("rel_pos_h", "rel_pos_w")):
                    table.data.normal_(0.0, RANDOM_REL_POS_STD)
            return sam
    if checkpoint is None:
        if variant == "tiny":
            raise ExportError("SAM tiny exists only with random weights (random_init=True)")
        checkpoint = resolve_checkpoint(f"sam_{variant}")
    return sam_from_checkpoint(variant, Path(checkpoint))


class BoxDecoder(torch.nn.Module):
    """prompt_encoder(boxes=...) + mask_decoder(multimask_output=False) as one traceable call.

    Re-states PromptEncoder._embed_boxes without in-place indexing (as segment-anything's
    own utils/onnx.py does for points); parity is checked against the unmodified modules.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        prompt = sam.prompt_encoder
        self.pe_layer = prompt.pe_layer
        self.mask_decoder = sam.mask_decoder
        height, width = prompt.input_image_size
        self.register_buffer("frame", torch.tensor([width, height], dtype=torch.float32), persistent=False)
        corners = torch.cat([prompt.point_embeddings[2].weight, prompt.point_embeddings[3].weight], dim=0)
        self.register_buffer("corner_embed", corners.detach().clone(), persistent=False)
        self.register_buffer("no_mask", prompt.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("image_pe", prompt.get_dense_pe().detach().clone(), persistent=False)

    def forward(self, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        corners = (boxes.reshape(-1, 2, 2) + 0.5) / self.frame  # pixel centres, then 0..1
        sparse = self.pe_layer._pe_encoding(corners) + self.corner_embed
        masks, iou = self._predict_masks(image_embeddings, sparse)
        return masks[:, 0:1], iou[:, 0:1]  # mask token 0: multimask_output=False

    def _predict_masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MaskDecoder.predict_masks with the image side left at batch 1 instead of copied per box.

        The official code repeats the embedding (+ the no-mask embedding, the same for every box)
        and the positional encoding once per box; until the first image-to-token attention writes
        into them they are the same for all boxes, so batch 1 broadcasts in the attention products
        and layer 0's image projections run once (measured on ViT-B, CPU: those copies and
        projections were ~25% of the decoder's time). Same arithmetic per box."""
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        src = image_embeddings + self.no_mask
        _, c, h, w = src.shape
        hs, src = decoder.transformer(src, self.image_pe, tokens)  # src comes back per box: [boxes, h*w, c]
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(tokens.shape[0], c, h, w))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, decoder.iou_prediction_head(iou_token_out)


@torch.no_grad()
def official_decode(sam: Sam, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SamPredictor.predict_torch(boxes=..., multimask_output=False) computes before upscaling."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    return sam.mask_decoder(
        image_embeddings=image_embeddings,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def parity_image(seed: int = 0) -> torch.Tensor:
    """A normalised, padded encoder input: smooth structure plus noise, zero padding at the bottom."""
    generator = torch.Generator().manual_seed(seed)
    size = SAM_IMAGE_SIZE
    low = torch.randn(1, 3, size // 32, size // 32, generator=generator)
    image = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    image = image + 0.3 * torch.randn(1, 3, size, size, generator=generator)
    image[:, :, int(size * 0.7) :, :] = 0.0  # a landscape image leaves the bottom padded
    return image


def parity_boxes(count: int, seed: int) -> torch.Tensor:
    """`count` valid xyxy boxes inside the resized frame."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([SAM_IMAGE_SIZE, SAM_IMAGE_SIZE * 0.7])
    low, high = corners.min(dim=1).values, corners.max(dim=1).values
    return torch.cat([low, high + 4.0], dim=1)


def name_output_dims(path: Path, shapes: dict[str, list[int | str]]) -> None:
    """Write the known output shapes into the graph (the tracer leaves names like 'Addimage_embeddings_dim_0')."""
    model = onnx.load(str(path), load_external_data=False)  # external tensors stay where they are
    for value in model.graph.output:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.save(model, str(path))


def gather_external_data(path: Path) -> str | None:
    """Move tensors that torch wrote as one file each (graphs > 2 GB: ViT-H) into `<name>.data`.

    Returns the data file's name, or None when the graph holds all its weights.
    """
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    data_name = f"{path.name}.data"
    if not locations or locations == {data_name}:
        return data_name if locations else None
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    for location in locations - {data_name}:
        (path.parent / location).unlink(missing_ok=True)
    return data_name


def _tolerance(atol: float, rtol: float, outputs: list[np.ndarray]) -> float:
    return atol + rtol * max(float(np.max(np.abs(out))) for out in outputs)


def _source(sam: Sam, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    encoder = sam.image_encoder
    source = {
        "library": "segment_anything",
        "embed_dim": int(encoder.patch_embed.proj.out_channels),
        "depth": len(encoder.blocks),
        "out_chans": int(sam.prompt_encoder.embed_dim),
    }
    return {**source, **(extra or {})}


def export_sam_encoder(sam: Sam, out_dir: Path, source: dict[str, Any] | None = None,
                       attention: str = "plain") -> tuple[ExportedModel, torch.Tensor]:
    """sam_encoder.onnx plus its parity record; also returns the embedding of the parity image.
    attention: "plain" (segment_anything's ops), "mha" (export.sam_forms: onnxruntime's fused
    MultiHeadAttention with the relative positions as its bias) or "augmented" (the relative
    positions inside the QK^T product), checked against the plain module."""
    path = Path(out_dir) / f"{SAM_ENCODER}.onnx"
    image = parity_image()
    with sam_attention_form(sam.image_encoder, attention), window_padding_by_concat():
        export_onnx(sam.image_encoder, (image,), path, [ENCODER_INPUT], [ENCODER_OUTPUT])
    with torch.no_grad():
        expected = sam.image_encoder(image)
    external = gather_external_data(path)
    name_output_dims(path, {ENCODER_OUTPUT: list(expected.shape)})
    session = ort_session(path)
    (got,) = session.run([ENCODER_OUTPUT], {ENCODER_INPUT: image.numpy()})
    tolerance = _tolerance(ENCODER_ATOL, ENCODER_RTOL, [expected.numpy()])
    case = compare_outputs(SAM_ENCODER, [expected.numpy()], [got], [ENCODER_OUTPUT], tolerance, "parity_image(seed=0)")
    inputs, outputs = io_spec(path)
    extra = {**(source or {}), "attention": attention, **({"external_data": external} if external else {})}
    model = ExportedModel(SAM_ENCODER, path.name, inputs, outputs, parity_record([case], tolerance), _source(sam, extra))
    return model, expected


def export_sam_decoder(
    sam: Sam, out_dir: Path, image_embeddings: torch.Tensor, source: dict[str, Any] | None = None
) -> ExportedModel:
    """sam_decoder.onnx, checked against the unmodified prompt encoder + mask decoder at several N."""
    path = Path(out_dir) / f"{SAM_DECODER}.onnx"
    wrapper = BoxDecoder(sam).eval()
    trace_boxes = parity_boxes(DECODER_TRACE_BOXES, seed=1)
    axes = {DECODER_INPUTS[1]: {0: "num_boxes"}, DECODER_OUTPUTS[0]: {0: "num_boxes"}, DECODER_OUTPUTS[1]: {0: "num_boxes"}}
    export_onnx(wrapper, (image_embeddings, trace_boxes), path, DECODER_INPUTS, DECODER_OUTPUTS, axes)
    name_output_dims(path, {DECODER_OUTPUTS[0]: ["num_boxes", 1, SAM_MASK_SIZE, SAM_MASK_SIZE], DECODER_OUTPUTS[1]: ["num_boxes", 1]})
    session = ort_session(path)
    runs = []
    for index, count in enumerate(DECODER_CHECK_BOXES):
        boxes = parity_boxes(count, seed=10 + index)
        expected = [t.numpy() for t in official_decode(sam, image_embeddings, boxes)]
        got = session.run(list(DECODER_OUTPUTS), {DECODER_INPUTS[0]: image_embeddings.numpy(), DECODER_INPUTS[1]: boxes.numpy()})
        runs.append((count, expected, got))
    tolerance = _tolerance(DECODER_ATOL, DECODER_RTOL, [out for _, expected, _ in runs for out in expected])
    cases = [
        compare_outputs(SAM_DECODER, expected, got, DECODER_OUTPUTS, tolerance, f"N={count} boxes (traced with N={DECODER_TRACE_BOXES})")
        for count, expected, got in runs
    ]
    inputs, outputs = io_spec(path)
    return ExportedModel(SAM_DECODER, path.name, inputs, outputs, parity_record(cases, tolerance), _source(sam, source))


def export_sam(sam: Sam, out_dir: Path, source: dict[str, Any] | None = None,
               attention: str = "plain") -> list[ExportedModel]:
    """Write sam_encoder.onnx and sam_decoder.onnx into out_dir; ParityError when ONNX Runtime disagrees.

    source: extra facts for the manifest (variant, checkpoint record), merged into each model's source.
    attention: the encoder's attention form (export_sam_encoder).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sam = sam.eval()
    encoder, embeddings = export_sam_encoder(sam, out_dir, source, attention)
    decoder = export_sam_decoder(sam, out_dir, embeddings, source)
    return [encoder, decoder]


def preprocess_record(variant: str) -> dict[str, Any]:
    """The manifest's preprocess["sam"] section, read by runtime.stages.segmenter.Segmenter."""
    if variant not in PRESETS:
        raise ExportError(f"unknown SAM variant {variant!r} (expected one of {sorted(PRESETS)})")
    return {
        "variant": variant,
        "image_size": SAM_IMAGE_SIZE,
        "mask_size": SAM_MASK_SIZE,
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
        "mask_threshold": float(Sam.mask_threshold),
    }


def export_tiny_sam(out_dir: Path) -> tuple[list[ExportedModel], dict[str, Any]]:
    """Random-weight tiny SAM exported into out_dir, for tests: (models, preprocess["sam"])."""
    sam = build_sam("tiny", random_init=True)
    models = export_sam(sam, out_dir, {"variant": "tiny", "checkpoint": checkpoint_record(None, "random_init")})
    return models, preprocess_record("tiny")


__all__ = [
    "PRESETS",
    "SamPreset",
    "BoxDecoder",
    "build_sam",
    "export_sam",
    "export_tiny_sam",
    "official_decode",
    "preprocess_record",
]
