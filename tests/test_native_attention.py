"""Native KV cache + attention (engine._native) against an independent numpy oracle.

The oracle below re-implements PALIGEMMA.md from scratch: RoPE (rotate_half, angles in fp32 as
transformers), prefix-LM mask, sliding window with the prefix exempt, GQA, scale, softcap before
the mask, softmax — in float64. Every SIMD level available on this CPU is compared with it and
with the scalar reference kernel.

Tolerances (max abs error, inputs ~N(0, 1), outputs O(1)):
  f32 cache: any level vs float64 oracle 2e-5; SIMD vs scalar kernel 1e-5.
  f16 cache: vs oracle 5e-3;  int8 cache: vs oracle 6e-2 (measured numbers: test_compact_cache_accuracy).
Threads 1 vs 2: bitwise identical.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import _native as nat

# amx runs the avx512 attention kernels (its tiles are for the int8 linear layers only)
LEVELS = ["scalar"] + {"amx": ["avx2", "avx512", "amx"], "avx512": ["avx2", "avx512"], "avx2": ["avx2"],
                       "neon": ["neon"]}.get(nat.cpu_features()["best"], [])
TOL_ORACLE = {"f32": 2e-5, "f16": 5e-3, "int8": 6e-2}
TOL_VS_SCALAR = {"f32": 1e-5, "f16": 1e-5, "int8": 1e-5}
# At the amx level, prefill tiles on f16 / int8 caches multiply in bf16 on AMX tiles
# (csrc/attention_amx.cpp): q, k, p and v keep 8 mantissa bits, sums stay fp32. Bound on
# max |native - scalar| / max |scalar| (measured 3.4e-3 to 6.6e-3 on these cases, qscale 2:
# scores of +-20 before the softcap, where bf16's 2^-9 relative rounding moves a probability by
# up to ~1%).
TOL_BF16_REL = 1.5e-2


def close_to_scalar(out, ref, level, dtype):
    err = float(np.abs(out - ref).max())
    if level == "amx" and dtype != "f32":
        return err <= TOL_BF16_REL * float(np.abs(ref).max())
    return err < TOL_VS_SCALAR[dtype]


@pytest.fixture(autouse=True)
def _restore_native_state():
    level, threads = nat.simd_level(), nat.get_num_threads()
    yield
    nat.set_simd_level(level)
    nat.set_num_threads(threads)


# ---------------------------------------------------------------- numpy oracle
def rope_np(x, pos, theta):
    """x [M, heads, D] float32, pos [M] ints -> rotated, float64. Angles in fp32 like transformers.
    The power is taken in float64 and rounded to fp32, as the core does: numpy's float32 power is
    not correctly rounded and differs between its SIMD paths (its AVX-512 one by an ulp), which
    at position 1e5 moves the angles by ~1e-3 rad."""
    x = x.astype(np.float64)
    if theta <= 0:
        return x
    D = x.shape[-1]
    half = D // 2
    power = np.float64(theta) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)).astype(np.float64)
    inv = np.float32(1.0) / power.astype(np.float32)
    ang = (np.asarray(pos).astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]).astype(np.float64)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend_np(q, K, V, qidx, prefix, scale, softcap=0.0, window=0):
    """q [T, H, D] rotated; K, V [L, KV, D] rotated keys / values of the whole slot; qidx [T] cache
    indices of the queries. Returns [T, H*D] float64."""
    T, H, D = q.shape
    L, KV, _ = K.shape
    G = H // KV
    Kh = np.repeat(K, G, axis=1)                       # [L, H, D]: head h uses kv head h // G
    Vh = np.repeat(V, G, axis=1)
    s = np.einsum("thd,lhd->htl", q, Kh) * scale       # [H, T, L]
    if softcap and softcap > 0:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(L)[None, :]
    j = np.asarray(qidx)[:, None]
    causal = (i <= j) & ((window <= 0) | (j - i < window))
    vis = causal | ((i < prefix) & (j < prefix))
    s = np.where(vis[None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("htl,lhd->thd", p, Vh)
    return out.reshape(T, H * D)


class Sim:
    """A native cache plus the numpy history of every slot (un-rotated k, v, positions)."""

    def __init__(self, layers, kv, D, slots, cap, dtype="f32", block=32):
        self.cache = nat.KVCache(layers, kv, D, slots, cap, dtype, block)
        self.kv, self.D = kv, D
        self.hist = [[{"k": [], "v": [], "pos": []} for _ in range(slots)] for _ in range(layers)]
        self.prefix = [0] * slots

    def step(self, layer, q, k, v, slots, positions, oracle=True, **kw):
        """q [N*T, H, D]; returns (native out, oracle out or None)."""
        out = nat.attention(self.cache, layer, q, k, v, slots, positions, **kw)
        N = len(slots)
        T = q.shape[0] // N
        theta = kw.get("rope_theta", 10000.0)
        ref = np.zeros(out.shape, np.float64) if oracle else None
        for n, s in enumerate(slots):
            rows = slice(n * T, (n + 1) * T)
            h = self.hist[layer][s]
            h["k"].append(k[rows]); h["v"].append(v[rows]); h["pos"].append(np.asarray(positions)[rows])
            if oracle:
                K = rope_np(np.concatenate(h["k"]), np.concatenate(h["pos"]), theta)
                V = np.concatenate(h["v"]).astype(np.float64)
                L = K.shape[0]
                qr = rope_np(q[rows], np.asarray(positions)[rows], theta)
                ref[rows] = attend_np(qr, K, V, np.arange(L - T, L), self.prefix[s], kw["scale"],
                                      kw.get("softcap") or 0.0, kw.get("window") or 0)
        return out, ref

    def set_prefix(self, slot, n):
        self.cache.set_prefix_length(slot, n)
        self.prefix[slot] = n


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def run_scenario(level, *, D, KV, G, prompts, prefixes, decode_steps, softcap=0.0, window=0, dtype="f32",
                 layers=1, qscale=1.0, seed=0, threads=None, theta=10000.0, pos0=0, block=32):
    """Prefill each slot with its own prompt (one call per slot), then `decode_steps` batched
    decode calls over all slots. Returns list of (native, oracle) pairs."""
    nat.set_simd_level(level)
    if threads:
        nat.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    H = KV * G
    S = len(prompts)
    cap = max(prompts) + decode_steps
    sim = Sim(layers, KV, D, S, cap, dtype, block)
    kw = dict(scale=1.0 / np.sqrt(D), softcap=softcap or None, window=window or None, rope_theta=theta)
    results = []
    for s, (T, P) in enumerate(zip(prompts, prefixes)):
        sim.set_prefix(s, P)
        pos = np.arange(T) + pos0
        for layer in range(layers):
            q, k, v = randn(rng, T, H, D, scale=qscale), randn(rng, T, KV, D), randn(rng, T, KV, D)
            results.append(sim.step(layer, q, k, v, [s], pos, **kw))
    for _ in range(decode_steps):
        slots = list(range(S))
        pos = np.array([sim.cache.length(s) + pos0 for s in slots])
        for layer in range(layers):
            q, k, v = randn(rng, S, H, D, scale=qscale), randn(rng, S, KV, D), randn(rng, S, KV, D)
            results.append(sim.step(layer, q, k, v, slots, pos, **kw))
    return results


def max_err(results):
    return max(float(np.abs(o - r).max()) for o, r in results)


# ---------------------------------------------------------------- correctness vs oracle
SHAPES = [  # (D, KV, G): PG1-3B, PG2-3B, PG2-28B-like, SigLIP-like, odd dims
    (256, 1, 8), (256, 4, 2), (128, 16, 2), (72, 16, 1), (72, 4, 8), (20, 2, 2), (6, 1, 1), (36, 1, 4)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("D,KV,G", SHAPES)
def test_prefill_decode_vs_oracle(level, D, KV, G):
    # 3 slots at different lengths (13, 7, 1) with prefix lengths 5, 7 (= all), 1; 3 decode steps.
    res = run_scenario(level, D=D, KV=KV, G=G, prompts=[13, 7, 1], prefixes=[5, 7, 1], decode_steps=3,
                       layers=2, qscale=2.0)
    assert max_err(res) < TOL_ORACLE["f32"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("T", [1, 7, 13, 33, 257])
@pytest.mark.parametrize("prefix", ["one", "all"])
def test_sequence_lengths(level, T, prefix):
    P = 1 if prefix == "one" else T
    res = run_scenario(level, D=128, KV=2, G=4, prompts=[T], prefixes=[P], decode_steps=2, qscale=3.0, seed=T)
    assert max_err(res) < TOL_ORACLE["f32"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_sliding_window_with_prefix_exemption(level, softcap):
    # window 8 < prompt 45; prefix 30 is bidirectional regardless of distance; suffix queries
    # (15 prompt tokens + 6 decode steps) see only the last 8 keys, prefix ones included.
    res = run_scenario(level, D=64, KV=2, G=2, prompts=[45, 12], prefixes=[30, 3], decode_steps=6, window=8,
                       softcap=softcap, qscale=4.0, block=8)
    assert max_err(res) < TOL_ORACLE["f32"]


@pytest.mark.parametrize("level", LEVELS)
def test_softcap_changes_result_and_matches(level):
    a = run_scenario(level, D=256, KV=1, G=8, prompts=[40], prefixes=[20], decode_steps=2, softcap=5.0,
                     qscale=6.0, seed=3)
    b = run_scenario(level, D=256, KV=1, G=8, prompts=[40], prefixes=[20], decode_steps=2, softcap=0.0,
                     qscale=6.0, seed=3)
    assert max_err(a) < TOL_ORACLE["f32"] and max_err(b) < TOL_ORACLE["f32"]
    assert np.abs(a[0][0] - b[0][0]).max() > 1e-2   # the softcap really is applied


@pytest.mark.parametrize("level", LEVELS)
def test_siglip_shaped_no_rope_bidirectional(level):
    # head_dim 72 (multiple of 8, not 16), 16 heads, no RoPE, fully bidirectional: prefix = T.
    res = run_scenario(level, D=72, KV=16, G=1, prompts=[257], prefixes=[257], decode_steps=0, theta=0.0)
    assert max_err(res) < TOL_ORACLE["f32"]


def test_position_origin_does_not_matter():
    a = run_scenario("scalar", D=32, KV=1, G=2, prompts=[9], prefixes=[4], decode_steps=2, pos0=0)
    b = run_scenario("scalar", D=32, KV=1, G=2, prompts=[9], prefixes=[4], decode_steps=2, pos0=1)
    for (oa, _), (ob, _) in zip(a, b):
        np.testing.assert_allclose(oa, ob, atol=1e-5)


# ---------------------------------------------------------------- SIMD vs scalar, threads
@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
@pytest.mark.parametrize("D,KV,G", [(256, 1, 8), (72, 4, 2), (20, 1, 3)])
def test_every_level_matches_scalar(dtype, D, KV, G):
    args = dict(D=D, KV=KV, G=G, prompts=[33, 5], prefixes=[17, 5], decode_steps=3, dtype=dtype, softcap=8.0,
                window=10, qscale=2.0)
    ref = run_scenario("scalar", **args)
    for level in LEVELS[1:]:
        res = run_scenario(level, **args)
        for (o, _), (r, _) in zip(res, ref):
            assert close_to_scalar(o, r, level, dtype), level


@pytest.mark.parametrize("level", LEVELS)
def test_threads_1_vs_2_identical(level):
    args = dict(D=256, KV=1, G=8, prompts=[70, 3], prefixes=[50, 2], decode_steps=3, softcap=10.0, window=30)
    one = run_scenario(level, threads=1, **args)
    two = run_scenario(level, threads=2, **args)
    for (a, _), (b, _) in zip(one, two):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- prefill tile kernel: odd shapes
# Calls with T * G >= 24 query rows per kv head take the packed-key tile kernel (6-row register
# tiles, 16 / 32 keys or head dims per tile, ~48 rows per task); fewer rows take the blocked
# decode kernel. These shapes straddle every tile edge; each SIMD level is compared with the
# scalar reference (1e-5) and, for f32, with the float64 oracle.
TILE_CASES = [  # D, KV, G, T, prefix, window, softcap, dtype
    (256, 4, 2, 260, 260, 0, 50.0, "f32"),    # PaliGemma 2 at 224 px: whole prompt = prefix block
    (256, 4, 2, 37, 0, 0, 0.0, "f32"),        # causal only (prefix 0), T not a multiple of the tile
    (256, 1, 8, 29, 11, 0, 50.0, "f16"),      # GQA 8 (PaliGemma 1), partial prefix
    (256, 2, 1, 1, 1, 0, 50.0, "f32"),        # T = 1 (decode kernel)
    (64, 8, 1, 25, 25, 0, 5.0, "f32"),        # GQA 1, head_dim 64, full prefix
    (64, 1, 8, 3, 2, 0, 0.0, "f32"),          # 24 rows: the smallest tile call; 3 tokens per task
    (72, 2, 1, 61, 30, 16, 0.0, "int8"),      # head_dim 72 (chunk tail), window < T
    (72, 4, 2, 100, 40, 9, 30.0, "f32"),      # window much smaller than T, softcap
    (64, 2, 2, 300, 20, 40, 50.0, "f32"),     # long causal part, window 40: key chunks skipped
    (20, 2, 2, 45, 7, 5, 0.0, "f16"),         # head_dim 20: a partial vector in every chunk
    (36, 1, 8, 50, 0, 0, 20.0, "int8"),       # GQA 8, causal, head_dim 36
]


@pytest.mark.parametrize("D,KV,G,T,P,window,softcap,dtype", TILE_CASES)
def test_prefill_tiles_every_level_matches_scalar(D, KV, G, T, P, window, softcap, dtype):
    # Two slots: the tested prompt and one of another length; then decode steps over both.
    args = dict(D=D, KV=KV, G=G, prompts=[T, T // 2 + 3], prefixes=[P, min(P, T // 2 + 3)], decode_steps=2,
                dtype=dtype, softcap=softcap, window=window, qscale=2.0, seed=D + T)
    ref = run_scenario("scalar", **args)
    if dtype == "f32":
        assert max_err(ref) < TOL_ORACLE["f32"]
    for level in LEVELS[1:]:
        res = run_scenario(level, **args)
        for (o, _), (r, _) in zip(res, ref):
            assert close_to_scalar(o, r, level, dtype), level
        if dtype == "f32":
            assert max_err(res) < TOL_ORACLE["f32"], level


def _chunked_batched(level, dtype, seed=0):
    """Prefill the prefix blocks of 3 slots (one call each), then two batched multi-token calls over
    all slots (so queries start after cached keys, k0 > 0 with the window), then a decode step."""
    nat.set_simd_level(level)
    rng = np.random.default_rng(seed)
    D, KV, G = 64, 2, 4
    H = KV * G
    sim = Sim(1, KV, D, 3, 120, dtype, 16)
    kw = dict(scale=D ** -0.5, softcap=20.0, window=12)
    results = []
    for s, P in enumerate([17, 30, 1]):
        sim.set_prefix(s, P)
        results.append(sim.step(0, randn(rng, P, H, D), randn(rng, P, KV, D), randn(rng, P, KV, D), [s],
                                np.arange(P), **kw))
    for T in (13, 7, 1):
        slots = [0, 1, 2]
        pos = np.concatenate([np.arange(T) + sim.cache.length(s) for s in slots])
        M = 3 * T
        results.append(sim.step(0, randn(rng, M, H, D, scale=2.0), randn(rng, M, KV, D), randn(rng, M, KV, D),
                                slots, pos, **kw))
    return results


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8"])
def test_prefill_tiles_chunked_and_batched(dtype):
    ref = _chunked_batched("scalar", dtype)
    if dtype == "f32":
        assert max_err(ref) < TOL_ORACLE["f32"]
    for level in LEVELS[1:]:
        res = _chunked_batched(level, dtype)
        for (o, _), (r, _) in zip(res, ref):
            assert close_to_scalar(o, r, level, dtype), level


@pytest.mark.parametrize("level", LEVELS)
def test_prefill_tiles_threads_identical(level):
    args = dict(D=72, KV=2, G=4, prompts=[150, 31], prefixes=[70, 0], decode_steps=1, softcap=50.0, window=40)
    one = run_scenario(level, threads=1, **args)
    three = run_scenario(level, threads=3, **args)
    for (a, _), (b, _) in zip(one, three):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- RoPE tables
def rope_f32(x, pos, theta):
    """RoPE as the native core computes it: fp32 angles, cos / sin in float64 rounded to fp32, the
    rotation in fp32 (x [M, heads, D] float32)."""
    D = x.shape[-1]
    half = D // 2
    inv = (np.float32(1.0) / (np.float64(theta) ** (np.arange(0, D, 2) / np.float32(D)).astype(np.float32)
                              .astype(np.float64)).astype(np.float32))
    ang = np.asarray(pos).astype(np.float32)[:, None] * inv[None, :]
    cos = np.cos(ang.astype(np.float64)).astype(np.float32)[:, None, :]
    sin = np.sin(ang.astype(np.float64)).astype(np.float32)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("pos0", [0, 7, 100000])   # inside the cache's table, past it (computed rows)
def test_rope_tables_match_direct_computation(pos0):
    rng = np.random.default_rng(pos0)
    D, KV, T = 64, 2, 40
    c = nat.KVCache(1, KV, D, 1, T + 1)
    k = randn(rng, T, KV, D)
    nat.attention(c, 0, randn(rng, T, 2, D), k, k, [0], np.arange(T) + pos0, scale=0.1)
    K, V = c.read(0, 0)
    np.testing.assert_allclose(K.transpose(1, 0, 2), rope_f32(k, np.arange(T) + pos0, 10000.0), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(V.transpose(1, 0, 2), k)
    # decode past the prefilled positions grows the table; the result still matches the oracle
    sim = Sim(1, KV, D, 1, T + 3)
    for step, n in enumerate([T, 1, 1, 1]):
        p0 = 0 if step == 0 else T + step - 1
        q, kk, vv = randn(rng, n, 4, D), randn(rng, n, KV, D), randn(rng, n, KV, D)
        out, ref = sim.step(0, q, kk, vv, [0], np.arange(n) + p0 + pos0, scale=0.1)
        np.testing.assert_allclose(out, ref, atol=TOL_ORACLE["f32"])


@pytest.mark.parametrize("level", LEVELS)
def test_rope_two_thetas_in_one_cache(level):
    # Layers with different rope_theta share one cache (one table per theta); both match the oracle.
    nat.set_simd_level(level)
    rng = np.random.default_rng(3)
    sim = Sim(2, 1, 32, 1, 40)
    for n, p0 in ((30, 0), (1, 30), (1, 31)):
        for layer, theta in ((0, 10000.0), (1, 500.0)):
            q, k, v = randn(rng, n, 2, 32), randn(rng, n, 1, 32), randn(rng, n, 1, 32)
            out, ref = sim.step(layer, q, k, v, [0], np.arange(n) + p0, scale=0.2, rope_theta=theta)
            np.testing.assert_allclose(out, ref, atol=TOL_ORACLE["f32"])


# ---------------------------------------------------------------- compact caches
def test_compact_cache_accuracy(capsys):
    """f16 / int8 cache error vs the float64 oracle, PG1-like shapes, 300-token prompt + decode, with
    fp32 products (the best level below amx); at the amx level the prefill's bf16 products too."""
    fp32_level = "avx512" if LEVELS[-1] == "amx" else LEVELS[-1]
    cases = [(fp32_level, d) for d in ("f32", "f16", "int8")] + ([("amx", "f16"), ("amx", "int8")] if "amx" in LEVELS else [])
    errs = {}
    for level, dtype in cases:
        res = run_scenario(level, D=256, KV=1, G=8, prompts=[300], prefixes=[260], decode_steps=4,
                           dtype=dtype, qscale=2.0)
        rel = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in res)
        errs[(level, dtype)] = (max_err(res), rel)
        if level == fp32_level:
            assert errs[(level, dtype)][0] < TOL_ORACLE[dtype], (dtype, errs[(level, dtype)])
        else:   # the storage's own error plus bf16's
            assert rel < errs[(fp32_level, dtype)][1] + TOL_BF16_REL / 2, (level, dtype, errs[(level, dtype)])
    with capsys.disabled():
        print("\nKV cache accuracy (max abs err, max err / max |out|) vs float64 oracle: " +
              ", ".join(f"{d} ({lv}): {a:.2e} / {r:.2e}" for (lv, d), (a, r) in errs.items()))
    assert errs[(fp32_level, "f16")][0] < errs[(fp32_level, "int8")][0]


