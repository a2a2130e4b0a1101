"""Forms of SAM image-encoder parts swapped in only while tracing: the window padding (always)
and the attention (`export --sam-attention mha|augmented`).

Window padding: segment_anything pads each windowed block's [B, 64, 64, C] tokens to a multiple
of the window (70 for 14) with F.pad. onnxruntime's CUDA Pad kernel moved ~10.5 G elements/s
at every size measured on an H200 (Swin, ViT-B and ViT-H alike: 16.6 ms of ViT-H's encoder,
bench/results/kernels_cuda-h200_*), far below the copy rate a pad needs. `export.common.
pad_right_bottom` writes the same zeros with two Concats (`window_partition_by_concat`).

Fused attention:

segment_anything's Attention writes the [heads, HW, HW] logits, adds the decomposed relative-
position terms in two broadcast passes, takes the softmax and reads the result again: seven
passes over the largest tensor of the encoder (ViT-B's global layers: 12 x 4096 x 4096). onnxruntime's
transformer optimizer cannot fuse it (the rel-pos Einsum sits between QK^T and the softmax). This
form computes the same terms and hands them to onnxruntime's `com.microsoft.MultiHeadAttention`
as its `attention_bias` (one pass to write the bias, one to read it inside the fused kernel).
Parity is checked against the unmodified module, as for every export.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from segment_anything.modeling import image_encoder
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from .common import pad_right_bottom

SAM_ATTENTIONS = ("plain", "mha", "augmented")


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v over packed heads: q, k, v [B, S, heads*d], bias [B, heads, S, S].
    Exported as onnxruntime's MultiHeadAttention (key_padding_mask and qkv bias left out)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, num_heads: int, scale: float):  # type: ignore[override]
        batch, length, hidden = q.shape
        heads = (t.view(batch, -1, num_heads, hidden // num_heads).transpose(1, 2) for t in (q, k, v))
        qh, kh, vh = heads
        attn = (qh * scale) @ kh.transpose(-2, -1) + bias
        return (attn.softmax(-1) @ vh).transpose(1, 2).reshape(batch, length, hidden)

    @staticmethod
    def symbolic(g, q, k, v, bias, num_heads: int, scale: float):  # type: ignore[override]
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor

        missing = _optional_input_placeholder_tensor(g)
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, missing, missing, bias,
                    num_heads_i=num_heads, scale_f=scale)


class FusedRelPosAttention(Attention):
    """segment_anything's Attention with its softmax(QK^T + rel-pos) V handed to one fused op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        heads, length = self.num_heads, height * width
        qkv = self.qkv(x).reshape(batch, length, 3, heads, -1)
        head_dim = qkv.shape[-1]
        q, k, v = (qkv[:, :, i].reshape(batch, length, heads * head_dim) for i in range(3))
        if self.use_rel_pos:
            # add_decomposed_rel_pos's terms, as the bias: rel_h[b, h, w, kh] + rel_w[b, h, w, kw]
            r_q = qkv[:, :, 0].permute(0, 2, 1, 3).reshape(batch * heads, height, width, head_dim)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, self.rel_pos_w))
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(batch, heads, length, length)
        else:
            bias = q.new_zeros(batch, heads, length, length)
        out = _MultiHeadAttention.apply(q, k, v, bias, heads, float(self.scale))
        return self.proj(out.reshape(batch, height, width, -1))


def _one_hot_positions(height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[height*width, height + width]: each key position's row and column as one-hot rows (a
    constant of the traced graph)."""
    rows = torch.eye(height, dtype=dtype).repeat_interleave(width, dim=0)
    cols = torch.eye(width, dtype=dtype).repeat(height, 1)
    return torch.cat([rows, cols], dim=1)


class AugmentedRelPosAttention(Attention):
    """segment_anything's Attention with the decomposed relative positions inside the QK^T product.

    Each query is widened by its rel_h and rel_w terms and each key by the one-hot rows of its
    row and column, so one MatMul gives scale * q.k + rel_h[q, kh] + rel_w[q, kw]: the two
    broadcast Adds over the [heads, HW, HW] logits (805 MB each in ViT-B's global layers, fp32)
    are gone, for (head_dim + H + W) / head_dim times the QK^T products (3x in the global
    layers): cheap where a GPU's matmuls are and its memory passes are not. The same sums in
    another order (standard ONNX ops; `export --sam-attention augmented`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        heads, length = self.num_heads, height * width
        qkv = self.qkv(x).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * heads, length, -1).unbind(0)
        queries, keys = q * self.scale, k
        if self.use_rel_pos:
            r_q = q.reshape(batch * heads, height, width, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, self.rel_pos_w))
            queries = torch.cat([queries, rel_h.reshape(-1, length, height), rel_w.reshape(-1, length, width)], dim=-1)
            one_hot = _one_hot_positions(height, width, k.dtype)
            keys = torch.cat([k, one_hot.expand(k.shape[0], -1, -1)], dim=-1)
        attn = (queries @ keys.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(out)


_FORM_CLASSES = {"mha": FusedRelPosAttention, "augmented": AugmentedRelPosAttention}


@contextmanager
def sam_attention_form(encoder: nn.Module, form: str) -> Iterator[None]:
    """Inside the block, the encoder's attention modules run `form` ("plain": unchanged)."""
    if form not in SAM_ATTENTIONS:
        raise ValueError(f"SAM attention form must be one of {SAM_ATTENTIONS}, got {form!r}")
    swapped = [m for m in encoder.modules() if type(m) is Attention] if form in _FORM_CLASSES else []
    for module in swapped:
        module.__class__ = _FORM_CLASSES[form]
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = Attention


def window_partition_by_concat(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """segment_anything's window_partition with its padding written by `pad_right_bottom`."""
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    x = pad_right_bottom(x, pad_h, pad_w)
    rows, cols = (height + pad_h) // window_size, (width + pad_w) // window_size
    x = x.view(batch, rows, window_size, cols, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, channels)
    return windows, (height + pad_h, width + pad_w)


@contextmanager
def window_padding_by_concat() -> Iterator[None]:
    """Inside the block, segment_anything's windowed blocks pad with `pad_right_bottom`."""
    original = image_encoder.window_partition
    image_encoder.window_partition = window_partition_by_concat
    try:
        yield
    finally:
        image_encoder.window_partition = original
