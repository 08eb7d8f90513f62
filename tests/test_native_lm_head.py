"""The native int8 LM head (engine.model, lm_head="auto"): used for int8 / int4 artifacts of
tied-embedding checkpoints, on both backends, without loading the lm_head graph; its logits
against a numpy oracle (final RMSNorm and the dequantized int8 table in fp32) and against the
lm_head graph of the same artifact; greedy tokens equal to the graph head's; bad options."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.__main__ import example_image_path
from engine.artifact import ArtifactError
from engine.reference import rms_norm


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def oracle_logits(model, hidden: np.ndarray) -> np.ndarray:
    """numpy, fp32, no activation quantization: norm, the dequantized table, Gemma 2's softcap."""
    art = model.artifact_dir
    t = model.config.text
    w = np.load(art / "final_norm.npy")
    table = np.load(art / "embed_tokens.npy").astype(np.float32) * np.load(art / "embed_scales.npy")[:, None]
    logits = rms_norm(hidden, w, t.rms_norm_eps) @ table.T
    cap = t.final_logit_softcapping
    return np.tanh(logits / cap) * cap if cap else logits


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def pair(request, module_cache):
    native = engine.load(backend=request.param, weights="int8", progress=False)
    graph = engine.load(backend=request.param, weights="int8", progress=False, lm_head="graph")
    yield native, graph
    native.close()
    graph.close()


def test_native_head_is_used_and_its_graph_not_loaded(pair):
    native, graph = pair
    assert native._final_norm is not None and "lm_head" not in native.runner.graph_names
    assert graph._final_norm is None and "lm_head" in graph.runner.graph_names


def test_logits_match_the_numpy_oracle_and_the_graph(pair):
    native, graph = pair
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((5, native.config.text.hidden_size)).astype(np.float32) * 3
    want = oracle_logits(native, hidden)
    got = native.logits(hidden)
    assert got.shape == want.shape == graph.logits(hidden).shape
    # only the activations' int8 rounding separates the two
    assert cosine(got, want).min() > 0.9995
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
    # the graph rounds differently (onnxruntime: 7-bit weight codes, export/onnx_graphs.py)
    assert cosine(got, graph.logits(hidden)).min() > 0.99


def test_greedy_tokens_equal_the_graph_head(pair):
    native, graph = pair
    for prompt in ("caption en", "detect square", "answer en how many shapes are there"):
        a = native.generate(example_image_path(), prompt, max_new_tokens=12)
        b = graph.generate(example_image_path(), prompt, max_new_tokens=12)
        assert a.tokens == b.tokens, prompt


def test_native_head_needs_an_int8_table(module_cache):
    with pytest.raises(ArtifactError, match="lm_head='native' needs an int8 embedding table"):
        engine.load(backend="onnxruntime", weights="fp32", progress=False, lm_head="native")
    m = engine.load(backend="onnxruntime", weights="fp32", progress=False)     # auto: the graph
    assert m._final_norm is None and "lm_head" in m.runner.graph_names
    m.close()


def test_bad_lm_head_option(module_cache):
    with pytest.raises(ValueError, match="lm_head must be 'auto', 'graph' or 'native'"):
        engine.load(backend="onnxruntime", weights="int8", progress=False, lm_head="fast")