def test_f16_storage_is_round_to_nearest_even():
    c = nat.KVCache(1, 1, 8, 1, 4, "f16")
    vals = np.array([[1.0, -2.5, 65504.0, 1e-7, 6.0e-8, 3.0e-5, 65519.0, -0.0]], np.float32)
    k = np.concatenate([vals, vals * 0.3337, vals * 1.0001, vals * -7.77]).astype(np.float32)[:, None, :]
    nat.attention(c, 0, np.zeros((4, 1, 8), np.float32), k, k, [0], np.arange(4), scale=1.0, rope_theta=0)
    K, V = c.read(0, 0)
    with np.errstate(over="ignore"):
        expect = k[:, 0, :].astype(np.float16).astype(np.float32)   # includes overflow to inf
    np.testing.assert_array_equal(K[0], expect)
    np.testing.assert_array_equal(V[0], expect)


def test_int8_storage_per_token_scale():
    c = nat.KVCache(1, 2, 16, 1, 4, "int8")
    rng = np.random.default_rng(1)
    k = randn(rng, 3, 2, 16, scale=5.0)
    nat.attention(c, 0, randn(rng, 3, 2, 16), k, k, [0], np.arange(3), scale=0.25, rope_theta=0)
    K, _ = c.read(0, 0)
    amax = np.abs(k).max(-1).transpose(1, 0)[..., None]       # [KV, T, 1]
    assert np.all(np.abs(K - k.transpose(1, 0, 2)) <= amax / 254 * 1.0001)


