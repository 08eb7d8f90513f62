"""Gemma / PaliGemma sentencepiece tokenizer, and a builder for synthetic tokenizer.model files.

Real checkpoints ship Google's tokenizer.model; tests and tiny models need one we can make
offline. `build_tokenizer` trains a small BPE model and rewrites it into the PaliGemma layout:

    0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, normal pieces (incl. "\\n", "\\t"), <0x00>..<0xFF>,
    [real_layout: <unused0>.. up to id 256000], <loc0000>..<loc1023>, <seg000>..<seg127>

With `real_layout` the loc/seg ids are exactly those of the real tokenizer (256000.., 257024..,
sp vocab 257152). The `<image>` token is not a sentencepiece piece: like HF, the model puts it
right after the sp vocabulary, and its id comes from config.image_token_index.
"""
from __future__ import annotations

import io
import os
import random
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .errors import TokenizerError

NUM_LOC = 1024
NUM_SEG = 128
REAL_LOC_START = 256000                       # first <loc> id of the real PaliGemma tokenizer
COMPACT_BASE_VOCAB = 384                      # specials + learned pieces + "\n" "\t" + 256 bytes
REAL_BASE_VOCAB = 1000

_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
_EXTRA_CHARS = ("\n", "\t")                   # normal pieces of Gemma that line-based training never sees
_Type = sp_pb2.ModelProto.SentencePiece.Type


def loc_piece(i: int) -> str:
    return f"<loc{i:04d}>"


def seg_piece(i: int) -> str:
    return f"<seg{i:03d}>"


def compact_vocab_size(base_vocab_size: int = COMPACT_BASE_VOCAB) -> int:
    """sp vocab size of `build_tokenizer(..., real_layout=False, base_vocab_size=...)`."""
    return base_vocab_size + NUM_LOC + NUM_SEG


# --------------------------------------------------------------------------- built-in corpus
_COLOURS = "red green blue yellow black white orange purple pink brown gray grey gold silver".split()
_SHAPES = "circle square triangle rectangle star line dot box oval heart cross ring".split()
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                 "fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty "
                 "hundred thousand").split()
_OBJECTS = ("cat dog car person man woman child bird tree house cup table chair bus truck bike "
            "boat plane horse cow sheep phone book bottle window door road sign flower ball "
            "apple banana pizza clock laptop sky water grass building street train").split()
_ADJECTIVES = "small big large tiny old new red bright dark happy sitting standing left right".split()
_LANGS = "en de fr es it pt nl pl ru ja zh ko".split()
_COMMON = ("the a an of on in at to and or is are was there this that with what how many where "
           "which who why it its image picture photo shows showing next near top bottom front "
           "behind under over some no yes one two".split())
_TEMPLATES = (
    "caption {lang}", "describe {lang}", "cap {lang}", "ocr",
    "answer {lang} how many {obj}s are there", "answer {lang} what color is the {obj}",
    "answer {lang} what is in the image", "answer {lang} where is the {obj}",
    "answer {lang} is there a {obj} in the picture", "question {lang} {obj}",
    "detect {obj}", "detect {obj} ; {obj2}", "segment {obj}", "segment {obj} ; {obj2}",
    "a {colour} {shape} on a {colour2} background", "there are {num} {colour} {shape}s",
    "the {obj} is {colour}", "a {adj} {colour} {obj} next to a {obj2}",
    "{num} {obj}s and {num2} {obj2}s", "the image shows a {adj} {obj} on the {obj2}",
    "{Obj} {num_d} {colour} {shape}s.", "A {colour} {obj}, a {shape} and {num_d} dots!",
    "Is the {obj} {colour}? Yes, it is {colour}.", "{num_d} + {num_d2} = {sum_d}",
)


def default_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """A deterministic English corpus of PaliGemma-style prompts and short descriptions."""
    rng = random.Random(seed)
    lines = ["ocr", " ".join(_COMMON), " ".join(_NUMBER_WORDS)]
    for _ in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        obj = rng.choice(_OBJECTS)
        lines.append(rng.choice(_TEMPLATES).format(
            lang=rng.choice(_LANGS), obj=obj, Obj=obj.capitalize(), obj2=rng.choice(_OBJECTS),
            colour=rng.choice(_COLOURS), colour2=rng.choice(_COLOURS), shape=rng.choice(_SHAPES),
            adj=rng.choice(_ADJECTIVES), num=rng.choice(_NUMBER_WORDS),
            num2=rng.choice(_NUMBER_WORDS), num_d=a, num_d2=b, sum_d=a + b))
    return lines


