"""python -m export CHECKPOINT_DIR --out ARTIFACT_DIR [options]  (also: paligemma-export)

Exports an HF PaliGemma checkpoint to an artifact directory the engine loads: graphs for
onnxruntime and/or OpenVINO, the embedding table, the tokenizer and a checksummed manifest.
"""
from __future__ import annotations

import argparse
import sys

from engine.errors import EngineError

from .quantize import WEIGHT_FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export",
                                description="Export an HF PaliGemma checkpoint to an engine artifact.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="HF checkpoint directory (config.json, "
                   "*.safetensors, tokenizer.model)")
    p.add_argument("--out", required=True, metavar="ARTIFACT_DIR", help="artifact directory to write")
    p.add_argument("--format", default="onnx", choices=("onnx", "openvino", "both"),
                   help="graph format(s) to export (default onnx)")
    p.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                   help="weight format of the matrices (default fp32); int4 is mixed precision: decoder "
                        "int4 except layer 0 and v_proj, LM head and vision tower int8 (see export/quantize.py), "
                        "and falls back to int8 for matrices whose input size is not a multiple of --group-size")
    p.add_argument("--group-size", type=int, default=128, metavar="N",
                   help="int4 group size, a power of two >= 16 (default 128)")
    p.add_argument("--lora", metavar="ADAPTER_DIR", help="PEFT LoRA adapter to merge into the weights")
    p.add_argument("--seg-decoder", metavar="PATH", help="VQ-VAE mask decoder (vae-oid.npz) to include")
    p.add_argument("--force", action="store_true", help="replace ARTIFACT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import export_checkpoint   # after parsing: --help stays fast
    try:
        export_checkpoint(args.checkpoint, args.out, formats=args.format, weights=args.weights,
                          group_size=args.group_size, lora_dir=args.lora, seg_decoder=args.seg_decoder,
                          force=args.force, progress=not args.quiet)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