# ---------------------------------------------------------------- cache bookkeeping
def test_capacity_overflow_raises_and_cache_intact():
    rng = np.random.default_rng(0)
    c = nat.KVCache(1, 1, 16, 2, 10, "f32", 4)
    kw = dict(scale=0.25)
    c.set_prefix_length(0, 3)
    nat.attention(c, 0, randn(rng, 8, 2, 16), randn(rng, 8, 1, 16), randn(rng, 8, 1, 16), [0], np.arange(8), **kw)
    nat.attention(c, 0, randn(rng, 2, 2, 16), randn(rng, 2, 1, 16), randn(rng, 2, 1, 16), [1], np.arange(2), **kw)
    before = c.read(0, 0), c.read(0, 1)
    with pytest.raises(IndexError, match="capacity"):   # 8 + 3 > 10
        nat.attention(c, 0, randn(rng, 3, 2, 16), randn(rng, 3, 1, 16), randn(rng, 3, 1, 16), [0],
                      np.arange(8, 11), **kw)
    with pytest.raises(IndexError, match="capacity"):   # slot 1 fits, slot 0 doesn't: nothing written
        nat.attention(c, 0, randn(rng, 6, 2, 16), randn(rng, 6, 1, 16), randn(rng, 6, 1, 16), [1, 0],
                      np.arange(6), **kw)
    assert (c.length(0), c.length(1)) == (8, 2)
    for (k0, v0), (k1, v1) in zip(before, (c.read(0, 0), c.read(0, 1))):
        np.testing.assert_array_equal(k0, k1)
        np.testing.assert_array_equal(v0, v1)
    # still usable up to exactly the capacity
    nat.attention(c, 0, randn(rng, 2, 2, 16), randn(rng, 2, 1, 16), randn(rng, 2, 1, 16), [0], [8, 9], **kw)
    assert c.length(0) == 10 == c.capacity()


