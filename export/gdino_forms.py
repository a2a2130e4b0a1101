"""Cheaper forms of two transformers GroundingDINO modules, swapped in only while tracing the head.

Each computes the same terms as the module it replaces, in another order or grouping, so the
traced graph equals transformers' forward to float rounding; `export_grounding_dino` checks
the exported head against the original modules, and the reference never uses these.

- `FoldedDeformableAttention`: the deformable attention with its sampling-grid arithmetic
  folded into the offset Linear, and its sampling and weighted sum either as standard ops (one
  grid_sample per level and point) or as one node of the runtime's custom op (`FusedDeformableSum`,
  `export --deformable-attention fused`, the default).
- `ReassociatedBiAttention`: the fusion layer's image-text attention with its three image-side
  projections (256 -> 1024 on every image position) folded into the few text tokens.
- `ConcatPaddedSwinLayer` (the image graph): Swin's window padding written as Concats with zeros
  (`export.common.pad_right_bottom`; onnxruntime's CUDA Pad held 2 ms of the image graph).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers.models.grounding_dino.modeling_grounding_dino import (
    GroundingDinoBiMultiHeadAttention,
    GroundingDinoMultiscaleDeformableAttention,
)
from transformers.models.swin.modeling_swin import SwinLayer

from runtime.ops import DEFORMABLE_OP

from .common import pad_right_bottom


class FusedDeformableSum(torch.autograd.Function):
    """The sampling and weighted sum as one node of the runtime's custom op
    saa.edge::MultiScaleDeformableAttention (runtime/ops/msda.h, compiled with the runtime).

    value [B, S, H, d], grids [B, Q, H, L, P, 2] in grid_sample's [-1, 1] convention, weights
    [B, Q, H, L, P] -> [B, Q, H*d]. In PyTorch it runs transformers' own sum (grid_sample per
    level, align_corners=False, zeros outside), so the export's parity check compares the op
    against that."""

    @staticmethod
    def forward(ctx, value, grids, weights, spatial_shapes_list):  # noqa: ARG004 (ctx: autograd's)
        batch, positions, heads, channels = value.shape
        _, queries, _, levels, points, _ = grids.shape
        sums = value.new_zeros(batch * heads, channels, queries)
        start = 0
        for level, (height, width) in enumerate(spatial_shapes_list):
            level_values = value[:, start:start + height * width].permute(0, 2, 3, 1).reshape(batch * heads, channels, height, width)
            start += height * width
            grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P, 2]
            sampled = nn.functional.grid_sample(level_values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            weight = weights[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P]
            sums = sums + (sampled * weight[:, None]).sum(-1)
        return sums.view(batch, heads * channels, queries).transpose(1, 2)

    @staticmethod
    def symbolic(g, value, grids, weights, spatial_shapes_list):
        flat = [int(size) for shape in spatial_shapes_list for size in shape]
        out = g.op(DEFORMABLE_OP, value, grids, weights, spatial_shapes_i=flat)
        out.setType(value.type().with_sizes([None, None, None]))  # float [B, Q, H*d]: ONNX cannot infer a custom op's
        return out



class FoldedDeformableAttention(GroundingDinoMultiscaleDeformableAttention):
    """GroundingDinoMultiscaleDeformableAttention with its arithmetic regrouped for onnxruntime.

    Same terms as transformers' forward (its MultiScaleDeformableAttention included), in three
    cheaper groupings; on a 2-core CPU with Swin-T at 800x800 each encoder layer handles
    13294 queries x 8 heads x 4 levels x 4 points:

    - Sampling grids: upstream divides the offsets by each level's size, adds the reference
      points and maps to [-1, 1] (2 x - 1), three passes over [Q, 8, 4, 4, 2] with odd
      broadcasts. The per-channel factor 2/size and the -1 fold into the offset Linear's weights
      and bias instead, leaving one add of 2 x reference (decoder, 4-coordinate references:
      the 1/points folds in, the box size stays a multiply).
    - The weighted sum over levels and points is accumulated one sampling point at a time (one
      grid_sample per level and point, then a multiply and an add), instead of over a stack of
      all levels' samples (218 MB per caption and layer). The export's first form summed each
      level's 4 points with a ReduceSum over a last axis of 4: onnxruntime's CUDA kernel for
      that shape (reduce_matrix_columns) ran at ~100 GB/s and took 68.7 of the head's 156 ms on
      an H200 (bench/results/kernels_cuda-h200_*). `WEIGHTED_SUM = "per_level"` keeps that form
      for A/B runs (bench/gpu/op_forms.py).
    - The value projection is computed channels-first (W x^T: onnxruntime's GEMM reads x
      transposed), the layout grid sampling needs, instead of projected and then transposed.
    """

    WEIGHTED_SUM = "per_point"  # "per_level": the export's first form (A/B runs only); "fused": the custom op

    @staticmethod
    def _levels(value: torch.Tensor, spatial_shapes_list) -> Iterator[torch.Tensor]:
        """Each level's value map, [B*H, d, height, width], from the flat [B*H, d, S] values."""
        start = 0
        for height, width in spatial_shapes_list:
            yield value[:, :, start:start + height * width].unflatten(-1, (height, width))
            start += height * width

    @classmethod
    def _sum_per_point(cls, value, grids, weights, spatial_shapes_list) -> torch.Tensor:
        """sum over levels l and points p of weight[l, p] x sample(level l, grid[l, p]): [B*H, d, Q, 1].

        Grids and weights are laid out once with (level, point) leading, so that each point's
        slice is contiguous; every term is then element-wise work on [B*H, d, Q]."""
        batch, queries, heads, levels, points, _ = grids.shape  # weights: [B, Q, H, L, P]
        grids = grids.permute(3, 4, 0, 2, 1, 5).reshape(levels, points, batch * heads, queries, 1, 2)
        weights = weights.permute(3, 4, 0, 2, 1).reshape(levels, points, batch * heads, 1, queries, 1)
        output = None
        for level, value_l in enumerate(cls._levels(value, spatial_shapes_list)):
            for point in range(points):
                sampled = nn.functional.grid_sample(value_l, grids[level, point], mode="bilinear",
                                                    padding_mode="zeros", align_corners=False)  # [B*H, d, Q, 1]
                term = sampled * weights[level, point]
                output = term if output is None else output + term
        return output

    @classmethod
    def _sum_per_level(cls, value, grids, weights, spatial_shapes_list) -> torch.Tensor:
        """The same sum, each level's points reduced with a ReduceSum over a last axis of P."""
        batch, queries, heads, levels, points = weights.shape
        weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
        output = None
        for level, value_l in enumerate(cls._levels(value, spatial_shapes_list)):
            grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P, 2]
            sampled = nn.functional.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
            term = (sampled * weights[:, :, :, level]).sum(-1)  # [B*H, d, Q]
            output = term if output is None else output + term
        return output

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes=None, spatial_shapes_list=None,
                level_start_index=None, output_attentions=False):
        if position_embeddings is not None:
            hidden_states = hidden_states + position_embeddings
        batch, queries, _ = hidden_states.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        head_dim = self.d_model // heads

        fused = self.WEIGHTED_SUM == "fused"
        if fused:  # the op reads each position's channels together: rows, as the Linear gives them
            value = self.value_proj(encoder_hidden_states)  # [B,S,D]
            if attention_mask is not None:
                value = value.masked_fill(~attention_mask[:, :, None], 0.0)
            value = value.view(batch, -1, heads, head_dim)
        else:
            value = torch.matmul(self.value_proj.weight, encoder_hidden_states.transpose(1, 2)) + self.value_proj.bias[:, None]  # [B,D,S]
            if attention_mask is not None:
                value = value.masked_fill(~attention_mask[:, None, :], 0.0)
            value = value.view(batch * heads, head_dim, -1)

        weights = self.attention_weights(hidden_states).view(batch, queries, heads, levels * points).softmax(-1)
        weights = weights.view(batch, queries, heads, levels, points)

        # Offsets come out as grid-sample coordinates: factor and shift folded into the Linear.
        offsets_weight, offsets_bias = self.sampling_offsets.weight, self.sampling_offsets.bias
        if reference_points.shape[-1] == 2:
            sizes = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets_weight.dtype)  # [levels,2] (w,h)
            factor = (2.0 / sizes)[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
            grids = nn.functional.linear(hidden_states, offsets_weight * factor[:, None], offsets_bias * factor - 1)
            # + 2 x reference, spread to the channels by a 0/1 product: onnxruntime's add that
            # broadcasts [Q,1,levels,1,2] over [Q,heads,levels,points,2] ran at ~1 GB/s.
            spread = torch.eye(levels * 2, dtype=grids.dtype).view(levels * 2, 1, levels, 1, 2)
            spread = (2 * spread).expand(-1, heads, -1, points, -1).reshape(levels * 2, -1)
            grids = grids + torch.matmul(reference_points.flatten(2), spread)
            grids = grids.view(batch, queries, heads, levels, points, 2)
        elif reference_points.shape[-1] == 4:
            offsets = nn.functional.linear(hidden_states, offsets_weight / points, offsets_bias / points)
            grids = (offsets.view(batch, queries, heads, levels, points, 2) * reference_points[:, :, None, :, None, 2:]
                     + (2 * reference_points[:, :, None, :, None, :2] - 1))
        else:
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")

        if fused:
            output = FusedDeformableSum.apply(value, grids, weights, [tuple(int(v) for v in s) for s in spatial_shapes_list])
            return self.output_proj(output), weights
        weighted_sum = {"per_point": self._sum_per_point, "per_level": self._sum_per_level}[self.WEIGHTED_SUM]
        output = weighted_sum(value, grids, weights, spatial_shapes_list)
        output = self.output_proj(output.view(batch, self.d_model, queries).transpose(1, 2))
        return output, weights


def shifted_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' max subtractions and clamps of the [B*H, N, L] image-text logits: (image side
    [B*H, N, L], text side [B*H, L, N]), the same bits as its code, with the global max taken from
    the text side's row maxes. The row max of clamp(x - g) is clamp(row max of x - g): both maps
    are monotonic, rounding included. So one full-tensor ReduceMax is gone (onnxruntime runs
    ReduceMax through cuDNN, at ~50 GB/s on an H200)."""
    transposed = logits.transpose(1, 2)  # [B*H, L, N]
    row_max = torch.max(transposed, dim=-1, keepdim=True)[0]
    global_max = row_max.max()
    image_side = torch.clamp(logits - global_max, min=-50000, max=50000)
    text_side = torch.clamp(transposed - global_max, min=-50000, max=50000)
    text_max = torch.clamp(row_max - global_max, min=-50000, max=50000)  # the row max of text_side
    return image_side, torch.clamp(text_side - text_max, min=-50000, max=50000)


class ReassociatedBiAttention(GroundingDinoBiMultiHeadAttention):
    """GroundingDinoBiMultiHeadAttention with the image-side projections folded into the text side.

    The original projects all N image positions from 256 to 1024 channels three times (query,
    value, and back out): with Swin-T at 800x800, N = 13294, that is 21 GFLOP per encoder layer
    and ~0.65 s of a caption's 3.3 s on a 2-core CPU. Every use of those projections meets the
    L text tokens (L is ~5-20 and at most 256), so the products regroup, per head h:

        query:  (v Wq_h^T + bq_h) k_h^T s     = v (Wq_h^T k_h^T s) + (bq_h k_h^T s)
        value:  P_h (v Wv_h^T + bv_h)         = (P_h v) Wv_h^T + bv_h      (rows of P_h sum to 1)
        output: sum_h A_h t_h Wo_h^T + bo     = [A_1 .. A_H] [t_1 Wo_1^T; ..; t_H Wo_H^T] + bo

    (v image features, k_h / t_h the head's text keys / values, s the scale, P_h the softmax
    over image positions, A_h the one over text tokens, Wo_h the out projection's columns of
    head h). Costs N*256*H*L per product instead of N*256*1024. The masking, clamping and both
    softmaxes are transformers' own, on the same attention logits; its max subtractions give the
    same values with the global max taken from the text side's row maxes (one ReduceMax fewer)."""

    def forward(self, vision_features, text_features, vision_attention_mask=None, text_attention_mask=None):
        batch, positions, vision_dim = vision_features.shape
        heads, head_dim = self.num_heads, self.head_dim
        text_keys = self.text_proj(text_features).view(batch, -1, heads, head_dim).permute(0, 2, 3, 1)  # [B,H,d,L]
        tokens = text_keys.shape[-1]

        # Attention logits [B*H, N, L] as v @ (Wq_h^T k_h^T s) + bq_h k_h^T s.
        query_weight = self.vision_proj.weight.view(heads, head_dim, vision_dim).transpose(1, 2)  # [H,D,d]
        logit_maps = torch.matmul(query_weight, text_keys) * self.scale  # [B,H,D,L]
        logit_bias = torch.matmul(self.vision_proj.bias.view(heads, 1, head_dim), text_keys) * self.scale  # [B,H,1,L]
        logit_maps = logit_maps.permute(0, 2, 1, 3).reshape(batch, vision_dim, heads * tokens)
        attn_weights = torch.matmul(vision_features, logit_maps) + logit_bias.reshape(batch, 1, heads * tokens)
        attn_weights = attn_weights.view(batch, positions, heads, tokens).transpose(1, 2).reshape(batch * heads, positions, tokens)

        attn_weights, text_attn_weights = shifted_logits(attn_weights)
        # From here to the softmaxes: transformers' code.
        if vision_attention_mask is not None:
            vision_attention_mask = vision_attention_mask[:, None, None, :].repeat(1, heads, 1, 1).flatten(0, 1)
            text_attn_weights = text_attn_weights.masked_fill(vision_attention_mask, float("-inf"))
        text_attn_weights = text_attn_weights.softmax(dim=-1)  # [B*H, L, N]
        if text_attention_mask is not None:
            text_attention_mask = text_attention_mask[:, None, None, :].repeat(1, heads, 1, 1).flatten(0, 1)
            attn_weights = attn_weights.masked_fill(text_attention_mask, float("-inf"))
        vision_attn_weights = attn_weights.softmax(dim=-1)  # [B*H, N, L]

        # Text side: (P_h v) Wv_h^T + bv_h, then transformers' out projection.
        pooled = torch.bmm(text_attn_weights.view(batch, heads * tokens, positions), vision_features)  # [B,H*L,D]
        value_weight = self.values_vision_proj.weight.view(heads, head_dim, vision_dim).transpose(1, 2)  # [H,D,d]
        text_out = torch.matmul(pooled.view(batch, heads, tokens, vision_dim), value_weight)
        text_out = text_out + self.values_vision_proj.bias.view(heads, 1, head_dim)  # [B,H,L,d]
        text_out = self.out_text_proj(text_out.transpose(1, 2).reshape(batch, tokens, self.embed_dim))

        # Image side: [A_1 .. A_H] @ stacked t_h Wo_h^T, + bo.
        text_values = self.values_text_proj(text_features).view(batch, tokens, heads, head_dim).transpose(1, 2)  # [B,H,L,d]
        out_weight = self.out_vision_proj.weight.view(vision_dim, heads, head_dim).permute(1, 2, 0)  # [H,d,D]
        value_maps = torch.matmul(text_values, out_weight).reshape(batch, heads * tokens, vision_dim)
        probs = vision_attn_weights.view(batch, heads, positions, tokens).transpose(1, 2).reshape(batch, positions, heads * tokens)
        vision_out = torch.matmul(probs, value_maps) + self.out_vision_proj.bias
        return (vision_out, vision_attn_weights), (text_out, text_attn_weights)


