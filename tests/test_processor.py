"""engine.processor: pixel values and prompts checked against HF SiglipImageProcessor / PaliGemmaProcessor."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from engine.errors import ConfigError, ImageError, TokenizerError
from engine.processor import Processor, load_image, preprocess_image
from engine.tokenizer import Tokenizer, build_tokenizer, compact_vocab_size

S = 28            # tiny image size: 2x2 patches of 14
N_TOK = 4         # image tokens per image at S=28


def _rng(seed=0):
    return np.random.default_rng(seed)


def hf_image_processor(size=S, **kw):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": size, "width": size}, **kw)


def hf_pixels(image, size=S, **kw):
    return np.asarray(hf_image_processor(size, **kw)(image, return_tensors="np")["pixel_values"][0])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc_tok")
    build_tokenizer(d / "tokenizer.model", real_layout=False)
    return d


@pytest.fixture(scope="module")
def ours(tok_dir):
    return Processor(Tokenizer(tok_dir / "tokenizer.model"), image_size=S, num_image_tokens=N_TOK)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import GemmaTokenizer, PaliGemmaProcessor
    ip = hf_image_processor()
    ip.image_seq_length = N_TOK
    tok = GemmaTokenizer.from_pretrained(str(tok_dir), mask_token=None)   # no <mask>: <image> gets id 1536
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


def hf_call(hf, images, prompt, suffix=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf(images=images, text=[prompt], suffix=suffix, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- test images
def rgb(h, w, seed=0):
    return Image.fromarray(_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth(h, w):
    """A gradient, so that resizing matters and JPEG keeps the content."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(a.astype(np.uint8))


def with_alpha(mode, h=23, w=31, seed=1):
    r = _rng(seed)
    a = r.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[0, :, 3], a[1, :, 3] = 0, 255                     # fully transparent and fully opaque rows
    im = Image.fromarray(a)
    return im if mode == "RGBA" else im.convert(mode)


def palette_with_transparency():
    im = rgb(19, 26, seed=3).quantize(16)
    im.info["transparency"] = 5
    return im


IMAGES = {
    "rgb_square": lambda: rgb(S, S),
    "rgb_tiny_5x3": lambda: rgb(5, 3),
    "rgb_nonsquare": lambda: rgb(37, 53),
    "rgb_large": lambda: smooth(300, 200),
    "L": lambda: rgb(33, 20).convert("L"),
    "1": lambda: rgb(33, 20).convert("1"),
    "LA": lambda: with_alpha("LA"),
    "P": lambda: rgb(40, 30, seed=2).quantize(32),
    "P_transparency": palette_with_transparency,
    "RGBA": lambda: with_alpha("RGBA"),
    "PA": lambda: with_alpha("RGBA").convert("PA"),
    "CMYK": lambda: rgb(21, 34, seed=4).convert("CMYK"),
}


# --------------------------------------------------------------------------- pixels vs HF
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pixels_match_hf(name):
    im = IMAGES[name]()
    ours = preprocess_image(im, S)
    ref = hf_pixels(im)
    assert ours.shape == ref.shape == (3, S, S) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("size", [14, 56, 224])
def test_pixels_match_hf_other_sizes_and_stats(size):
    im = rgb(37, 53, seed=7)
    assert np.abs(preprocess_image(im, size) - hf_pixels(im, size)).max() <= 1e-6
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = preprocess_image(im, size, mean=mean, std=std)
    assert np.abs(ours - hf_pixels(im, size, image_mean=list(mean), image_std=list(std))).max() <= 1e-6


def test_pixels_hand_computed():
    # a flat image survives bicubic unchanged: 0 -> -1, 255 -> 1, 51 -> 51/255*2-1
    im = Image.new("RGB", (9, 6), (0, 255, 51))
    x = preprocess_image(im, S)
    assert np.allclose(x[0], -1) and np.allclose(x[1], 1) and np.allclose(x[2], 51 / 255 * 2 - 1, atol=1e-7)
    # transparent pixels become white, as in HF
    x = preprocess_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), S)
    assert np.allclose(x, 1.0)


