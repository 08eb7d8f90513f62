"""engine.tasks: prompts, the detect / segment parsers on hand-written model outputs, and the
task methods end to end on a tiny synthetic model.

Expected boxes are worked out by hand for a 640 x 480 image: a bin v maps to v / 1024 * 640 =
v * 0.625 pixels across and v / 1024 * 480 = v * 0.46875 pixels down. Tokens are written
<locY1><locX1><locY2><locX2>; boxes are (x0, y0, x1, y1).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

import engine
from engine.tasks import (Detection, Segment, answer_prompt, caption_prompt, detect_prompt, normalize_labels,
                          ocr_prompt, parse_detections, parse_segments, segment_prompt)

W, H = 640, 480
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))            # 16 seg tokens, codes 0..15
SEGS_REV = "".join(f"<seg{i:03d}>" for i in range(127, 111, -1))  # codes 127..112

CAT = (80.0, 112.5, 320.0, 360.0)             # <loc0240><loc0128><loc0768><loc0512>
BALL = (40.0, 30.0, 80.0, 60.0)               # <loc0064><loc0064><loc0128><loc0128>
DOG = (0.0, 0.0, 320.0, 240.0)                # <loc0000><loc0000><loc0512><loc0512>
FAR = (320.0, 240.0, 639.375, 479.53125)      # <loc0512><loc0512><loc1023><loc1023>

DETECTION_CASES = [
    # (id, model output, expected [(label, box)])
    ("single", "<loc0240><loc0128><loc0768><loc0512> cat", [("cat", CAT)]),
    ("two", "<loc0000><loc0000><loc0512><loc0512> dog ; <loc0512><loc0512><loc1023><loc1023> cat",
     [("dog", DOG), ("cat", FAR)]),
    ("same label twice", "<loc0100><loc0200><loc0300><loc0400> car ; <loc0500><loc0600><loc0700><loc0800> car",
     [("car", (125.0, 46.875, 250.0, 140.625)), ("car", (375.0, 234.375, 500.0, 328.125))]),
    ("odd bins", "<loc0333><loc0001><loc0999><loc1000> x", [("x", (0.625, 156.09375, 625.0, 468.28125))]),
    ("empty string", "", []),
    ("caption text", "a cat sitting on a mat", []),
    ("stray text before", "sure! <loc0064><loc0064><loc0128><loc0128> ball", [("ball", BALL)]),
    ("prompt echo", "detect ball\n<loc0064><loc0064><loc0128><loc0128> ball", [("ball", BALL)]),
    ("eos text", "<loc0064><loc0064><loc0128><loc0128> ball<eos>", [("ball", BALL)]),
    ("trailing line", "<loc0064><loc0064><loc0128><loc0128> ball\nthat is all", [("ball", BALL)]),
    ("trailing separator", "<loc0064><loc0064><loc0128><loc0128> ball ;", [("ball", BALL)]),
    ("y swapped", "<loc0768><loc0128><loc0240><loc0512> cat", [("cat", CAT)]),
    ("x and y swapped", "<loc0768><loc0512><loc0240><loc0128> cat", [("cat", CAT)]),
    ("only 3 locs", "<loc0100><loc0200><loc0300> cat", []),
    ("partial then full", "<loc0100><loc0200> ; <loc0064><loc0064><loc0128><loc0128> ball", [("ball", BALL)]),
    ("truncated after full", "<loc0064><loc0064><loc0128><loc0128> ball ; <loc0010><loc0020>", [("ball", BALL)]),
    ("5 locs: last 4 count", "<loc0001><loc0064><loc0064><loc0128><loc0128> ball", [("ball", BALL)]),
    ("loc9999", "<loc9999><loc0064><loc0128><loc0128> ball", []),
    ("loc9999 then valid", "<loc9999><loc0064><loc0128><loc0128> ball ; <loc0000><loc0000><loc0512><loc0512> dog",
     [("dog", DOG)]),
    ("loc1024", "<loc0000><loc0000><loc1024><loc0512> dog", []),
    ("3-digit loc", "<loc064><loc0064><loc0128><loc0128> ball", []),
    ("extra spaces in label", "<loc0064><loc0064><loc0128><loc0128>   red    ball   ", [("red ball", BALL)]),
    ("no space before label", "<loc0064><loc0064><loc0128><loc0128>ball", [("ball", BALL)]),
    ("empty label", "<loc0064><loc0064><loc0128><loc0128>", [("", BALL)]),
    ("empty label then labelled",
     "<loc0064><loc0064><loc0128><loc0128> ; <loc0000><loc0000><loc0512><loc0512> dog", [("", BALL), ("dog", DOG)]),
    ("unicode labels", "<loc0000><loc0000><loc0512><loc0512> café noir ; <loc0512><loc0512><loc1023><loc1023> 猫",
     [("café noir", DOG), ("猫", FAR)]),
    ("missing separator", "<loc0000><loc0000><loc0512><loc0512> dog <loc0512><loc0512><loc1023><loc1023> cat",
     [("dog", DOG), ("cat", FAR)]),
    ("separator without spaces", "<loc0000><loc0000><loc0512><loc0512>dog;<loc0512><loc0512><loc1023><loc1023>cat",
     [("dog", DOG), ("cat", FAR)]),
    ("garbage", "<loc<loc0012>>>;;; <seg012> ??? <unk> <loc0001><loc00", []),
    ("spaces between locs", "<loc0064> <loc0064> <loc0128> <loc0128> ball", [("ball", BALL)]),
    ("zero-area box", "<loc0100><loc0100><loc0100><loc0100> dot", [("dot", (62.5, 46.875, 62.5, 46.875))]),
    ("segment answer", f"<loc0240><loc0128><loc0768><loc0512>{SEGS} cat", [("cat", CAT)]),
    ("punctuation kept", "<loc0064><loc0064><loc0128><loc0128> traffic light.", [("traffic light.", BALL)]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in DETECTION_CASES], ids=[c[0] for c in DETECTION_CASES])
def test_parse_detections(text, expected):
    got = parse_detections(text, W, H)
    assert [(d.label, d.box) for d in got] == expected       # exact: every expected value is a binary fraction
    assert all(isinstance(d, Detection) for d in got)


def test_at_least_25_detection_cases():
    assert len(DETECTION_CASES) >= 25


def test_detection_boxes_on_a_square_and_a_tall_image():
    text = "<loc0256><loc0512><loc1023><loc0768> a"
    assert parse_detections(text, 1024, 1024)[0].box == (512.0, 256.0, 768.0, 1023.0)
    # 100 wide, 300 tall: x = v * 100 / 1024, y = v * 300 / 1024
    assert parse_detections(text, 100, 300)[0].box == (50.0, 75.0, 75.0, 299.70703125)


def test_parse_accepts_a_generation_result():
    from engine.model import GenerationResult
    r = GenerationResult("<loc0064><loc0064><loc0128><loc0128> ball", [], "eos")
    assert parse_detections(r, W, H) == [Detection("ball", BALL)]


@pytest.mark.parametrize("width, height", [(0, 10), (10, -1), (10.5, 10)])
def test_bad_image_size_is_an_error(width, height):
    with pytest.raises(ValueError, match="image size"):
        parse_detections("", width, height)


SEGMENT_CASES = [
    ("single", f"<loc0240><loc0128><loc0768><loc0512>{SEGS} cat", [("cat", CAT, list(range(16)))]),
    ("two", f"<loc0064><loc0064><loc0128><loc0128>{SEGS_REV} ball ; <loc0240><loc0128><loc0768><loc0512>{SEGS} cat",
     [("ball", BALL, list(range(127, 111, -1))), ("cat", CAT, list(range(16)))]),
    ("15 segs", "<loc0240><loc0128><loc0768><loc0512>" + SEGS[:-8] + " cat", []),
    ("17 segs", f"<loc0240><loc0128><loc0768><loc0512>{SEGS}<seg000> cat", []),
    ("seg128", "<loc0240><loc0128><loc0768><loc0512>" + SEGS[:-8] + "<seg128> cat", []),
    ("detection answer", "<loc0240><loc0128><loc0768><loc0512> cat", []),
    ("second truncated", f"<loc0064><loc0064><loc0128><loc0128>{SEGS} ball ; <loc0240><loc0128><loc0768><loc0512>"
     + SEGS[:40], [("ball", BALL, list(range(16)))]),
    ("no label", f"<loc0064><loc0064><loc0128><loc0128>{SEGS}", [("", BALL, list(range(16)))]),
    ("segs before locs", f"{SEGS}<loc0064><loc0064><loc0128><loc0128> ball", []),
    ("swapped, stray text", f"ok <loc0768><loc0512><loc0240><loc0128>{SEGS}  big  cat <eos>",
     [("big cat", CAT, list(range(16)))]),
    ("loc9999", f"<loc0240><loc9999><loc0768><loc0512>{SEGS} cat", []),
    ("empty", "", []),
]


class RecordingDecoder:
    """Stands in for SegDecoder: records the codes, returns all-positive logits (mask = box)."""

    def __init__(self):
        self.calls = []

    def decode(self, indices):
        self.calls.append(np.asarray(indices).tolist())
        return np.ones((len(indices), 64, 64), np.float32)


@pytest.mark.parametrize("text, expected", [c[1:] for c in SEGMENT_CASES], ids=[c[0] for c in SEGMENT_CASES])
def test_parse_segments(text, expected):
    plain = parse_segments(text, W, H)
    assert [(s.label, s.box) for s in plain] == [(label, box) for label, box, _ in expected]
    assert all(isinstance(s, Segment) and s.mask is None for s in plain)

    dec = RecordingDecoder()
    with_masks = parse_segments(text, W, H, dec)
    assert [(s.label, s.box) for s in with_masks] == [(label, box) for label, box, _ in expected]
    assert dec.calls == ([[codes for _, _, codes in expected]] if expected else [])
    for s in with_masks:
        assert s.mask.shape == (H, W) and s.mask.dtype == bool


def test_segment_mask_fills_the_truncated_box():
    dec = RecordingDecoder()
    (s,) = parse_segments(f"<loc0240><loc0128><loc0768><loc0512>{SEGS} cat", W, H, dec)
    # box (80, 112.5, 320, 360): rows 112..359, columns 80..319
    assert s.mask.sum() == 248 * 240
    assert s.mask[112, 80] and s.mask[359, 319] and not s.mask[111, 80] and not s.mask[360, 319]
    assert not s.mask[200, 79] and not s.mask[200, 320]


# --------------------------------------------------------------------------- prompts
def test_prompts():
    assert caption_prompt() == "caption en"
    assert caption_prompt("de") == "caption de"
    assert answer_prompt("what is  this?\n") == "answer en what is this?"
    assert answer_prompt("wie viele Katzen?", "de") == "answer de wie viele Katzen?"
    assert ocr_prompt() == "ocr"
    assert detect_prompt(["cat", "dog"]) == "detect cat ; dog"
    assert detect_prompt("cat;dog") == "detect cat ; dog"
    assert detect_prompt("  cat  ;  hot   dog ") == "detect cat ; hot dog"
    assert detect_prompt(("猫",)) == "detect 猫"
    assert segment_prompt("cat") == "segment cat"
    assert segment_prompt(["cat", "dog"]) == "segment cat ; dog"
    assert normalize_labels("a ; b ; c") == ["a", "b", "c"]


@pytest.mark.parametrize("labels", [[], "", "  ", " ; ", "cat ; ", ["cat", ""], ["  "]])
def test_empty_labels_are_rejected(labels):
    with pytest.raises(ValueError, match="empty label"):
        detect_prompt(labels)


@pytest.mark.parametrize("labels, message", [(["a;b"], "contains ';'"), ([1], "must be strings"),
                                             (None, "list of strings"), (42, "list of strings")])
def test_bad_labels_are_rejected(labels, message):
    with pytest.raises(ValueError, match=message):
        segment_prompt(labels)


@pytest.mark.parametrize("call", [lambda: caption_prompt(""), lambda: caption_prompt("en us"),
                                  lambda: answer_prompt(""), lambda: answer_prompt("  \n"),
                                  lambda: answer_prompt("why?", lang=None)])
def test_bad_lang_or_question(call):
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- on a tiny model
def random_seg_decoder_npz(path, dim=512, seed=0):
    """Random weights with the real vae-oid.npz names and shapes (test helper, numpy only)."""
    rng = np.random.default_rng(seed)

    def conv(name, o, i, k, transpose=False):
        shape = (i, o, k, k) if transpose else (o, i, k, k)
        arrays[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(i * k * k)).astype(np.float32)
        arrays[f"{name}.bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)

    arrays = {"_vq_vae._embedding": rng.standard_normal((128, dim)).astype(np.float32)}
    conv("decoder.0", 128, dim, 1)
    for block in ("decoder.2.net", "decoder.3.net"):
        conv(f"{block}.0", 128, 128, 3)
        conv(f"{block}.2", 128, 128, 3)
        conv(f"{block}.4", 128, 128, 1)
    for name, i, o in (("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32), ("decoder.10", 32, 16)):
        conv(name, o, i, 4, transpose=True)
    conv("decoder.12", 1, 16, 1)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, model) of the tiny-pg2 synthetic model on onnxruntime, exported into a
    temporary cache."""
    from engine.synth import write_synthetic_checkpoint
    root = tmp_path_factory.mktemp("tasks_model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PALIGEMMA_EDGE_CACHE", str(root / "cache"))
        ckpt = write_synthetic_checkpoint("tiny-pg2", root / "ckpt", dtype="fp32", progress=False)
        model = engine.load(ckpt, backend="onnxruntime", weights="fp32", progress=False)
        yield ckpt, model
        model.close()


