"""The decode loop's own cost per step, without a model.

step_fn returns precomputed logits [n, vocab] (no model work, no copies), so what remains is the
loop: token selection on the full vocabulary (argmax / softmax / top-k / top-p / repetition
penalty), beam bookkeeping, GIL hand-offs, the numpy wrapping of each step's inputs and outputs,
and the stream callback. _native.last_generate_stats() splits the time spent inside step_fn
from the rest; this reports the rest per step and as a share of a 3B decode step (100-300 ms).

    python benchmarks/loop_overhead_bench.py [--vocab 257216] [--steps 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from engine import _native

DECODE_STEP_MS = (100.0, 300.0)   # PaliGemma 3B decode step on CPU, for the percentages


def make_logits(rng, rows: int, vocab: int, peaked: bool) -> np.ndarray:
    """LM-like rows: a normal background, plus (peaked) a few dominant tokens so the nucleus
    holds a handful of tokens; without the peak the mass is spread over thousands of tokens
    (the slow case for top-p)."""
    x = rng.standard_normal((rows, vocab), dtype=np.float32) * 2.0
    if peaked:
        for r in range(rows):
            top = rng.choice(vocab, 20, replace=False)
            x[r, top] += rng.uniform(8.0, 14.0, 20).astype(np.float32)
    return x


def bench(name, logits, *, batch=1, steps=64, repeat=3, stream=False, **kw):
    vocab = logits.shape[1]
    num_beams = kw.get("num_beams", 1)
    rows = batch * num_beams
    pool = [np.ascontiguousarray(np.roll(logits, i, axis=0)[:rows]) for i in range(4)]
    for p in pool:
        assert p.shape[0] == rows
    counter = [0]

    def step(tokens, positions, slots):
        counter[0] += 1
        out = pool[counter[0] % len(pool)]
        return out if len(tokens) == rows else out[: len(tokens)]

    cache = _native.KVCache(2, 1, 8, rows, steps + 8, "f32", 16)
    first = np.ascontiguousarray(logits[:batch])
    best = None
    for _ in range(repeat):
        cache.reset()
        t0, c0 = time.perf_counter(), time.thread_time()
        _native.generate(step, cache, first, [[2, 5, 6]] * batch, [3] * batch, list(range(batch)),
                         max_new_tokens=steps, eos_token_ids=[],
                         stream=(lambda b, t: None) if stream else None, **kw)
        cpu = time.thread_time() - c0   # this thread's CPU: immune to a busy machine
        s = _native.last_generate_stats()
        selections = s["steps"] + 1                        # token selections (first from prefill)
        per_step = s["loop_s"] / selections
        cpu_step = (cpu - s["step_fn_s"]) / selections   # step_fn does no work here: ~its wall time
        if best is None or cpu_step < best[1]:
            best = (per_step, cpu_step, s)
    per_step, cpu_step, s = best
    ms, cpu_ms = per_step * 1e3, cpu_step * 1e3
    glue_ms = (s["step_s"] - s["step_fn_s"]) / max(s["steps"], 1) * 1e3
    print(f"{name:<36} {ms:7.3f} {cpu_ms:7.3f} {glue_ms:7.3f}   "
          f"{100 * cpu_ms / DECODE_STEP_MS[1]:5.2f}% - {100 * cpu_ms / DECODE_STEP_MS[0]:5.2f}%")
    return cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=257216)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    peaked = make_logits(rng, 4, args.vocab, peaked=True)
    flat = make_logits(rng, 4, args.vocab, peaked=False)
    common = dict(steps=args.steps, repeat=args.repeat)

    print(f"vocab {args.vocab}, {args.steps} steps, best of {args.repeat}. Per step, everything but "
          f"step_fn: wall ms (loop_s), thread CPU ms, of which binding glue (GIL, arrays); share of "
          f"a {DECODE_STEP_MS[0]:.0f}-{DECODE_STEP_MS[1]:.0f} ms decode step (CPU)")
    print(f"{'':<36} {'wall':>7} {'cpu':>7} {'glue':>7}")
    bench("greedy", peaked, **common)
    bench("greedy + stream callback", peaked, stream=True, **common)
    bench("greedy + repetition_penalty 1.2", peaked, repetition_penalty=1.2, **common)
    bench("greedy, batch 4", peaked, batch=4, **common)
    bench("sample (temperature 0.8)", peaked, do_sample=True, temperature=0.8, **common)
    bench("sample top_k 50", peaked, do_sample=True, top_k=50, **common)
    bench("sample top_p 0.9 (peaked)", peaked, do_sample=True, top_p=0.9, **common)
    bench("sample top_p 0.9 (flat, worst case)", flat, do_sample=True, top_p=0.9, **common)
    bench("beam search, 3 beams", peaked, num_beams=3, **common)
    bench("beam search, 3 beams + rep. penalty", peaked, num_beams=3, repetition_penalty=1.2, **common)


if __name__ == "__main__":
    main()
