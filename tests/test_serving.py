"""The serving core (engine/serving) on a tiny synthetic PaliGemma 2, both backends.

Oracle: the same request run alone, serially, on the same model (each call waits for the
previous one). Concurrent runs must give exactly the same tokens (beam scores within 1e-6):
the scheduler batches decode rows of different requests into shared graph calls, so any leak
of one request's state into another, or any row result that depended on the batch, shows here.
"""
from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import engine
from engine import _native
from engine.serving import FeatureCache, QueueFullError, SchedulerClosed, SchedulerConfig, image_key
from engine.synth import write_synthetic_checkpoint

BACKENDS = ("onnxruntime", "openvino")


def noise_image(i: int, size=None):
    from PIL import Image
    rng = np.random.default_rng(200 + i)
    h, w = size or (30 + 11 * i, 40 + 5 * i)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from export.pipeline import export_checkpoint
    root = tmp_path_factory.mktemp("serving")
    write_synthetic_checkpoint("tiny-pg2", root / "ckpt", seed=3, dtype="fp32")
    return export_checkpoint(root / "ckpt", root / "fp32", formats=("onnx", "openvino"), weights="fp32",
                             progress=False)


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, artifact):
    m = engine.load(artifact, backend=request.param, threads=1, progress=False)
    yield m
    m.close()


# --------------------------------------------------------------------------- the mixed workload
PROMPTS = ("caption en", "answer en what colour is the circle", "detect red circle ; blue square ; cat",
           "segment green triangle", "ocr")
SETTINGS = (dict(), dict(do_sample=True, temperature=1.3, top_p=0.9, seed=5), dict(num_beams=3),
            dict(do_sample=True, top_k=20, seed=11, repetition_penalty=1.3), dict(ignore_eos=True))


