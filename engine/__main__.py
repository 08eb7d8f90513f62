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
from stdin), --backend, --threads, --max-new-tokens, --num-beams, --sample / --temperature /
--top-k / --top-p / --seed, --json.

Output: the generated text is streamed to stdout token by token (greedy or sampling; beam search
prints it at the end), followed for detect / segment by one line per instance. With --json,
stdout is one JSON object instead:

    {"task", "prompt", "text", "tokens", "finish_reason", "score", "timings",
     "image": {"width", "height"},
     "detections": [{"label", "box": [x0, y0, x1, y1]}],                      (detect)
     "segments": [{"label", "box", "mask": {"size": [h, w], "counts": [...]} or null,
                   "mask_area"}]}                                           (segment)

Boxes are in pixels of the input image. Masks are COCO-style uncompressed RLE: run lengths of
the flattened mask in column-major order, starting with a run of zeros (pycocotools reads it
with `mask.frPyObjects`); null when no mask decoder is available. A timings line goes to stderr.
User errors print one `error: ...` line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

EXAMPLES = """examples:
  python -m engine caption --image cat.jpg --model ARTIFACT_OR_CHECKPOINT
  python -m engine answer  --image cat.jpg --question "what is the cat doing?"
  python -m engine detect  --image cat.jpg --labels "cat ; dog" --draw boxes.png --json
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
    """Caption the image, detect and segment what the caption names, draw the result."""
    from . import draw, load
    from .processor import load_image
    from .tasks import normalize_labels

    model = load(args.model, backend=args.backend, weights=args.weights, threads=args.threads)
    image_path = Path(args.image) if args.image else example_image_path()
    image = load_image(image_path)
    cap = model.caption(image)
    print(f"model    : {model.artifact_dir} ({args.weights}, {args.backend})")
    print(f"image    : {image_path} ({image.size[0]}x{image.size[1]})")
    print(f"caption  : {cap.text.strip()}")
    labels = normalize_labels(args.labels) if args.labels else caption_objects(cap.text)
    found = []
    for label in labels:
        if model.seg_decoder is not None:
            found += model.segment(image, label)
        else:
            found += model.detect(image, label)
    kind = "segments" if model.seg_decoder is not None else "detections"
    print(f"{kind:9s}: {len(found)} for {labels}")
    for item in found:
        x0, y0, x1, y1 = item.box
        mask = "" if getattr(item, "mask", None) is None else f", mask {int(item.mask.sum())} px"
        print(f"  {item.label or '(no label)'}: box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}){mask}")
    draw.draw_segments(image, found, args.out)
    t = cap.timings
    print(f"overlay  : {args.out}")
    print(f"timings  : caption first token {t['first_token'] * 1e3:.1f} ms, total {t['total'] * 1e3:.1f} ms "
          f"({t['new_tokens']} tokens)")
    return 0


# --------------------------------------------------------------------------- run / tasks
def _read_image(spec: str):
    """The input image as an RGB PIL image (EXIF orientation applied): a path, or `-` for stdin."""
    from .errors import ImageError
    from .processor import load_image

    if spec == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise ImageError("--image -: stdin is empty; pipe the image file in, e.g. `< photo.jpg`")
        return load_image(data)
    return load_image(spec)


def _prompt(args: argparse.Namespace) -> str:
    from . import tasks
    if args.command == "run":
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give the text prompt, e.g. --prompt 'caption en'")
        return args.prompt
    if args.command == "caption":
        return tasks.caption_prompt(args.lang)
    if args.command == "answer":
        return tasks.answer_prompt(args.question, args.lang)
    if args.command == "ocr":
        return tasks.ocr_prompt()
    if args.command == "detect":
        return tasks.detect_prompt(args.labels)
    return tasks.segment_prompt(args.labels)


def _max_new_tokens(args: argparse.Namespace, model, input_len: int) -> int:
    """--max-new-tokens, else the task's default capped to the room left in the context."""
    from .tasks import DEFAULT_MAX_NEW_TOKENS
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    default = DEFAULT_MAX_NEW_TOKENS.get(args.command, 64)
    return max(1, min(default, model.max_context - input_len))


def _seg_decoder(args: argparse.Namespace, model):
    if args.seg_decoder:
        return model.load_seg_decoder(args.seg_decoder)
    return model.seg_decoder


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