def test_copy_on_write_fork():
    rng = np.random.default_rng(0)
    sim = Sim(2, 1, 32, 3, 64, "f32", 8)
    kw = dict(scale=0.2)
    sim.set_prefix(0, 6)
    for layer in range(2):
        sim.step(layer, randn(rng, 13, 2, 32), randn(rng, 13, 1, 32), randn(rng, 13, 1, 32), [0], np.arange(13),
                 oracle=False, **kw)
    used = sim.cache.blocks_in_use(0)
    src_k = [sim.cache.read(layer, 0) for layer in range(2)]
    sim.cache.copy_slot(0, 2)
    assert sim.cache.blocks_in_use(0) == used                 # a fork copies no blocks
    assert sim.cache.length(2) == 13 and sim.cache.prefix_length(2) == 6
    for layer in range(2):                                   # decode into the fork only
        k = randn(rng, 1, 1, 32)
        out, _ = sim.step(layer, randn(rng, 1, 2, 32), k, k, [2], [13], oracle=False, **kw)
    assert sim.cache.blocks_in_use(0) == used + 1             # only the partial last block was copied
    for layer in range(2):
        k0, v0 = sim.cache.read(layer, 0)
        np.testing.assert_array_equal(k0, src_k[layer][0])   # the source is unchanged
        k2, _ = sim.cache.read(layer, 2)
        np.testing.assert_array_equal(k2[:, :13], k0)
    # truncate the fork back to the shared 13 tokens, then one batched decode step over slots 0
    # and 2 (both write into the same shared block -> each gets its own copy) vs the oracle
    sim.cache.set_length(2, 13)
    for layer in range(2):
        sim.hist[layer][2] = {key: list(val) for key, val in sim.hist[layer][0].items()}
    sim.prefix[2] = 6
    for layer in range(2):
        q, k, v = randn(rng, 2, 2, 32), randn(rng, 2, 1, 32), randn(rng, 2, 1, 32)
        out, ref = sim.step(layer, q, k, v, [0, 2], [13, 13], **kw)
        np.testing.assert_allclose(out, ref, atol=TOL_ORACLE["f32"])


