"""The native decoder (csrc/linear_int8*, csrc/decoder_layer*, engine/runtime/native_decoder.py).

Oracles: numpy for the packed layout and the per-row int8 linear layer (bit for bit, at every SIMD
level this machine has), float64 numpy for the norm and gelu, onnxruntime's own decoder graphs of
the default model's int8 artifact for whole boundaries, and the graphs' tokens for generation.
Bad input gets a clear error."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import _native
from engine.__main__ import example_image_path
from engine.artifact import ArtifactError
from engine.runtime import native_decoder, packed_weights

STEP = np.float32(1.0 / 127.0)
FEATURES = _native.cpu_features()
VNNI = FEATURES["avx512_vnni"]
# Every level this CPU runs: avx2 (vpmaddubsw), avx512 (VNNI where present, else the AVX2 kernel),
# amx (AMX tiles for calls of >= 16 rows with K4 % 64 == 0, else VNNI), neon (sdot where present,
# else the scalar twin).
LEVELS = ["scalar"] + {"amx": ["avx2", "avx512", "amx"], "avx512": ["avx2", "avx512"], "avx2": ["avx2"],
                       "neon": ["neon"]}.get(FEATURES["best"], [])
AMX = FEATURES["best"] == "amx"


@pytest.fixture
def simd_level():
    before = _native.simd_level()
    yield _native.set_simd_level
    _native.set_simd_level(before)


def reference_linear(x, wt, scales):
    """The exported graph's per-row int8 linear layer in numpy (export/onnx_graphs.py)."""
    r = np.maximum(np.abs(x).max(1, keepdims=True), np.float32(1e-30))
    u = np.clip(np.rint((x / r) / STEP) + 128, 0, 255)
    acc = (u.astype(np.int64) - 128) @ wt.astype(np.int64)
    return (acc.astype(np.float32) * (STEP * scales)) * r