# --------------------------------------------------------------------------- 16-bit and float
def test_16bit_is_scaled_not_clipped():
    a = _rng(5).integers(0, 65536, (17, 29), dtype=np.uint16)
    a[0, :3] = (0, 65535, 257 * 128)
    im16 = Image.fromarray(a)
    assert im16.mode == "I;16"
    as8 = np.round(a / 257).astype(np.uint8)
    ref = hf_pixels(Image.fromarray(as8))                 # HF on the 8-bit image is the oracle
    for src in (im16, a, im16.convert("I")):
        assert np.abs(preprocess_image(src, S) - ref).max() <= 1e-6
    # HF clips 16-bit values at 255 (nearly all white): that is what we avoid
    assert np.abs(hf_pixels(im16) - ref).max() > 0.5
    flat = np.full((4, 4), 257 * 128, dtype=np.uint16)
    assert np.allclose(preprocess_image(flat, S), 128 / 255 * 2 - 1, atol=1e-7)
    assert np.allclose(preprocess_image(np.full((4, 4, 3), 65535, np.uint16), S), 1.0)


def test_float_inputs():
    f = _rng(6).random((15, 22, 3))
    as8 = np.round(f * 255).astype(np.uint8)
    ref = preprocess_image(as8, S)
    assert np.array_equal(preprocess_image(f, S), ref)
    assert np.array_equal(preprocess_image(f.astype(np.float32), S), ref)
    assert np.abs(ref - hf_pixels(Image.fromarray(as8))).max() <= 1e-6
    fl = f[..., 0].astype(np.float32)
    assert Image.fromarray(fl).mode == "F"
    assert np.array_equal(preprocess_image(Image.fromarray(fl), S),
                          preprocess_image(np.round(fl.astype(np.float64) * 255).astype(np.uint8), S))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(f * 255)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((3, 3), np.nan))


def test_array_layouts():
    im = rgb(12, 18, seed=8)
    a = np.asarray(im)
    ref = preprocess_image(im, S)
    assert np.array_equal(preprocess_image(a.astype(np.int64), S), ref)
    g = np.asarray(im.convert("L"))
    assert np.array_equal(preprocess_image(g, S), preprocess_image(g[..., None], S))
    assert np.abs(preprocess_image(g, S) - hf_pixels(Image.fromarray(g))).max() <= 1e-6
    rgba = np.asarray(with_alpha("RGBA"))
    assert np.array_equal(preprocess_image(rgba, S), preprocess_image(Image.fromarray(rgba), S))
    with pytest.raises(ImageError, match="channels-last"):
        load_image(a.transpose(2, 0, 1))
    with pytest.raises(ImageError, match="0..255"):
        load_image(a.astype(np.int32) * 2)
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.zeros((4, 4), dtype=bool))


# --------------------------------------------------------------------------- sources and EXIF
def _encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_sources_give_identical_pixels(tmp_path):
    im = rgb(26, 35, seed=9)
    data = _encode(im, "PNG")
    p = tmp_path / "x.png"
    p.write_bytes(data)
    ref = preprocess_image(im, S)
    for src in (str(p), p, data, bytearray(data), memoryview(data), Image.open(io.BytesIO(data)), np.asarray(im)):
        assert np.array_equal(preprocess_image(src, S), ref), type(src)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation(tmp_path, orientation):
    im = smooth(24, 40)                                   # non-square: rotation changes the shape
    exif = Image.Exif()
    exif[274] = orientation
    data = _encode(im, "JPEG", exif=exif, quality=95)
    raw = Image.open(io.BytesIO(data))
    assert raw.size == (40, 24)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert load_image(data).size == upright.size
    ours = preprocess_image(data, S)
    assert np.abs(ours - hf_pixels(upright)).max() <= 1e-6    # HF ignores EXIF: feed it the upright image
    assert np.abs(ours - hf_pixels(raw)).max() > 0.2           # ...and the orientation did matter
    (tmp_path / "r.jpg").write_bytes(data)
    assert np.array_equal(preprocess_image(tmp_path / "r.jpg", S), ours)
    assert np.array_equal(preprocess_image(Image.open(io.BytesIO(data)), S), ours)


