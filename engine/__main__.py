"""Command line: `python -m engine SUBCOMMAND ...` (also installed as `paligemma-engine`).

    python -m engine caption --image cat.jpg [--lang en]
    python -m engine answer  --image cat.jpg --question "what is the cat doing?"
    python -m engine ocr     --image sign.png
    python -m engine detect  --image cat.jpg --labels "cat ; dog" [--draw boxes.png]
    python -m engine segment --image cat.jpg --labels cat [--seg-decoder vae-oid.npz] [--draw masks.png]
    python -m engine run     --image cat.jpg --prompt "caption de"      (any prompt, sent as is)
    python -m engine demo [--image scene.png] [--out demo.png]          (default model: caption, detect, segment)
    python -m engine serve [--port 8000] ...                            (HTTP server: engine/serve, `serve --help`)

Common options: --model (an exported artifact dir, or an HF checkpoint dir exported once into
the cache with --weights; default: the default model), --image PATH (`-` reads the image bytes
from stdin), --backend, --threads (capped, with a warning, to the cores this process may use),
--max-new-tokens, --num-beams, --sample / --temperature / --top-k / --top-p / --seed,
--max-image-pixels, --json; `python -m engine --version`.

Several labels (detect / segment --labels "a ; b", --multi-label): per_label (the default) sends
one prompt per label ("detect a", "detect b"), submitted together so that the serving core
batches them; every checkpoint answers these, the bundled default model included (it was
trained on one label per prompt). joint sends one prompt ("detect a ; b"), for checkpoints
trained on multi-label prompts (PaliGemma mix). demo always asks per label.

Output: the generated text is streamed to stdout token by token (greedy or sampling with one
prompt; beam search and several prompts print it at the end, the answers joined by " ; "),
followed for detect / segment by one line per instance. With --json, stdout is one JSON object:

    {"task", "prompt", "text", "tokens", "finish_reason", "score", "timings",
     "image": {"width", "height"},
     "multi_label", "requests": [{"prompt", "text", "tokens", "finish_reason", "score",
                                  "timings"}],                               (detect, segment)
     "detections": [{"label", "box": [x0, y0, x1, y1]}],                      (detect)
     "segments": [{"label", "box", "mask": {"size": [h, w], "counts": [...]} or null,
                   "mask_area"}]}                                           (segment)

With several prompts, "prompt" is the prompts one per line, "text" the answers joined by " ; "
(which parse_detections reads like one joint answer), "tokens" the requests' tokens one after
another, "finish_reason" the first that is not "eos", "score" null, and "timings" those of the
requests together (see _combined_timings); "requests" has each one. An empty --prompt is sent
as is, as model.generate(image, "") does.

Boxes are in pixels of the input image. Masks are COCO-style uncompressed RLE: run lengths of
the flattened mask in column-major order, starting with a run of zeros (pycocotools reads it
with `mask.frPyObjects`); null when no mask decoder is available. A timings line goes to stderr.
User errors print one `error: ...` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from . import WEIGHT_FORMATS          # export.quantize's, without importing the exporter
from .runtime import BACKENDS, DEFAULT_BACKEND

EXAMPLES = """examples:
  python -m engine caption --image cat.jpg --model ARTIFACT_OR_CHECKPOINT
  python -m engine answer  --image cat.jpg --question "what is the cat doing?"
  python -m engine detect  --image cat.jpg --labels "cat ; dog" --draw boxes.png --json
      (several labels: one prompt per label, batched; --multi-label joint sends "detect cat ; dog")
  cat cat.jpg | python -m engine run --image - --prompt "caption de" --num-beams 2
