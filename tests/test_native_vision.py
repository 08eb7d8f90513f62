"""The native vision tower (csrc/vision_tower*, engine/runtime/native_vision.py).

Oracles: float64 numpy for the layer norm and gelu; a numpy SigLIP (the graph's per-row int8
linear layers in exact integers, float64 elsewhere) for a small hand-built tower; onnxruntime's
own vision graph of the default model's int8 artifact for the whole tower; the graph's tokens for
generation. Bad input gets a clear error."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine import _native
from engine.__main__ import example_image_path
from engine.artifact import ArtifactError
from engine.runtime import native_vision, packed_weights

STEP = np.float32(1.0 / 127.0)
FEATURES = _native.cpu_features()
LEVELS = ["scalar"] + {"amx": ["avx2", "avx512", "amx"], "avx512": ["avx2", "avx512"], "avx2": ["avx2"],
                       "neon": ["neon"]}.get(FEATURES["best"], [])


@pytest.fixture
def simd_level():
    before = _native.simd_level()
    yield _native.set_simd_level
    _native.set_simd_level(before)


def int8_linear(x, wt, scales, bias):
    """The graph's per-row int8 linear layer (export/onnx_graphs.py) + bias, in numpy."""
    x = x.astype(np.float32)
    r = np.maximum(np.abs(x).max(1, keepdims=True), np.float32(1e-30))
    u = np.clip(np.rint((x / r) / STEP) + 128, 0, 255)
    acc = (u.astype(np.int64) - 128) @ wt.astype(np.int64)
    return (acc.astype(np.float32) * (STEP * scales)) * r + bias