# --------------------------------------------------------------------------- bad inputs
def test_decompression_bomb(monkeypatch):
    data = _encode(rgb(40, 40), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)     # 1600 px > 2 * 100: Pillow refuses
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data)


def png_header_of_size(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixel data is a 1x1 image's): enough to be
    refused by size before any decoding."""
    import struct
    import zlib
    data = bytearray(_encode(rgb(1, 1), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_pixel_limit_per_call_without_warnings(monkeypatch):
    """A 12000 x 12000 header is refused by our own per-call limit, with what to do, and no raw
    Pillow DecompressionBombWarning; max_pixels lifts the limit for one call only."""
    import warnings
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # any warning fails the test
        with pytest.raises(ImageError, match=r"12000x12000 = 144,000,000 pixels.*--max-image-pixels 144000000"):
            load_image(png_header_of_size(12000, 12000))
        data = _encode(rgb(40, 40), "PNG")                   # 1600 pixels
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would warn (1000 < 1600 < 2000)
        with pytest.raises(ImageError, match="max_pixels=1600"):
            load_image(data)
        assert load_image(data, max_pixels=1600).size == (40, 40)
        with pytest.raises(ImageError, match="max_pixels=1600"):
            load_image(data, max_pixels=1599)
    assert Image.MAX_IMAGE_PIXELS == 1000                    # untouched by the calls
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", before)
    assert load_image(data).size == (40, 40)


def test_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(_encode(rgb(30, 30), "PNG")[:80])         # truncated file
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(str(tmp_path))                            # a directory
    with pytest.raises(ImageError, match="URLs"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(42)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((0, 4, 3), np.uint8))


# --------------------------------------------------------------------------- prompts vs HF
PROMPTS = [
    ("caption en", None),
    ("answer en how many cats are there?", "two"),
    ("detect cat ; dog", "<loc0010><loc0020><loc0300><loc0400> cat ; <loc0001><loc0002><loc0003><loc0004> dog"),
    ("segment person", "<loc0100><loc0200><loc0300><loc0400><seg000><seg001><seg127><seg064> person"),
    ("ocr", ""),
    ("", None),
    ("  spaces  and\nnewline ", "Über café 123"),
    ("<loc0005> what is here", "a red circle"),
]


@pytest.mark.parametrize("prompt,suffix", PROMPTS)
def test_prompt_matches_hf(ours, hf, prompt, suffix):
    im = rgb(37, 53, seed=11)
    o = ours(im, prompt, suffix)
    h = hf_call(hf, im, prompt, suffix)
    assert o["input_ids"].dtype == np.int64 and o["token_type_ids"].dtype == np.int64
    assert o["input_ids"].tolist() == h["input_ids"][0].tolist()
    assert o["token_type_ids"].tolist() == h["token_type_ids"][0].tolist()
    assert o["pixel_values"].shape == (1, 3, S, S) and o["pixel_values"].dtype == np.float32
    assert np.abs(o["pixel_values"] - h["pixel_values"]).max() <= 1e-6


def test_prompt_layout_by_hand(ours):
    tok = ours.tokenizer
    o = ours(rgb(8, 8), "caption en", "a cat")
    prefix = [tok.image_token_id] * N_TOK + [tok.bos_id] + tok.encode("caption en\n")
    tail = tok.encode("a cat") + [tok.eos_id]
    assert o["input_ids"].tolist() == prefix + tail
    assert o["token_type_ids"].tolist() == [0] * len(prefix) + [1] * len(tail)
    assert ours.decode(o["input_ids"]) == "caption en\na cat"


def test_multi_image_matches_hf(ours, hf):
    ims = [rgb(37, 53, seed=12), IMAGES["P_transparency"](), rgb(5, 3, seed=13)]
    o = ours(ims, "compare these", "same")
    h = hf_call(hf, [ims], "compare these", "same")       # HF: a nested list is one prompt's images
    assert o["input_ids"].tolist() == h["input_ids"][0].tolist()
    assert o["token_type_ids"].tolist() == h["token_type_ids"][0].tolist()
    assert o["input_ids"][: 3 * N_TOK].tolist() == [ours.image_token_id] * (3 * N_TOK)
    assert o["pixel_values"].shape == (3, 3, S, S)
    assert np.abs(o["pixel_values"] - h["pixel_values"]).max() <= 1e-6


def test_prompt_errors(ours):
    with pytest.raises(TokenizerError, match="<image>"):
        ours(rgb(8, 8), "<image>caption en")
    with pytest.raises(ImageError, match="at least one image"):
        ours([], "caption en")
    with pytest.raises(TokenizerError, match="str"):
        ours(rgb(8, 8), 5)


# --------------------------------------------------------------------------- from_pretrained
def _checkpoint(tmp_path, tok_dir, preprocessor=None):
    from tests.hf_tiny import tiny_config
    cfg = tiny_config(2, image_size=S, vocab_size=compact_vocab_size() + 1)   # <image> = sp vocab size
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    (tmp_path / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tmp_path


REAL_STYLE_PP = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": [0.4, 0.5, 0.6], "image_std": [0.3, 0.5, 0.7],
                 "image_processor_type": "SiglipImageProcessor", "image_seq_length": N_TOK,
                 "processor_class": "PaliGemmaProcessor", "resample": 3,
                 "rescale_factor": 0.00392156862745098, "size": {"height": S, "width": S}}


def test_from_pretrained(tmp_path, tok_dir, hf):
    d = _checkpoint(tmp_path, tok_dir, REAL_STYLE_PP)
    p = Processor.from_pretrained(d)
    assert (p.image_size, p.num_image_tokens, p.image_token_id) == (S, N_TOK, compact_vocab_size())
    im = rgb(37, 53, seed=14)
    o = p(im, "caption en", "a dog")
    h = hf_call(hf, im, "caption en", "a dog")
    assert o["input_ids"].tolist() == h["input_ids"][0].tolist()
    ref = hf_pixels(im, image_mean=REAL_STYLE_PP["image_mean"], image_std=REAL_STYLE_PP["image_std"])
    assert np.abs(o["pixel_values"][0] - ref).max() <= 1e-6
    assert np.abs(o["pixel_values"][0] - hf_pixels(im)).max() > 0.01     # the stats were read


def test_from_pretrained_without_preprocessor_config(tmp_path, tok_dir):
    p = Processor.from_pretrained(_checkpoint(tmp_path, tok_dir))
    im = rgb(20, 20, seed=15)
    assert np.abs(p(im, "ocr")["pixel_values"][0] - hf_pixels(im)).max() <= 1e-6


def test_from_pretrained_errors(tmp_path, tok_dir):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    d = _checkpoint(tmp_path / "a", tok_dir, dict(REAL_STYLE_PP, size={"height": 56, "width": 56}))
    with pytest.raises(ConfigError, match="size"):
        Processor.from_pretrained(d)
    d = _checkpoint(tmp_path / "b", tok_dir, dict(REAL_STYLE_PP, image_seq_length=256))
    with pytest.raises(ConfigError, match="image_seq_length"):
        Processor.from_pretrained(d)
    (d / "preprocessor_config.json").unlink()
    (d / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer_path"):
        Processor.from_pretrained(d)
    p = Processor.from_pretrained(d, tokenizer_path=tok_dir / "tokenizer.model")
    assert p.tokenizer.sp_vocab_size == compact_vocab_size()
