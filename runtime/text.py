"""GroundingDINO's text side outside the graph: captions -> token inputs, token scores -> phrases.

The reference (the authors' GroundingDINO, and transformers' port) lower-cases and strips a
caption and ends it with "."; tokenizes it with bert-base-uncased; and builds a "sub-sentence"
self-attention mask: tokens attend only within their phrase (the run of tokens closed by the
next "[CLS]", "[SEP]", "." or "?"), with position ids restarting at 0 in each phrase. That mask
and those ids go into BERT and the text enhancer in place of the usual padding mask; they are
computed here (numpy) because the upstream code does not export to ONNX.

Several captions are padded to a common length L: padded positions get id 0 ([PAD]), token
mask 0, position id 0 and an identity row in the sub-sentence mask (they attend only to
themselves), so padding changes nothing for the real tokens. Each caption's own mask is
computed on its untruncated tokens and then cut to max_text_len (256), as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import ConfigError, ManifestError

TOKENIZER_FILE = "tokenizer.json"  # in the engines dir, listed under manifest "files"
TOKENIZER_KEY = "tokenizer"
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")  # the phrase delimiters GroundingDINO uses
# get_phrases_from_posmap's default right_idx: the reference never reports token 255 or later.
PHRASE_RIGHT_INDEX = 255


def normalize_caption(caption: str) -> str:
    """The reference's caption: lower-case, strip, end with "."."""
    if not isinstance(caption, str):
        raise ConfigError(f"a GroundingDINO caption must be a string, got {type(caption).__name__}")
    caption = caption.lower().strip()
    return caption if caption.endswith(".") else caption + "."


def sub_sentence_mask(token_ids: np.ndarray, special_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask [n,n] bool, position_ids [n] int64) of one unpadded token sequence.

    Same result as transformers' generate_masks_with_special_tokens_and_transfer_map: a token
    belongs to the block closed by the next special token at or after it; blocks closed by the
    first or last token (or by none) are not blocks (their tokens attend only to themselves and
    get position 0); elsewhere the position is the distance from the previous special token.
    """
    ids = np.asarray(token_ids)
    n = ids.shape[0]
    index = np.arange(n)
    special = np.isin(ids, special_ids)
    next_special = np.minimum.accumulate(np.where(special, index, n)[::-1])[::-1]
    prev_special = np.concatenate(([-1], np.maximum.accumulate(np.where(special, index, -1))[:-1]))
    in_block = (next_special != 0) & (next_special != n - 1) & (next_special != n)
    mask = (next_special[:, None] == next_special[None, :]) & in_block[None, :]
    mask |= np.eye(n, dtype=bool)
    position_ids = np.where(in_block, np.maximum(index - prev_special - 1, 0), 0).astype(np.int64)
    return mask, position_ids


class GdinoTokenizer:
    """bert-base-uncased WordPiece from the engines dir's tokenizer.json (no truncation, no padding)."""

    def __init__(self, path: Path, max_text_len: int = 256):
        path = Path(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception for unreadable files
            raise ManifestError(f"cannot load the GroundingDINO tokenizer {path}: {err}") from None
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        ids = [self._tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ManifestError(f"{path} lacks the tokens {SPECIAL_TOKENS}: it is not the bert-base-uncased tokenizer")
        self.special_ids = np.asarray(ids, dtype=np.int64)
        self.pad_id = 0
        self.max_text_len = int(max_text_len)
        self.path = path

    def token_ids(self, caption: str) -> np.ndarray:
        """Ids of an already normalised caption, with [CLS] and [SEP], untruncated."""
        return np.asarray(self._tokenizer.encode(caption).ids, dtype=np.int64)

    def decode(self, token_ids: Sequence[int]) -> str:
        """As the reference's tokenizer.decode(ids): special tokens kept, WordPiece joined."""
        return self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=False)

    def phrase_from_mask(self, token_ids: np.ndarray, token_mask: np.ndarray) -> str:
        """The reference's get_phrases_from_posmap: the masked tokens decoded, [CLS] and index >= 255 left out."""
        token_ids = np.asarray(token_ids)
        keep = np.array(token_mask, dtype=bool)  # a copy: the caller's mask stays as it was
        if keep.shape != token_ids.shape:
            raise ValueError(f"token mask of shape {keep.shape} for {token_ids.shape[0]} tokens")
        keep[:1] = False
        keep[PHRASE_RIGHT_INDEX:] = False
        return self.decode(token_ids[keep])

    def phrase(self, token_ids: np.ndarray, scores: np.ndarray, text_threshold: float) -> str:
        """Phrase of one query: its tokens scoring above text_threshold."""
        return self.phrase_from_mask(token_ids, np.asarray(scores) > text_threshold)


@dataclass(frozen=True)
class EncodedText:
    """Inputs of the text graph (and the head) for P captions padded to a common L."""

    captions: tuple[str, ...]  # normalised, as the reference tokenizes them
    input_ids: np.ndarray  # [P, L] int64, 0 = [PAD]
    attention_mask: np.ndarray  # [P, L] int64, 1 = real token
    position_ids: np.ndarray  # [P, L] int64
    text_self_attention_masks: np.ndarray  # [P, L, L] bool
    lengths: np.ndarray  # [P] real tokens per caption (after truncation to max_text_len)

    def token_ids(self, index: int) -> np.ndarray:
        return self.input_ids[index, : self.lengths[index]]


def encode_captions(tokenizer: GdinoTokenizer, captions: Sequence[str]) -> EncodedText:
    """Normalise, tokenize and mask captions as the reference does, padded to the longest."""
    if isinstance(captions, str) or not len(captions):
        raise ConfigError("encode_captions needs a non-empty list of captions")
    normalised = tuple(normalize_caption(c) for c in captions)
    per_caption = []
    for caption in normalised:
        ids = tokenizer.token_ids(caption)
        mask, positions = sub_sentence_mask(ids, tokenizer.special_ids)
        cut = tokenizer.max_text_len  # masks come from the full caption, then are cut (reference order)
        per_caption.append((ids[:cut], mask[:cut, :cut], positions[:cut]))
    count = len(per_caption)
    length = max(ids.shape[0] for ids, _, _ in per_caption)
    input_ids = np.full((count, length), tokenizer.pad_id, dtype=np.int64)
    attention = np.zeros((count, length), dtype=np.int64)
    position_ids = np.zeros((count, length), dtype=np.int64)
    masks = np.broadcast_to(np.eye(length, dtype=bool), (count, length, length)).copy()
    lengths = np.zeros(count, dtype=np.int64)
    for row, (ids, mask, positions) in enumerate(per_caption):
        n = ids.shape[0]
        input_ids[row, :n] = ids
        attention[row, :n] = 1
        position_ids[row, :n] = positions
        masks[row, :n, :n] = mask
        lengths[row] = n
    return EncodedText(normalised, input_ids, attention, position_ids, masks, lengths)