Run `python -m engine COMMAND --help` for a command's options."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def example_image():
    """A simple scene for benchmarks: a red circle and a blue square on a light background."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (320, 240), (235, 230, 220))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 60, 140, 160), fill=(220, 40, 40))
    d.rectangle((180, 80, 280, 180), fill=(40, 70, 220))
    return img


def example_image_path() -> Path:
    """The bundled example scene (a held-out scene of engine.scenes, never seen in training)."""
    from . import default_model_path
    return default_model_path() / "example.png"


_COUNT_WORDS = ("a", "an", "one", "two", "three", "four", "five")


def caption_objects(caption: str) -> list[str]:
    """The object labels of a caption in the default model's grammar: "a red circle, two blue
    squares and a green triangle" -> ["red circle", "blue square", "green triangle"]."""
    labels = []
    for part in re.split(r",\s*|\s+and\s+", caption.strip()):
        words = part.split()
        if words and words[0] in _COUNT_WORDS:
            words = words[1:]
        if not words:
            continue
        if part.split()[0] not in ("a", "an", "one") and words[-1].endswith("s"):
            words[-1] = words[-1][:-1]                      # "two blue squares" -> "blue square"
        label = " ".join(words)
        if label not in labels:
            labels.append(label)
    return labels


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    """Caption the image, detect and segment what the caption names (one prompt per label,
    batched), draw the result."""
    from . import draw, tasks
    from .processor import load_image

    _check_output_path("--out", args.out)
    image_path = Path(args.image) if args.image else example_image_path()
    image = load_image(image_path, max_pixels=args.max_image_pixels)
    labels = tasks.normalize_labels(args.labels) if args.labels else None
    model = _load_model(args)
    cap = model.caption(image)
    labels = labels if labels is not None else caption_objects(cap.text)
    task = "segment" if model.seg_decoder is not None else "detect"
    kind = "segments" if task == "segment" else "detections"
    found, results, prompts = [], [], []
    if labels:
        width, height = image.size
        prompts = tasks.label_prompts(task, labels, "per_label")
        results = tasks.generate_prompts(model, image, prompts, task, {})
        for r in results:
            found += (tasks.parse_segments(r.text, width, height, model.seg_decoder) if kind == "segments"
                      else tasks.parse_detections(r.text, width, height))
    draw.draw_segments(image, found, args.out)
    query_timings = _combined_timings(results) if results else None
    if args.json:
        print(json.dumps({
            "model": str(model.artifact_dir), "weights": args.weights, "backend": args.backend,
            "image": {"path": str(image_path), "width": image.size[0], "height": image.size[1]},
            "caption": {"text": cap.text, "tokens": cap.tokens, "timings": cap.timings},
            "labels": labels, "prompts": prompts,
            kind: [_instance_json(item) for item in found], "overlay": str(args.out),
            "timings": {"caption": cap.timings, kind: query_timings}}))
    else:
        print(f"model    : {model.artifact_dir} ({args.weights}, {args.backend})")
        print(f"image    : {image_path} ({image.size[0]}x{image.size[1]})")
        print(f"caption  : {cap.text.strip()}")
        print(f"{kind:9s}: {len(found)} for {labels} (one prompt per label)")
        for item in found:
            x0, y0, x1, y1 = item.box
            mask = "" if getattr(item, "mask", None) is None else f", mask {int(item.mask.sum())} px"
            print(f"  {item.label or '(no label)'}: box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}){mask}")
        print(f"overlay  : {args.out}")
    print("caption: " + _timings_line(cap.timings), file=sys.stderr)
    if query_timings:
        print(f"{kind} ({len(results)} prompts, batched): " + _timings_line(query_timings), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- run / tasks
def _read_image(spec: str, max_pixels: int | None = None):
    """The input image as an RGB PIL image (EXIF orientation applied): a path, or `-` for stdin."""
    from .errors import ImageError
    from .processor import load_image

    if spec == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise ImageError("--image -: stdin is empty; pipe the image file in, e.g. `< photo.jpg`")
        return load_image(data, max_pixels=max_pixels)
    return load_image(spec, max_pixels=max_pixels)


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of the command: one, or one per label for detect / segment (--multi-label)."""
    from . import tasks
    if args.command == "run":
        return [args.prompt]              # sent as is; "" too, like model.generate(image, "")
    if args.command == "caption":
        return [tasks.caption_prompt(args.lang)]
    if args.command == "answer":
        return [tasks.answer_prompt(args.question, args.lang)]
    if args.command == "ocr":
        return [tasks.ocr_prompt()]
    return tasks.label_prompts(args.command, args.labels, args.multi_label)


# What the user typed, for the few API words that can reach a CLI error message.
_PROMPT_FLAG = {"run": "--prompt", "answer": "--question", "detect": "--labels", "segment": "--labels"}


def _max_new_tokens(args: argparse.Namespace, model, prompt: str) -> int:
    """--max-new-tokens, else the task's default capped to the room left in the context; an
    error in the CLI's words when the prompt and the answer cannot fit."""
    from .tasks import DEFAULT_MAX_NEW_TOKENS
    input_len = model.config.num_image_tokens + 1 + len(model.tokenizer.encode(prompt + "\n"))
    room = model.max_context - input_len
    flag = _PROMPT_FLAG.get(args.command)
    too_long = (f"the prompt takes {input_len} of the model's {model.max_context} context tokens "
                f"({model.config.num_image_tokens} of them the image)")
    if args.max_new_tokens is not None:
        if args.max_new_tokens > room:
            fix = f"use --max-new-tokens {room} or less" if room >= 1 else f"shorten {flag}"
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit: {too_long}, which leaves "
                             f"{max(room, 0)} for the answer; {fix}")
        return args.max_new_tokens
    if room < 1:
        raise ValueError(f"{flag or 'the prompt'} is too long: {too_long}, which leaves {max(room, 0)} for the "
                         f"answer; shorten {flag or 'it'}")
    return min(DEFAULT_MAX_NEW_TOKENS.get(args.command, 64), room)


