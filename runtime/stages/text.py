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

from ..errors import ConfigError, ManifestError

TOKENIZER_FILE = "tokenizer.json"  # in the engines dir, listed under manifest "files"
TOKENIZER_KEY = "tokenizer"
SPECIAL_TOKENS = ("[CLS]", "[SEP]", ".", "?")  # the phrase delimiters GroundingDINO uses


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
        """The masked tokens decoded, as SAA+'s own GroundingDINO (its get_phrases_from_posmap) does: every
        marked token, [CLS] and [SEP] included (later GroundingDINO releases leave out [CLS] and tokens 255 on)."""
        token_ids = np.asarray(token_ids)
        keep = np.array(token_mask, dtype=bool)  # a copy: the caller's mask stays as it was
        if keep.shape != token_ids.shape:
            raise ValueError(f"token mask of shape {keep.shape} for {token_ids.shape[0]} tokens")
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


def _checked_captions(captions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(captions, str) or not len(captions):
        raise ConfigError("encode_captions needs a non-empty list of captions")
    return tuple(normalize_caption(c) for c in captions)


def encode_captions(tokenizer: GdinoTokenizer, captions: Sequence[str]) -> EncodedText:
    """Normalise, tokenize and mask captions as the reference does, padded to the longest."""
    normalised = _checked_captions(captions)
    return _encode_token_ids(tokenizer, normalised, [tokenizer.token_ids(caption) for caption in normalised])


def _encode_token_ids(tokenizer: GdinoTokenizer, normalised: tuple[str, ...], token_ids: Sequence[np.ndarray]) -> EncodedText:
    per_caption = []
    for ids in token_ids:
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


@dataclass(frozen=True)
class CaptionSpan:
    """Where one caption's tokens sit in a joined caption."""

    row: int  # the joined caption (EncodedText row) that holds it
    start: int  # its first token after [CLS] in that row
    stop: int  # one past its closing "."
    token_ids: np.ndarray  # the caption's own ids, [CLS] ... [SEP], as it tokenizes alone


@dataclass(frozen=True)
class JoinedCaptions:
    """Captions joined into GroundingDINO's multi-phrase captions ("crack. black hole.")."""

    captions: tuple[str, ...]  # the config's captions, normalised
    encoded: EncodedText  # the joined captions: one row each
    spans: tuple[CaptionSpan, ...]  # one per caption, in order

    def columns(self, index: int) -> np.ndarray:
        """The joined row's token positions that stand for caption `index`'s own tokens: [CLS],
        its span, [SEP] (the columns of its logits as if it had run alone)."""
        span = self.spans[index]
        last = int(self.encoded.lengths[span.row]) - 1
        return np.concatenate(([0], np.arange(span.start, span.stop), [last])).astype(np.int64)


def join_captions(tokenizer: GdinoTokenizer, captions: Sequence[str]) -> JoinedCaptions:
    """GroundingDINO's own way to ask for several phrases at once: the captions one after the
    other in one caption, each phrase closed by its ".", as many per joined caption as fit in
    max_text_len tokens (a caption too long alone keeps a row of its own, cut as the reference cuts it).

    Each phrase's token ids, BERT mask block and position ids are the ones it has alone (the
    sub-sentence mask keeps phrases apart), so the text features of its tokens are too. What
    differs from running each caption alone is the head: the image features attend to every
    phrase at once, and the 900 queries are chosen over all of them.
    """
    normalised = _checked_captions(captions)
    lone = [tokenizer.token_ids(caption) for caption in normalised]
    rows: list[list[int]] = []  # the caption indices of each joined caption
    room = tokenizer.max_text_len - 2  # [CLS] and [SEP]
    for index, ids in enumerate(lone):
        body = ids.shape[0] - 2
        if rows and sum(lone[i].shape[0] - 2 for i in rows[-1]) + body <= room:
            rows[-1].append(index)
        else:
            rows.append([index])
    joined_ids, spans = [], [None] * len(lone)
    for row, members in enumerate(rows):
        cls, sep = lone[members[0]][:1], lone[members[0]][-1:]
        start = 1
        for index in members:
            stop = start + lone[index].shape[0] - 2
            spans[index] = CaptionSpan(row, start, min(stop, tokenizer.max_text_len - 1), lone[index][:tokenizer.max_text_len])
            start = stop
        joined_ids.append(np.concatenate([cls, *(lone[i][1:-1] for i in members), sep]))
    texts = tuple(" ".join(normalised[i] for i in members) for members in rows)
    return JoinedCaptions(normalised, _encode_token_ids(tokenizer, texts, joined_ids), tuple(spans))