def test_reorder_reads_all_sources_first():
    rng = np.random.default_rng(5)
    for level in LEVELS:
        nat.set_simd_level(level)
        sim = Sim(1, 2, 16, 4, 32, "f32", 4)
        kw = dict(scale=0.25, softcap=20.0)
        lens = [5, 9, 3, 6]
        for s, T in enumerate(lens):
            sim.set_prefix(s, min(2 + s, T))
            sim.step(0, randn(rng, T, 4, 16), randn(rng, T, 2, 16), randn(rng, T, 2, 16), [s], np.arange(T),
                     oracle=False, **kw)
        before = [sim.cache.read(0, s) for s in range(4)]
        perm = [1, 0, 0]                                      # slot 3 untouched
        sim.cache.reorder(perm)
        sim.hist[0][:3] = [{k: list(v) for k, v in sim.hist[0][p].items()} for p in perm]
        sim.prefix[:3] = [sim.prefix[p] for p in perm]
        for d, src in enumerate(perm + [3]):
            k, v = sim.cache.read(0, d)
            np.testing.assert_array_equal(k, before[src][0])
            assert sim.cache.length(d) == lens[src] and sim.cache.prefix_length(d) == min(2 + src, lens[src])
        slots = [0, 1, 2, 3]
        pos = np.array([sim.cache.length(s) for s in slots])
        out, ref = sim.step(0, randn(rng, 4, 4, 16), randn(rng, 4, 2, 16), randn(rng, 4, 2, 16), slots, pos, **kw)
        np.testing.assert_allclose(out, ref, atol=TOL_ORACLE["f32"])
        # the two copies of old slot 0 diverged without touching each other
        assert not np.array_equal(sim.cache.read(0, 1)[0], sim.cache.read(0, 2)[0])


