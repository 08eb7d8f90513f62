"""Generated scenes of coloured shapes, and PaliGemma task targets for them.

The project cannot download real PaliGemma weights, so it trains its own small PaliGemma on
these scenes (training/train_model.py) and evaluates it on a held-out set (`eval_set`).
Runtime-safe: numpy and PIL only, never torch.

A scene (`make_scene(seed, size)`, deterministic by seed):
  - a background: a solid colour, a linear gradient or light noise, always of low chroma
    (greyish), so it never equals a shape colour;
  - 1-3 shapes: KINDS (circle, square, triangle) x COLOURS (6 saturated colours), 14-38% of
    the image wide, axis-aligned; later shapes are drawn over earlier ones, and every shape
    keeps at least MIN_VISIBLE of its pixels;
  - with probability 1/2, a 2-4 digit string drawn as seven-segment digits (no font files, so
    the pixels depend only on numpy and PIL's polygon fill), away from the shapes.
Each object has its visible binary mask (H x W) and box = the tight box of that mask, in
pixels, (x0, y0, x1, y1) with x1 / y1 exclusive.

Task targets (`task_examples`) use the exact PaliGemma formats, prompt -> suffix:
  caption en                      "a red circle and two blue squares"   (see `caption`)
  answer en how many shapes are there              "2"
  answer en how many {kind}s are there             "0".."3"
  answer en how many {colour} shapes are there     "0".."3"
  answer en what colour is the {kind}              "red"     (only when one {kind} exists)
  answer en which shape is {colour}                "circle"  (only when one {colour} shape exists)
  answer en is there a / an {colour} {kind}        "yes" / "no"
  detect {colour} {kind}          "<locY0><locX0><locY1><locX1> {colour} {kind}" per instance,
                                  left to right (by x0, then y0), joined by " ; "
  segment {colour} {kind}         the same with 16 <seg###> tokens after the 4 loc tokens
  ocr                             the digits, e.g. "4821"
A detect / segment query with no matching object, and ocr on a scene without digits, have an
EMPTY suffix (the model outputs <eos> at once), as PaliGemma does: the parser then finds no
instance. It is learnable: the first token is <eos> or a <loc> token, a yes/no decision.

Loc tokens: loc = round(v / size * 1024) clamped to 0..1023, for y0, x0, y1, x1 (exclusive
ends), so the engine's parser, pixel = loc / 1024 * size, gives back the box within a pixel.
Seg tokens: the object's mask inside its box, resized to 64x64, encoded by the VQ-VAE encoder
(`MaskTokenizer`, numpy, weights from training/train_vqvae.py's npz) into 16 codebook indices.

Training scenes use seeds in [0, EVAL_SEED_BASE); `eval_set` uses seeds from EVAL_SEED_BASE on.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224                          # default scene resolution (pixels)
KINDS = ("circle", "square", "triangle")
COLOURS = {                         # name -> RGB; saturated, far apart
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 25),
    "purple": (145, 55, 195),
    "orange": (250, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
MAX_SHAPES = 3
MIN_VISIBLE = 0.7                   # fraction of each shape's pixels that stays visible
MIN_SIDE, MAX_SIDE = 0.14, 0.38     # shape size as a fraction of the image side
DIGITS_PROB = 0.5
EVAL_SEED_BASE = 1_000_000_000      # training seeds are below, eval seeds at and above
NUM_LOC = 1024
NUM_SEG = 128
MASK_RES = 64                       # VQ-VAE mask resolution
NUMBER_WORDS = {2: "two", 3: "three"}   # a count of 1 is the article "a" / "an"
TASKS = ("caption", "answer", "detect", "segment", "ocr")


@dataclass
class SceneObject:
    kind: str                       # one of KINDS
    colour: str                     # one of COLOUR_NAMES
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1 / y1 exclusive
    mask: np.ndarray = field(repr=False)   # bool [H, W], the visible pixels

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    seed: int
    image: Image.Image              # RGB, size x size
    objects: list[SceneObject]      # in drawing order (later ones are on top)
    digits: str                     # "" when the scene has no digit string
    digits_box: tuple[int, int, int, int] | None = None

    @property
    def size(self) -> int:
        return self.image.size[0]


# ================================================================================ drawing
def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5CE7E])))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [H, W, 3] background of low chroma: solid, gradient or light noise."""
    def grey_tint() -> np.ndarray:
        return (rng.uniform(30, 235) + rng.uniform(-18, 18, size=3)).astype(np.float32)

    mode = rng.integers(3)
    if mode == 0:                                   # solid
        bg = np.broadcast_to(grey_tint(), (size, size, 3)).copy()
    elif mode == 1:                                 # linear gradient in a random direction
        a, b = grey_tint(), grey_tint()
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        t = np.float32(np.cos(angle)) * ramp[None, :] + np.float32(np.sin(angle)) * ramp[:, None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = a + (b - a) * t[..., None]
    else:                                           # solid + light noise
        bg = grey_tint() + 8 * rng.standard_normal((size, size, 1), dtype=np.float32)
    return np.clip(bg, 0, 255)


def _shape_mask(kind: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """bool [size, size] of a shape filling `box` (x0, y0, x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    if kind == "circle":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif kind == "square":
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif kind == "triangle":                        # pointing up
        d.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; use one of {KINDS}")
    return np.asarray(im) > 0


# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom),
# e (bottom left), f (top left), g (middle).
_SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
             "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}


def _draw_digit(d: ImageDraw.ImageDraw, ch: str, x: float, y: float, w: float, h: float,
                t: float, colour: tuple[int, int, int]) -> None:
    """One seven-segment digit in the box (x, y, x + w, y + h), stroke width t."""
    m = y + h / 2
    bars = {"a": (x, y, x + w, y + t), "d": (x, y + h - t, x + w, y + h), "g": (x, m - t / 2, x + w, m + t / 2),
            "f": (x, y, x + t, m), "b": (x + w - t, y, x + w, m),
            "e": (x, m, x + t, y + h), "c": (x + w - t, m, x + w, y + h)}
    for s in _SEGMENTS[ch]:
        x0, y0, x1, y1 = bars[s]
        d.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=colour)


def _digits_layout(rng: np.random.Generator, size: int) -> tuple[str, tuple[int, int, int, int], float, float, float]:
    n = int(rng.integers(2, 5))
    digits = "".join(str(v) for v in rng.integers(0, 10, size=n))
    h = rng.uniform(0.10, 0.15) * size
    w, gap = 0.55 * h, 0.3 * h
    total = n * w + (n - 1) * gap
    x = rng.uniform(0.03 * size, size * 0.97 - total)
    y = rng.uniform(0.03 * size, size * 0.97 - h)
    box = (int(np.floor(x)), int(np.floor(y)), int(np.ceil(x + total)), int(np.ceil(y + h)))
    return digits, box, h, w, gap


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def make_scene(seed: int, size: int = SIZE, max_shapes: int = MAX_SHAPES) -> Scene:
    """The scene of `seed` at `size` x `size` pixels; the same seed always gives the same scene.
    `max_shapes` < MAX_SHAPES gives simpler scenes (1..max_shapes shapes), for a curriculum."""
    if size < 56:
        raise ValueError(f"size {size} is too small for readable shapes; use 56 or more")
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be 1..{MAX_SHAPES}, got {max_shapes}")
    rng = _rng(seed)
    bg = _background(rng, size)

    digits, digits_box, dh, dw, dgap = "", None, 0.0, 0.0, 0.0
    if rng.random() < DIGITS_PROB:
        digits, digits_box, dh, dw, dgap = _digits_layout(rng, size)

    n_shapes = int(rng.integers(1, max_shapes + 1))
    placed: list[tuple[str, str, np.ndarray]] = []          # (kind, colour, full mask)
    for _ in range(n_shapes):
        for _attempt in range(50 if placed else 10_000):    # the first shape always finds a place
            kind = KINDS[rng.integers(len(KINDS))]
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            side = int(rng.uniform(MIN_SIDE, MAX_SIDE) * size)
            x0 = int(rng.integers(1, size - side))
            y0 = int(rng.integers(1, size - side))
            box = (x0, y0, x0 + side, y0 + side)
            if digits_box is not None and _overlaps(box, digits_box, margin=size // 40):
                continue
            full = _shape_mask(kind, box, size)
            # The new shape goes on top: each earlier shape must keep MIN_VISIBLE of its pixels.
            covered = full.copy()
            ok = True
            for i in range(len(placed) - 1, -1, -1):
                prev = placed[i][2]
                if (prev & ~covered).sum() < MIN_VISIBLE * prev.sum():
                    ok = False
                    break
                covered |= prev
            if ok:
                placed.append((kind, colour, full))
                break

    if not placed:
        raise RuntimeError(f"scene {seed}: no room for a shape (a bug in the layout parameters)")

    # Visible masks: a shape is hidden where a later one is drawn.
    objects: list[SceneObject] = []
    img = bg.copy()
    above = np.zeros((size, size), dtype=bool)
    for kind, colour, full in reversed(placed):
        visible = full & ~above
        above |= full
        ys, xs = np.nonzero(visible)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(kind, colour, box, visible))
    objects.reverse()
    for obj in objects:
        img[obj.mask] = COLOURS[obj.colour]

    image = Image.fromarray((img + 0.5).astype(np.uint8), "RGB")     # round: img is in [0, 255]
    if digits:
        x0, y0 = digits_box[0], digits_box[1]
        region = img[digits_box[1]:digits_box[3], digits_box[0]:digits_box[2]]
        ink = (20, 20, 20) if region.mean() > 128 else (240, 240, 240)
        d = ImageDraw.Draw(image)
        t = max(2.0, dh / 7)
        for i, ch in enumerate(digits):
            _draw_digit(d, ch, x0 + i * (dw + dgap), y0, dw, dh, t, ink)
    return Scene(seed=int(seed), image=image, objects=objects, digits=digits, digits_box=digits_box)


# ================================================================================ targets
def loc_token(v: float, size: int) -> str:
    """<locNNNN> of pixel coordinate v in an image of `size` pixels."""
    i = min(max(int(round(v / size * NUM_LOC)), 0), NUM_LOC - 1)
    return f"<loc{i:04d}>"


def box_tokens(box: tuple[int, int, int, int], size: int) -> str:
    x0, y0, x1, y1 = box
    return "".join(loc_token(v, size) for v in (y0, x0, y1, x1))


def seg_tokens(indices) -> str:
    return "".join(f"<seg{int(i):03d}>" for i in indices)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Canonical caption: groups of equal (colour, kind) with their count, ordered by kind
    (KINDS order), then colour (COLOURS order); "X", "X and Y", "X, Y and Z"."""
    counts: dict[tuple[str, str], int] = {}
    for o in scene.objects:
        counts[(o.kind, o.colour)] = counts.get((o.kind, o.colour), 0) + 1
    keys = sorted(counts, key=lambda k: (KINDS.index(k[0]), COLOUR_NAMES.index(k[1])))
    parts = [f"{NUMBER_WORDS[counts[k]]} {k[1]} {k[0]}s" if counts[k] > 1 else f"{article(k[1])} {k[1]} {k[0]}"
             for k in keys]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def instances(scene: Scene, colour: str, kind: str) -> list[SceneObject]:
    """Objects matching (colour, kind), left to right (by x0, then y0)."""
    found = [o for o in scene.objects if o.colour == colour and o.kind == kind]
    return sorted(found, key=lambda o: (o.box[0], o.box[1]))


def detect_target(scene: Scene, colour: str, kind: str) -> str:
    return " ; ".join(f"{box_tokens(o.box, scene.size)} {o.label}" for o in instances(scene, colour, kind))


def mask_crop(mask: np.ndarray, box: tuple[int, int, int, int], res: int = MASK_RES) -> np.ndarray:
    """The mask inside `box`, resized to res x res (bilinear, then > 0.5): float32 {0, 1}."""
    x0, y0, x1, y1 = box
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8), "L")
    crop = crop.resize((res, res), Image.Resampling.BILINEAR)
    return (np.asarray(crop) > 127).astype(np.float32)


