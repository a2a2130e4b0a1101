"""runtime.stages.text against the reference's own code: transformers' mask function and tokenizer.

The sub-sentence masks and position ids must equal transformers'
generate_masks_with_special_tokens_and_transfer_map (and the authors' original, when the
groundingdino package is installed) on every caption SAA uses, padded or not; phrases must equal
get_phrases_from_posmap decoded with the transformers tokenizer.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import (
    SPECIAL_TOKENS,
    generate_masks_with_special_tokens_and_transfer_map,
)

from bench.reference.detector import load_reference_tokenizer, reference_caption
from export.gdino import copy_tokenizer
from runtime.errors import ConfigError, ManifestError
from runtime.stages.text import GdinoTokenizer, encode_captions, normalize_caption, sub_sentence_mask

from official_gdino import official_groundingdino  # tests/official_gdino.py

REPO = Path(__file__).resolve().parent.parent


def _prompt_captions() -> list[str]:
    """Every caption the SAA prompt sets produce, with the reference's "bottle," object quirk."""
    captions = []
    for path in sorted((REPO / "runtime" / "data" / "prompts").glob("*.json")):
        data = json.loads(path.read_text())
        templates = data.get("general_prompt_templates", [])
        for name, category in data["categories"].items():
            captions.append(category["object_prompt"] + ",")
            captions += [t.format(name) for t in templates]
            captions += [p["text"] for p in category["defect_prompts"]]
    return captions


EDGE_CAPTIONS = [
    "bottle,.", "crack. flawed golden wire. black hole.", "defect on bottle", "", ".", "?", "what? no.",
    "a.b.c", "  Mixed CASE Caption  ", "broken_large", "scratch; dent", "café crème", "two  spaces. and? more",
    "..", ". . .", "[SEP] literal", "hole.", "a hole in the metal surface of the capsule.",
]
CAPTIONS = list(dict.fromkeys(EDGE_CAPTIONS + _prompt_captions()))


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tok(tokenizer_json: Path) -> GdinoTokenizer:
    return GdinoTokenizer(tokenizer_json)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_json: Path):
    return load_reference_tokenizer(tokenizer_json)