def test_pack_layout_and_column_sums():
    rng = np.random.default_rng(0)
    for K, O in ((1, 1), (5, 33), (36, 64), (130, 70)):
        wt = rng.integers(-127, 128, (K, O), dtype=np.int8)
        codes, colsum, max_code = _native.pack_linear_int8(wt)
        assert max_code == np.abs(wt.astype(np.int32)).max()
        K4, O32 = -(-K // 4) * 4, -(-O // 32) * 32
        padded = np.zeros((K4, O32), np.int8)
        padded[:K, :O] = wt
        assert codes.shape == (O32 // 32, K4 // 4, 32, 4)
        assert np.array_equal(codes, padded.reshape(K4 // 4, 4, O32 // 32, 32).transpose(2, 0, 3, 1))
        assert np.array_equal(colsum, padded.astype(np.int32).sum(0))


@pytest.mark.parametrize("level", LEVELS)
def test_linear_equals_numpy_bit_for_bit(level, simd_level):
    simd_level(level)
    rng = np.random.default_rng(1)
    pool = _native.ThreadPool(3)
    for M, K, O in ((1, 4, 1), (5, 36, 33), (7, 100, 70), (13, 130, 31), (2, 9, 64), (19, 257, 97)):
        x = (rng.standard_normal((M, K)) * rng.choice([1e-3, 1.0, 50.0], (M, 1))).astype(np.float32)
        x[M // 2] = 0.0                                    # an all-zero row
        wt = rng.integers(-63, 64, (K, O), dtype=np.int8)
        scales = rng.random(O, dtype=np.float32)
        codes, colsum, max_code = _native.pack_linear_int8(wt)
        y = _native.linear_int8(x, codes, colsum, STEP * scales, K, pool, max_code)
        assert np.array_equal(y, reference_linear(x, wt, scales)), (level, M, K, O)
        # rows never interact: a row alone gives what it gives in the call
        assert np.array_equal(_native.linear_int8(x[1:2], codes, colsum, STEP * scales, K), y[1:2])


@pytest.mark.parametrize("level", LEVELS)
def test_full_range_codes_equal_numpy_bit_for_bit(level, simd_level):
    """Codes up to +-127 (int4 artifacts' per-channel 8-bit matrices): AVX2 takes its wide variant
    (|code| x signed q via vpsignb) instead of the scalar twin; every tile shape and channel tail."""
    simd_level(level)
    expected = {"scalar": "scalar", "neon": "neon_dot" if FEATURES["neon_dot"] else "scalar", "avx2": "avx2_wide",
                "avx512": "avx512_vnni" if FEATURES["avx512_vnni"] else "avx2_wide"}.get(level)
    if expected:
        assert _native.linear_int8_kernel(7, 100, 70, 127) == expected
        seven_bit = "avx512bw" if level == "avx512" else "avx2"   # AVX-512 without VNNI: 512-bit vpmaddubsw
        assert _native.linear_int8_kernel(7, 100, 70, 64) == expected.replace("avx2_wide", seven_bit)
    rng = np.random.default_rng(6)
    pool = _native.ThreadPool(2)
    for M, K, O in ((1, 4, 1), (1, 260, 70), (4, 36, 33), (9, 100, 64), (13, 130, 31), (38, 257, 97)):
        x = (rng.standard_normal((M, K)) * rng.choice([1e-3, 1.0, 50.0], (M, 1))).astype(np.float32)
        x[M // 2] = 0.0
        x[-1, : K // 2] = 1.0                              # u = 255 next to large codes
        wt = rng.integers(-127, 128, (K, O), dtype=np.int8)
        wt[: K // 2, 0] = 127
        scales = rng.random(O, dtype=np.float32)
        codes, colsum, max_code = _native.pack_linear_int8(wt)
        assert max_code == 127
        y = _native.linear_int8(x, codes, colsum, STEP * scales, K, pool, max_code)
        assert np.array_equal(y, reference_linear(x, wt, scales)), (level, M, K, O)


@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX-INT8 tiles that the OS enables")
@pytest.mark.parametrize("level", ["amx", "avx512"])
def test_prefill_sized_linear_equals_numpy_bit_for_bit(level, simd_level):
    """The AMX kernel's shapes: 32-row blocks (rows padded, the padding dropped), K4 % 64 == 0,
    channel tails, the 16-row threshold, and K4 % 64 != 0 (VNNI at any row count)."""
    simd_level(level)
    rng = np.random.default_rng(5)
    pool = _native.ThreadPool(2)
    tiles = "amx" if level == "amx" else "avx512_vnni"
    assert _native.linear_int8_kernel(16, 64, 40) == tiles and _native.linear_int8_kernel(260, 2304, 9216) == tiles
    assert _native.linear_int8_kernel(15, 64, 40) == "avx512_vnni" == _native.linear_int8_kernel(300, 100, 40)
    for M, K, O in ((16, 64, 1), (17, 128, 33), (31, 64, 64), (33, 192, 97), (64, 256, 300), (95, 320, 31),
                    (300, 128, 70), (15, 64, 40), (40, 100, 50), (20, 60, 32)):
        x = (rng.standard_normal((M, K)) * rng.choice([1e-3, 1.0, 50.0], (M, 1))).astype(np.float32)
        x[M // 3] = 0.0
        wt = rng.integers(-127, 128, (K, O), dtype=np.int8)
        scales = rng.random(O, dtype=np.float32)
        codes, colsum, max_code = _native.pack_linear_int8(wt)
        y = _native.linear_int8(x, codes, colsum, STEP * scales, K, pool, max_code)
        assert np.array_equal(y, reference_linear(x, wt, scales)), (level, M, K, O)
        assert np.array_equal(_native.linear_int8(x[:1], codes, colsum, STEP * scales, K), y[:1])
        # several matrices of one call (q/k/v): each its own kernel choice, one padded u
        wt2 = rng.integers(-127, 128, (K, 37), dtype=np.int8)
        c2, s2, m2 = _native.pack_linear_int8(wt2)
        y1, y2 = _native.linear_int8_many(x, [(codes, colsum, STEP * scales, max_code), (c2, s2, STEP * scales[:1].repeat(37), m2)], K, pool)
        assert np.array_equal(y1, y) and np.array_equal(y2, reference_linear(x, wt2, scales[:1].repeat(37)))


@pytest.mark.parametrize("level", LEVELS)
def test_linear_at_the_saturation_edges(level, simd_level):
    """AVX2's vpmaddubsw adds two u8 x s8 products in int16: u = 255 with codes of +-64 is its
    largest exact case (2 * 255 * 64 = 32640); codes beyond 64 must not take that kernel."""
    simd_level(level)
    rng = np.random.default_rng(4)
    K, O = 68, 40
    x = np.ones((3, K), np.float32)                        # u = 255 everywhere
    x[1] = -1.0                                            # u = 1
    x[2, ::2] = -1.0
    scales = rng.random(O, dtype=np.float32)
    for wt in (np.full((K, O), 64, np.int8), np.full((K, O), -64, np.int8),
               rng.choice(np.array([-64, 64], np.int8), (K, O)),
               rng.integers(-127, 128, (K, O), dtype=np.int8)):   # full range: max_code 127
        codes, colsum, max_code = _native.pack_linear_int8(wt)
        for mc in (max_code, -1):
            y = _native.linear_int8(x, codes, colsum, STEP * scales, K, None, mc)
            assert np.array_equal(y, reference_linear(x, wt, scales)), (level, max_code)


@pytest.mark.parametrize("level", LEVELS)
def test_non_finite_input_is_refused_at_every_level(level, simd_level):
    """Each level's quantizer checks every element: in its SIMD steps and in a row's tail."""
    simd_level(level)
    K = 19
    codes, colsum, max_code = _native.pack_linear_int8(np.ones((K, 4), np.int8))
    cs = np.full(4, STEP, np.float32)
    for at in (2, 9, 17):
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones((3, K), np.float32)
            x[1, at] = bad
            with pytest.raises(ValueError, match="non-finite"):
                _native.linear_int8(x, codes, colsum, cs, K, None, max_code)
    x = np.full((3, K), 1e36, np.float32)     # large but finite: accepted
    x[1, ::2] = -1e36
    y = _native.linear_int8(x, codes, colsum, cs, K, None, max_code)
    assert np.array_equal(y, reference_linear(x, np.ones((K, 4), np.int8), np.ones(4, np.float32)))


def test_linear_bad_input_errors():
    wt = np.ones((8, 4), np.int8)
    codes, colsum, _ = _native.pack_linear_int8(wt)
    cs = np.full(4, STEP, np.float32)
    with pytest.raises(ValueError, match="x must be float32"):
        _native.linear_int8(np.ones((2, 8), np.float64), codes, colsum, cs, 8)
    with pytest.raises(ValueError, match=r"x must be float32 \[rows, K\], got shape \(2, 7\)"):
        _native.linear_int8(np.ones((2, 7), np.float32), codes, colsum, cs, 8)
    with pytest.raises(ValueError, match="non-finite"):
        _native.linear_int8(np.array([[np.nan] * 8], np.float32), codes, colsum, cs, 8)
    with pytest.raises(ValueError, match="codes must be int8"):
        _native.linear_int8(np.ones((1, 8), np.float32), codes[:, :1], colsum, cs, 8)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        _native.pack_linear_int8(np.full((4, 4), -128, np.int8))
    with pytest.raises(ValueError, match=r"max_code must be max \|code\| <= 127"):
        _native.linear_int8(np.ones((1, 8), np.float32), codes, colsum, cs, 8, None, 300)
    with pytest.raises(ValueError, match=r"must be \(codes, colsum, colscale, max_code\)"):
        _native.DecoderBoundary({"q": (codes, colsum, cs)}, {}, hidden_size=8, mlp_width=8, heads=1, kv_heads=1,
                                head_dim=4, eps=1e-6, gemma2=True, has_end=False, has_start=True)


@pytest.mark.parametrize("level", LEVELS)
def test_norm_and_gelu_against_float64(level, simd_level):
    simd_level(level)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 37)).astype(np.float32) * 3
    w1 = rng.random(37).astype(np.float32) + 0.5
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-6) * w1
    np.testing.assert_allclose(_native.rms_norm_rows(x, w1, 1e-6), want, rtol=2e-6, atol=1e-6)
    # the SIMD rows against the scalar twin: the same float ops after the (double) sum of squares
    xl = (rng.standard_normal((40, 2304)) * rng.choice([1e-3, 1.0, 300.0], (40, 1))).astype(np.float32)
    wl = (rng.random(2304) + 0.5).astype(np.float32)
    got = _native.rms_norm_rows(xl, wl, 1e-6)
    simd_level("scalar")
    np.testing.assert_array_equal(got, _native.rms_norm_rows(xl, wl, 1e-6))
    g = np.linspace(-12, 12, 1001).astype(np.float32)
    u = rng.standard_normal(1001).astype(np.float32)
    g64 = g.astype(np.float64)
    gelu = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
    np.testing.assert_allclose(_native.gelu_mul(g, u), gelu * u, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the default model's int8 artifact
@pytest.fixture(scope="module")
def graphs_model(module_cache):
    m = engine.load(backend="onnxruntime", weights="int8", progress=False, decoder="graphs")
    yield m
    m.close()


@pytest.mark.parametrize("level", LEVELS)
def test_boundaries_match_the_onnxruntime_graphs(graphs_model, level, simd_level):
    simd_level(level)
    nd = native_decoder.open_native_decoder(graphs_model.artifact_dir, graphs_model.manifest, graphs_model.config)
    t = graphs_model.config.text
    rng = np.random.default_rng(3)
    pool = _native.ThreadPool(2)
    assert sorted(nd.boundaries) == sorted(f"decoder_{i}" for i in range(t.num_hidden_layers + 1))
    scratch = _native.DecoderScratch()          # shared by every boundary and both row counts below
    for name in nd.boundaries:
        inputs = {"hidden": rng.standard_normal((5, t.hidden_size)).astype(np.float32)}
        if name != "decoder_0":
            inputs["attn"] = rng.standard_normal((5, t.num_attention_heads * t.head_dim)).astype(np.float32)
        want = graphs_model.runner.run(name, inputs)
        got = nd.run(name, inputs, pool, scratch)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].shape == want[key].shape, (name, key)
            scale = np.abs(want[key]).max()
            assert np.abs(got[key] - want[key]).max() <= 1e-3 * scale, (name, key)
        one = nd.run(name, {k: v[2:3] for k, v in inputs.items()}, pool, scratch)
        alone = nd.run(name, inputs, pool)       # temporaries of its own
        blocks = nd.run(name, inputs, pool, _native.DecoderScratch(mlp_rows=2))   # MLP on rows 2 + 2 + 1
        for key in got:
            assert np.array_equal(one[key], got[key][2:3]), (name, key)
            assert np.array_equal(alone[key], got[key]), (name, key)
            assert np.array_equal(blocks[key], got[key]), (name, key)


@pytest.mark.parametrize("level", LEVELS)
def test_a_layer_start_is_its_norm_then_three_linear_layers_exactly(graphs_model, level, simd_level):
    """decoder_0 (q/k/v from one quantization and one task list) equals the norm and three
    separate linear_int8 calls bit for bit."""
    import json
    simd_level(level)
    nd = native_decoder.open_native_decoder(graphs_model.artifact_dir, graphs_model.manifest, graphs_model.config)
    t = graphs_model.config.text
    index = json.loads((nd.entry / native_decoder.INDEX).read_text())["graphs"]["decoder_0"]
    data = np.memmap(nd.entry / native_decoder.WEIGHTS, dtype=np.uint8, mode="r")

    def view(rec):
        return packed_weights.packed_array(data, rec)
    hidden = np.random.default_rng(5).standard_normal((7, t.hidden_size)).astype(np.float32)
    got = nd.run("decoder_0", {"hidden": hidden}, _native.ThreadPool(2))
    h = _native.rms_norm_rows(hidden, np.ascontiguousarray(view(index["norms"]["input"])), float(t.rms_norm_eps))
    for key in ("q", "k", "v"):
        rec = index["linears"][key]
        want = _native.linear_int8(h, view(rec["codes"]), view(rec["colsum"]), view(rec["colscale"]), rec["K"],
                                   None, rec["max_code"])
        assert np.array_equal(got[key].reshape(len(hidden), -1), want), (level, key)


@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "scalar"])
def test_generation_matches_the_graphs(graphs_model, module_cache, level, simd_level):
    simd_level(level)
    native = engine.load(backend="onnxruntime", weights="int8", progress=False, decoder="native")
    try:
        assert native.decoder_kind == "native" and graphs_model.decoder_kind == "graphs"
        # the pool spins between calls only where it runs the whole step
        assert native._pool.spin_us > 0 and graphs_model._pool.spin_us == 0
        assert not any(g.startswith("decoder_") for g in native.runner.graph_names)
        image = example_image_path()
        for prompt in ("caption en", "answer en what is in the image?", "detect circle"):
            a = graphs_model.generate(image, prompt, max_new_tokens=12)
            b = native.generate(image, prompt, max_new_tokens=12)
            assert a.tokens == b.tokens, prompt
    finally:
        native.close()


def test_a_damaged_cache_entry_is_packed_again(graphs_model, module_cache, caplog):
    nd = native_decoder.open_native_decoder(graphs_model.artifact_dir, graphs_model.manifest, graphs_model.config)
    weights = nd.entry / native_decoder.WEIGHTS
    del nd
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    old_layout = native_decoder.cache_root() / "decoder-an-older-engine"   # never read by this engine
    old_layout.mkdir(parents=True, exist_ok=True)
    (old_layout / native_decoder.INDEX).write_text('{"layout": 1}')
    with caplog.at_level("WARNING", logger="engine"):
        nd = native_decoder.open_native_decoder(graphs_model.artifact_dir, graphs_model.manifest, graphs_model.config)
    assert "packing them again" in caplog.text
    assert native_decoder.stamped_dir.check(nd.entry, native_decoder.FILES) is None
    assert not old_layout.exists() and nd.entry.parent == old_layout.parent


def test_auto_takes_the_native_decoder_only_where_it_was_measured_faster(module_cache, simd_level):
    for level in LEVELS:
        simd_level(level)
        m = engine.load(backend="onnxruntime", weights="int8", progress=False)
        try:
            native = (level == "amx" or (level == "avx512" and not FEATURES["amx"])
                      or level == FEATURES["best"] == "avx2")
            assert m.decoder_kind == ("native" if native else "graphs"), level
        finally:
            m.close()


def test_auto_on_amx_takes_the_native_decoder_at_the_amx_level_only(monkeypatch):
    """AMX CPUs: the core's AMX kernel beats MLAS's at the amx level; forced down to avx512, the core
    has VNNI only and MLAS still multiplies on AMX tiles, so the graphs stay."""
    features = dict(_native.cpu_features(), amx=True, avx512_vnni=True, simd="amx")
    monkeypatch.setattr(native_decoder._native, "cpu_features", lambda: features)
    assert native_decoder.auto_declines() is None
    monkeypatch.setattr(native_decoder._native, "cpu_features", lambda: dict(features, simd="avx512"))
    assert "AMX" in native_decoder.auto_declines()
    monkeypatch.setattr(native_decoder._native, "cpu_features", lambda: dict(features, amx=False, simd="avx512"))
    assert native_decoder.auto_declines() is None
    # ENGINE_SIMD=avx2 on an AVX-512 CPU: MLAS stays on AVX-512, the graphs stay
    monkeypatch.setattr(native_decoder._native, "cpu_features",
                        lambda: dict(features, amx=False, best="avx512", simd="avx2"))
    assert "avx2" in native_decoder.auto_declines()
    # AVX-512 without VNNI: the core's 512-bit vpmaddubsw kernel against MLAS's
    monkeypatch.setattr(native_decoder._native, "cpu_features",
                        lambda: dict(features, amx=False, avx512_vnni=False, best="avx512", simd="avx512"))
    assert native_decoder.auto_declines() is None
    # a CPU whose best is AVX2: both sides on ymm vpmaddubsw, the core takes it
    monkeypatch.setattr(native_decoder._native, "cpu_features",
                        lambda: dict(features, amx=False, avx512_vnni=False, best="avx2", simd="avx2"))
    assert native_decoder.auto_declines() is None
    monkeypatch.setattr(native_decoder._native, "cpu_features",
                        lambda: dict(features, amx=False, avx512_vnni=False, avx2=False, best="scalar", simd="scalar"))
    assert "scalar" in native_decoder.auto_declines()


def test_bad_decoder_choice_errors(module_cache):
    with pytest.raises(ValueError, match="decoder must be one of auto, graphs, native"):
        engine.load(backend="onnxruntime", weights="int8", progress=False, decoder="fast")
    with pytest.raises(ArtifactError, match="decoder='native' cannot run: the openvino backend"):
        engine.load(backend="openvino", weights="int8", progress=False, decoder="native")


def test_scratch_rejects_a_row_block_below_one():
    assert _native.DecoderScratch().mlp_rows == 512
    with pytest.raises(ValueError, match="mlp_rows must be >= 1"):
        _native.DecoderScratch(mlp_rows=0)
