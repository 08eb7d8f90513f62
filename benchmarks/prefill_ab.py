"""Prefill of two or more artifacts side by side in one process: TTFT and its split.

engine.bench runs each sample in a fresh process, which is what a user sees, but on a VM whose
speed drifts between processes (and within one) a 5-10% difference between two weight formats
or kernels drowns in the spread. Here every artifact is loaded once into the same process and
the artifacts take turns on fresh random images (no image cache hits), so drift hits them alike;
the first round is a warm-up and is not counted. Printed per artifact: TTFT of a 1-token
generate and the prefill split (decoder layers, vision tower, attention), min and median.

    python benchmarks/prefill_ab.py ARTIFACT_A ARTIFACT_B [...] [--rounds 5] [--threads 2] [--size 224]

Every figure is printed with the CPU model and engine.cpu_features(); run it under
benchmarks/cpuid_cap.c (README, Performance) for the AVX2 and AVX-512-without-VNNI paths.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

import engine
from engine.bench.__main__ import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", help="exported artifact directories (python -m export)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds after the warm-up round (default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="side of the random test images (default 224)")
    ap.add_argument("--backend", default="onnxruntime")
    args = ap.parse_args()
    if len(args.artifacts) < 2:
        ap.error("give at least two artifacts to compare")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    m = machine_info()
    cap = f"; CPUID capped to {m['cpuid_cap']} (benchmarks/cpuid_cap.c)" if m["cpuid_cap"] else ""
    print(f"CPU: {m['cpu']}; SIMD flags (/proc/cpuinfo): {', '.join(m['simd_flags'])}{cap}; "
          f"engine.cpu_features(): {m['engine_cpu_features']}; threads {args.threads}")
    models = [engine.load(a, backend=args.backend, threads=args.threads, progress=False) for a in args.artifacts]
    rng = np.random.default_rng(0)
    samples: list[list[tuple[float, float, float, float]]] = [[] for _ in models]   # per round: ttft, decoder, vision, attention
    for r in range(args.rounds + 1):
        for i, model in enumerate(models):
            image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), np.uint8))
            t0 = time.perf_counter()
            result = model.generate(image, "caption en", max_new_tokens=1)
            ttft = time.perf_counter() - t0
            p = result.stats.prefill
            if r > 0:
                samples[i].append((ttft, p.decoder_s, p.vision_s, p.attention_s))
    print(f"{args.rounds} rounds, min / median in s")
    print(f"{'artifact':<48} {'TTFT':>13} {'decoder':>13} {'vision':>13} {'attention':>13}")
    for path, rows in zip(args.artifacts, samples):
        a = np.array(rows)
        cells = " ".join(f"{a[:, c].min():6.2f}/{np.median(a[:, c]):<6.2f}" for c in range(4))
        print(f"{str(path)[-48:]:<48} {cells}")


if __name__ == "__main__":
    main()