def _timings_line(t: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    rate = t.get("decode_tokens_per_s")
    rate = f" ({rate:.1f} tokens/s)" if rate else ""
    return (f"timings: image {ms(t['image_encode'])}, prefill {ms(t['prefill'])}, first token "
            f"{ms(t['first_token'])}, {t['new_tokens']} tokens, decode {ms(t['decode'])}{rate}, "
            f"total {ms(t['total'])} (model load {ms(t['load'])})")


def _generate_command(args: argparse.Namespace) -> int:
    from . import load, tasks

    image = _read_image(args.image)                      # bad image: fail before loading the model
    prompt = _prompt(args)
    model = load(args.model, backend=args.backend, threads=args.threads, weights=args.weights)
    decoder = _seg_decoder(args, model) if args.command == "segment" else None
    if args.command == "segment" and decoder is None:
        print("note: no mask decoder in this model, so segments carry boxes only; pass --seg-decoder "
              "vae-oid.npz (gs://big_vision/paligemma/vae-oid.npz) for masks", file=sys.stderr)

    input_len = model.config.num_image_tokens + 1 + len(model.tokenizer.encode(prompt + "\n"))
    streaming = not args.json and args.num_beams == 1

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = model.generate(
        image, prompt, max_new_tokens=_max_new_tokens(args, model, input_len), num_beams=args.num_beams,
        do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stream=show if streaming else None)
    text = result.text if args.command == "run" else result.text.strip()
    width, height = image.size

    out = {"task": args.command, "prompt": prompt, "text": text, "tokens": result.tokens,
           "finish_reason": result.finish_reason, "score": result.score, "timings": result.timings,
           "image": {"width": width, "height": height}}
    instances = []
    if args.command == "detect":
        instances = tasks.parse_detections(result.text, width, height)
        out["detections"] = [{"label": d.label, "box": _box(d.box)} for d in instances]
    elif args.command == "segment":
        instances = tasks.parse_segments(result.text, width, height, decoder)
        out["segments"] = [{"label": s.label, "box": _box(s.box),
                            "mask": None if s.mask is None else _rle(s.mask),
                            "mask_area": None if s.mask is None else int(s.mask.sum())}
                           for s in instances]
    if args.draw:
        from . import draw
        drawer = draw.draw_detections if args.command == "detect" else draw.draw_segments
        drawer(image, instances, args.draw)

    if args.json:
        print(json.dumps(out))
    else:
        if not streaming:
            sys.stdout.write(result.text)
        sys.stdout.write("\n")
        for item in instances:
            mask = "" if getattr(item, "mask", None) is None else f"  mask {int(item.mask.sum())} px"
            print(f"{item.label or '(no label)'}: box {_box(item.box)}{mask}")
        if args.command in ("detect", "segment"):
            print(f"{len(instances)} {'detections' if args.command == 'detect' else 'segments'}"
                  + (f", drawn to {args.draw}" if args.draw else ""))
    print(f"finish: {result.finish_reason}; " + _timings_line(result.timings), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="image file, or - to read the image bytes from stdin")
    p.add_argument("--model", help="exported artifact dir, or HF checkpoint dir (exported once into the "
                                   "cache); default: the default model")
    p.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--weights", default="int8",
                   help="weight format when --model is an HF checkpoint (fp32, fp16, bf16, int8, int4, fp8; "
                        "default int8)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: per task (caption/answer 64, ocr 128, detect 128, segment 256)")
    p.add_argument("--num-beams", type=_positive_int, default=1, help="beam search with N beams")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=_generate_command, draw=None, seg_decoder=None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine", description="PaliGemma CPU inference engine",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="generate for a free prompt")
    r.add_argument("--prompt", required=True, help="the text prompt, e.g. 'caption en'")
    c = sub.add_parser("caption", help="caption the image")
    c.add_argument("--lang", default="en")
    a = sub.add_parser("answer", help="answer a question about the image")
    a.add_argument("--question", required=True)
    a.add_argument("--lang", default="en")
    o = sub.add_parser("ocr", help="read the text in the image")
    d = sub.add_parser("detect", help="detect objects: boxes")
    s = sub.add_parser("segment", help="segment objects: boxes and masks")
    for q in (d, s):
        q.add_argument("--labels", required=True, help='objects to find, e.g. "cat ; dog"')
        q.add_argument("--draw", metavar="OUT.png", help="save the image with the results drawn on it")
    s.add_argument("--seg-decoder", metavar="PATH",
                   help="VQ-VAE mask decoder (vae-oid.npz); default: the one in the artifact, if any")
    for q in (r, c, a, o, d, s):
        _common(q)

    dm = sub.add_parser("demo", help="caption, detect and segment the bundled example scene with the "
                                      "default model; draws the result")
    dm.add_argument("--model", help="artifact or HF checkpoint dir (default: the bundled default model)")
    dm.add_argument("--image", help="image file (default: the bundled example scene)")
    dm.add_argument("--labels", help='objects to find, e.g. "red circle ; blue square" (default: the ones '
                                     "the caption names)")
    dm.add_argument("--out", default="demo.png", help="overlay image to write (default demo.png)")
    dm.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    dm.add_argument("--weights", default="int8", help="weight format of the export (default int8)")
    dm.add_argument("--threads", type=_positive_int, default=None)
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
    if getattr(args, "draw", None) and not args.draw.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")):
        print(f"error: --draw {args.draw}: give an image file name ending in .png, .jpg, .webp or .bmp",
              file=sys.stderr)
        return 2
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