def layer_norm64(x, w, b, eps):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def gelu64(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("level", LEVELS)
def test_layer_norm_and_gelu_against_float64(level, simd_level):
    simd_level(level)
    rng = np.random.default_rng(0)
    for T, D in ((1, 1), (3, 15), (5, 37), (4, 1152)):
        x = (rng.standard_normal((T, D)) * rng.choice([1e-3, 1.0, 300.0], (T, 1)) + 5).astype(np.float32)
        w, b = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
        np.testing.assert_allclose(_native.layer_norm_rows(x, w, b, 1e-6), layer_norm64(x, w, b, 1e-6),
                                   rtol=1e-4, atol=2e-5 * np.abs(w).max() + 1e-6)
    g = np.linspace(-12, 12, 1001).astype(np.float32)      # 1001: a tail of 9 after 62 vectors of 16
    np.testing.assert_allclose(_native.gelu_tanh(g), gelu64(g), rtol=1e-5, atol=1e-6)


def random_tower(rng, *, D=24, heads=3, F=40, image=12, patch=4, out=20, layers=2, C=3, fc2_rows=None):
    """A small tower with random per-row int8 weights: (the VisionTower, the numpy oracle).
    fc2_rows: fc2 packed with zero rows up to this K (the packer's padding for the AMX kernel)."""
    def linear(K, O, rows=None):
        wt = rng.integers(-63, 64, (K, O), dtype=np.int8)
        scales = (rng.random(O, dtype=np.float32) + 0.5) * np.float32(0.02)
        bias = rng.standard_normal(O).astype(np.float32)
        padded = wt if rows is None else np.concatenate([wt, np.zeros((rows - K, O), np.int8)])
        codes, colsum, max_code = _native.pack_linear_int8(padded)
        return (codes, colsum, STEP * scales, max_code, bias), (wt, scales, bias)

    def norm():
        return (1 + 0.1 * rng.standard_normal(D)).astype(np.float32), (0.1 * rng.standard_normal(D)).astype(np.float32)
    P = (image // patch) ** 2
    patch_l, patch_np = linear(C * patch * patch, D)
    position = rng.standard_normal((P, D)).astype(np.float32)
    layer_args, layer_np = [], []
    for _ in range(layers):
        lins = {k: linear(*kio) for k, kio in {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "fc1": (D, F),
                                                "fc2": (F, D, fc2_rows)}.items()}
        (w1, b1), (w2, b2) = norm(), norm()
        layer_args.append({**{k: v[0] for k, v in lins.items()}, "ln1_w": w1, "ln1_b": b1, "ln2_w": w2, "ln2_b": b2})
        layer_np.append(({k: v[1] for k, v in lins.items()}, (w1, b1), (w2, b2)))
    post = norm()
    proj_l, proj_np = linear(D, out)
    tower = _native.VisionTower(patch_l, position, layer_args, post, proj_l, image_size=image, patch_size=patch,
                                channels=C, hidden_size=D, mlp_width=F, heads=heads, out_dim=out, eps=1e-6,
                                attn_dtype="f32")

    def oracle(pixels):
        N = pixels.shape[0]
        g, hd = image // patch, D // heads
        x = pixels.reshape(N, C, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(N * P, -1)
        x = int8_linear(x, *patch_np).astype(np.float64) + np.tile(position, (N, 1))
        for lins, ln1, ln2 in layer_np:
            h = layer_norm64(x, *ln1, 1e-6)
            q, k, v = (int8_linear(h, *lins[n]).astype(np.float64).reshape(N, P, heads, hd).transpose(0, 2, 1, 3)
                       for n in ("q", "k", "v"))
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)                   # [N, heads, P, P]
            p = np.exp(s - s.max(-1, keepdims=True))
            a = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(N * P, D)
            x = x + int8_linear(a, *lins["o"])
            h = gelu64(int8_linear(layer_norm64(x, *ln2, 1e-6), *lins["fc1"]))
            x = x + int8_linear(h, *lins["fc2"])
        return int8_linear(layer_norm64(x, *post, 1e-6), *proj_np).reshape(N, P, out)
    return tower, oracle


@pytest.mark.parametrize("level", LEVELS)
def test_small_tower_against_numpy(level, simd_level):
    """Odd sizes (D 24, 3 heads of 8, MLP 40, 9 tokens) against the numpy SigLIP; two images in one
    call give each image what it gives alone, bit for bit (they only meet in the attention, which
    keeps them apart)."""
    simd_level(level)
    rng = np.random.default_rng(1)
    tower, oracle = random_tower(rng)
    pixels = rng.uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    pool = _native.ThreadPool(3)
    got = tower.run(pixels, pool)
    want = oracle(pixels)
    assert got.shape == want.shape == (2, 9, 20)
    # the int8 rounding of a row can flip where float64 and float32 activations differ: compare the
    # whole output's scale, and the cosine
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), level
    cos = (got.ravel() @ want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.9999, (level, cos)
    assert np.array_equal(tower.run(pixels[1:], pool), got[1:])
    assert np.array_equal(tower.run(pixels[:1]), got[:1])          # the default pool, the same bits


@pytest.mark.parametrize("level", LEVELS)
def test_fc2_padded_to_64_gives_the_same_bits(level, simd_level):
    """The packer pads fc2's K to a multiple of 64 (SigLIP's 4,304 -> 4,352) so that the AMX kernel
    takes it: zero codes against zero activation columns add exactly nothing."""
    simd_level(level)
    plain, _ = random_tower(np.random.default_rng(4), F=40)
    padded, _ = random_tower(np.random.default_rng(4), F=40, fc2_rows=64)
    assert (plain.mlp_stride, padded.mlp_stride) == (40, 64)
    pixels = np.random.default_rng(5).uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    assert np.array_equal(plain.run(pixels), padded.run(pixels))
    with pytest.raises(ValueError, match=r"fc2'\] must have K = mlp_width \(40\) or mlp_width rounded up to 64"):
        random_tower(np.random.default_rng(4), F=40, fc2_rows=48)


def test_tower_bad_input_errors():
    rng = np.random.default_rng(2)
    tower, _ = random_tower(rng)
    with pytest.raises(ValueError, match=r"pixel_values must be float32 \[images, channels, image_size, image_size\]"):
        tower.run(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="pixel_values must be float32"):
        tower.run(np.zeros((1, 3, 12, 12), np.float64))
    with pytest.raises(ValueError, match="at least one image"):
        tower.run(np.zeros((0, 3, 12, 12), np.float32))
    bad = np.zeros((1, 3, 12, 12), np.float32)
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        tower.run(bad)
    codes, colsum, _ = _native.pack_linear_int8(np.zeros((48, 24), np.int8))
    good = (codes, colsum, np.ones(24, np.float32), 0, np.zeros(24, np.float32))
    with pytest.raises(ValueError, match=r"patch must be \(codes, colsum, colscale, max_code, bias\)"):
        _native.VisionTower(good[:4], np.zeros((9, 24), np.float32), [], (np.ones(24, np.float32),) * 2, good,
                            image_size=12, patch_size=4, channels=3, hidden_size=24, mlp_width=40, heads=3,
                            out_dim=24, eps=1e-6)
    with pytest.raises(ValueError, match="layers\\[0\\] needs 'q'"):
        _native.VisionTower(good, np.zeros((9, 24), np.float32), [{}], (np.ones(24, np.float32),) * 2, good,
                            image_size=12, patch_size=4, channels=3, hidden_size=24, mlp_width=40, heads=3,
                            out_dim=24, eps=1e-6)
    with pytest.raises(ValueError, match="multiple of heads"):
        _native.VisionTower(good, np.zeros((9, 24), np.float32), [], (np.ones(24, np.float32),) * 2, good,
                            image_size=12, patch_size=4, channels=3, hidden_size=24, mlp_width=40, heads=5,
                            out_dim=24, eps=1e-6)
    with pytest.raises(ValueError, match=r"position must be float32 \[tokens, hidden_size\]"):
        _native.VisionTower(good, np.zeros((8, 24), np.float32), [], (np.ones(24, np.float32),) * 2, good,
                            image_size=12, patch_size=4, channels=3, hidden_size=24, mlp_width=40, heads=3,
                            out_dim=24, eps=1e-6)


# ---------------------------------------------------------------- the default model's int8 artifact
@pytest.fixture(scope="module")
def graph_model(module_cache):
    m = engine.load(backend="onnxruntime", weights="int8", progress=False, vision="graph")
    yield m
    m.close()


@pytest.mark.parametrize("level", LEVELS)
def test_tower_matches_the_onnxruntime_graph(graph_model, level, simd_level):
    simd_level(level)
    nv = native_vision.open_native_vision(graph_model.artifact_dir, graph_model.manifest, graph_model.config)
    v = graph_model.config.vision
    assert nv.tower.mlp_stride == -(-v.intermediate_size // 64) * 64
    rng = np.random.default_rng(3)
    batch = rng.uniform(-1, 1, (2, 3, v.image_size, v.image_size)).astype(np.float32)
    batch[0] = graph_model.processor.preprocess(example_image_path())       # a real image, and noise
    want = graph_model.runner.run("vision", {"pixel_values": batch})["image_features"]
    got = nv.run(batch, _native.ThreadPool(2))
    assert got.shape == want.shape
    for g, w in zip(got, want):
        cos = (g.ravel().astype(np.float64) @ w.ravel()) / np.linalg.norm(g) / np.linalg.norm(w)
        assert cos > 0.9999, (level, cos)
        assert np.abs(g - w).max() <= 3e-2 * np.abs(w).max(), level


def test_int8_features_against_the_fp32_reference(graph_model):
    """The fidelity bar of the int8 format (cosine >= 0.999 against fp32): the native tower's image
    features of the default model against the numpy fp32 SigLIP on the checkpoint's own weights,
    next to onnxruntime's graph on the same artifact."""
    from engine.reference import ReferenceModel
    ref = ReferenceModel.from_pretrained(engine.default_model_path())
    nv = native_vision.open_native_vision(graph_model.artifact_dir, graph_model.manifest, graph_model.config)
    rng = np.random.default_rng(6)
    v = graph_model.config.vision
    pixels = np.stack([graph_model.processor.preprocess(example_image_path()),
                       rng.uniform(-1, 1, (3, v.image_size, v.image_size)).astype(np.float32)])
    want = ref.encode_image(pixels).astype(np.float64)
    native = nv.run(pixels, _native.ThreadPool(2))
    graph = graph_model.runner.run("vision", {"pixel_values": pixels})["image_features"]
    for i in range(len(pixels)):
        w = want[i].ravel()
        cos = {name: float(f[i].ravel() @ w / np.linalg.norm(f[i]) / np.linalg.norm(w))
               for name, f in (("native", native), ("graph", graph))}
        assert min(cos.values()) >= 0.999, (i, cos)


def test_generation_matches_the_graph(graph_model, module_cache):
    native = engine.load(backend="onnxruntime", weights="int8", progress=False, vision="native")
    try:
        assert native.vision_kind == "native" and graph_model.vision_kind == "graph"
        assert "vision" not in native.runner.graph_names
        assert native.identity != graph_model.identity      # image-feature cache keys: never shared
        image = example_image_path()
        for prompt in ("caption en", "detect circle"):
            assert graph_model.generate(image, prompt, max_new_tokens=12).tokens == \
                native.generate(image, prompt, max_new_tokens=12).tokens, prompt
    finally:
        native.close()
    assert native._native_vision is None and native.vision_kind == "native"   # the map is released


def test_a_damaged_cache_entry_is_packed_again(graph_model, caplog):
    nv = native_vision.open_native_vision(graph_model.artifact_dir, graph_model.manifest, graph_model.config)
    weights = nv.entry / packed_weights.WEIGHTS
    del nv
    data = bytearray(weights.read_bytes())
    data[200] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="engine"):
        nv = native_vision.open_native_vision(graph_model.artifact_dir, graph_model.manifest, graph_model.config)
    assert "packing them again" in caplog.text
    assert native_vision.stamped_dir.check(nv.entry, packed_weights.FILES) is None


def test_cache_command_lists_and_clears_the_packed_weights(graph_model, capsys):
    import json
    from engine.__main__ import main
    native_vision.open_native_vision(graph_model.artifact_dir, graph_model.manifest, graph_model.config)
    n = len(native_vision.entries())
    assert n >= 1
    assert main(["cache", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["native_vision"]["graphs"] == n
    assert main(["cache", "clear", "--older-than", "1h"]) == 0        # just used: kept
    assert len(native_vision.entries()) == n
    (native_vision.entries()[0] / native_vision.stamped_dir.STAMP).unlink()
    capsys.readouterr()
    assert main(["cache", "clear", "--corrupt"]) == 0
    assert len(native_vision.entries()) == n - 1 and "native vision packed weights of 1 graphs" in capsys.readouterr().out


def test_auto_takes_the_native_tower_only_where_it_was_measured(module_cache, simd_level):
    for level in LEVELS:
        simd_level(level)
        m = engine.load(backend="onnxruntime", weights="int8", progress=False)
        try:
            native = ((level == "avx512" and not FEATURES["amx"])
                      or level == FEATURES["best"] == "avx2")
            assert m.vision_kind == ("native" if native else "graph"), level
        finally:
            m.close()


def test_auto_declines_by_cpu(monkeypatch):
    features = dict(_native.cpu_features(), amx=False, avx512_vnni=True, simd="avx512")
    monkeypatch.setattr(native_vision._native, "cpu_features", lambda: features)
    assert native_vision.auto_declines() is None
    monkeypatch.setattr(native_vision._native, "cpu_features", lambda: dict(features, amx=True, simd="amx"))
    assert "AMX" in native_vision.auto_declines()
    monkeypatch.setattr(native_vision._native, "cpu_features", lambda: dict(features, best="avx512", simd="avx2"))
    assert "avx2" in native_vision.auto_declines()            # ENGINE_SIMD=avx2 on an AVX-512 CPU
    monkeypatch.setattr(native_vision._native, "cpu_features",
                        lambda: dict(features, avx512_vnni=False, best="avx512", simd="avx512"))
    assert native_vision.auto_declines() is None               # AVX-512 without VNNI
    monkeypatch.setattr(native_vision._native, "cpu_features",
                        lambda: dict(features, avx512_vnni=False, best="avx2", simd="avx2"))
    assert native_vision.auto_declines() is None               # a CPU whose best is AVX2
    monkeypatch.setattr(native_vision._native, "cpu_features",
                        lambda: dict(features, avx512_vnni=False, best="neon", simd="neon", arch="aarch64"))
    assert "neon" in native_vision.auto_declines()
    monkeypatch.setenv(native_vision.ENV_SWITCH, "0")
    assert not native_vision.enabled_by_env()


def test_bad_vision_choice_errors(module_cache):
    with pytest.raises(ValueError, match="vision must be one of auto, graph, native"):
        engine.load(backend="onnxruntime", weights="int8", progress=False, vision="fast")
    with pytest.raises(ArtifactError, match="vision='native' cannot run: the openvino backend"):
        engine.load(backend="openvino", weights="int8", progress=False, vision="native")
