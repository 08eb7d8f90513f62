"""Command line: `python -m engine SUBCOMMAND ...` (also installed as `paligemma-engine`).

Subcommands today:
    demo    create a small synthetic checkpoint (random weights) if needed, export it (cached)
            and run the full engine on a generated example image: proves the data path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def example_image():
    """A simple scene: a red circle and a blue square on a light background."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (320, 240), (235, 230, 220))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 60, 140, 160), fill=(220, 40, 40))
    d.rectangle((180, 80, 280, 180), fill=(40, 70, 220))
    return img


def _demo(args: argparse.Namespace) -> int:
    from . import default_cache_dir, load
    from .synth import write_synthetic_checkpoint

    ckpt = Path(args.checkpoint) if args.checkpoint else default_cache_dir() / "synthetic" / args.preset
    if not (ckpt / "config.json").is_file():
        print(f"creating synthetic checkpoint {args.preset} (random weights) in {ckpt}", file=sys.stderr)
        write_synthetic_checkpoint(args.preset, ckpt, seed=0, dtype="fp32", progress=False, force=True)
    model = load(ckpt, backend=args.backend, weights=args.weights, threads=args.threads)
    result = model.generate(example_image(), args.prompt, max_new_tokens=args.max_new_tokens)
    t = result.timings
    print(f"checkpoint : {ckpt}" + ("" if args.checkpoint else " (synthetic, random weights: the text is noise)"))
    print(f"artifact   : {model.artifact_dir} ({args.weights}, {args.backend})")
    print(f"prompt     : {args.prompt!r} + {model.config.num_image_tokens} image tokens")
    print(f"tokens     : {result.tokens} ({result.finish_reason})")
    print(f"text       : {result.text!r}")
    print(f"timings    : image {t['image_encode'] * 1e3:.1f} ms, first token {t['first_token'] * 1e3:.1f} ms, "
          f"total {t['total'] * 1e3:.1f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="PaliGemma CPU inference engine")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a synthetic checkpoint end to end through the engine")
    d.add_argument("--preset", default="tiny-pg2", help="synthetic preset to create (default tiny-pg2)")
    d.add_argument("--checkpoint", help="an HF PaliGemma checkpoint directory instead of a synthetic one")
    d.add_argument("--prompt", default="caption en")
    d.add_argument("--max-new-tokens", type=int, default=12)
    d.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    d.add_argument("--weights", default="int8", help="weight format of the export (default int8)")
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
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