def _reference_masks(input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, positions = generate_masks_with_special_tokens_and_transfer_map(
        torch.from_numpy(input_ids), torch.tensor(SPECIAL_TOKENS)
    )
    return masks.numpy(), positions.numpy()


def test_caption_corpus_is_broad():
    assert len(CAPTIONS) > 60
    assert "bottle,." in {normalize_caption(c) for c in CAPTIONS}


@pytest.mark.parametrize(
    "raw, expected",
    [("Bottle,", "bottle,."), ("  crack. hole  ", "crack. hole."), ("defect.", "defect."), ("", "."), ("A?", "a?.")],
)
def test_normalize_caption_is_the_reference(raw, expected):
    assert normalize_caption(raw) == expected == reference_caption(raw)


def test_special_token_ids_are_the_reference(tok):
    assert tok.special_ids.tolist() == SPECIAL_TOKENS  # [CLS], [SEP], ".", "?"


def test_token_ids_match_transformers(tok, hf_tok):
    for caption in CAPTIONS:
        caption = normalize_caption(caption)
        assert tok.token_ids(caption).tolist() == hf_tok(caption)["input_ids"], caption


def test_masks_match_transformers_per_caption(tok):
    for caption in CAPTIONS:
        ids = tok.token_ids(normalize_caption(caption))
        mask, positions = sub_sentence_mask(ids, tok.special_ids)
        ref_mask, ref_positions = _reference_masks(ids[None])
        np.testing.assert_array_equal(mask, ref_mask[0], err_msg=caption)
        np.testing.assert_array_equal(positions, ref_positions[0], err_msg=caption)


def test_padded_batch_matches_transformers(tok, hf_tok):
    # transformers computes masks on the padded batch; ours per caption, padding with identity
    # rows. They agree because a normalised caption always ends in "." before [SEP].
    encoded = encode_captions(tok, CAPTIONS)
    batch = hf_tok([normalize_caption(c) for c in CAPTIONS], padding="longest", return_tensors="np")
    np.testing.assert_array_equal(encoded.input_ids, batch["input_ids"])
    np.testing.assert_array_equal(encoded.attention_mask, batch["attention_mask"])
    ref_mask, ref_positions = _reference_masks(encoded.input_ids)
    np.testing.assert_array_equal(encoded.text_self_attention_masks, ref_mask)
    np.testing.assert_array_equal(encoded.position_ids, ref_positions)
    assert encoded.lengths.tolist() == batch["attention_mask"].sum(1).tolist()


def test_padding_rows_attend_only_to_themselves(tok):
    encoded = encode_captions(tok, ["hole", "crack. flawed golden wire. black hole."])
    n = int(encoded.lengths[0])
    pad = encoded.text_self_attention_masks[0, n:]
    np.testing.assert_array_equal(pad, np.eye(encoded.input_ids.shape[1], dtype=bool)[n:])
    assert not encoded.text_self_attention_masks[0, :n, n:].any()  # real tokens never see padding
    assert (encoded.position_ids[0, n:] == 0).all() and (encoded.input_ids[0, n:] == 0).all()
    np.testing.assert_array_equal(encoded.token_ids(0), tok.token_ids("hole."))


def test_long_caption_is_cut_after_masking_like_the_reference(tok, hf_tok):
    caption = " ".join(f"word{i % 7}." if i % 5 == 4 else f"w{i}" for i in range(300))
    encoded = encode_captions(tok, [caption, "short."])
    assert encoded.input_ids.shape[1] == 256 and encoded.lengths.tolist()[0] == 256
    full = np.asarray(hf_tok(normalize_caption(caption))["input_ids"])[None]
    assert full.shape[1] > 256
    ref_mask, ref_positions = _reference_masks(full)  # the model computes on all tokens, then cuts
    np.testing.assert_array_equal(encoded.text_self_attention_masks[0], ref_mask[0, :256, :256])
    np.testing.assert_array_equal(encoded.position_ids[0], ref_positions[0, :256])


def _official_generate_masks():
    """The authors' function from the groundingdino package (skipped when not installed)."""
    with official_groundingdino():
        from groundingdino.models.GroundingDINO.bertwarper import generate_masks_with_special_tokens_and_transfer_map as official
    return official


def test_masks_match_the_authors_original(tok, hf_tok):
    official = _official_generate_masks()
    for caption in CAPTIONS:
        caption = normalize_caption(caption)
        tokenized = hf_tok([caption], return_tensors="pt")
        mask, positions, _ = official(tokenized, SPECIAL_TOKENS, hf_tok)
        ours = encode_captions(tok, [caption])
        np.testing.assert_array_equal(ours.text_self_attention_masks[0], mask[0].numpy(), err_msg=caption)
        np.testing.assert_array_equal(ours.position_ids[0], positions[0].numpy(), err_msg=caption)


def _reference_phrase(posmap_256: np.ndarray, input_ids: list[int], hf_tok) -> str:
    """get_phrases_from_posmap(posmap, tokenized, tokenizer) of the GroundingDINO SAA+ ships: every marked token."""
    posmap = torch.from_numpy(posmap_256.copy())
    non_zero_idx = posmap.nonzero(as_tuple=True)[0].tolist()
    return hf_tok.decode([input_ids[i] for i in non_zero_idx])


def test_phrases_match_the_reference_decode(tok, hf_tok):
    rng = np.random.default_rng(0)
    checked = 0
    for caption in CAPTIONS[:40]:
        caption = normalize_caption(caption)
        ids = tok.token_ids(caption)
        for _ in range(6):
            scores = rng.random(ids.shape[0]).astype(np.float32)
            mask = scores > 0.4
            padded = np.zeros(256, dtype=bool)
            padded[: ids.shape[0]] = mask
            expected = _reference_phrase(padded, ids.tolist(), hf_tok)
            assert tok.phrase_from_mask(ids, mask) == expected, (caption, mask)
            assert tok.phrase(ids, scores, 0.4) == expected
            checked += bool(expected)
    assert checked > 100  # most draws decode something non-empty (incl. [SEP] and ".")


def test_phrase_keeps_separators_and_joins_wordpieces(tok):
    ids = tok.token_ids("flawed golden wire.")
    everything = np.ones(ids.shape[0], dtype=bool)
    assert tok.phrase_from_mask(ids, everything) == "[CLS] flawed golden wire. [SEP]"  # [CLS] too, as SAA+ decodes
    assert tok.phrase_from_mask(ids, everything) == tok.decode(ids)
    assert tok.phrase_from_mask(ids, ~everything) == ""
    mask = everything.copy()
    assert tok.phrase_from_mask(ids, mask) and mask.all()  # the caller's mask is not modified


def test_bad_inputs_raise_clear_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match="string"):
        encode_captions(tok, ["ok", 3])
    with pytest.raises(ConfigError, match="non-empty"):
        encode_captions(tok, [])
    with pytest.raises(ConfigError, match="non-empty"):
        encode_captions(tok, "a single string")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="tokenizer"):
        GdinoTokenizer(bad)