def _cli_words(message: str) -> str:
    """An API error message in the CLI's flag names (a safety net: the flags are checked first)."""
    for api, flag in (("do_sample=True", "--sample"), ("do_sample=False", "no --sample"),
                      ("max_new_tokens", "--max-new-tokens"), ("num_beams", "--num-beams"),
                      ("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p"),
                      ("seed", "--seed")):
        message = re.sub(rf"(?<![-\w]){re.escape(api)}(?![\w])", flag, message)
    return re.sub(r"^prompt \d+: ", "", message)


def _check_sampling(args: argparse.Namespace) -> None:
    """The decoding flags, checked before any work, in the CLI's words."""
    if args.sample and args.num_beams > 1:
        raise ValueError("--sample with --num-beams > 1 (beam sampling) is not supported; drop --sample for "
                         "beam search, or --num-beams to sample")
    if args.sample and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number > 0 with --sample, got {args.temperature}; "
                         "drop --sample for greedy (deterministic) decoding")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 disables it), got {args.top_p}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if not args.sample:
        given = [f for f, v, default in (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, 0),
                                          ("--top-p", args.top_p, 1.0), ("--seed", args.seed, 0)) if v != default]
        if given:
            print(f"note: {', '.join(given)}: only used with --sample; decoding is greedy", file=sys.stderr)


def _check_output_path(flag: str, path: str) -> None:
    """An overlay path we can write: an image extension, an existing, writable directory. Checked
    before the model runs, so a typo costs nothing."""
    if not path.lower().endswith(DRAW_EXTENSIONS):
        raise ValueError(f"{flag} {path}: give an image file name ending in .png, .jpg, .webp or .bmp")
    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the directory {folder} does not exist; create it first "
                         f"(mkdir -p {folder}) or choose another path")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the directory {folder} is not writable; choose another path")
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a directory; give an image file name such as {path}/overlay.png")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _threads(requested: int | None) -> int | None:
    """--threads, capped to the cores this process may use, with a warning when capped: more
    threads than cores make them wait for each other (decode ran 30-100 times slower)."""
    cores = available_cores()
    if requested is not None and requested > cores:
        print(f"warning: --threads {requested} is more than the {cores} CPU cores this process may use; using "
              f"{cores} (threads beyond the cores wait for each other and slow decoding many times over)",
              file=sys.stderr)
        return cores
    return requested


def _load_model(args: argparse.Namespace):
    from . import load
    return load(args.model, backend=args.backend, threads=_threads(args.threads), weights=args.weights)


def _rle(mask) -> dict:
    """COCO-style uncompressed RLE of a bool [h, w] mask (column-major, starts with zeros)."""
    import numpy as np
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _box(box) -> list[float]:
    return [round(float(v), 2) for v in box]


def _instance_json(item) -> dict:
    out = {"label": item.label, "box": _box(item.box)}
    if hasattr(item, "mask"):
        out["mask"] = None if item.mask is None else _rle(item.mask)
        out["mask_area"] = None if item.mask is None else int(item.mask.sum())
    return out


