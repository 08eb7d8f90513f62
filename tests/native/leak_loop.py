"""Load -> generate -> close, repeated, for LeakSanitizer (tests/native/run_python_sanitizers.sh).

Each round loads a tiny synthetic artifact on both backends with every KV cache storage type,
runs greedy, sampled, beam and concurrent requests and the task helpers through the serving
core (so the native Decoder, KVCache, ThreadPool, attention plans and beam search are built and
torn down), then closes the model and drops it. A leak per round in our extension shows up in
the LeakSanitizer report at exit `rounds` times over (tests/native/lsan_report.py).

    python tests/native/leak_loop.py --rounds 4 --work /tmp/leak
"""
from __future__ import annotations

import argparse
import gc
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8))


def one_round(artifact: Path, backend: str, kv_dtype: str) -> list[list[int]]:
    import engine
    model = engine.load(artifact, backend=backend, threads=2, kv_dtype=kv_dtype, progress=False)
    try:
        out = [model.generate(image(0), "caption en", max_new_tokens=8).tokens,
               model.generate(image(1), "answer en what is it", max_new_tokens=6, do_sample=True, seed=3,
                              top_k=20, top_p=0.9).tokens,
               model.generate(image(2), "caption en", max_new_tokens=5, num_beams=3).tokens]
        with ThreadPoolExecutor(4) as pool:       # concurrent requests batch in the scheduler
            out += list(pool.map(lambda i: model.generate(image(i), "ocr", max_new_tokens=4).tokens, range(4)))
        model.detect(image(3), ["red circle"])
        handle = model.submit(image(4), "caption en", max_new_tokens=30)
        handle.cancel()                           # a request cancelled mid-way frees its cache
        return out
    finally:
        model.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--work", type=Path, required=True, help="directory for the synthetic checkpoint and artifact")
    args = ap.parse_args(argv)

    from engine.synth import write_synthetic_checkpoint
    from export.pipeline import export_checkpoint
    args.work.mkdir(parents=True, exist_ok=True)
    artifact = args.work / "artifact"
    if not (artifact / "manifest.json").is_file():
        ckpt = write_synthetic_checkpoint("tiny-pg2", args.work / "ckpt", seed=1, dtype="fp32", progress=False)
        export_checkpoint(ckpt, artifact, formats=("onnx", "openvino"), weights="fp32", progress=False)

    first = {}
    for r in range(args.rounds):
        for backend in ("onnxruntime", "openvino"):
            for kv_dtype in ("f32", "f16", "int8"):
                tokens = one_round(artifact, backend, kv_dtype)
                key = (backend, kv_dtype)
                # Same tokens every round: a sanity check that each round did the same work.
                if first.setdefault(key, tokens) != tokens:
                    print(f"leak_loop: round {r} {key} gave different tokens", file=sys.stderr)
                    return 1
        gc.collect()
    print(f"leak_loop: {args.rounds} rounds x 2 backends x 3 KV types of load, generate, close")
    return 0


if __name__ == "__main__":
    sys.exit(main())