def test_runtime_text_side_does_not_import_torch():
    code = "import sys, runtime.stages.text, runtime.stages.detector; sys.exit(1 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


JOIN_CASES = [["bottle,", "defect on bottle", "crack. flawed golden wire. black hole.", "Broken  Large"], ["hole"],
              ["what? no.", "a.b.c", "café crème"]]


@pytest.mark.parametrize("captions", JOIN_CASES)
def test_joined_captions_are_the_joined_string_with_each_phrase_as_alone(tok, captions):
    from runtime.stages.text import join_captions

    joined = join_captions(tok, captions)
    (text,) = joined.encoded.captions
    assert text == " ".join(normalize_caption(c) for c in captions)
    ids = joined.encoded.token_ids(0)
    assert ids.tolist() == tok.token_ids(text).tolist()  # the concatenation is what the joined string tokenizes to
    mask = joined.encoded.text_self_attention_masks[0]
    positions = joined.encoded.position_ids[0]
    for index, caption in enumerate(captions):
        alone = encode_captions(tok, [caption])
        columns = joined.columns(index)
        assert ids[columns].tolist() == alone.token_ids(0).tolist() == joined.spans[index].token_ids.tolist()
        body = columns[1:-1]  # a phrase's tokens: the same BERT mask block and position ids as alone
        np.testing.assert_array_equal(mask[np.ix_(body, body)], alone.text_self_attention_masks[0][1:-1, 1:-1])
        np.testing.assert_array_equal(positions[body], alone.position_ids[0][1:-1])
        others = np.setdiff1d(np.arange(1, ids.shape[0] - 1), body)
        assert not mask[np.ix_(body, others)].any()  # and no attention across phrases


def test_joined_captions_fill_rows_up_to_max_text_len(tokenizer_json):
    from runtime.stages.text import join_captions

    tok = GdinoTokenizer(tokenizer_json, max_text_len=10)
    captions = ["crack", "black hole", "flawed golden wire", "a hole in the metal surface of the capsule"]
    joined = join_captions(tok, captions)  # bodies of 2, 3, 4 and 10 tokens; rows hold 8
    assert joined.encoded.captions == ("crack. black hole.", "flawed golden wire.", "a hole in the metal surface of the capsule.")
    assert [s.row for s in joined.spans] == [0, 0, 1, 2]
    alone = encode_captions(tok, captions[-1:])  # too long alone: cut as the reference cuts it
    assert joined.encoded.token_ids(2).tolist() == alone.token_ids(0).tolist() == joined.spans[3].token_ids.tolist()
    assert joined.encoded.token_ids(2)[joined.columns(3)].tolist() == alone.token_ids(0).tolist()
    with pytest.raises(ConfigError):
        join_captions(tok, [])