@pytest.fixture(scope="module")
def seg_npz(tmp_path_factory):
    return random_seg_decoder_npz(tmp_path_factory.mktemp("vae") / "vae-oid.npz")


def test_text_tasks_return_generation_results(tiny):
    from engine.model import GenerationResult
    _, model = tiny
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for result, prompt in ((model.caption(image, max_new_tokens=6), "caption en"),
                           (model.answer(image, "what is this?", lang="fr", max_new_tokens=6), "answer fr what is this?"),
                           (model.ocr(image, max_new_tokens=6), "ocr")):
        assert isinstance(result, GenerationResult)
        assert isinstance(result.text, str) and result.text == result.text.strip()
        assert 1 <= len(result.tokens) <= 6 and result.finish_reason in ("eos", "length")
        raw = model.generate(image, prompt, max_new_tokens=6)          # same greedy run
        assert result.tokens == raw.tokens and result.text == raw.text.strip()


def test_default_max_new_tokens(tiny, monkeypatch):
    _, model = tiny
    seen = []
    real = model.generate

    def spy(image, prompt, **gen):
        seen.append((prompt, gen["max_new_tokens"]))
        return real(image, prompt, **{**gen, "max_new_tokens": 1})

    monkeypatch.setattr(model, "generate", spy)
    image = np.zeros((8, 8, 3), np.uint8)
    model.caption(image)
    model.ocr(image)
    model.detect(image, "cat")
    model.caption(image, max_new_tokens=3)
    assert seen == [("caption en", 64), ("ocr", 128), ("detect cat", 128), ("caption en", 3)]


