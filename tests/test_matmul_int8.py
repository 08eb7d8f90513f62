"""engine._native.matmul_int8 (the int8 LM head over the embedding table) against its numpy twin,
on odd shapes, at every SIMD level this CPU has, on 1 and 3 threads; hand-computed cases; bad
input. The integer sums are exact, so every path must equal the twin to float rounding and the
SIMD paths must equal the scalar one bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from engine import _native as nat


def reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The numpy twin: per-row symmetric int8 quantization of x, exact int64 products."""
    x = x.astype(np.float32)
    a = np.abs(x).max(axis=1)                                   # [M]
    inv = np.where(a > 0, np.float32(127) / np.where(a > 0, a, 1), 0).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int64)
    acc = q @ codes.astype(np.int64).T                          # [M, V] exact
    qscale = (a / np.float32(127)).astype(np.float32)
    return acc.astype(np.float32) * (scales[None, :] * qscale[:, None])


def levels() -> list[str]:
    best = nat.cpu_features()["best"]
    return ["scalar"] + {"amx": ["avx2", "avx512", "amx"], "avx512": ["avx2", "avx512"], "avx2": ["avx2"],
                         "neon": ["neon"]}.get(best, [])


@pytest.fixture
def simd():
    """Restores the process's SIMD level after a test that changes it."""
    level = nat.simd_level()
    yield nat.set_simd_level
    nat.set_simd_level(level)


SHAPES = [(1, 1, 1), (1, 31, 7), (2, 32, 5), (3, 33, 17), (4, 64, 513), (5, 95, 1031), (8, 2304, 600),
          (9, 100, 3), (1, 2304, 1500),
          # many-row calls (batched decode, beams): several 4 x 4 tiles of the VNNI kernel, tails in
          # table rows (V % 4), activation rows (M % 4) and K (K % 64)
          (16, 130, 37), (24, 2304, 259), (7, 200, 6)]


@pytest.mark.parametrize("M,K,V", SHAPES)
def test_matches_numpy_twin_at_every_level(M, K, V, simd):
    rng = np.random.default_rng(M * 1000 + K + V)
    x = rng.standard_normal((M, K)).astype(np.float32) * rng.uniform(0.01, 50, (M, 1)).astype(np.float32)
    codes = rng.integers(-127, 128, (V, K), dtype=np.int8)
    scales = rng.uniform(1e-4, 0.1, V).astype(np.float32)
    want = reference(x, codes, scales)
    outs = {}
    for level in levels():
        simd(level)
        for threads in (1, 3):
            pool = nat.ThreadPool(threads)
            got = nat.matmul_int8(x, codes, scales, pool=pool)
            assert got.shape == (M, V) and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30, err_msg=f"{level}, {threads} threads")
            outs[(level, threads)] = got
    first = next(iter(outs.values()))
    for key, got in outs.items():
        assert np.array_equal(got, first), key      # same integer sums, same float ops everywhere


def test_extreme_codes_do_not_saturate(simd):
    # |q| = |code| = 127 everywhere: the largest int16 pair sums AVX2's maddubs can see.
    K, V = 2304, 37
    x = np.full((3, K), -2.5, np.float32)
    x[1] = 2.5
    x[2, ::2] = 2.5                                             # alternating signs
    codes = np.full((V, K), 127, np.int8)
    codes[::2] = -127
    scales = np.ones(V, np.float32)
    for level in levels():
        simd(level)
        got = nat.matmul_int8(x, codes, scales)
        np.testing.assert_allclose(got, reference(x, codes, scales), rtol=1e-6)
        # by hand: row 0 is q = -127 everywhere, scale 2.5 / 127: code 127 -> -127 * 127 * K * 2.5 / 127
        assert got[0, 1] == pytest.approx(-127 * K * 2.5, rel=1e-6)
        assert got[2, 1] == 0.0


def test_hand_computed_small_case():
    x = np.array([[1.0, -0.5, 0.25]], np.float32)               # max 1 -> q = [127, -64 (rint -63.5), 32 (31.75)]
    codes = np.array([[1, 2, 3], [-127, 0, 127]], np.int8)
    scales = np.array([0.5, 0.01], np.float32)
    got = nat.matmul_int8(x, codes, scales)
    q = np.array([127, -64, 32])
    assert got[0, 0] == pytest.approx((q @ [1, 2, 3]) * 0.5 / 127, rel=1e-6)
    assert got[0, 1] == pytest.approx((q @ [-127, 0, 127]) * 0.01 / 127, rel=1e-6)


def test_zero_rows_and_empty_shapes():
    codes = np.ones((4, 8), np.int8)
    scales = np.ones(4, np.float32)
    out = nat.matmul_int8(np.zeros((2, 8), np.float32), codes, scales)
    assert out.shape == (2, 4) and not out.any()
    assert nat.matmul_int8(np.zeros((0, 8), np.float32), codes, scales).shape == (0, 4)


def test_a_memory_mapped_table(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (300, 40), dtype=np.int8)
    np.save(tmp_path / "t.npy", codes)
    table = np.load(tmp_path / "t.npy", mmap_mode="r")
    x = rng.standard_normal((2, 40)).astype(np.float32)
    scales = np.full(300, 0.02, np.float32)
    np.testing.assert_allclose(nat.matmul_int8(x, table, scales), reference(x, codes, scales), rtol=2e-6)


@pytest.mark.parametrize("args,message", [
    (lambda: (np.zeros((1, 8)), np.zeros((4, 8), np.int8), np.ones(4, np.float32)), "x must be float32"),
    (lambda: (np.zeros((1, 8), np.float32), np.zeros((4, 8), np.uint8), np.ones(4, np.float32)), "codes must be int8"),
    (lambda: (np.zeros((1, 8), np.float32), np.zeros((4, 9), np.int8), np.ones(4, np.float32)), "hidden size K"),
    (lambda: (np.zeros((1, 8), np.float32), np.zeros((4, 8), np.int8), np.ones(3, np.float32)), "one scale per row"),
    (lambda: (np.zeros(8, np.float32), np.zeros((4, 8), np.int8), np.ones(4, np.float32)), r"float32 \[rows, K\], got shape \(8\)"),
    (lambda: (np.zeros((8, 2), np.float32).T, np.zeros((4, 8), np.int8), np.ones(4, np.float32)), "C-contiguous"),
    (lambda: (np.full((1, 8), np.nan, np.float32), np.zeros((4, 8), np.int8), np.ones(4, np.float32)), "non-finite"),
])
def test_bad_input_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        nat.matmul_int8(*args())
