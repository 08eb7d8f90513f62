"""The serving core on the bundled default model (engine.load()), whose answers are real: boxes,
masks, captions. Oracle: the same call alone, serially, on the same model.

Backends: OpenVINO int8 (the default load), onnxruntime int8 (its native decoder and vision tower
on AVX-512 VNNI), onnxruntime int4 (its native int4 decoder there) and onnxruntime fp32. Exact
batching needs every row of a graph call to be independent of the others, which
test_int8_rows_are_independent checks directly for the int8 graphs of both runtimes.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import engine
from engine import scenes
from proc_status import status_bytes

CONFIGS = (("int8", "openvino"), ("int8", "onnxruntime"), ("int4", "onnxruntime"), ("fp32", "onnxruntime"))


@pytest.fixture(scope="module")
def cache_dir(module_cache):
    return module_cache


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[1]}-{c[0]}")
def model(request, cache_dir):
    weights, backend = request.param
    m = engine.load(None, backend=backend, weights=weights, threads=2, progress=False)
    yield m
    m.close()


SCENES = [scenes.make_scene(scenes.EVAL_SEED_BASE + 700 + i) for i in range(8)]
SETTINGS = (dict(), dict(do_sample=True, temperature=1.0), dict(num_beams=3))
TASKS = ("caption", "answer", "detect", "segment")


def specs(n: int) -> list[tuple]:
    out = []
    for i in range(n):
        scene = SCENES[i % len(SCENES)]
        obj = scene.objects[i % len(scene.objects)]
        task = TASKS[i % len(TASKS)]
        kw = dict(SETTINGS[(i // len(TASKS)) % len(SETTINGS)])
        if kw.get("do_sample"):
            kw["seed"] = i
        kw["max_new_tokens"] = 60 if task == "segment" else (12, 24, 40)[i % 3]
        out.append((i % len(SCENES), task, obj, kw))
    return out


def run(model, spec):
    """A task helper's output in comparable form (beam scores kept apart for the tolerance)."""
    scene, task, obj, kw = spec
    image = SCENES[scene].image
    labels = [obj.label, "red circle", "blue triangle"]       # several labels, some absent
    if task == "caption":
        r = model.caption(image, **kw)
        return (r.tokens, r.finish_reason), r.score
    if task == "answer":
        r = model.answer(image, f"what colour is the {obj.kind}", **kw)
        return (r.tokens, r.finish_reason), r.score
    if task == "detect":
        return [(d.label, d.box) for d in model.detect(image, labels, **kw)], None
    return [(s.label, s.box, s.mask.tobytes()) for s in model.segment(image, labels[:2], **kw)], None


def test_concurrent_tasks_equal_lone_runs(model):
    """16 threads, 120 requests: caption, answer, detect (3 labels), segment (2 labels, masks);
    greedy, seeded sampling, 3 beams; eight scenes; several max_new_tokens."""
    work = specs(120)
    alone = [run(model, s) for s in work]
    order = list(range(len(work)))
    random.Random(2).shuffle(order)
    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(order, pool.map(lambda i: run(model, work[i]), order)))
    for i, spec in enumerate(work):
        (value, score), (want, want_score) = got[i], alone[i]
        assert value == want, spec
        if want_score is not None:
            assert score == pytest.approx(want_score, abs=1e-6), spec
    found = sum(1 for s, (v, _) in zip(work, alone) if s[1] in ("detect", "segment") and v)
    assert found >= 30, f"only {found} detect / segment calls found something: the comparison is too weak"
    assert model.serving_state().kv_cache_bytes == 0


@pytest.mark.parametrize("backend", ("onnxruntime", "openvino"))
def test_int8_rows_are_independent(cache_dir, backend):
    """Row 0 of a decoder-graph / LM-head call gives the same numbers whatever the other rows are
    (rows of very different scales), for any call of two or more rows (PaliGemma.run_rows pads a
    one-row call to two). The graphs' runner (the native decoder's rows: tests/test_native_decoder.py)."""
    m = engine.load(None, backend=backend, weights="int8", progress=False, decoder="graphs")
    try:
        t = m.config.text
        rng = np.random.default_rng(0)
        hidden = rng.standard_normal((9, t.hidden_size)).astype(np.float32)
        attn = rng.standard_normal((9, t.num_attention_heads * t.head_dim)).astype(np.float32)
        scale = np.linspace(0.05, 8, 8, dtype=np.float32)[:, None]
        hidden[1:] *= scale
        attn[1:] *= scale
        for rows in ([0], [0, 1], [0, 3, 8], list(range(9))):
            got = m.run_rows("decoder_1", {"hidden": hidden[rows], "attn": attn[rows]})
            want = m.run_rows("decoder_1", {"hidden": hidden[:1], "attn": attn[:1]})
            for name in got:
                np.testing.assert_array_equal(got[name][0], want[name][0], err_msg=f"{backend} {name} {rows}")
            np.testing.assert_array_equal(m.logits(hidden[rows])[0], m.logits(hidden[:1])[0])
    finally:
        m.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_thousand_requests_do_not_leak(cache_dir):
    """1,000 requests (8 threads, mixed tasks and settings) on the default model: the RSS after
    request 1,000 is within 5% of the RSS after request 100."""
    m = engine.load(None, progress=False, threads=2)
    work = [(i % 8, TASKS[i % 3], SCENES[i % 8].objects[0], dict(SETTINGS[i % 3], max_new_tokens=10 + i % 7,
                                                                 seed=i))
            for i in range(1000)]
    for s in work:
        if not s[3].get("do_sample"):
            s[3].pop("seed")
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: run(m, s), work[:100]))
            rss_100 = status_bytes("VmRSS")
            list(pool.map(lambda s: run(m, s), work[100:]))
            rss_1000 = status_bytes("VmRSS")
        state = m.serving_state()
    finally:
        m.close()
    assert state.kv_cache_bytes == 0 and state.decoding == 0 and state.queued == 0
    growth = (rss_1000 - rss_100) / rss_100
    print(f"RSS after 100: {rss_100 / 2**20:.1f} MiB, after 1000: {rss_1000 / 2**20:.1f} MiB ({growth:+.2%})")
    assert abs(growth) < 0.05