# --------------------------------------------------------------------------- builder
def build_tokenizer(out_path: str | os.PathLike, *, real_layout: bool,
                    corpus: Iterable[str] | None = None, base_vocab_size: int | None = None,
                    seed: int = 0) -> int:
    """Train a small Gemma-style BPE sentencepiece model and write it to `out_path`.

    `base_vocab_size` counts the ids before the loc/seg (and filler) pieces: 4 specials, the
    learned pieces, "\\n", "\\t" and 256 byte-fallback pieces. Default: COMPACT_BASE_VOCAB
    without real_layout, REAL_BASE_VOCAB with it. `corpus` lines are added to the built-in
    corpus. The result is deterministic for given arguments. Returns the sp vocab size
    (257152 with real_layout, `compact_vocab_size(base_vocab_size)` without).
    """
    if base_vocab_size is None:
        base_vocab_size = REAL_BASE_VOCAB if real_layout else COMPACT_BASE_VOCAB
    if not 300 <= base_vocab_size <= REAL_LOC_START:
        raise TokenizerError(f"base_vocab_size={base_vocab_size}: use 300..{REAL_LOC_START} "
                             "(4 specials, 256 bytes and the corpus characters must fit)")
    lines = default_corpus(seed) + [line for text in (corpus or ()) for line in str(text).splitlines()]
    lines = [line for line in lines if line.strip()]

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
            vocab_size=base_vocab_size - len(_EXTRA_CHARS), character_coverage=1.0,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_by_whitespace=True,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
            bos_piece="<bos>", unk_piece="<unk>", num_threads=1, shuffle_input_sentence=False,
            input_sentence_size=0, max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed ({e}); give a larger corpus "
                             "or a smaller base_vocab_size") from None

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    _to_paligemma_layout(proto, real_layout)
    with open(out_path, "wb") as f:
        f.write(proto.SerializeToString())
    return len(proto.pieces)


def _to_paligemma_layout(proto: sp_pb2.ModelProto, real_layout: bool) -> None:
    """Reorder the trained pieces into the Gemma layout and append the PaliGemma tokens."""
    trained = list(proto.pieces)
    normal = [p for p in trained if p.type == _Type.NORMAL and p.piece not in _EXTRA_CHARS]
    byte_pieces = [p for p in trained if p.type == _Type.BYTE]
    if len(byte_pieces) != 256:
        raise TokenizerError(f"trained model has {len(byte_pieces)} byte pieces, expected 256")
    # BPE merge priority is the piece score (sentencepiece) or the id order (HF): keep both
    # consistent by leaving the learned pieces in their trained order, best first.
    lowest = min((p.score for p in normal), default=0.0)

    del proto.pieces[:]

    def add(piece: str, kind: int, score: float = 0.0) -> None:
        p = proto.pieces.add()
        p.piece, p.type, p.score = piece, kind, score

    for name in _SPECIALS:
        add(name, _Type.UNKNOWN if name == "<unk>" else _Type.CONTROL)
    for p in normal:
        add(p.piece, _Type.NORMAL, p.score)
    for i, ch in enumerate(_EXTRA_CHARS):
        add(ch, _Type.NORMAL, lowest - 1 - i)   # single characters: never the result of a merge
    for p in byte_pieces:
        add(p.piece, _Type.BYTE)
    if real_layout:
        for i in range(REAL_LOC_START - len(proto.pieces)):
            add(f"<unused{i}>", _Type.UNUSED)   # never produced by encode; keeps ids like the real model
    for i in range(NUM_LOC):
        add(loc_piece(i), _Type.USER_DEFINED)
    for i in range(NUM_SEG):
        add(seg_piece(i), _Type.USER_DEFINED)

    ts = proto.trainer_spec
    ts.vocab_size = len(proto.pieces)
    ts.pad_id, ts.eos_id, ts.bos_id, ts.unk_id = 0, 1, 2, 3
    ts.byte_fallback = True
    ns = proto.normalizer_spec                  # Gemma: no NFKC, no dummy prefix, keep whitespace
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True


