"""engine.scenes: the generated training / eval scenes and their PaliGemma task targets.

Fast (numpy + PIL only; no torch, no training)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine import scenes
from engine.scenes import COLOURS, KINDS, Scene, SceneObject

SEEDS = [scenes.train_seed(i) for i in range(40)]
LOC = r"<loc(\d{4})>"
LABEL = rf"(?:{'|'.join(COLOURS)}) (?:{'|'.join(KINDS)})"


def random_mask_tokenizer(dim: int = 8, seed: int = 0) -> scenes.MaskTokenizer:
    """Random weights with the shapes of training/train_vqvae.py's npz."""
    rng = np.random.default_rng(seed)
    shapes = {"encoder.0": (16, 1, 4, 4), "encoder.2": (32, 16, 4, 4), "encoder.4": (64, 32, 4, 4),
              "encoder.6": (128, 64, 4, 4), "encoder.10": (dim, 128, 1, 1)}
    for blk in ("encoder.8", "encoder.9"):
        shapes.update({f"{blk}.net.0": (128, 128, 3, 3), f"{blk}.net.2": (128, 128, 3, 3),
                       f"{blk}.net.4": (128, 128, 1, 1)})
    w = {}
    for name, shape in shapes.items():
        w[name + ".weight"] = rng.normal(0, np.prod(shape[1:]) ** -0.5, shape).astype(np.float32)
        w[name + ".bias"] = rng.normal(0, 0.02, shape[0]).astype(np.float32)
    w["_vq_vae._embedding"] = rng.normal(0, 1, (128, dim)).astype(np.float32)
    return scenes.MaskTokenizer(w)


@pytest.fixture(scope="module")
def some_scenes():
    return [scenes.make_scene(s) for s in SEEDS]


