"""export/quantize.py: every format's dequantize vs the original, within bounds computed by hand."""
import ml_dtypes
import numpy as np
import pytest

from export import quantize as qz
from export.quantize import (WEIGHT_FORMATS, QuantizedWeight, dequantize, effective_format, matrix_format,
                             pack_uint4, quantize, summarize_formats, unpack_uint4)


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


def _int4_round_to_nearest(w, g):
    """Plain round-to-nearest int4 (scale = max|group| / 7), written out here as the baseline."""
    O, K = w.shape
    c = w.reshape(O, K // g, g).astype(np.float64)
    s = np.abs(c).max(-1, keepdims=True) / 7
    s[s == 0] = 1
    return (np.clip(np.rint(c / s), -8, 7) * s).reshape(O, K)


def _group_sq_error(w, d, g):
    return ((d.astype(np.float64) - w) ** 2).reshape(w.shape[0], -1, g).sum(-1)


def test_int4_scale_search_by_hand():
    g = 16
    w = np.zeros((4, 2 * g), np.float32)
    # group 0: the codes -8..7 times 0.1 exactly: scale -m / 8 = 0.1 (m = -0.8) is exact, while
    # round-to-nearest's 0.8 / 7 misses every value but 0 and -0.8
    w[0, :g] = np.arange(-8, 8) / 10
    # group 1: the same group negated: the largest magnitude is +0.8, so the exact scale is -0.1
    w[0, g:] = -np.arange(-8, 8) / 10
    # row 1: one outlier 1.0 and fifteen 0.3: round-to-nearest (scale 1/7) gives 0.3 the code 2,
    # i.e. 0.2857 (squared error 0.0031); the same codes with the least-squares scale
    # (7 + 15 * 0.6) / (49 + 15 * 4) = 0.1468 leave 0.0008. Its second group is all zeros.
    w[1, :g] = 0.3
    w[1, 0] = 1.0
    # row 2: a ramp and a tiny cubic (only the bound against round-to-nearest is checked); row 3: zeros
    w[2, :g] = np.linspace(-1, 1, g)
    w[2, g:] = 1e-3 * np.linspace(-1, 1, g) ** 3
    q = quantize(w, "int4", group_size=g)
    d = dequantize(q)
    np.testing.assert_allclose(d[0], w[0], atol=1e-7)                    # exact
    np.testing.assert_allclose(q.scales[0], [0.1, -0.1], rtol=1e-6)
    assert q.data[0, :g].tolist() == list(range(-8, 8))
    assert q.data[0, g:].tolist() == list(range(-8, 8))                   # same codes, negative scale
    rtn = _int4_round_to_nearest(w, g)
    assert _group_sq_error(w, rtn, g)[0, 0] > 1e-3                        # 0.8 / 7 steps miss
    err, err_rtn = _group_sq_error(w, d, g), _group_sq_error(w, rtn, g)
    assert err_rtn[1, 0] == pytest.approx(15 * (0.3 - 2 / 7) ** 2, rel=1e-4)
    assert err[1, 0] == pytest.approx((1 - 7 * 16 / 109) ** 2 + 15 * (0.3 - 2 * 16 / 109) ** 2, rel=1e-3)
    assert (err <= err_rtn * (1 + 1e-5) + 1e-12).all()
    # the all-zero group (row 1, group 1; row 3): scale 1.0, codes 0, exact zeros
    assert q.scales[1, 1] == 1.0 and q.scales[3].tolist() == [1.0, 1.0]
    assert not q.data[1, g:].any() and not q.data[3].any() and not d[3].any()


@pytest.mark.parametrize("g", [16, 32, 64, 128])
def test_int4_scale_search_never_increases_the_error(g):
    """Every group's squared error is at most plain round-to-nearest's, and on these Gaussian
    rows (with all-zero groups mixed in) the total error is clearly lower."""
    w = _w(O=61, K=256, seed=g)
    w[5, :g] = 0                      # zero groups
    w[9] = 0
    w[11, g:2 * g] = 3.0              # constant group: exact with codes -7 or -8
    q = quantize(w, "int4", group_size=g)
    assert q.data.min() >= -8 and q.data.max() <= 7
    assert np.isfinite(q.scales).all() and (q.scales != 0).all()
    d = dequantize(q)
    err, err_rtn = _group_sq_error(w, d, g), _group_sq_error(w, _int4_round_to_nearest(w, g), g)
    assert (err <= err_rtn * (1 + 1e-5) + 1e-12).all()
    assert err.sum() < 0.85 * err_rtn.sum()
    assert (d[5, :g] == 0).all() and (d[9] == 0).all() and (q.scales[9] == 1).all()
    np.testing.assert_allclose(d[11, g:2 * g], 3.0, rtol=1e-6)


def test_int4_mixed_precision_rule():
    """int4 keeps the LM head, the vision tower + projector, decoder layer 0 and every v_proj at
    int8; other formats never change; the int4 -> int8 fallback still applies elsewhere."""
    int8_names = ["text.embed_tokens.weight", "lm_head.weight", "vision.encoder.layers.3.mlp.fc1.weight",
                  "vision.embeddings.patch_embedding.weight", "projector.weight",
                  "text.layers.0.mlp.down_proj.weight", "text.layers.0.self_attn.q_proj.weight",
                  "text.layers.7.self_attn.v_proj.weight"]
    int4_names = ["text.layers.1.mlp.down_proj.weight", "text.layers.10.self_attn.q_proj.weight",
                  "text.layers.7.self_attn.k_proj.weight", "text.layers.25.self_attn.o_proj.weight"]
    for name in int8_names:
        assert matrix_format(name, "int4", 1024, 128) == "int8", name
    for name in int4_names:
        assert matrix_format(name, "int4", 1024, 128) == "int4", name
        assert matrix_format(name, "int4", 1000, 128) == "int8", name        # K fallback
    for fmt in ("fp32", "fp16", "bf16", "int8", "fp8"):
        assert matrix_format("text.embed_tokens.weight", fmt, 1024, 128) == fmt
        assert matrix_format("text.layers.0.mlp.up_proj.weight", fmt, 1000, 128) == fmt
    formats = {n: matrix_format(n, "int4", 1000 if n.endswith("o_proj.weight") else 1024, 128)
               for n in int8_names + int4_names}
    summary = summarize_formats(formats, "int4")
    assert summary["fallbacks"] == {"text.layers.25.self_attn.o_proj.weight": "int8"}   # design: not fallbacks
    assert summary["groups"] == {"lm_head": "int8", "vision": "int8", "projector": "int8", "text.layers.0": "int8",
                                 "text.v_proj": "int8", "text": "int4+int8"}


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
    w[8] = 3e-45           # int4: even the least-squares scale (~m / 7) underflows
    q = quantize(w, fmt, group_size=32)
    if q.scales is not None:   # int4 scales may be negative (the sign convention of quantize.py)
        assert np.isfinite(q.scales).all() and ((q.scales > 0) if fmt != "int4" else (q.scales != 0)).all()
    d = dequantize(q)
    assert np.isfinite(d).all()
    assert (d[3] == 0).all() and (d[5, :32] == 0).all()
    assert (np.abs(d[7:9] - w[7:9]) <= 1e-42).all()         # tiny rows stay tiny


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
    monkeypatch.setattr(qz, "SEARCH_BLOCK_ELEMENTS", 32 * 3)  # int4 search: 3 groups per block
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