class ConcatPaddedSwinLayer(SwinLayer):
    """transformers' SwinLayer with its window padding (F.pad of [B, H, W, C]) as Concats with zeros."""

    def maybe_pad(self, hidden_states: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        pad_right = (self.window_size - width % self.window_size) % self.window_size
        pad_bottom = (self.window_size - height % self.window_size) % self.window_size
        return pad_right_bottom(hidden_states, pad_bottom, pad_right), (0, 0, 0, pad_right, 0, pad_bottom)


# The forms the head is traced with, keyed by the transformers class each replaces.
TRACE_FORMS: dict[type, type] = {
    GroundingDinoBiMultiHeadAttention: ReassociatedBiAttention,
    GroundingDinoMultiscaleDeformableAttention: FoldedDeformableAttention,
}
IMAGE_TRACE_FORMS: dict[type, type] = {SwinLayer: ConcatPaddedSwinLayer}  # the image graph's


DEFORMABLE_ATTENTIONS = ("standard", "fused")  # export --deformable-attention


@contextmanager
def deformable_attention(form: str) -> Iterator[None]:
    """Inside the block, FoldedDeformableAttention sums with standard ONNX ops ("standard": one
    grid_sample per level and point) or with the runtime's custom op ("fused")."""
    if form not in DEFORMABLE_ATTENTIONS:
        raise ValueError(f"deformable attention form must be one of {DEFORMABLE_ATTENTIONS}, got {form!r}")
    before = FoldedDeformableAttention.WEIGHTED_SUM
    FoldedDeformableAttention.WEIGHTED_SUM = "fused" if form == "fused" else "per_point"
    try:
        yield
    finally:
        FoldedDeformableAttention.WEIGHTED_SUM = before


@contextmanager
def trace_forms(model: nn.Module, forms: dict[type, type] = TRACE_FORMS) -> Iterator[None]:
    """Inside the block, every module of `model` with a class in `forms` runs its cheaper form."""
    swapped = [(m, type(m)) for m in model.modules() if type(m) in forms]
    for module, original in swapped:
        module.__class__ = forms[original]
    try:
        yield
    finally:
        for module, original in swapped:
            module.__class__ = original
