"""PaliGemma tasks: prompts, output parsers, and task functions on a loaded model.

Prompts (the processor adds the final "\\n"):

    caption {lang}        answer {lang} {question}        ocr
    detect {a} ; {b}      segment {a} ; {b}

Detection / segmentation answers are instances joined by " ; ":

    <locY1><locX1><locY2><locX2> label                         (detect)
    <locY1><locX1><locY2><locX2><seg..> x16 label               (segment)

Coordinates are bins 0..1023 over the square, resized image. We map a bin v to pixels of the
ORIGINAL image as `v / 1024 * H` (rows) and `v / 1024 * W` (columns): bin v covers
[v, v + 1) / 1024 of the side, and its start is reported. (big_vision's evaluator divides by
1023 instead; the two differ by at most one bin, 1/1024 of the side.)

The parsers never raise on model output; they skip what they cannot read:
- text around and between instances (stray words, `<eos>`, `<unk>`, trailing text);
- instances with fewer than 4 loc tokens; segments with fewer (or more) than 16 seg tokens;
- instances with a token out of range (`<loc9999>`, `<seg200>`): such text is not a token
  the model can produce, so the instance is corrupted;
- after a run of more than 4 loc tokens only the last 4 (those next to the label) count.
Fixed rather than skipped:
- corners out of order (y1 > y2 or x1 > x2) are swapped: the box is still meaningful;
- boxes are clamped to the image (a no-op for in-range bins, kept as a safety net);
- labels are stripped, inner whitespace collapsed to single spaces; the label ends at ";",
  a newline or the next "<" (token). An instance without a label is kept with label "":
  the box is real model output, callers can filter it. Zero-area boxes are kept as well.
- parse_detections also reads segment answers (the seg tokens are ignored).
Instances keep the model's order, and several instances may share a label.

Several labels (`multi_label`): "per_label" (the default) asks one prompt per label
(`detect a`, `detect b`), submitted together so that the serving core batches them (the image
is encoded once), and returns the instances of each answer in label order: each label's result
equals a call with that label alone. "joint" sends them in one prompt (`detect a ; b`), which
only checkpoints trained on multi-label prompts answer well (PaliGemma's mix checkpoints); the
bundled default model was trained on one label per prompt and mislabels joint answers.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from .processor import load_image

if TYPE_CHECKING:  # pragma: no cover
    from .masks import SegDecoder
    from .model import GenerationResult, PaliGemma

NUM_LOC_BINS = 1024
NUM_SEG_CODES = 128
NUM_SEG_TOKENS = 16

# Default max_new_tokens per task. An instance takes about 8 tokens (detect: 4 locs, label,
# " ;") or about 24 (segment: + 16 segs); defaults are capped to what fits the context.
DEFAULT_MAX_NEW_TOKENS = {"caption": 64, "answer": 64, "ocr": 128, "detect": 128, "segment": 256}

Labels = Union[str, Sequence[str]]

MULTI_LABEL_MODES = ("per_label", "joint")
DEFAULT_MULTI_LABEL = "per_label"


@dataclass
class Detection:
    """One detected object; box = (x0, y0, x1, y1) in pixels of the original image."""
    label: str
    box: tuple[float, float, float, float]


@dataclass(eq=False)
class Segment:
    """One segmented object: a Detection plus its mask, bool [H, W] of the original image size
    (None when no mask decoder is available). Compared by identity (masks are arrays)."""
    label: str
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


# --------------------------------------------------------------------------- prompts
def normalize_labels(labels: Labels) -> list[str]:
    """Labels as a clean list: from ["cat", "dog"] or "cat ; dog". Raises ValueError if empty."""
    if isinstance(labels, str):
        items = labels.split(";")
    elif isinstance(labels, (list, tuple)):
        items = list(labels)
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"labels must be strings, got {type(item).__name__} {item!r}")
            if ";" in item:
                raise ValueError(f"label {item!r} contains ';', which separates labels in the prompt; "
                                 "pass it as separate labels")
    else:
        raise ValueError(f"labels must be a list of strings or a ' ; '-separated string, "
                         f"got {type(labels).__name__}")
    out = [" ".join(item.split()) for item in items]
    if not out or any(not label for label in out):
        raise ValueError(f"empty label in {labels!r}; give at least one non-empty label, "
                         "e.g. ['cat', 'dog'] or 'cat ; dog'")
    return out


def _lang(lang: str) -> str:
    if not isinstance(lang, str) or not lang.strip() or len(lang.split()) != 1:
        raise ValueError(f"lang must be a language code such as 'en', 'de' or 'fr', got {lang!r}")
    return lang.strip()


def caption_prompt(lang: str = "en") -> str:
    return f"caption {_lang(lang)}"


def answer_prompt(question: str, lang: str = "en") -> str:
    """`answer {lang} {question}`; whitespace in the question (newlines too) becomes single spaces."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return f"answer {_lang(lang)} {' '.join(question.split())}"