def mixed_requests(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kw = dict(SETTINGS[i % len(SETTINGS)])
        if kw.get("do_sample"):
            kw["seed"] = kw["seed"] + i
        kw["max_new_tokens"] = rng.choice((3, 6, 10, 17))
        out.append(dict(image=i % 6, prompt=PROMPTS[(i // len(SETTINGS)) % len(PROMPTS)], kw=kw))
    # a batched request (two prompts, one of them multi-image) every so often
    for j in range(0, n, 25):
        out.append(dict(image=[[1, 2], 3], prompt=["caption en", "answer en how many"],
                        kw=dict(max_new_tokens=7, num_beams=2 if j % 2 else 1)))
    return out


def run_one(model, spec, images):
    img = spec["image"]
    image = [[images[k] for k in i] if isinstance(i, list) else images[i] for i in img] \
        if isinstance(img, list) else images[img]
    r = model.generate(image, spec["prompt"], **spec["kw"])
    return [(x.tokens, x.finish_reason, x.score, x.stats) for x in (r if isinstance(r, list) else [r])]


def assert_same(got, want, what):
    assert len(got) == len(want), what
    for (tokens, reason, score, _), (t0, r0, s0, _) in zip(got, want):
        assert tokens == t0 and reason == r0, what
        if s0 is not None:
            assert score == pytest.approx(s0, abs=1e-6), what


def test_concurrent_mixed_requests_equal_lone_runs(model):
    """16 threads, 110+ mixed requests (prompts of every task, greedy / seeded sampling / 3 beams /
    repetition penalty, six images, several max_new_tokens, batched and multi-image requests)."""
    images = [noise_image(i) for i in range(6)]
    specs = mixed_requests(110)
    alone = [run_one(model, s, images) for s in specs]          # the oracle: one after another
    order = list(range(len(specs)))
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(16) as pool:
        futures = {i: pool.submit(run_one, model, specs[i], images) for i in order}
        together = {i: f.result(timeout=300) for i, f in futures.items()}
    for i, spec in enumerate(specs):
        assert_same(together[i], alone[i], spec)
    # The test is only meaningful if requests really shared decode steps.
    shared = 0
    for i, spec in enumerate(specs):
        own_rows = spec["kw"].get("num_beams", 1) * (len(spec["prompt"]) if isinstance(spec["prompt"], list) else 1)
        st = together[i][0][3]
        shared += st.decode_rows > st.decode_steps * own_rows
    assert shared > len(specs) // 3, f"only {shared} of {len(specs)} requests shared a decode step"
    assert model.serving_state().kv_cache_bytes == 0


def test_task_helpers_are_thread_safe(model):
    images = [noise_image(i) for i in range(3)]
    calls = [lambda i=i: model.caption(images[i % 3], max_new_tokens=8) for i in range(6)]
    calls += [lambda i=i: model.answer(images[i % 3], "what is it", max_new_tokens=5, num_beams=3) for i in range(6)]
    calls += [lambda i=i: model.detect(images[i % 3], ["cat", "dog", "bird"], max_new_tokens=12) for i in range(6)]
    calls += [lambda i=i: model.ocr(images[i % 3], max_new_tokens=6, do_sample=True, seed=i) for i in range(6)]

    def key(out):
        return (out.tokens, out.score) if hasattr(out, "tokens") else out

    alone = [key(c()) for c in calls]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda c: key(c()), calls))
    assert together == alone


# --------------------------------------------------------------------------- batching mechanics
def test_native_calls_per_step_do_not_grow_with_live_requests(model, monkeypatch):
    """Between two token selections of a pure decode step (no prefill in between), the graph and
    native calls are the same for one live request and for eight."""
    from engine import model as model_module
    from engine.serving import scheduler as scheduler_module
    events: list[tuple] = []
    run = model.runner.run

    def counting_run(graph, inputs):
        events.append(("graph", graph, len(next(iter(inputs.values())))))
        return run(graph, inputs)

    class Counting:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            attr = getattr(self._inner, name)
            if not callable(attr) or isinstance(attr, type):
                return attr

            def counted(*args, **kwargs):
                events.append(("native", name, len(args[0]) if name == "select_step" else 0))
                return attr(*args, **kwargs)
            return counted

    monkeypatch.setattr(model.runner, "run", counting_run)
    monkeypatch.setattr(model_module, "_native", Counting(_native))
    monkeypatch.setattr(scheduler_module, "_native", Counting(_native))
    n_layers = model.config.text.num_hidden_layers
    image = noise_image(0)

    def per_step(n_requests):
        events.clear()
        handles = [model.submit(image, "caption en", max_new_tokens=80, ignore_eos=True) for _ in range(n_requests)]
        for h in handles:
            h.result(timeout=60)
        # split at select_step; keep the steps that fed exactly n_requests decode rows, no prefill
        steps, current = [], []
        for e in events:
            if e[:2] == ("native", "select_step"):
                steps.append((e[2], current))
                current = []
            else:
                current.append(e)
        pure = [c for n, c in steps if n == n_requests and c and all(e[0] == "native" or e[2] <= max(n_requests, 2)
                                                                     for e in c) and
                not any(e[1] == "vision" for e in c)]
        assert pure, "no pure decode step with every request live"
        return {tuple(sorted(Counter(e[1] for e in c).items())) for c in pure}

    one, eight = per_step(1), per_step(8)
    assert one == eight and len(one) == 1, (one, eight)
    counts = dict(next(iter(one)))
    assert counts["attention_plan"] == n_layers and counts["decode_rows"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("decoder_")) == n_layers + 1 and counts["lm_head"] == 1


def test_prefill_is_chunked_while_others_decode(artifact):
    """A request that arrives while another decodes has its prefill spread over several steps
    (prefill_chunk_layers=1: one layer boundary per step), and still equals its lone result."""
    m = engine.load(artifact, backend="onnxruntime", threads=1, progress=False,
                    serving=SchedulerConfig(prefill_chunk_layers=1))
    try:
        long_one = m.submit(noise_image(0), "caption en", max_new_tokens=200, ignore_eos=True)
        next(long_one.tokens())                         # it is decoding now
        late = m.generate(noise_image(1), "answer en what", max_new_tokens=6)
        assert late.stats.prefill_chunks >= m.config.text.num_hidden_layers + 1
        long_one.cancel()
        alone = m.generate(noise_image(1), "answer en what", max_new_tokens=6)
        assert alone.stats.prefill_chunks == 1 and alone.tokens == late.tokens
    finally:
        m.close()


# --------------------------------------------------------------------------- cancellation
def test_cancel_mid_decode_frees_its_cache(model):
    other = model.submit(noise_image(2), "caption en", max_new_tokens=40, ignore_eos=True)
    h = model.submit(noise_image(1), "caption en", max_new_tokens=400, ignore_eos=True)
    got = []
    for new in h.tokens():
        got += new
        if len(got) >= 3:
            break
    assert model.serving_state().kv_cache_bytes > 0
    h.cancel()
    r = h.result(timeout=30)
    assert r.finish_reason == "cancelled" and 3 <= len(r.tokens) < 400
    assert r.tokens[:3] == got[:3]
    full = other.result(timeout=60)
    assert full.finish_reason == "length" and len(full.tokens) == 40
    assert full.tokens == model.generate(noise_image(2), "caption en", max_new_tokens=40, ignore_eos=True).tokens
    state = model.serving_state()
    assert state.decoding == 0 and state.prefilling == 0 and state.kv_cache_bytes == 0


def test_a_finished_request_has_left_the_state_when_its_caller_wakes(model):
    """The scheduler removes a finished request from its decoding set before it hands the result
    over, so `serving_state()` read right after `generate` returns does not count it (it did, for
    a moment, and a slow run under ASan caught the test above reading it)."""
    sched = model._scheduler
    seen = []

    def spy(live, **kw):                    # runs where the result is handed to the caller
        seen.append(model.serving_state().decoding)
        type(sched)._hand_over(sched, live, **kw)

    sched._hand_over = spy
    try:
        r = model.generate(noise_image(3), "caption en", max_new_tokens=5, ignore_eos=True)
    finally:
        del sched._hand_over
    assert len(r.tokens) == 5 and seen == [0]


def test_stream_returning_false_cancels(model):
    pieces = []

    def stream(piece):
        pieces.append(piece)
        return len(pieces) < 2

    r = model.generate(noise_image(3), "caption en", max_new_tokens=300, ignore_eos=True, stream=stream)
    assert r.finish_reason == "cancelled" and len(r.tokens) < 300 and len(pieces) == 2
    assert model.serving_state().kv_cache_bytes == 0


def test_dropped_handle_cancels_its_request(model):
    h = model.submit(noise_image(4), "caption en", max_new_tokens=2000, ignore_eos=True)
    next(h.tokens())
    del h
    gc.collect()
    deadline = time.time() + 30
    while model.serving_state().decoding and time.time() < deadline:
        time.sleep(0.01)
    assert model.serving_state().decoding == 0 and model.serving_state().kv_cache_bytes == 0


# --------------------------------------------------------------------------- limits and failures
def test_full_queue_raises_at_once(artifact):
    m = engine.load(artifact, backend="onnxruntime", threads=1, progress=False,
                    serving=SchedulerConfig(max_queue=2, max_active=1))
    try:
        running = m.submit(noise_image(0), "caption en", max_new_tokens=3000, ignore_eos=True)
        next(running.tokens())
        queued = [m.submit(noise_image(i), "caption en", max_new_tokens=5) for i in range(2)]
        assert m.serving_state().queued == 2
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError, match="queue is full .*2 requests waiting.*max_queue"):
            m.submit(noise_image(3), "caption en", max_new_tokens=5)
        assert time.perf_counter() - t0 < 0.5
        running.cancel()
        for q in queued:                                  # the queue drains once the place is free
            assert q.result(timeout=60).finish_reason in ("eos", "length")
    finally:
        m.close()


def test_failing_request_fails_alone(model, monkeypatch):
    """A request whose image makes the vision graph fail (in the scheduler thread), one whose
    prompt overflows the context and one with an unreadable image (both in the caller's thread):
    each fails with its own error while concurrent requests finish with their lone results."""
    images = [noise_image(i) for i in range(4)]
    poison = noise_image(9, size=(33, 33))
    poison_px = model.processor(poison, "caption en")["pixel_values"][0]
    run = model.runner.run

    def failing_run(graph, inputs):
        if graph == "vision" and np.array_equal(inputs["pixel_values"][0], poison_px):
            raise ValueError("vision graph failed on purpose")
        return run(graph, inputs)

    good = [dict(image=i, prompt="caption en", kw=dict(max_new_tokens=12, num_beams=1 + (i % 2) * 2))
            for i in range(4)]
    alone = [run_one(model, s, images) for s in good]
    monkeypatch.setattr(model.runner, "run", failing_run)
    errors = {}

    def bad(name, fn):
        try:
            fn()
        except Exception as e:          # noqa: BLE001 - the test records what each raised
            errors[name] = e

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run_one, model, s, images) for s in good]
        pool.submit(bad, "vision", lambda: model.generate(poison, "caption en", max_new_tokens=5))
        pool.submit(bad, "context", lambda: model.generate(images[0], "caption en", max_new_tokens=10 ** 6))
        pool.submit(bad, "image", lambda: model.generate(b"not an image", "caption en"))
        results = [f.result(timeout=120) for f in futures]
    for got, want, spec in zip(results, alone, good):
        assert_same(got, want, spec)
    assert isinstance(errors["vision"], ValueError) and "failed on purpose" in str(errors["vision"])
    assert isinstance(errors["context"], ValueError) and "exceeds the model's context" in str(errors["context"])
    assert isinstance(errors["image"], (ValueError, OSError))
    assert model.serving_state().kv_cache_bytes == 0