def test_detect_is_consistent_with_the_parser(tiny):
    """Random weights emit loc tokens among noise; detect() must equal parsing generate()'s text:
    one prompt per label by default, one prompt for all with multi_label="joint"."""
    _, model = tiny
    found = 0
    for seed in range(3):
        image = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
        dets = model.detect(image, ["cat", "dog"], max_new_tokens=40)
        per_label = [d for label in ("cat", "dog")
                     for d in parse_detections(model.generate(image, f"detect {label}", max_new_tokens=40).text, 40, 30)]
        assert dets == per_label
        dets = model.detect(image, ["cat", "dog"], max_new_tokens=40, multi_label="joint")
        raw = model.generate(image, "detect cat ; dog", max_new_tokens=40)
        assert all(isinstance(d, Detection) for d in dets)
        assert dets == parse_detections(raw.text, 40, 30)
        for d in dets:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 30
        found += len(dets)
    assert found > 0          # the noise did contain boxes, so the comparison was not vacuous


def _exif_rotated_jpeg() -> bytes:
    """A 60 x 20 JPEG whose EXIF orientation 6 (rotate 90 degrees) makes it 20 x 60 upright."""
    im = Image.new("RGB", (60, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def test_detect_uses_the_upright_image_size(tiny, monkeypatch):
    """Boxes are in pixels of the image after EXIF orientation (20 wide, 60 tall here)."""
    from engine.model import GenerationResult
    _, model = tiny
    prompts = []

    def fake_generate(image, prompt, **gen):
        prompts.append(prompt)
        return GenerationResult("<loc0512><loc0256><loc1023><loc0768> cat<eos>", [], "eos")

    monkeypatch.setattr(model, "generate", fake_generate)
    dets = model.detect(_exif_rotated_jpeg(), "cat ; dog", multi_label="joint")
    assert prompts == ["detect cat ; dog"]
    # x = v * 20 / 1024, y = v * 60 / 1024
    assert dets == [Detection("cat", (5.0, 30.0, 15.0, 59.94140625))]


def test_segment_without_decoder_warns_and_gives_boxes(tiny, monkeypatch):
    from engine.model import GenerationResult
    _, model = tiny
    monkeypatch.setattr(model, "_seg_decoder", None, raising=False)
    monkeypatch.setattr(model, "generate", lambda image, prompt, **gen: GenerationResult(
        f"<loc0000><loc0000><loc0512><loc0512>{SEGS} cat", [], "eos"))
    with pytest.warns(UserWarning, match="load_seg_decoder") as record:
        segs = model.segment(np.zeros((480, 640, 3), np.uint8), "cat")
    assert "--seg-decoder" in str(record[0].message)
    assert [(s.label, s.box, s.mask) for s in segs] == [("cat", DOG, None)]


def test_segment_with_a_loaded_decoder(tiny, seg_npz, monkeypatch):
    from engine.masks import SegDecoder, mask_in_box
    _, model = tiny
    monkeypatch.setattr(model, "_seg_decoder", None, raising=False)
    decoder = model.load_seg_decoder(seg_npz)
    assert isinstance(decoder, SegDecoder) and model.seg_decoder is decoder
    image = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no "no decoder" warning now
        segs = model.segment(image, "cat", max_new_tokens=60)
    raw = model.generate(image, "segment cat", max_new_tokens=60)
    expected = parse_segments(raw.text, 40, 30, decoder)
    assert [(s.label, s.box) for s in segs] == [(s.label, s.box) for s in expected]
    for s, e in zip(segs, expected):
        assert s.mask.shape == (30, 40) and s.mask.dtype == bool
        np.testing.assert_array_equal(s.mask, e.mask)

    # a forced answer: the mask is the decoded logits resized into the box
    from engine.model import GenerationResult
    monkeypatch.setattr(model, "generate", lambda image, prompt, **gen: GenerationResult(
        f"<loc0000><loc0000><loc0512><loc0512>{SEGS_REV} cat", [], "eos"))
    (s,) = model.segment(np.zeros((480, 640, 3), np.uint8), ["cat"])
    want = mask_in_box(decoder.decode(np.arange(127, 111, -1)), DOG, 640, 480)
    np.testing.assert_array_equal(s.mask, want)
    assert not s.mask[240:].any() and not s.mask[:, 320:].any()


def test_seg_decoder_from_the_artifact(tiny, seg_npz, tmp_path):
    """An artifact exported with --seg-decoder loads its decoder lazily; one without has None."""
    from export.pipeline import export_checkpoint

    from engine.masks import SegDecoder
    from engine.model import PaliGemma
    ckpt, model = tiny
    out = export_checkpoint(ckpt, tmp_path / "art", formats=("onnx",), weights="fp32", seg_decoder=seg_npz,
                            progress=False)
    with_dec = PaliGemma(out, backend="onnxruntime")
    assert not hasattr(with_dec, "_seg_decoder")              # not read until needed
    assert isinstance(with_dec.seg_decoder, SegDecoder)
    assert with_dec.seg_decoder is with_dec.seg_decoder
    with_dec.close()
    fresh = PaliGemma(model.artifact_dir, backend="onnxruntime")
    assert fresh.seg_decoder is None
    fresh.close()


def test_label_prompts():
    from engine.tasks import label_prompts
    assert label_prompts("detect", "a ; b c") == ["detect a", "detect b c"]
    assert label_prompts("segment", ["a", "b"], "per_label") == ["segment a", "segment b"]
    assert label_prompts("detect", ["a", " b "], "joint") == ["detect a ; b"]
    assert label_prompts("segment", "a", "joint") == label_prompts("segment", "a") == ["segment a"]
    with pytest.raises(ValueError, match="multi_label must be one of 'per_label', 'joint'"):
        label_prompts("detect", "a", "both")


def test_task_argument_errors(tiny):
    _, model = tiny
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="multi_label"):
        model.detect(image, "cat", multi_label="per-label")
    with pytest.raises(ValueError, match="stream works with one prompt"):
        model.detect(image, "cat ; dog", stream=print)
    with pytest.raises(ValueError, match="empty label"):
        model.detect(image, [])
    with pytest.raises(ValueError, match="one image"):
        model.caption([image, image])
    with pytest.raises(ValueError, match="question"):
        model.answer(image, "")