def ocr_prompt() -> str:
    return "ocr"


def detect_prompt(labels: Labels) -> str:
    return "detect " + " ; ".join(normalize_labels(labels))


def segment_prompt(labels: Labels) -> str:
    return "segment " + " ; ".join(normalize_labels(labels))


def check_multi_label(multi_label: str | None) -> str:
    """The multi-label mode: "per_label" or "joint" (None: DEFAULT_MULTI_LABEL)."""
    if multi_label is None:
        return DEFAULT_MULTI_LABEL
    if multi_label not in MULTI_LABEL_MODES:
        raise ValueError(f"multi_label must be one of {', '.join(map(repr, MULTI_LABEL_MODES))} or None, "
                         f"got {multi_label!r}")
    return multi_label


def label_prompts(task: str, labels: Labels, multi_label: str | None = None) -> list[str]:
    """The prompts of a detect / segment query: one per label ("per_label") or one for all ("joint")."""
    if task not in ("detect", "segment"):
        raise ValueError(f"label prompts are for 'detect' or 'segment', got {task!r}")
    labels = normalize_labels(labels)
    if check_multi_label(multi_label) == "joint":
        return [f"{task} " + " ; ".join(labels)]
    return [f"{task} {label}" for label in labels]


# --------------------------------------------------------------------------- parsers
_LOC4 = r"((?:<loc\d{4}>\s*){3}<loc\d{4}>)(?!\s*<loc\d{4}>)"       # the last 4 of a loc run
_SEG16 = r"((?:<seg\d{3}>\s*){15}<seg\d{3}>)(?!\s*<seg\d{3}>)"      # exactly 16 seg tokens
_LABEL = r"([^<;\n]*)"
_DETECTION_RE = re.compile(_LOC4 + r"\s*(?:<seg\d{3}>\s*)*" + _LABEL)
_SEGMENT_RE = re.compile(_LOC4 + r"\s*" + _SEG16 + _LABEL)
_NUMBER_RE = re.compile(r"\d+")


def parse_detections(text: str, width: int, height: int) -> list[Detection]:
    """Detections in `text` (a detect answer), boxes in pixels of a width x height image."""
    width, height = _check_size(width, height)
    out = []
    for m in _DETECTION_RE.finditer(_as_text(text)):
        box = _box(m.group(1), width, height)
        if box is not None:
            out.append(Detection(_clean_label(m.group(2)), box))
    return out


def parse_segments(text: str, width: int, height: int, decoder: "SegDecoder | None" = None) -> list[Segment]:
    """Segments in `text` (a segment answer). With a decoder, each gets a bool [height, width]
    mask (its 16 seg tokens decoded, resized into its box); without one, mask is None."""
    width, height = _check_size(width, height)
    found = []
    for m in _SEGMENT_RE.finditer(_as_text(text)):
        box = _box(m.group(1), width, height)
        codes = [int(v) for v in _NUMBER_RE.findall(m.group(2))]
        if box is not None and max(codes) < NUM_SEG_CODES:
            found.append((_clean_label(m.group(3)), box, codes))
    if decoder is None or not found:
        return [Segment(label, box, None) for label, box, _ in found]
    from .masks import mask_in_box
    logits = decoder.decode(np.array([codes for _, _, codes in found], dtype=np.int64))   # [N, 64, 64]
    return [Segment(label, box, mask_in_box(m64, box, width, height))
            for (label, box, _), m64 in zip(found, logits)]


def _as_text(text) -> str:
    return text if isinstance(text, str) else ("" if text is None else str(text))   # str(GenerationResult) = text


def _check_size(width, height) -> tuple[int, int]:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"image size must be positive integers, got width={width!r} height={height!r}")
    return int(width), int(height)


def _box(locs: str, width: int, height: int):
    """(x0, y0, x1, y1) pixels from the text of 4 loc tokens (y1 x1 y2 x2); None if out of range."""
    ya, xa, yb, xb = (int(v) for v in _NUMBER_RE.findall(locs))
    if max(ya, xa, yb, xb) >= NUM_LOC_BINS:
        return None
    y0, y1 = sorted((ya, yb))
    x0, x1 = sorted((xa, xb))

    def px(v: int, size: int) -> float:
        return min(max(v / NUM_LOC_BINS * size, 0.0), float(size))

    return (px(x0, width), px(y0, height), px(x1, width), px(y1, height))


def _clean_label(s: str) -> str:
    return " ".join(s.split())


# --------------------------------------------------------------------------- tasks on a model
def caption(model: "PaliGemma", image, lang: str = "en", **gen) -> "GenerationResult":
    """Caption an image. `gen` goes to model.generate (max_new_tokens defaults to 64)."""
    return _generate(model, image, caption_prompt(lang), "caption", gen)


