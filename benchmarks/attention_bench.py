"""Attention micro-benchmark of the native core: decode and prefill per SIMD path and KV dtype.

Shapes (--model):
  gemma2 (default): PaliGemma 2 3B's Gemma2-2B decoder: 8 q heads, 4 kv heads (GQA), head_dim 256,
                    26 layers, attention logit softcap 50, sliding window 4096 (inactive below 4096).
  pg1:              PaliGemma-1 3B: 8 q heads, 1 kv head, head_dim 256, 18 layers, no softcap.
  siglip:           the native vision tower's attention (SigLIP So400m): 16 heads of 72, 27
                    layers, no RoPE; prefill of 256 / 1024 patches (224 / 448 px); the tower
                    never decodes, so run it with --modes prefill.

  decode:  one new token attending to 300 / 1300 cached tokens, all layers, in µs per token
           (Python call overhead included).
  prefill: 260 / 1030-token prompts (a 224 / 448 px image prompt; the whole prompt is the
           bidirectional prefix block), ms per layer, ms for all layers, and GFLOP/s counting
           4 * T * T * H * D flops per layer (QK^T and PV over the full T x T prefix block).

Every figure is printed with the CPU model (/proc/cpuinfo) and engine.cpu_features().

python benchmarks/attention_bench.py [--model gemma2|pg1] [--levels avx2,scalar] [--threads 2]
       [--dtypes f32,f16,int8] [--modes decode,prefill] [--clock wall|cpu] [--repeat 5] [--json out.json]
--json writes every figure as a record that carries the CPU model and cpu_features too.
--clock cpu measures process CPU time instead of wall time: robust on a shared, loaded machine
(with --threads 1 it is the time the kernel takes when it has a core to itself).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from engine import _native as nat

MODELS = {  # layers, q heads, kv heads, head_dim, softcap, window
    "gemma2": dict(layers=26, H=8, KV=4, D=256, softcap=50.0, window=4096),
    "pg1": dict(layers=18, H=8, KV=1, D=256, softcap=None, window=None),
    # the vision tower's (csrc/vision_tower.cpp): 16 heads of 72, no RoPE, 256 / 1024 patches
    "siglip": dict(layers=27, H=16, KV=16, D=72, softcap=None, window=None, rope_theta=0.0, prefill_T=(256, 1024)),
}
PREFILL_T = (260, 1030)
DECODE_CTX = (300, 1300)

CLOCK = time.perf_counter


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def attn_kw(m):
    return dict(scale=m["D"] ** -0.5, softcap=m["softcap"], window=m["window"], rope_theta=m.get("rope_theta", 10000.0))


def decode_us(m, ctx, dtype, rng, steps=10, repeat=3):
    L, H, KV, D = m["layers"], m["H"], m["KV"], m["D"]
    cache = nat.KVCache(L, KV, D, 1, ctx + 8, dtype)
    cache.set_prefix_length(0, ctx)
    q = rng.standard_normal((ctx, H, D), dtype=np.float32)
    k = rng.standard_normal((ctx, KV, D), dtype=np.float32)
    for layer in range(L):
        nat.attention(cache, layer, q, k, k, [0], np.arange(ctx), **attn_kw(m))
    q1 = rng.standard_normal((1, H, D), dtype=np.float32)
    k1 = rng.standard_normal((1, KV, D), dtype=np.float32)
    pos = np.array([ctx])

    def one_token():
        for layer in range(L):
            nat.attention(cache, layer, q1, k1, k1, [0], pos, **attn_kw(m))
        cache.set_length(0, ctx)

    one_token()
    return best_of(lambda: [one_token() for _ in range(steps)], repeat) / steps * 1e6


def prefill_ms_per_layer(m, T, dtype, rng, repeat):
    H, KV, D = m["H"], m["KV"], m["D"]
    cache = nat.KVCache(1, KV, D, 1, T, dtype)
    q = rng.standard_normal((T, H, D), dtype=np.float32)
    k = rng.standard_normal((T, KV, D), dtype=np.float32)
    v = rng.standard_normal((T, KV, D), dtype=np.float32)
    pos = np.arange(T)

    def run():
        cache.reset()
        cache.set_prefix_length(0, T)
        nat.attention(cache, 0, q, k, v, [0], pos, **attn_kw(m))

    run()
    return best_of(run, repeat) * 1e3


def main():
    ap = argparse.ArgumentParser()
    best = nat.cpu_features()["best"]
    default_levels = {"avx512": "avx512,avx2,scalar", "avx2": "avx2,scalar", "neon": "neon,scalar"}.get(best, "scalar")
    ap.add_argument("--model", choices=sorted(MODELS), default="gemma2")
    ap.add_argument("--levels", default=default_levels)
    ap.add_argument("--threads", type=int, default=nat.get_num_threads())
    ap.add_argument("--dtypes", default="f32,f16,int8")
    ap.add_argument("--modes", default="decode,prefill")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--repeat", type=int, default=5, help="best of N prefill runs (scalar: 1)")
    ap.add_argument("--json", help="also write the figures here, one record each")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    nat.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    m = MODELS[args.model]
    prefill_T = m.get("prefill_T", PREFILL_T)
    modes = set(args.modes.split(","))
    feats = nat.cpu_features()

    cpu = cpu_model()
    records = []

    def record(**kw):
        records.append(dict(cpu=cpu, cpu_features=feats, model=args.model, threads=args.threads, clock=args.clock,
                            **kw))

    print(f"CPU: {cpu}; cpu_features: {feats}")
    print(f"model {args.model}: {m}; threads: {args.threads}; clock: {args.clock}")
    print(f"{'level':8} {'cache':5} | {'decode@300':>11} {'decode@1300':>12} (µs/token, {m['layers']} layers) | "
          + " ".join(f"{'prefill ' + str(T):>26}" for T in prefill_T) + f" (ms/layer, ms x{m['layers']}, GFLOP/s)")
    for level in args.levels.split(","):
        nat.set_simd_level(level)
        for dtype in args.dtypes.split(","):
            dec = ["-", "-"]
            if "decode" in modes:
                us = [decode_us(m, c, dtype, rng) for c in DECODE_CTX]
                dec = [f"{x:.0f}" for x in us]
                for c, x in zip(DECODE_CTX, us):
                    record(level=level, dtype=dtype, mode="decode", ctx=c, us_per_token=round(x, 1))
            cells = []
            for T in prefill_T:
                if "prefill" not in modes or (level == "scalar" and T > prefill_T[0]):
                    cells.append(f"{'(skipped)':>26}")
                    continue
                ms = prefill_ms_per_layer(m, T, dtype, rng, repeat=1 if level == "scalar" else args.repeat)
                gflops = 4 * T * T * m["H"] * m["D"] / (ms * 1e-3) / 1e9
                cells.append(f"{ms:8.2f} {ms * m['layers']:8.0f} {gflops:8.1f}")
                record(level=level, dtype=dtype, mode="prefill", T=T, ms_per_layer=round(ms, 3),
                       gflops=round(gflops, 2))
            print(f"{level:8} {dtype:5} | {dec[0]:>11} {dec[1]:>12}                        | " + " ".join(cells),
                  flush=True)
            if level == "scalar":
                break   # the reference kernel: one dtype is enough
    nat.set_simd_level(best)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