# --------------------------------------------------------------------------- runtime tokenizer
class Tokenizer:
    """A PaliGemma tokenizer.model. `encode` adds no bos/eos; `<loc####>` / `<seg###>` are
    single tokens. Special tokens written as text (e.g. "<eos>") are encoded as plain text."""

    def __init__(self, model_path: str | os.PathLike, image_token_id: int | None = None):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such tokenizer file; pass the tokenizer.model of the "
                                 "PaliGemma checkpoint (it sits next to config.json)")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e}); pass the checkpoint's "
                                 "tokenizer.model") from None
        self._sp = sp
        self.path = path
        self.sp_vocab_size = sp.GetPieceSize()
        self.pad_id, self.eos_id, self.bos_id = sp.pad_id(), sp.eos_id(), sp.bos_id()
        for name, i in (("pad", self.pad_id), ("eos", self.eos_id), ("bos", self.bos_id)):
            if i < 0:
                raise TokenizerError(f"{path}: the model has no <{name}> token; this is not a "
                                     "Gemma / PaliGemma tokenizer.model")
        self._loc_ids = self._lookup(loc_piece(i) for i in range(NUM_LOC))
        self._seg_ids = self._lookup(seg_piece(i) for i in range(NUM_SEG))
        self._loc_index = {t: i for i, t in enumerate(self._loc_ids)}
        self._seg_index = {t: i for i, t in enumerate(self._seg_ids)}

        # HF appends <image> right after the sp vocabulary.
        self.image_token_id = self.sp_vocab_size if image_token_id is None else int(image_token_id)
        if 0 <= self.image_token_id < self.sp_vocab_size:
            raise TokenizerError(
                f"image_token_id {self.image_token_id} collides with the piece "
                f"{sp.IdToPiece(self.image_token_id)!r}; PaliGemma puts <image> after the "
                f"{self.sp_vocab_size} sentencepiece ids (check config.json image_token_index)")
        self._drop = {self.pad_id, self.bos_id, self.eos_id, self.image_token_id}

    def _lookup(self, pieces: Iterable[str]) -> list[int]:
        ids, missing = [], []
        for piece in pieces:
            i = self._sp.PieceToId(piece)
            if i == self._sp.unk_id():
                missing.append(piece)
            else:
                ids.append(i)
        if missing:
            raise TokenizerError(
                f"{self.path}: {len(missing)} PaliGemma tokens are missing (e.g. {missing[0]}); "
                "this looks like a plain Gemma tokenizer. Use the tokenizer.model of a PaliGemma "
                "checkpoint, which has <loc0000>..<loc1023> and <seg000>..<seg127>")
        return ids

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; loc/seg tokens stay in the text, pad/bos/eos/<image> are dropped, and
        so are ids past the sp vocabulary (the model's padding rows have no text)."""
        keep = [int(i) for i in ids]
        if any(i < 0 for i in keep):
            raise TokenizerError(f"decode() got a negative token id: {min(keep)}")
        keep = [i for i in keep if i not in self._drop and i < self.sp_vocab_size]
        return self._sp.DecodeIds(keep)

    def piece_to_id(self, piece: str) -> int | None:
        """Id of `piece`, or None when the sp model lacks it ("<image>" gives image_token_id)."""
        if piece == "<image>":
            return self.image_token_id
        i = self._sp.PieceToId(piece)
        return None if i == self._sp.unk_id() and piece != "<unk>" else i

    def id_to_piece(self, i: int) -> str:
        if i == self.image_token_id:
            return "<image>"
        if not 0 <= i < self.sp_vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary (0..{self.sp_vocab_size - 1})")
        return self._sp.IdToPiece(int(i))

    # ---------------------------------------------------------------- loc / seg
    def loc_id(self, i: int) -> int:
        return self._loc_ids[_check_index(i, NUM_LOC, "loc")]

    def seg_id(self, i: int) -> int:
        return self._seg_ids[_check_index(i, NUM_SEG, "seg")]

    def loc_index(self, token_id: int) -> int | None:
        """i for the id of <loc{i:04d}>, None for any other id."""
        return self._loc_index.get(int(token_id))

    def seg_index(self, token_id: int) -> int | None:
        """i for the id of <seg{i:03d}>, None for any other id."""
        return self._seg_index.get(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, sp_vocab_size={self.sp_vocab_size}, image_token_id={self.image_token_id})"


def _check_index(i: int, n: int, kind: str) -> int:
    if not 0 <= i < n:
        raise TokenizerError(f"{kind} index {i} is out of range 0..{n - 1}")
    return i