def test_reset_and_lengths():
    c = nat.KVCache(2, 1, 8, 2, 16)
    rng = np.random.default_rng(0)
    for layer in range(2):
        nat.attention(c, layer, randn(rng, 4, 1, 8), randn(rng, 4, 1, 8), randn(rng, 4, 1, 8), [1], np.arange(4),
                      scale=1.0)
        assert c.layer_length(layer, 1) == 4
    assert c.length(1) == 4 and c.length(0) == 0
    with pytest.raises(IndexError, match="truncate"):
        c.set_length(1, 5)
    c.set_length(1, 2)
    assert c.length(1) == 2 and c.blocks_in_use(0) == 1
    c.reset()
    assert c.length(1) == 0 and c.blocks_in_use(0) == 0 and c.blocks_in_use(1) == 0


# ---------------------------------------------------------------- validation
def test_errors_are_clear():
    c = nat.KVCache(2, 2, 8, 2, 16)
    z = lambda *s: np.zeros(s, np.float32)   # noqa: E731
    kw = dict(scale=0.3)
    with pytest.raises(ValueError, match="float32"):
        nat.attention(c, 0, z(1, 2, 8).astype(np.float64), z(1, 2, 8), z(1, 2, 8), [0], [0], **kw)
    with pytest.raises(ValueError, match="C-contiguous"):
        nat.attention(c, 0, z(1, 8, 2).transpose(0, 2, 1), z(1, 2, 8), z(1, 2, 8), [0], [0], **kw)
    with pytest.raises(ValueError, match="head_dim"):
        nat.attention(c, 0, z(1, 2, 7), z(1, 2, 8), z(1, 2, 8), [0], [0], **kw)
    with pytest.raises(ValueError, match="multiple"):
        nat.attention(c, 0, z(1, 3, 8), z(1, 2, 8), z(1, 2, 8), [0], [0], **kw)
    with pytest.raises(ValueError, match="positions"):
        nat.attention(c, 0, z(2, 2, 8), z(2, 2, 8), z(2, 2, 8), [0], [0], **kw)
    with pytest.raises(ValueError, match="twice"):
        nat.attention(c, 0, z(2, 2, 8), z(2, 2, 8), z(2, 2, 8), [0, 0], [0, 0], **kw)
    with pytest.raises(IndexError, match="slot 5"):
        nat.attention(c, 0, z(1, 2, 8), z(1, 2, 8), z(1, 2, 8), [5], [0], **kw)
    with pytest.raises(IndexError, match="layer 2"):
        nat.attention(c, 2, z(1, 2, 8), z(1, 2, 8), z(1, 2, 8), [0], [0], **kw)
    with pytest.raises(ValueError, match="scale"):
        nat.attention(c, 0, z(1, 2, 8), z(1, 2, 8), z(1, 2, 8), [0], [0], scale=0.0)
    with pytest.raises(RuntimeError, match="layers in order"):   # std::logic_error
        nat.attention(c, 1, z(1, 2, 8), z(1, 2, 8), z(1, 2, 8), [0], [0], **kw)
    c.set_prefix_length(1, 4)
    with pytest.raises(RuntimeError, match="whole prefix"):
        nat.attention(c, 0, z(2, 2, 8), z(2, 2, 8), z(2, 2, 8), [1], [0, 1], **kw)
    assert c.layer_length(0, 0) == 0 and c.layer_length(0, 1) == 0 and c.blocks_in_use(0) == 0
    with pytest.raises(IndexError):
        c.copy_slot(0, 2)
    with pytest.raises(IndexError):
        c.reorder([0, 1, 0])
    with pytest.raises(ValueError, match="dtype"):
        nat.KVCache(1, 1, 8, 1, 8, "bf16")
    with pytest.raises(ValueError, match="even head_dim"):
        nat.attention(nat.KVCache(1, 1, 7, 1, 4), 0, z(1, 1, 7), z(1, 1, 7), z(1, 1, 7), [0], [0], **kw)
    with pytest.raises(ValueError):
        nat.set_num_threads(0)


def _attend_in_child(queue):
    c = nat.KVCache(1, 1, 16, 1, 8)
    x = np.ones((4, 2, 16), np.float32)
    out = nat.attention(c, 0, x, x[:, :1].copy(), x[:, :1].copy(), [0], np.arange(4), scale=0.25)
    queue.put(float(out.sum()))


def test_thread_pool_survives_fork():
    import multiprocessing as mp
    nat.set_num_threads(2)
    run_scenario(LEVELS[-1], D=16, KV=1, G=2, prompts=[40], prefixes=[40], decode_steps=1)   # pool started
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_attend_in_child, args=(q,))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
    assert p.exitcode == 0, "attention hung or failed in a forked child"
    assert q.get(timeout=5) == pytest.approx(4 * 2 * 16)
