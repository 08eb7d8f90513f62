"""Checks that tests/arm/run_python_qemu.sh runs on the host (x86) and under qemu-aarch64.

    python tests/arm/arm_checks.py tokens --out F.json [--backends openvino,onnxruntime]
        the default model's greedy tokens (int8) on PROMPTS, per backend -> JSON
    python tests/arm/arm_checks.py compare A.json B.json
        exit 1 unless both hold the same tokens for every backend and prompt
    python tests/arm/arm_checks.py tiny [--backends ...]
        a tiny synthetic PaliGemma 2 (engine.synth) exported with fp32 weights, loaded and decoded
        greedily in each backend; the oracle is engine.reference (numpy) on the same weights
    python tests/arm/arm_checks.py quant --backend B (--weights W | --artifact DIR)
        the default model exported with W (or an artifact) loaded in B: resident memory growth of
        the load plus a short caption, for OpenVINO the compiled graphs' weight precisions -> JSON
    python tests/arm/arm_checks.py wide-export --out DIR
        a 47M-parameter-decoder synthetic model exported fp32 / int8 / int4 for both runtimes

Runtime dependencies only (numpy, the engine, its runtimes): no torch, so it runs where only
the package's own wheels exist.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import engine
from engine import scenes

MAX_NEW_TOKENS = 32


def prompts() -> list[tuple[str, object, str]]:
    """6 fixed (name, image, prompt) cases: the bundled example scene and 4 held-out scenes,
    captions, a question, detect and segment."""
    from engine.__main__ import example_image_path
    example = example_image_path()
    seeds = scenes.eval_seeds(4, seed=7)
    s = [scenes.make_scene(seed) for seed in seeds]
    o2, o3, o4 = s[1].objects[0], s[2].objects[-1], s[3].objects[0]
    return [
        ("example-caption", example, "caption en"),
        ("example-count", example, "answer en how many shapes are there"),
        ("scene1-caption", s[0].image, "caption en"),
        ("scene2-detect", s[1].image, f"detect {o2.colour} {o2.kind}"),
        ("scene3-segment", s[2].image, f"segment {o3.colour} {o3.kind}"),
        ("scene4-answer", s[3].image, f"answer en what colour is the {o4.kind}"),
    ]


def default_tokens(backend: str, weights: str = "int8") -> dict[str, dict]:
    model = engine.load(backend=backend, weights=weights, threads=2, progress=False)
    try:
        out = {}
        for name, image, prompt in prompts():
            r = model.generate(image, prompt, max_new_tokens=MAX_NEW_TOKENS)
            out[name] = {"prompt": prompt, "tokens": r.tokens, "text": r.text}
        return out
    finally:
        model.close()


def cmd_tokens(args) -> int:
    result = {"machine": platform.machine(), "simd": engine.cpu_features()["simd"], "backends": {}}
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        result["backends"][backend] = default_tokens(backend)
        print(f"tokens: {backend} int8, {len(result['backends'][backend])} prompts in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def cmd_compare(args) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    equal, differ = 0, []
    for backend, cases in b["backends"].items():
        if backend not in a["backends"]:
            differ.append(f"{backend}: missing from {args.a}")
            continue
        for name, case in cases.items():
            want = a["backends"][backend].get(name)
            if want is not None and want["tokens"] == case["tokens"]:
                equal += 1
            else:
                differ.append(f"{backend} {name}: {a['machine']} {want and want['tokens']} vs "
                              f"{b['machine']} {case['tokens']}")
    for line in differ:
        print("DIFFER " + line)
    print(f"compare: {a['machine']} ({a['simd']}) vs {b['machine']} ({b['simd']}): {equal} equal, "
          f"{len(differ)} differ")
    return 0 if equal and not differ else 1


def cmd_tiny(args) -> int:
    """Export + load + greedy on a tiny synthetic PG2 in each backend against engine.reference."""
    from engine.reference import ReferenceModel
    from engine.synth import write_synthetic_checkpoint
    from export.pipeline import export_checkpoint

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_synthetic_checkpoint("tiny-pg2", Path(tmp) / "ckpt", dtype="fp32", progress=False)
        ref = ReferenceModel.from_pretrained(ckpt)
        image = scenes.make_scene(3).image
        for backend in args.backends.split(","):
            fmt = "onnx" if backend == "onnxruntime" else "openvino"
            art = Path(tmp) / f"art-{fmt}"
            t0 = time.perf_counter()
            export_checkpoint(ckpt, art, formats=(fmt,), weights="fp32", progress=False)
            model = engine.load(art, backend=backend, threads=2, progress=False)
            try:
                r = model.generate(image, "caption en", max_new_tokens=12, ignore_eos=True)
                inputs = model.processor([image], "caption en")
                want = ref.generate(inputs["input_ids"], inputs["pixel_values"], 12,
                                    inputs["token_type_ids"], eos_token_id=-1)
            finally:
                model.close()
            ok = r.tokens == want
            failures += not ok
            print(f"tiny: {backend} fp32 export+load+greedy {'==' if ok else '!='} numpy reference "
                  f"({len(want)} tokens, {time.perf_counter() - t0:.0f} s)"
                  + ("" if ok else f": got {r.tokens}, want {want}"))
    return 1 if failures else 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


WIDE_FORMATS = ("fp32", "int8", "int4")


def wide_config():
    """engine.synth's tiny-pg2 with a 1024-wide, 4096-intermediate decoder (47M decoder
    parameters): its weights outweigh the runtimes' own memory, so resident memory shows the
    format the runtime keeps them in (fp32 ~190 MB, int8 ~50 MB, int4 ~30 MB)."""
    import dataclasses
    from engine.synth import preset_config
    cfg = preset_config("tiny-pg2")
    text = dataclasses.replace(cfg.text, hidden_size=1024, intermediate_size=4096, head_dim=128,
                               num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=128)
    return dataclasses.replace(cfg, text=text, projection_dim=1024)


def cmd_wide_export(args) -> int:
    """The wide model's artifacts (fp32 / int8 / int4, both formats) under args.out; exported on
    the host (artifacts are platform-independent files), loaded under qemu by `quant`."""
    from engine.synth import write_synthetic_checkpoint
    from export.pipeline import export_checkpoint
    out = Path(args.out)
    ckpt = write_synthetic_checkpoint(wide_config(), out / "ckpt", dtype="fp32", progress=False, force=True)
    for fmt in WIDE_FORMATS:
        if not (out / fmt / "manifest.json").is_file():
            export_checkpoint(ckpt, out / fmt, formats=("onnx", "openvino"), weights=fmt, progress=False)
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cmd_quant(args) -> int:
    """Resident memory growth of loading an artifact and captioning one image, and for OpenVINO
    the compiled graphs' weight precisions. Default: the default model with --weights."""
    from engine.__main__ import example_image_path
    fmt = "onnx" if args.backend == "onnxruntime" else "openvino"
    art = (Path(args.artifact) if args.artifact else
           engine._export_cached(engine.default_model_path(), args.backend, args.weights, 128, False))
    manifest = json.loads((art / "manifest.json").read_text())
    graph_bytes = sum(f["size"] for rel, f in manifest["files"].items() if rel.startswith(fmt + "/"))
    rss0 = _rss_bytes()
    model = engine.load(art, backend=args.backend, threads=2, progress=False)
    model.generate(example_image_path(), "caption en", max_new_tokens=2, ignore_eos=True)
    rss1 = _rss_bytes()
    out = {"machine": platform.machine(), "model": "wide" if args.artifact else "default",
           "backend": args.backend, "weights": manifest["weights"]["format"],
           "graph_MB": round(graph_bytes / 1e6, 1), "rss_growth_MB": round((rss1 - rss0) / 1e6, 1)}
    if args.backend == "openvino":
        out["runtime_precisions"] = {g: model.runner.runtime_weight_precisions(g)
                                     for g in sorted(model.runner._compiled)}
    model.close()
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokens")
    t.add_argument("--out", required=True)
    t.add_argument("--backends", default="openvino,onnxruntime")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    y = sub.add_parser("tiny")
    y.add_argument("--backends", default="openvino,onnxruntime")
    q = sub.add_parser("quant")
    q.add_argument("--backend", required=True, choices=["openvino", "onnxruntime"])
    q.add_argument("--weights", default="int8")
    q.add_argument("--artifact", help="an exported artifact directory instead of the default model")
    w = sub.add_parser("wide-export")
    w.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return {"tokens": cmd_tokens, "compare": cmd_compare, "tiny": cmd_tiny, "quant": cmd_quant,
            "wide-export": cmd_wide_export}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