def _timings_line(t: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    rate = t.get("decode_tokens_per_s")
    rate = f" ({rate:.1f} tokens/s)" if rate else ""
    return (f"timings: image {ms(t['image_encode'])}, prefill {ms(t['prefill'])}, first token "
            f"{ms(t['first_token'])}, {t['new_tokens']} tokens, decode {ms(t['decode'])}{rate}, "
            f"total {ms(t['total'])} (model load {ms(t['load'] or 0.0)})")


def _combined_timings(results) -> dict:
    """Timings of requests submitted together (within milliseconds), from their submission: image
    the first request's (the others find its features in the cache), prefill until the last
    prefill ended, first token the earliest, total the longest, tokens summed, the decode rate
    over the time after the first token."""
    ts = [r.timings for r in results]
    if len(ts) == 1:
        return dict(ts[0])
    total = max(t["total"] for t in ts)
    first = min(t["first_token"] for t in ts)
    tokens = sum(t["new_tokens"] for t in ts)
    decode = total - first
    image = ts[0]["image_encode"]
    return {"image_encode": image, "prefill": max(t["image_encode"] + t["prefill"] for t in ts) - image,
            "first_token": first, "decode": decode, "total": total, "new_tokens": tokens,
            "decode_tokens_per_s": (tokens - len(ts)) / decode if decode > 0 and tokens > len(ts) else None,
            "load": ts[0].get("load"), "queue": max(t.get("queue") or 0.0 for t in ts)}


def _generate_command(args: argparse.Namespace) -> int:
    from . import tasks

    # Everything the user typed is checked before the model loads or runs.
    _check_sampling(args)
    if args.draw:
        _check_output_path("--draw", args.draw)
    decoder = None
    if args.command == "segment" and args.seg_decoder:
        from .masks import SegDecoder
        decoder = SegDecoder.from_npz(args.seg_decoder)
    image = _read_image(args.image, args.max_image_pixels)
    prompts = _prompts(args)
    model = _load_model(args)
    if args.command == "segment" and decoder is None:
        decoder = model.seg_decoder
        if decoder is None:
            print("note: no mask decoder in this model, so segments carry boxes only; pass --seg-decoder "
                  "vae-oid.npz (gs://big_vision/paligemma/vae-oid.npz) for masks", file=sys.stderr)
    limits = [_max_new_tokens(args, model, p) for p in prompts]
    gen = dict(num_beams=args.num_beams, do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, seed=args.seed)
    streaming = not args.json and args.num_beams == 1 and len(prompts) == 1

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        if len(prompts) == 1:
            results = [model.generate(image, prompts[0], max_new_tokens=limits[0],
                                      stream=show if streaming else None, **gen)]
        else:          # one request per label, submitted together: the scheduler batches them
            handles = [model.submit(image, p, max_new_tokens=n, **gen) for p, n in zip(prompts, limits)]
            results = [h.result() for h in handles]
    except ValueError as e:
        raise ValueError(_cli_words(str(e))) from None
    texts = [r.text if args.command == "run" else r.text.strip() for r in results]
    text = " ; ".join(texts)
    width, height = image.size

    instances = []
    if args.command == "detect":
        instances = [d for t in texts for d in tasks.parse_detections(t, width, height)]
    elif args.command == "segment":
        instances = [s for t in texts for s in tasks.parse_segments(t, width, height, decoder)]
    if args.draw:
        from . import draw
        drawer = draw.draw_detections if args.command == "detect" else draw.draw_segments
        drawer(image, instances, args.draw)

    timings = _combined_timings(results)
    if args.json:
        reasons = [r.finish_reason for r in results]
        out = {"task": args.command, "prompt": "\n".join(prompts), "text": text,
               "tokens": [t for r in results for t in r.tokens],
               "finish_reason": next((x for x in reasons if x != "eos"), "eos"),
               "score": results[0].score if len(results) == 1 else None, "timings": timings,
               "image": {"width": width, "height": height}}
        if args.command in ("detect", "segment"):
            out["multi_label"] = tasks.check_multi_label(args.multi_label)
            out["requests"] = [{"prompt": p, "text": t, "tokens": r.tokens, "finish_reason": r.finish_reason,
                                "score": r.score, "timings": r.timings} for p, t, r in zip(prompts, texts, results)]
            key = "detections" if args.command == "detect" else "segments"
            out[key] = [_instance_json(item) for item in instances]
        print(json.dumps(out))
    else:
        if not streaming:
            sys.stdout.write(results[0].text if args.command == "run" else text)
        sys.stdout.write("\n")
        for item in instances:
            mask = "" if getattr(item, "mask", None) is None else f"  mask {int(item.mask.sum())} px"
            print(f"{item.label or '(no label)'}: box {_box(item.box)}{mask}")
        if args.command in ("detect", "segment"):
            print(f"{len(instances)} {'detections' if args.command == 'detect' else 'segments'}"
                  + (f", drawn to {args.draw}" if args.draw else ""))
    reason = ", ".join(dict.fromkeys(r.finish_reason for r in results))
    batched = f"{len(results)} prompts, batched; " if len(results) > 1 else ""
    print(f"finish: {reason}; {batched}" + _timings_line(timings), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


DRAW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PIL_MAX_IMAGE_PIXELS = 89_478_485        # Pillow's default PIL.Image.MAX_IMAGE_PIXELS


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="exported artifact dir, or HF checkpoint dir (exported once into the "
                                   "cache); default: the bundled default model")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS,
                   help=f"inference runtime (default {DEFAULT_BACKEND}: the faster on x86, README Performance)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=f"threads for the graphs and native kernels (default: one per core; capped, with a "
                        f"warning, to the {available_cores()} cores this process may use)")
    p.add_argument("--weights", default="int8", choices=WEIGHT_FORMATS, metavar="{" + ",".join(WEIGHT_FORMATS) + "}",
                   help="weight format when --model is an HF checkpoint (default int8)")
    p.add_argument("--max-image-pixels", type=_positive_int, default=PIL_MAX_IMAGE_PIXELS, metavar="N",
                   help="refuse images of more than N pixels (width x height), a guard against "
                        f"decompression bombs (default {PIL_MAX_IMAGE_PIXELS:,}, Pillow's; Pillow refuses "
                        "more than twice that whatever N is)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="image file, or - to read the image bytes from stdin")
    _model_options(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="most tokens to generate per prompt (default: per task, caption/answer 64, ocr 128, "
                        "detect 128, segment 256, capped to the room left in the model's context)")
    p.add_argument("--num-beams", type=_positive_int, default=1, help="beam search with N beams (default 1: greedy)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --sample: divide the logits by T (> 0; below 1 sharper, above 1 flatter; default 1)")
    p.add_argument("--top-k", type=int, default=0,
                   help="with --sample: keep the K most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="with --sample: keep the smallest set of tokens whose probability reaches P, in (0, 1] "
                        "(default 1: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="with --sample: random seed (>= 0, default 0); the same seed gives the same text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=_generate_command, draw=None, seg_decoder=None)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="python -m engine", description="PaliGemma CPU inference engine",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"paligemma-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="generate for a free prompt")
    r.add_argument("--prompt", required=True,
                   help="the text prompt, sent as is, e.g. 'caption en' (an empty prompt is allowed, as in "
                        "model.generate: the model then continues from the image alone)")
    lang_help = "language code of the prompt, e.g. en, de, fr (default en)"
    c = sub.add_parser("caption", help="caption the image")
    c.add_argument("--lang", default="en", help=lang_help)
    a = sub.add_parser("answer", help="answer a question about the image")
    a.add_argument("--question", required=True, help='the question, e.g. "what colour is the square?"')
    a.add_argument("--lang", default="en", help=lang_help)
    o = sub.add_parser("ocr", help="read the text in the image")
    d = sub.add_parser("detect", help="detect objects: boxes")
    s = sub.add_parser("segment", help="segment objects: boxes and masks")
    for q in (d, s):
        q.add_argument("--labels", required=True, help='objects to find, e.g. "cat ; dog"')
        q.add_argument("--multi-label", choices=["per_label", "joint"], default="per_label",
                       help="several labels: per_label (default) asks one prompt per label, batched, which every "
                            "checkpoint answers, the bundled default model included; joint asks one prompt "
                            "'detect a ; b', for checkpoints trained on it (PaliGemma mix)")
        q.add_argument("--draw", metavar="OUT.png", help="save the image with the results drawn on it")
    s.add_argument("--seg-decoder", metavar="PATH",
                   help="VQ-VAE mask decoder (vae-oid.npz); default: the one in the artifact, if any")
    for q in (r, c, a, o, d, s):
        _common(q)

    dm = sub.add_parser("demo", help="caption, detect and segment the bundled example scene with the "
                                      "default model; draws the result")
    dm.add_argument("--image", help="image file (default: the bundled example scene)")
    dm.add_argument("--labels", help='objects to find, e.g. "red circle ; blue square" (default: the ones '
                                     "the caption names); one prompt per label, batched")
    dm.add_argument("--out", default="demo.png", help="overlay image to write (default demo.png)")
    dm.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    _model_options(dm)
    dm.set_defaults(func=_demo)

    from .cache import add_cache_parser
    add_cache_parser(sub)       # python -m engine cache list|verify|clear (engine/cache.py)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:                      # the HTTP server parses its own options (engine/serve)
        from .serve.cli import main as serve_main
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns our errors into one clear line
        from .errors import EngineError
        if isinstance(e, (EngineError, FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