def test_failing_decode_step_fails_its_requests_and_the_scheduler_goes_on(model, monkeypatch):
    """A graph failure inside a shared decode step fails the requests of that step (they share
    the call); requests submitted afterwards run normally."""
    want = model.generate(noise_image(1), "caption en", max_new_tokens=6).tokens
    run = model.runner.run
    armed = threading.Event()

    def failing_run(graph, inputs):
        if graph == "lm_head" and armed.is_set() and len(inputs["hidden"]) == 2:
            armed.clear()
            raise ValueError("lm_head failed on purpose")
        return run(graph, inputs)

    monkeypatch.setattr(model.runner, "run", failing_run)
    handles = [model.submit(noise_image(i), "caption en", max_new_tokens=400, ignore_eos=True) for i in (2, 3)]
    for h in handles:
        next(h.tokens())
    armed.set()
    for h in handles:
        with pytest.raises(ValueError, match="failed on purpose"):
            h.result(timeout=60)
    assert model.generate(noise_image(1), "caption en", max_new_tokens=6).tokens == want
    assert model.serving_state().kv_cache_bytes == 0


def test_close_leaves_no_threads(artifact):
    def native_threads():
        return len(os.listdir("/proc/self/task"))

    def cycle():
        m = engine.load(artifact, backend="openvino", threads=2, progress=False)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: m.caption(noise_image(i), max_new_tokens=4), range(8)))
        assert any(t.name == "paligemma-scheduler" for t in threading.enumerate())
        m.close()
        with pytest.raises(SchedulerClosed, match="closed"):
            m.caption(noise_image(0))
        del m
        gc.collect()

    cycle()                                     # runtimes' own process-wide threads start here
    before_py, before_os = set(threading.enumerate()), native_threads()
    cycle()
    cycle()
    assert set(threading.enumerate()) == before_py
    assert native_threads() <= before_os


