"""Attention micro-benchmark on PaliGemma-1 3B shapes (8 heads, 1 kv head, head_dim 256, 18 layers).

  decode:  one new token attending to 300 / 1300 cached tokens, all 18 layers, in µs per token
           (Python call overhead included), next to the decode step's weight streaming: the 3B
           decoder + LM head weight bytes (bf16) divided by a measured memory bandwidth (numpy
           GEMV over a 512 MB float32 matrix) and by the nominal 28 GB/s.
  prefill: 262 / 1030-token prompts (whole prompt = bidirectional prefix block), ms per layer,
           ms for 18 layers, and GFLOP/s counting 4 * T * T * H * D flops per layer.

python benchmarks/attention_bench.py [--levels avx512,avx2,scalar] [--threads 2] [--dtypes f32,f16,int8]
                                    [--clock wall|cpu]
--clock cpu measures process CPU time instead of wall time: robust on a shared, loaded machine
(with --threads 1 it is the time the kernel takes when it has a core to itself).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from engine import _native as nat

LAYERS, H, KV, D = 18, 8, 1, 256
# PaliGemma-1 3B text decoder parameters streamed per decode step: per layer q, k, v, o and the
# gated MLP, plus the tied LM head (257216 x 2048).
HIDDEN, MLP, VOCAB = 2048, 16384, 257216
DECODER_PARAMS = LAYERS * (HIDDEN * H * D + 2 * HIDDEN * KV * D + H * D * HIDDEN + 3 * HIDDEN * MLP) + VOCAB * HIDDEN


CLOCK = time.perf_counter


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def filled_cache(ctx, dtype, rng):
    cache = nat.KVCache(LAYERS, KV, D, 1, ctx + 8, dtype)
    cache.set_prefix_length(0, ctx)
    q = rng.standard_normal((ctx, H, D), dtype=np.float32)
    k = rng.standard_normal((ctx, KV, D), dtype=np.float32)
    for layer in range(LAYERS):
        nat.attention(cache, layer, q, k, k, [0], np.arange(ctx), scale=D ** -0.5)
    return cache


def decode_us(ctx, dtype, rng, steps=20):
    cache = filled_cache(ctx, dtype, rng)
    q = rng.standard_normal((1, H, D), dtype=np.float32)
    k = rng.standard_normal((1, KV, D), dtype=np.float32)
    pos = np.array([ctx])

    def one_token():
        for layer in range(LAYERS):
            nat.attention(cache, layer, q, k, k, [0], pos, scale=D ** -0.5)
        cache.set_length(0, ctx)

    one_token()
    return best_of(lambda: [one_token() for _ in range(steps)], 3) / steps * 1e6


def prefill_ms_per_layer(T, dtype, rng, repeat=3):
    cache = nat.KVCache(1, KV, D, 1, T, dtype)
    q = rng.standard_normal((T, H, D), dtype=np.float32)
    k = rng.standard_normal((T, KV, D), dtype=np.float32)
    pos = np.arange(T)

    def run():
        cache.reset()
        cache.set_prefix_length(0, T)
        nat.attention(cache, 0, q, k, k, [0], pos, scale=D ** -0.5)

    run()
    return best_of(run, repeat) * 1e3


def gemv_bandwidth_gbs():
    a = np.ones((8192, 16384), np.float32)   # 512 MB
    x = np.ones(16384, np.float32)
    a @ x
    t = best_of(lambda: a @ x, 3)
    return a.nbytes / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    best = nat.cpu_features()["best"]
    default_levels = {"avx512": "avx512,avx2,scalar", "avx2": "avx2,scalar", "neon": "neon,scalar"}.get(best, "scalar")
    ap.add_argument("--levels", default=default_levels)
    ap.add_argument("--threads", type=int, default=nat.get_num_threads())
    ap.add_argument("--dtypes", default="f32,f16,int8")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    nat.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    bw = gemv_bandwidth_gbs()
    wbytes = DECODER_PARAMS * 2
    print(f"CPU best SIMD: {best}; threads: {args.threads}; clock: {args.clock}")
    print(f"decode weight streaming (PG1-3B decoder + LM head, {DECODER_PARAMS / 1e9:.2f} B params, bf16 "
          f"{wbytes / 1e9:.2f} GB): {wbytes / (bw * 1e9) * 1e3:.0f} ms at measured {bw:.1f} GB/s (numpy GEMV), "
          f"{wbytes / 28e9 * 1e3:.0f} ms at 28 GB/s\n")
    print(f"{'level':8} {'cache':5} | {'decode@300':>11} {'decode@1300':>12} (µs/token, 18 layers) | "
          f"{'prefill 262':>24} {'prefill 1030':>24} (ms/layer, ms x18, GFLOP/s)")
    for level in args.levels.split(","):
        nat.set_simd_level(level)
        for dtype in args.dtypes.split(","):
            d300, d1300 = decode_us(300, dtype, rng), decode_us(1300, dtype, rng)
            cells = []
            for T in (262, 1030):
                if level == "scalar" and T > 262:
                    cells.append(f"{'(skipped)':>24}")
                    continue
                ms = prefill_ms_per_layer(T, dtype, rng, repeat=1 if level == "scalar" else 3)
                gflops = 4 * T * T * H * D / (ms * 1e-3) / 1e9
                cells.append(f"{ms:8.2f} {ms * LAYERS:8.0f} {gflops:6.1f}")
            print(f"{level:8} {dtype:5} | {d300:11.0f} {d1300:12.0f}                       | {cells[0]} {cells[1]}")
            if level == "scalar":
                break   # the reference kernel: one dtype is enough
    nat.set_simd_level(best)


if __name__ == "__main__":
    main()
