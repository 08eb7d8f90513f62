"""kv_dtype="auto" (the default of engine.load): f16 KV storage for quantized artifacts, f32 for
float ones; an explicit choice wins; a bad one is a clear error. On the default (trained) model the
int8 artifact's greedy tokens with f16 keys and values equal those with f32 on both backends."""
from __future__ import annotations

import pytest

import engine
from engine.__main__ import example_image_path
from engine.model import resolve_kv_dtype


def test_resolve_by_hand():
    assert [resolve_kv_dtype("auto", f) for f in ("int8", "int4", "fp8")] == ["f16"] * 3
    assert [resolve_kv_dtype("auto", f) for f in ("fp32", "fp16", "bf16", None)] == ["f32"] * 4
    assert [resolve_kv_dtype(k, "int8") for k in ("f32", "f16", "int8")] == ["f32", "f16", "int8"]
    with pytest.raises(ValueError, match="kv_dtype must be 'auto' or one of f32, f16, int8, got 'bf16'"):
        resolve_kv_dtype("bf16", "int8")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_default_is_f16_and_gives_the_f32_tokens(backend, module_cache):
    auto = engine.load(backend=backend, weights="int8", progress=False)
    f32 = engine.load(backend=backend, weights="int8", progress=False, kv_dtype="f32")
    try:
        assert auto.kv_dtype == "f16" and f32.kv_dtype == "f32"
        for prompt in ("caption en", "detect blue square ; green square", "answer en how many shapes are there"):
            a = auto.generate(example_image_path(), prompt, max_new_tokens=16)
            b = f32.generate(example_image_path(), prompt, max_new_tokens=16)
            assert a.tokens == b.tokens, prompt
    finally:
        auto.close()
        f32.close()


def test_float_artifact_stays_f32_and_bad_choice_raises(module_cache):
    m = engine.load(backend="onnxruntime", weights="fp32", progress=False)
    assert m.kv_dtype == "f32"
    m.close()
    with pytest.raises(ValueError, match="kv_dtype must be 'auto' or one of"):
        engine.load(backend="onnxruntime", weights="fp32", progress=False, kv_dtype="half")
