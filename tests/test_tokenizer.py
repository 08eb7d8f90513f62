"""engine.tokenizer: synthetic PaliGemma tokenizer.model files, checked against HF's GemmaTokenizer."""
from __future__ import annotations

import shutil

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from engine.errors import TokenizerError
from engine.tokenizer import (COMPACT_BASE_VOCAB, NUM_LOC, NUM_SEG, Tokenizer, build_tokenizer,
                              compact_vocab_size)

STRINGS = [
    "caption en", "describe en", "ocr", "answer en how many cats are there?",
    "detect cat ; dog", "segment person ; red car",
    "<loc0000><loc1023><loc0512><loc0077> cat ; <loc0010><loc0020><loc0300><loc0400> dog",
    "<loc0001><loc0002><loc0003><loc0004><seg000><seg127><seg064><seg005> person",
    "detect<loc0005>no space<seg012>x", "  leading and trailing spaces  ", "multiple   inner    spaces",
    "line one\nline two\n\nthree\n", "tab\tseparated\tcolumns", "digits 0123456789 and 3.14159, 1e-6",
    "Über naïve café — “quotes” ½", "日本語のテキスト 中文 한국어", "emoji 🐈‍⬛🚗 end", "A Red Circle!",
    "<loc12345> <loc99> <seg1000> loc0001 <Loc0001>", "", " ", "\n", "mixed CASE Words with UPPER",
]


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_compact")
    build_tokenizer(d / "tokenizer.model", real_layout=False)
    return d


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_real")
    build_tokenizer(d / "tokenizer.model", real_layout=True)
    return d