def segment_target(scene: Scene, colour: str, kind: str, encoder: "MaskTokenizer") -> str:
    objs = instances(scene, colour, kind)
    if not objs:
        return ""
    codes = encoder.encode(np.stack([mask_crop(o.mask, o.box) for o in objs]))
    return " ; ".join(f"{box_tokens(o.box, scene.size)}{seg_tokens(c)} {o.label}" for o, c in zip(objs, codes))


def absent_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.colour, o.kind) for o in scene.objects}
    absent = [(c, k) for c in COLOUR_NAMES for k in KINDS if (c, k) not in present]
    return absent[rng.integers(len(absent))]


def task_examples(scene: Scene, rng: np.random.Generator, encoder: "MaskTokenizer | None" = None
                  ) -> list[tuple[str, str]]:
    """(prefix, suffix) pairs for the scene, every task: 1 caption, 4-6 questions, detect and
    segment for each present (colour, kind) plus one absent pair (empty suffix), and ocr.
    Segment examples need `encoder`; without it there are none. `rng` picks the random
    questions (which kind / colour to ask about, which absent pair)."""
    objs = scene.objects
    out = [("caption en", caption(scene)),
           ("answer en how many shapes are there", str(len(objs)))]
    kind = KINDS[rng.integers(len(KINDS))]
    out.append((f"answer en how many {kind}s are there", str(sum(o.kind == kind for o in objs))))
    colour = (objs[rng.integers(len(objs))].colour if rng.random() < 0.5
              else COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))])
    out.append((f"answer en how many {colour} shapes are there", str(sum(o.colour == colour for o in objs))))
    for k in KINDS:
        of_kind = [o for o in objs if o.kind == k]
        if len(of_kind) == 1:
            out.append((f"answer en what colour is the {k}", of_kind[0].colour))
    for c in COLOUR_NAMES:
        of_colour = [o for o in objs if o.colour == c]
        if len(of_colour) == 1:
            out.append((f"answer en which shape is {c}", of_colour[0].kind))
    if rng.random() < 0.5:
        o = objs[rng.integers(len(objs))]
        out.append((f"answer en is there {article(o.colour)} {o.colour} {o.kind}", "yes"))
    else:
        c, k = absent_pair(scene, rng)
        out.append((f"answer en is there {article(c)} {c} {k}", "no"))

    pairs = sorted({(o.colour, o.kind) for o in objs}, key=lambda p: (KINDS.index(p[1]), COLOUR_NAMES.index(p[0])))
    absent = absent_pair(scene, rng)
    for c, k in pairs + [absent]:
        out.append((f"detect {c} {k}", detect_target(scene, c, k)))
    if encoder is not None:
        for c, k in pairs + [absent]:
            out.append((f"segment {c} {k}", segment_target(scene, c, k, encoder)))
    out.append(("ocr", scene.digits))
    return out