def test_closing_fails_waiting_requests(artifact):
    m = engine.load(artifact, backend="onnxruntime", threads=1, progress=False)
    h = m.submit(noise_image(0), "caption en", max_new_tokens=5000, ignore_eos=True)
    next(h.tokens())
    m.close()
    with pytest.raises(SchedulerClosed):
        h.result(timeout=30)


def test_two_models_side_by_side(artifact):
    """Two models in one process, each with its own thread count, used at the same time."""
    a = engine.load(artifact, backend="onnxruntime", threads=1, progress=False)
    b = engine.load(artifact, backend="openvino", threads=2, progress=False)
    try:
        assert a._pool.num_threads == 1 and b._pool.num_threads == 2
        images = [noise_image(i) for i in range(4)]
        want = {(m.backend, i): m.generate(images[i], "caption en", max_new_tokens=9).tokens
                for m in (a, b) for i in range(4)}
        with ThreadPoolExecutor(8) as pool:
            got = dict(pool.map(lambda k: (k, (a if k[0] == "onnxruntime" else b).generate(
                images[k[1]], "caption en", max_new_tokens=9).tokens), list(want) * 2))
        assert got == want
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- image reuse
def test_same_image_encodes_once(artifact):
    m = engine.load(artifact, backend="onnxruntime", threads=1, progress=False)
    try:
        image = noise_image(5)
        first = m.generate(image, "caption en", max_new_tokens=5)
        again = m.generate([image, image], ["answer en what", "detect cat ; dog"], max_new_tokens=5)
        assert first.stats.images == 1 and first.stats.images_cached == 0 and first.stats.prefill.vision_calls == 1
        assert again[0].stats.images == 1 and again[0].stats.images_cached == 1
        assert again[0].stats.prefill.vision_calls == 0
        off = engine.load(m.artifact_dir, backend="onnxruntime", threads=1, progress=False,
                          serving=SchedulerConfig(image_cache_bytes=0))
        try:
            plain = off.generate([image, image], ["answer en what", "detect cat ; dog"], max_new_tokens=5)
            assert [r.tokens for r in plain] == [r.tokens for r in again]
            assert plain[0].stats.prefill.vision_calls == 1      # one image, two prompts: one encode
        finally:
            off.close()
    finally:
        m.close()


def test_feature_cache_lru_bounded_in_bytes():
    item = np.ones((4, 8), np.float32)                  # 128 bytes
    cache = FeatureCache(3 * item.nbytes)
    for k in "abc":
        cache.put(k, item * ord(k))
    assert cache.get("a") is not None                   # a is now the most recent
    cache.put("d", item)
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert cache.nbytes == 3 * item.nbytes
    got = cache.get("c")
    assert not got.flags.writeable and float(got[0, 0]) == ord("c")
    cache.put("huge", np.ones((100, 100), np.float32))  # larger than the cache: not stored
    assert cache.get("huge") is None and cache.nbytes <= cache.max_bytes
    assert FeatureCache(0).get("a") is None
    with pytest.raises(ValueError, match="image_cache_bytes"):
        FeatureCache(-1)
    px = np.zeros((3, 4, 4), np.float32)
    assert image_key(px, "m1") != image_key(px, "m2") != image_key(px + 1, "m2")
    assert image_key(px, "m1") == image_key(px.copy(), "m1")


def test_scheduler_config_errors():
    for bad in (dict(max_queue=0), dict(max_active=-1), dict(prefill_chunk_layers=0), dict(max_queue=1.5)):
        with pytest.raises(ValueError, match="must be an integer"):
            SchedulerConfig(**bad)
