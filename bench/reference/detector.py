"""The reference's GroundingDINO call, one caption at a time, as the authors' code makes it.

SAA's Model.get_grounding_output: the image goes through GroundingDINO's transform
(RandomResize([800], max_size=1333) = torchvision resize of the PIL image, ToTensor, Normalize
with ImageNet mean/std), the caption is lower-cased, stripped and ended with "."; the full
model runs on that single caption (it builds its own sub-sentence masks) and the outputs are
sigmoid(pred_logits)[0] [900, 256] and pred_boxes[0] [900, 4]. Here the model is transformers'
GroundingDinoForObjectDetection, whose forward is that of the authors' model.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image

from runtime.manifest import GDINO_MAX_SIDE, GDINO_SHORT_SIDE, IMAGENET_MEAN, IMAGENET_STD


def reference_caption(caption: str) -> str:
    caption = caption.lower()
    caption = caption.strip()
    if not caption.endswith("."):
        caption = caption + "."
    return caption


def _size_with_aspect_ratio(width: int, height: int, size: int, max_size: int) -> tuple[int, int]:
    """GroundingDINO datasets/transforms.py get_size_with_aspect_ratio: (h, w) of the resize."""
    min_original = float(min(width, height))
    max_original = float(max(width, height))
    if max_original / min_original * size > max_size:
        size = int(round(max_size * min_original / max_original))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def reference_transform(image_rgb: np.ndarray, short_side: int = GDINO_SHORT_SIDE, max_side: int = GDINO_MAX_SIDE) -> torch.Tensor:
    """[3, h, w] float32: PIL resize (torchvision), ToTensor, Normalize."""
    pil = Image.fromarray(image_rgb)
    size = _size_with_aspect_ratio(pil.width, pil.height, short_side, max_side)
    resized = F.resize(pil, list(size))
    return F.normalize(F.to_tensor(resized), list(IMAGENET_MEAN), list(IMAGENET_STD))


def load_reference_tokenizer(tokenizer_json: Path):
    """transformers' BERT tokenizer over the same tokenizer.json the runtime uses."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", model_max_length=512, clean_up_tokenization_spaces=True,
    )


@torch.no_grad()
def reference_detect(
    model,
    tokenizer,
    image_rgb: np.ndarray,
    caption: str,
    short_side: int = GDINO_SHORT_SIDE,
    max_side: int = GDINO_MAX_SIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid logits [900, max_text_len], boxes [900, 4] cx,cy,w,h) for one caption."""
    pixels = reference_transform(image_rgb, short_side, max_side)[None]
    tokenized = tokenizer(reference_caption(caption), padding="longest", return_tensors="pt")
    outputs = model(
        pixel_values=pixels,
        input_ids=tokenized["input_ids"],
        attention_mask=tokenized["attention_mask"],
        token_type_ids=tokenized.get("token_type_ids"),
    )
    return outputs.logits.sigmoid()[0].numpy(), outputs.pred_boxes[0].numpy()


@contextmanager
def query_selection(force: torch.Tensor | np.ndarray | None = None, num_queries: int = 900) -> Iterator[list]:
    """Record, or impose, GroundingDINO's top-`num_queries` query selection inside the block.

    The two-stage selection (torch.topk over the encoder's scores) is discontinuous: scores
    closer than float rounding come out in either order in two implementations, and a swapped
    pair changes those queries' outputs. Parity checks therefore compare the selections (the
    yielded list gets one (scores [B, S], indices [B, k]) pair per call) and, where they differ
    on near-ties only, rerun with `force` ([B, k] positions) so the rest can be compared.
    Works for transformers' model and the authors' (both call torch.topk with k = num_queries).
    """
    original = torch.topk
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    forced = None if force is None else torch.as_tensor(np.asarray(force), dtype=torch.long)

    def topk(input, k, dim=-1, largest=True, sorted=True):  # noqa: A002 (torch's argument names)
        if k != num_queries:
            return original(input, k, dim, largest, sorted)
        if forced is None:
            values, indices = original(input, k, dim, largest, sorted)
        else:
            indices = forced.to(input.device)
            values = torch.gather(input, dim, indices)
        calls.append((input.detach().clone(), indices.clone()))
        return values, indices

    torch.topk = topk
    try:
        yield calls
    finally:
        torch.topk = original