def answer(model: "PaliGemma", image, question: str, lang: str = "en", **gen) -> "GenerationResult":
    """Answer a question about an image (max_new_tokens defaults to 64)."""
    return _generate(model, image, answer_prompt(question, lang), "answer", gen)


def ocr(model: "PaliGemma", image, **gen) -> "GenerationResult":
    """Read the text in an image (max_new_tokens defaults to 128)."""
    return _generate(model, image, ocr_prompt(), "ocr", gen)


def detect(model: "PaliGemma", image, labels: Labels, multi_label: str | None = None, **gen) -> list[Detection]:
    """Detect objects of the given labels; boxes in pixels of the image (after EXIF orientation).
    multi_label: "per_label" (default) or "joint", see the module docstring. max_new_tokens
    defaults to 128 per prompt (about 16 instances)."""
    prompts = label_prompts("detect", labels, multi_label)
    width, height = load_image(image).size
    results = generate_prompts(model, image, prompts, "detect", gen)
    return [d for r in results for d in parse_detections(r.text, width, height)]


def segment(model: "PaliGemma", image, labels: Labels, multi_label: str | None = None, **gen) -> list[Segment]:
    """Segment objects of the given labels: boxes plus bool masks of the image size.

    multi_label: "per_label" (default) or "joint", see the module docstring. Masks need the
    VQ-VAE mask decoder (model.seg_decoder); without one the segments carry boxes only (mask
    None) and a warning says how to add it. max_new_tokens defaults to 256 per prompt.
    """
    prompts = label_prompts("segment", labels, multi_label)
    width, height = load_image(image).size
    decoder = model.seg_decoder
    if decoder is None:
        warnings.warn("this model has no segmentation mask decoder, so segments carry boxes only "
                      "(mask=None). To get masks, download big_vision's vae-oid.npz "
                      "(gs://big_vision/paligemma/vae-oid.npz) and attach it with "
                      "model.load_seg_decoder(PATH), or export the model with "
                      "`python -m export CHECKPOINT --out DIR --seg-decoder PATH`", stacklevel=3)
    results = generate_prompts(model, image, prompts, "segment", gen)
    return [s for r in results for s in parse_segments(r.text, width, height, decoder)]


def generate_prompts(model: "PaliGemma", image, prompts: Sequence[str], task: str,
                     gen: dict) -> list["GenerationResult"]:
    """Run the prompts of one task on one image; results in prompt order, each equal to running
    its prompt alone (same options and seed). Several prompts are submitted together as separate
    requests, so the scheduler batches them and encodes the image once (its feature cache)."""
    if len(prompts) == 1:
        return [_generate(model, image, prompts[0], task, dict(gen))]
    _check_task_call(image, prompts[0], task, gen)
    if gen.get("stream") is not None:
        raise ValueError(f"stream works with one prompt, and this {task} call runs {len(prompts)} (one per "
                         "label, multi_label='per_label'); call it once per label to stream each")
    handles = []
    try:
        for prompt in prompts:
            g = dict(gen)
            if g.get("max_new_tokens") is None:
                g["max_new_tokens"] = _default_max_new_tokens(model, prompt, task)
            handles.append(model.submit(image, prompt, **g))
        return [_clean_result(h.result(), prompt) for h, prompt in zip(handles, prompts)]
    except BaseException:
        for h in handles:
            h.cancel()
        raise


def _check_task_call(image, prompt: str, task: str, gen: dict) -> None:
    if isinstance(image, (list, tuple)):
        raise ValueError(f"{task} takes one image; for several, call it once per image "
                         "(or use model.generate with a list of prompts)")
    if "prompt" in gen:
        raise ValueError(f"{task} builds its own prompt ({prompt!r}); use model.generate for a custom prompt")


def _generate(model: "PaliGemma", image, prompt: str, task: str, gen: dict) -> "GenerationResult":
    _check_task_call(image, prompt, task, gen)
    if gen.get("max_new_tokens") is None:
        gen["max_new_tokens"] = _default_max_new_tokens(model, prompt, task)
    return _clean_result(model.generate(image, prompt, **gen), prompt)


def _clean_result(result: "GenerationResult", prompt: str) -> "GenerationResult":
    text = result.text
    echo = prompt + "\n"
    if text.startswith(echo):           # some decoders repeat the prompt; ours returns new tokens only
        text = text[len(echo):]
    return replace(result, text=text.strip())


def _default_max_new_tokens(model: "PaliGemma", prompt: str, task: str) -> int:
    """The task's default, capped so that the prompt plus the answer fit the model's context."""
    cfg = model.config
    n_prompt = cfg.num_image_tokens + 1 + len(model.tokenizer.encode(prompt + "\n"))
    return max(1, min(DEFAULT_MAX_NEW_TOKENS[task], model.max_context - n_prompt))