def test_deterministic_by_seed():
    a, b = scenes.make_scene(123), scenes.make_scene(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.digits == b.digits
    assert [(o.kind, o.colour, o.box) for o in a.objects] == [(o.kind, o.colour, o.box) for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert scenes.task_examples(a, rng1) == scenes.task_examples(b, rng2)
    c = scenes.make_scene(124)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("size", [112, 224])
def test_objects_inside_image_and_masks_match_boxes(size):
    for seed in SEEDS[:15]:
        sc = scenes.make_scene(seed, size)
        assert sc.image.size == (size, size) and sc.image.mode == "RGB"
        assert 1 <= len(sc.objects) <= scenes.MAX_SHAPES
        pixels = np.asarray(sc.image)
        for o in sc.objects:
            assert o.kind in KINDS and o.colour in COLOURS
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert o.mask.shape == (size, size) and o.mask.dtype == bool
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box      # tight box of the mask
            assert (x1 - x0) >= 0.1 * size and (y1 - y0) >= 0.05 * size           # big enough to see
            assert np.all(pixels[o.mask] == COLOURS[o.colour])                    # mask = its pixels
        for a in range(len(sc.objects)):                                          # visible masks are disjoint
            for b in range(a + 1, len(sc.objects)):
                assert not np.any(sc.objects[a].mask & sc.objects[b].mask)


def test_shapes_mostly_visible_and_background_never_a_shape_colour(some_scenes):
    for sc in some_scenes:
        union = np.zeros((sc.size, sc.size), dtype=bool)
        for o in sc.objects:
            side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
            full_area = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[o.kind] * side * side
            assert o.mask.sum() >= 0.6 * full_area
            union |= o.mask
        if sc.digits_box is not None:
            x0, y0, x1, y1 = sc.digits_box
            union[y0:y1, x0:x1] = True
        bg = np.asarray(sc.image)[~union].astype(int)
        chroma = bg.max(axis=1) - bg.min(axis=1)
        assert chroma.max() < 80           # greyish; every shape colour has chroma > 120
    assert min(max(c) - min(c) for c in COLOURS.values()) > 120


def test_digits(some_scenes):
    with_digits = [sc for sc in some_scenes if sc.digits]
    assert 5 < len(with_digits) < len(some_scenes) - 5      # about half the scenes
    for sc in with_digits:
        assert re.fullmatch(r"\d{2,4}", sc.digits)
        x0, y0, x1, y1 = sc.digits_box
        assert 0 <= x0 < x1 <= sc.size and 0 <= y0 < y1 <= sc.size
        for o in sc.objects:              # the digits are never covered by a shape
            assert not o.mask[y0:y1, x0:x1].any()
        assert dict(scenes.task_examples(sc, np.random.default_rng(0)))["ocr"] == sc.digits
    no_digits = next(sc for sc in some_scenes if not sc.digits)
    assert dict(scenes.task_examples(no_digits, np.random.default_rng(0)))["ocr"] == ""


def _obj(kind, colour, box=(10, 10, 40, 40), size=224):
    mask = np.zeros((size, size), dtype=bool)
    mask[box[1]:box[3], box[0]:box[2]] = True
    return SceneObject(kind, colour, box, mask)


def _scene(objs, size=224):
    from PIL import Image
    return Scene(seed=0, image=Image.new("RGB", (size, size)), objects=objs, digits="")


def test_captions_canonical():
    objs = [_obj("square", "blue", (100, 100, 150, 150)), _obj("circle", "red", (10, 10, 40, 40)),
            _obj("square", "blue", (160, 20, 200, 60))]
    assert scenes.caption(_scene(objs)) == "a red circle and two blue squares"
    assert scenes.caption(_scene(objs[::-1])) == "a red circle and two blue squares"   # order-free
    three = [_obj("triangle", "orange"), _obj("square", "green"), _obj("triangle", "blue")]
    assert scenes.caption(_scene(three)) == "a green square, a blue triangle and an orange triangle"
    assert scenes.caption(_scene([_obj("circle", "yellow")] * 3)) == "three yellow circles"
    for sc in (scenes.make_scene(s) for s in SEEDS[:20]):
        cap = scenes.caption(sc)
        assert re.fullmatch(rf"(?:an?|two|three) {LABEL}s?(?:(?:, | and )(?:an?|two|three) {LABEL}s?)*", cap), cap


def test_detect_targets_well_formed(some_scenes):
    rng = np.random.default_rng(0)
    n_empty = 0
    for sc in some_scenes:
        for prefix, suffix in scenes.task_examples(sc, rng):
            if not prefix.startswith("detect "):
                continue
            colour, kind = prefix.split()[1:]
            truth = scenes.instances(sc, colour, kind)
            if not truth:
                assert suffix == ""           # no match: empty output, as PaliGemma
                n_empty += 1
                continue
            parts = suffix.split(" ; ")
            assert len(parts) == len(truth)
            for part, o in zip(parts, truth):
                assert re.fullmatch(rf"(?:{LOC}){{4}} {colour} {kind}", part), part
                locs = [int(v) for v in re.findall(LOC, part)]
                assert all(0 <= v <= 1023 for v in locs)
                y0, x0, y1, x1 = (v / 1024 * sc.size for v in locs)      # the engine's parser
                assert np.allclose((x0, y0, x1, y1), o.box, atol=sc.size / 1024 + 1e-6)
            xs = [o.box[0] for o in truth]
            assert xs == sorted(xs)            # left to right
    assert n_empty == len(some_scenes)         # one absent query per scene


def test_loc_token_rounding_and_clamp():
    assert scenes.loc_token(0, 224) == "<loc0000>"
    assert scenes.loc_token(224, 224) == "<loc1023>"
    assert scenes.loc_token(112, 224) == "<loc0512>"
    assert scenes.loc_token(-3, 224) == "<loc0000>"


def test_segment_targets_have_16_seg_tokens(some_scenes):
    enc = random_mask_tokenizer()
    rng = np.random.default_rng(1)
    seen = 0
    for sc in some_scenes[:12]:
        for prefix, suffix in scenes.task_examples(sc, rng, enc):
            if not prefix.startswith("segment "):
                continue
            colour, kind = prefix.split()[1:]
            truth = scenes.instances(sc, colour, kind)
            assert len([p for p in suffix.split(" ; ") if p]) == len(truth)
            for part in filter(None, suffix.split(" ; ")):
                assert re.fullmatch(rf"(?:{LOC}){{4}}(?:<seg(\d{{3}})>){{16}} {colour} {kind}", part), part
                assert all(0 <= int(v) < 128 for v in re.findall(r"<seg(\d{3})>", part))
                seen += 1
    assert seen > 10
    # Without an encoder there are no segment examples.
    assert not any(p.startswith("segment") for p, _ in scenes.task_examples(some_scenes[0], rng))


def test_answers(some_scenes):
    rng = np.random.default_rng(2)
    for sc in some_scenes:
        ex = scenes.task_examples(sc, rng)
        d = dict(ex)
        assert d["answer en how many shapes are there"] == str(len(sc.objects))
        for prefix, answer in ex:
            if prefix.startswith("answer en what colour is the "):
                assert answer in COLOURS
            elif prefix.startswith("answer en which shape is "):
                assert answer in KINDS
            elif prefix.startswith("answer en is there"):
                assert answer in ("yes", "no")
            elif prefix.startswith("answer en how many"):
                assert answer in ("0", "1", "2", "3")
        assert {scenes.task_of(p) for p, _ in ex} == {"caption", "answer", "detect", "ocr"}


def test_eval_set_disjoint_from_training():
    train = {scenes.train_seed(i) for i in range(200_000)}
    train |= {scenes.train_seed(s * 10**8 + k) for s in range(4) for k in range(50_000)}
    assert max(train) < scenes.EVAL_SEED_BASE
    ev = scenes.eval_seeds(500, seed=0) + scenes.eval_seeds(500, seed=1)
    assert min(ev) >= scenes.EVAL_SEED_BASE and len(set(ev)) == 1000
    assert not train & set(ev)
    es = scenes.eval_set(3, seed=0)
    assert [s.seed for s in es] == scenes.eval_seeds(3, seed=0)


def test_numpy_conv_matches_direct_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 9, 9)).astype(np.float32)
    w = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    got = scenes._conv2d(x, w, b, stride=2, pad=1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho = (9 + 2 - 4) // 2 + 1
    want = np.zeros((2, 4, ho, ho), np.float32)
    for i in range(ho):
        for j in range(ho):
            patch = xp[:, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4]
            want[:, :, i, j] = np.einsum("nckl,ockl->no", patch, w) + b
    assert np.allclose(got, want, atol=1e-4)


def test_mask_tokenizer_shapes_and_crop():
    enc = random_mask_tokenizer()
    sc = scenes.make_scene(SEEDS[0])
    crops = np.stack([scenes.mask_crop(o.mask, o.box) for o in sc.objects])
    assert crops.shape == (len(sc.objects), 64, 64) and set(np.unique(crops)) <= {0.0, 1.0}
    codes = enc.encode(crops)
    assert codes.shape == (len(sc.objects), 16) and codes.min() >= 0 and codes.max() < 128
    square = next((o for s in SEEDS for o in scenes.make_scene(s).objects if o.kind == "square"
                   and o.mask.sum() == (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])), None)
    if square is not None:                     # an unoccluded square fills its crop
        assert scenes.mask_crop(square.mask, square.box).all()


def test_max_shapes_curriculum():
    for s in SEEDS[:10]:
        assert len(scenes.make_scene(s, max_shapes=1).objects) == 1
        assert 1 <= len(scenes.make_scene(s, max_shapes=2).objects) <= 2
    # the default is the full scene, unchanged
    a, b = scenes.make_scene(SEEDS[0]), scenes.make_scene(SEEDS[0], max_shapes=scenes.MAX_SHAPES)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    with pytest.raises(ValueError):
        scenes.make_scene(0, max_shapes=0)