def task_of(prefix: str) -> str:
    """The task of a prompt: its first word (caption, answer, detect, segment, ocr)."""
    return prefix.split(" ", 1)[0]


def train_seed(i: int) -> int:
    """A training scene seed for sample i: spread over [0, EVAL_SEED_BASE)."""
    return int(np.uint64(i) * np.uint64(2654435761) % np.uint64(EVAL_SEED_BASE))


def eval_seeds(n: int, seed: int = 0) -> list[int]:
    """Seeds of the held-out set `seed`: n consecutive values from EVAL_SEED_BASE + seed * 10**6."""
    if not 0 <= n <= 10**6 or seed < 0:
        raise ValueError("eval_seeds: 0 <= n <= 1e6 and seed >= 0")
    return [EVAL_SEED_BASE + seed * 10**6 + i for i in range(n)]


def eval_set(n: int, seed: int = 0, size: int = SIZE) -> list[Scene]:
    """n held-out scenes; their seeds never occur in training (see train_seed / eval_seeds)."""
    return [make_scene(s, size) for s in eval_seeds(n, seed)]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Task texts without loc / seg tokens: the tokenizer corpus for the trained model."""
    rng = _rng(seed)
    lines = []
    for i in range(n):
        for prefix, suffix in task_examples(make_scene(train_seed(i), 112), rng):
            lines.append(prefix)
            text = re.sub(r"<(loc\d{4}|seg\d{3})>", "", suffix).strip()
            if text:
                lines.append(text)
    return lines


# ================================================================================ VQ-VAE encoder
def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """x [N, C, H, W], w [O, C, k, k] (PyTorch layout) -> [N, O, H', W']."""
    k = w.shape[-1]
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))    # [N, H', W', O], a BLAS matmul
    return out.transpose(0, 3, 1, 2) + b[None, :, None, None]


class MaskTokenizer:
    """The VQ-VAE encoder in numpy: 64x64 masks -> 16 codebook indices (the seg tokens).

    Weights: the npz of training/train_vqvae.py (PyTorch-style names, as vae-oid.npz):
        encoder.0/2/4/6   Conv2d k4 s2 p1 + ReLU, 1 -> 16 -> 32 -> 64 -> 128, 64 -> 4 px
        encoder.8, .9     residual blocks x + net.4(relu(net.2(relu(net.0(x)))))
        encoder.10        Conv2d 1x1 128 -> D
        _vq_vae._embedding [128, D]
    Input masks are {0, 1}, fed as 2 * m - 1. Token i is grid cell (i // 4, i % 4).
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        missing = [k for k in ("_vq_vae._embedding", "encoder.0.weight", "encoder.10.weight") if k not in self.w]
        if missing:
            raise ValueError(f"VQ-VAE weights lack {missing}; pass the npz of training/train_vqvae.py")
        self.codebook = self.w["_vq_vae._embedding"]          # [128, D]

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "MaskTokenizer":
        with np.load(path) as z:
            return cls({k: z[k] for k in z.files})

    def _conv(self, name: str, x: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
        return _conv2d(x, self.w[name + ".weight"], self.w[name + ".bias"], stride, pad)

    def _res(self, name: str, x: np.ndarray) -> np.ndarray:
        h = np.maximum(self._conv(f"{name}.net.0", x, pad=1), 0)
        h = np.maximum(self._conv(f"{name}.net.2", h, pad=1), 0)
        return x + self._conv(f"{name}.net.4", h)

    def features(self, masks: np.ndarray) -> np.ndarray:
        """masks [N, 64, 64] in {0, 1} -> encoder output [N, D, 4, 4]."""
        x = (2.0 * np.asarray(masks, dtype=np.float32) - 1.0)[:, None]
        for i in (0, 2, 4, 6):
            x = np.maximum(self._conv(f"encoder.{i}", x, stride=2, pad=1), 0)
        x = self._res("encoder.8", x)
        x = self._res("encoder.9", x)
        return self._conv("encoder.10", x)

    def encode(self, masks: np.ndarray) -> np.ndarray:
        """masks [N, 64, 64] -> int64 [N, 16], the nearest codebook entry per grid cell."""
        z = self.features(masks)                                # [N, D, 4, 4]
        n, d = z.shape[:2]
        z = z.reshape(n, d, 16).transpose(0, 2, 1)              # [N, 16, D], cell i = (i // 4, i % 4)
        e = self.codebook
        dist = (z ** 2).sum(-1, keepdims=True) - 2 * z @ e.T + (e ** 2).sum(-1)
        return dist.argmin(-1).astype(np.int64)