@pytest.fixture(scope="module")
def compact(compact_dir):
    return Tokenizer(compact_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def real(real_dir):
    return Tokenizer(real_dir / "tokenizer.model")


def hf_tokenizer(d):
    from transformers import GemmaTokenizer
    # mask_token=None: otherwise HF appends a <mask> token that the Gemma models do not have
    return GemmaTokenizer.from_pretrained(str(d), mask_token=None)


def _proto(path):
    m = sp_pb2.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


# --------------------------------------------------------------------------- layout
def test_compact_layout(compact, compact_dir):
    n = compact_vocab_size()
    assert n == COMPACT_BASE_VOCAB + NUM_LOC + NUM_SEG == 1536
    assert compact.sp_vocab_size == n and compact.image_token_id == n
    assert [compact.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert (compact.pad_id, compact.eos_id, compact.bos_id) == (0, 1, 2)
    # loc/seg follow the base vocabulary directly
    assert [compact.loc_id(i) for i in range(NUM_LOC)] == list(range(COMPACT_BASE_VOCAB, COMPACT_BASE_VOCAB + NUM_LOC))
    assert [compact.seg_id(i) for i in range(NUM_SEG)] == list(range(COMPACT_BASE_VOCAB + NUM_LOC, n))
    types = {p.piece: p.type for p in _proto(compact_dir / "tokenizer.model").pieces}
    T = sp_pb2.ModelProto.SentencePiece.Type
    assert types["\n"] == T.NORMAL and types["\t"] == T.NORMAL
    assert sum(t == T.BYTE for t in types.values()) == 256
    assert types["<loc0000>"] == T.USER_DEFINED and types["<seg127>"] == T.USER_DEFINED
    assert compact.encode("\n") == [compact.piece_to_id("\n")]


def test_real_layout_ids(real):
    assert real.sp_vocab_size == 257152
    assert real.image_token_id == 257152 and real.piece_to_id("<image>") == 257152
    assert real.loc_id(0) == 256000 and real.loc_id(1023) == 257023
    assert real.seg_id(0) == 257024 and real.seg_id(127) == 257151
    assert real.encode("<loc0000><loc1023><seg000><seg127>") == [256000, 257023, 257024, 257151]
    assert real.id_to_piece(256005) == "<loc0005>" and real.id_to_piece(257024 + 9) == "<seg009>"


def test_build_is_deterministic_and_returns_size(tmp_path, compact_dir):
    assert build_tokenizer(tmp_path / "a.model", real_layout=False) == compact_vocab_size()
    assert (tmp_path / "a.model").read_bytes() == (compact_dir / "tokenizer.model").read_bytes()
    assert build_tokenizer(tmp_path / "b.model", real_layout=False, base_vocab_size=500) == compact_vocab_size(500)


def test_extra_corpus_is_learned(tmp_path, compact):
    build_tokenizer(tmp_path / "t.model", real_layout=False, corpus=["xylophone zebra"] * 1000)
    tok = Tokenizer(tmp_path / "t.model")
    assert len(tok.encode("xylophone")) == 1
    assert len(compact.encode("xylophone")) > 3


def test_bad_base_vocab_size(tmp_path):
    with pytest.raises(TokenizerError, match="base_vocab_size"):
        build_tokenizer(tmp_path / "t.model", real_layout=False, base_vocab_size=100)


# --------------------------------------------------------------------------- encode / decode
def test_loc_seg_are_single_tokens(compact):
    for i in (0, 1, 511, 1023):
        assert compact.encode(f"<loc{i:04d}>") == [compact.loc_id(i)]
        assert compact.loc_index(compact.loc_id(i)) == i
    for i in (0, 64, 127):
        assert compact.encode(f"<seg{i:03d}>") == [compact.seg_id(i)]
        assert compact.seg_index(compact.seg_id(i)) == i
    ids = compact.encode("<loc0001><loc0002><loc0003><loc0004> cat<seg005>")
    assert ids[:4] == [compact.loc_id(i) for i in (1, 2, 3, 4)] and ids[-1] == compact.seg_id(5)
    assert compact.loc_index(compact.seg_id(0)) is None and compact.seg_index(compact.loc_id(0)) is None
    assert compact.loc_index(compact.bos_id) is None
    # near-misses are plain text, several tokens
    assert len(compact.encode("<loc001>")) > 1 and len(compact.encode("<seg0001>")) > 1
    with pytest.raises(TokenizerError, match="out of range"):
        compact.loc_id(1024)
    with pytest.raises(TokenizerError, match="out of range"):
        compact.seg_id(-1)


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip(compact, text):
    ids = compact.encode(text)
    assert 3 not in ids   # byte fallback: nothing becomes <unk>
    assert compact.decode(ids) == text


def test_decode_drops_specials_keeps_loc(compact):
    body = compact.encode("a cat<loc0007>")
    ids = [compact.image_token_id] * 3 + [compact.bos_id] + body + [compact.eos_id, compact.pad_id, compact.pad_id]
    assert compact.decode(ids) == "a cat<loc0007>"
    assert compact.decode(body + [compact.sp_vocab_size + 5]) == "a cat<loc0007>"   # padding rows of the LM head
    with pytest.raises(TokenizerError, match="negative"):
        compact.decode([-1])


def test_piece_lookup(compact):
    assert compact.piece_to_id("<loc0003>") == compact.loc_id(3)
    assert compact.piece_to_id("<unk>") == 3
    assert compact.piece_to_id("no such piece") is None
    assert compact.id_to_piece(compact.image_token_id) == "<image>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        compact.id_to_piece(compact.sp_vocab_size + 1)
    with pytest.raises(TokenizerError, match="str"):
        compact.encode(b"bytes")


# --------------------------------------------------------------------------- HF oracle
@pytest.mark.parametrize("layout", ["compact", "real"])
def test_matches_hf_gemma_tokenizer(layout, request):
    d = request.getfixturevalue(f"{layout}_dir")
    ours = request.getfixturevalue(layout)
    hf = hf_tokenizer(d)
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids), text
    assert hf.convert_tokens_to_ids(["<loc0000>", "<seg000>", "<bos>", "<eos>", "<pad>"]) == \
        [ours.loc_id(0), ours.seg_id(0), ours.bos_id, ours.eos_id, ours.pad_id]


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer(tmp_path / "nope.model")


def test_not_a_model(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(p)


def test_missing_loc_or_seg_pieces(tmp_path, compact_dir):
    m = _proto(compact_dir / "tokenizer.model")
    m.pieces[COMPACT_BASE_VOCAB + 5].piece = "<lox0005>"
    (tmp_path / "noloc.model").write_bytes(m.SerializeToString())
    with pytest.raises(TokenizerError, match=r"<loc0005>.*PaliGemma checkpoint"):
        Tokenizer(tmp_path / "noloc.model")

    m = _proto(compact_dir / "tokenizer.model")
    del m.pieces[-NUM_SEG:]
    m.trainer_spec.vocab_size = len(m.pieces)
    (tmp_path / "noseg.model").write_bytes(m.SerializeToString())
    with pytest.raises(TokenizerError, match=r"128 PaliGemma tokens are missing \(e.g. <seg000>\)"):
        Tokenizer(tmp_path / "noseg.model")


def test_image_token_must_not_collide(compact_dir):
    with pytest.raises(TokenizerError, match="image_token_id 100 collides"):
        Tokenizer(compact_dir / "tokenizer.model", image_token_id=100)
    tok = Tokenizer(compact_dir / "tokenizer.model", image_token_id=2000)
    assert tok.image_token_id == 2000 and tok.decode([2000, tok.loc_id(1)]) == "<loc0001>"


def test_path_like_and_copy(tmp_path, compact_dir):
    shutil.copy(compact_dir / "tokenizer.model", tmp_path / "copy.model")
    assert Tokenizer(str(tmp_path / "copy.model")).encode("detect cat") == \
        Tokenizer(tmp_path / "copy.model").encode("detect cat")
