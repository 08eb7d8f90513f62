"""export/quantize.py: every format's dequantize vs the original, within bounds computed by hand."""
import ml_dtypes
import numpy as np
import pytest

from export import quantize as qz
from export.quantize import (WEIGHT_FORMATS, QuantizedWeight, dequantize, effective_format, pack_uint4,
                             quantize, unpack_uint4)


def _w(O=37, K=256, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((O, K)).astype(np.float32) * rng.uniform(0.01, 3, (O, 1)).astype(np.float32)
    return w.astype(dtype)


def test_api_shapes_and_dtypes():
    w = _w()
    expect = {"fp32": (np.float32, None), "fp16": (np.float16, None), "bf16": (ml_dtypes.bfloat16, None),
              "int8": (np.int8, (37,)), "int4": (np.int8, (37, 256 // 64)), "fp8": (ml_dtypes.float8_e4m3fn, (37,))}
    assert set(expect) == set(WEIGHT_FORMATS)
    for fmt, (dt, sshape) in expect.items():
        q = quantize(w, fmt, group_size=64)
        assert isinstance(q, QuantizedWeight) and q.format == fmt and q.shape == (37, 256)
        assert q.data.dtype == np.dtype(dt)
        assert (q.scales is None) == (sshape is None)
        if sshape is not None:
            assert q.scales.dtype == np.float32 and q.scales.shape == sshape
        assert q.group_size == (64 if fmt == "int4" else None)
        assert dequantize(q).dtype == np.float32 and dequantize(q).shape == (37, 256)


def test_int8_error_at_most_half_a_step_per_element():
    w = _w()
    q = quantize(w, "int8")
    assert q.data.min() >= -127 and q.data.max() <= 127
    np.testing.assert_allclose(q.scales, np.abs(w).max(1) / 127, rtol=1e-6)
    err = np.abs(dequantize(q) - w)
    assert (err <= q.scales[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (np.abs(q.data).max(1) == 127).all()       # the max of every row uses the full range


def test_int4_error_at_most_half_a_step_per_group():
    w = _w(K=256)
    g = 32
    q = quantize(w, "int4", group_size=g)
    assert q.data.min() >= -8 and q.data.max() <= 7
    amax = np.abs(w.reshape(37, -1, g)).max(-1)
    np.testing.assert_allclose(q.scales, amax / 7, rtol=1e-6)
    err = np.abs(dequantize(q) - w).reshape(37, -1, g)
    assert (err <= q.scales[:, :, None] / 2 * (1 + 1e-5) + 1e-12).all()


def test_fp8_relative_error():
    w = _w()
    q = quantize(w, "fp8")
    np.testing.assert_allclose(q.scales, np.abs(w).max(1) / 448, rtol=1e-6)
    scaled = np.abs(w) / q.scales[:, None]
    assert np.abs(q.data.astype(np.float32)).max() <= 448
    err = np.abs(dequantize(q) - w)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normal values; below the
    # smallest normal (2^-6) the absolute spacing is 2^-9, so the error is <= 2^-10 * scale.
    bound = np.maximum(np.abs(w) * 2.0 ** -4, q.scales[:, None] * 2.0 ** -10) * (1 + 1e-5)
    assert (err <= bound).all()
    assert (scaled.max(1) > 447).all()


@pytest.mark.parametrize("fmt,rel", [("fp32", 0), ("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
def test_float_formats(fmt, rel):
    w = _w()
    d = dequantize(quantize(w, fmt))
    assert (np.abs(d - w) <= np.abs(w) * rel * (1 + 1e-6)).all()


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_zero_rows_and_groups_give_finite_scales_and_exact_zeros(fmt):
    w = _w(K=128)
    w[3] = 0
    w[5, :32] = 0          # a zero int4 group
    w[7] = 1e-42           # amax / 127 underflows to 0 in fp32
    q = quantize(w, fmt, group_size=32)
    if q.scales is not None:
        assert np.isfinite(q.scales).all() and (q.scales > 0).all()
    d = dequantize(q)
    assert np.isfinite(d).all()
    assert (d[3] == 0).all() and (d[5, :32] == 0).all()


def test_non_finite_weights_are_rejected():
    w = _w()
    w[4, 9] = np.nan
    with pytest.raises(ValueError, match="row 4"):
        quantize(w, "int8")


def test_effective_format_int4_fallback():
    assert effective_format("int4", 4304, 128) == "int8"     # SigLIP fc2
    assert effective_format("int4", 1152, 128) == "int4"
    assert effective_format("int4", 588, 32) == "int8"       # patch embedding 3*14*14
    for fmt in ("fp32", "fp16", "bf16", "int8", "fp8"):
        assert effective_format(fmt, 4304, 128) == fmt
    with pytest.raises(ValueError, match="unknown weight format"):
        effective_format("int3", 128, 128)
    with pytest.raises(ValueError, match="effective_format"):
        quantize(_w(K=96), "int4", group_size=64)


@pytest.mark.parametrize("g", [0, 24, 100, 8])
def test_bad_group_sizes(g):
    with pytest.raises(ValueError, match="power of two"):
        quantize(_w(K=96), "int4", group_size=g)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(5, np.float32), "int8")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(_w(), "int2")


def test_pack_uint4_round_trip_and_layout():
    rng = np.random.default_rng(1)
    d = rng.integers(-8, 8, (5, 64)).astype(np.int8)
    p = pack_uint4(d)
    assert p.dtype == np.uint8 and p.shape == (5, 32)
    assert int(p[0, 0]) == (int(d[0, 0]) + 8) | ((int(d[0, 1]) + 8) << 4)    # low nibble first
    np.testing.assert_array_equal(unpack_uint4(p), d)
    with pytest.raises(ValueError, match="even"):
        pack_uint4(d[:, :3])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_uint4(np.full((1, 2), 9, np.int8))


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
def test_chunked_equals_whole_and_bf16_input(fmt, monkeypatch):
    w = _w(O=50, K=64, dtype=ml_dtypes.bfloat16)
    whole = quantize(w, fmt, group_size=32)
    monkeypatch.setattr(qz, "ROW_CHUNK_ELEMENTS", 64 * 7)     # 7 rows per chunk
    chunked = quantize(w, fmt, group_size=32)
    np.testing.assert_array_equal(whole.data.view(np.uint8), chunked.data.view(np.uint8))
    if whole.scales is not None:
        np.testing.assert_array_equal(whole.scales, chunked.scales)
    assert w.dtype == ml_dtypes.bfloat16          # input untouched


def test_input_array_is_not_modified():
    w = _w()
    before = w.copy()
    for fmt in WEIGHT_FORMATS:
        quantize(w, fmt, group_size=64)
    np.testing.assert_array_equal(w, before)
