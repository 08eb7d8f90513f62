"""Command line: `python -m engine SUBCOMMAND ...` (also installed as `paligemma-engine`).

Subcommands today:
    demo    create a small synthetic checkpoint (random weights) if needed and run it on a
            generated example image with the numpy reference model: proves the data path.
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
    from . import default_cache_dir
    from .processor import Processor
    from .reference import ReferenceModel
    from .synth import write_synthetic_checkpoint

    ckpt = Path(args.checkpoint) if args.checkpoint else default_cache_dir() / "synthetic" / args.preset
    if not (ckpt / "config.json").is_file():
        print(f"creating synthetic checkpoint {args.preset} (random weights) in {ckpt}", file=sys.stderr)
        write_synthetic_checkpoint(args.preset, ckpt, seed=0, dtype="fp32", progress=False)
    processor = Processor.from_pretrained(ckpt)
    model = ReferenceModel.from_pretrained(ckpt)
    image = example_image()
    batch = processor(image, args.prompt)
    t0 = time.perf_counter()
    tokens = model.generate(batch["input_ids"], batch["pixel_values"], args.max_new_tokens,
                            token_type_ids=batch["token_type_ids"])
    dt = time.perf_counter() - t0
    print(f"checkpoint : {ckpt} (synthetic, random weights: the text is noise)")
    print(f"prompt     : {args.prompt!r} + {model.config.num_image_tokens} image tokens")
    print(f"tokens     : {tokens}")
    print(f"text       : {processor.decode(tokens)!r}")
    print(f"time       : {dt:.2f} s for {len(tokens)} tokens (numpy reference model)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="PaliGemma CPU inference engine")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a synthetic checkpoint end to end with the numpy reference model")
    d.add_argument("--preset", default="tiny-pg2", help="synthetic preset to create (default tiny-pg2)")
    d.add_argument("--checkpoint", help="an HF PaliGemma checkpoint directory instead of a synthetic one")
    d.add_argument("--prompt", default="caption en")
    d.add_argument("--max-new-tokens", type=int, default=12)
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
