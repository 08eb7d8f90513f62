"""engine.bench's concurrency mode: the quick run end to end (subprocess, its own cache), the
request bookkeeping checked against what the settings imply, and the math (percentiles against
numpy, the decode-time share, the goals) on hand-computed cases."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from engine.bench import concurrency
from engine.bench.__main__ import build_parser, parse_levels, resolve_args

HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


@pytest.fixture(scope="module")
def quick_concurrency(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-concurrency")
    out = tmp / "out"
    env = dict(os.environ, PALIGEMMA_EDGE_CACHE=str(tmp / "cache"))
    proc = subprocess.run([sys.executable, "-m", "engine.bench", "--quick", "--concurrency", "1,3",
                           "--concurrency-requests", "2", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads((out / "results.json").read_text()), proc.stdout, out


def test_quick_concurrency_counts_every_request(quick_concurrency):
    r, stdout, out = quick_concurrency
    st = r["settings"]
    assert st["levels"] == [1, 3] and st["per_client"] == 2
    engines = [s for s in r["systems"] if s["kind"] == "engine"]
    assert {s["backend"] for s in engines} == {"openvino", "onnxruntime"}
    want = {"caption": st["new_tokens"], "detect": st["detect_tokens"]}
    for s in engines:
        levels = s["result"]["levels"]
        assert [lv["clients"] for lv in levels] == [1, 3]
        for lv in levels:
            recs = lv["records"]
            assert lv["requests"] == len(recs) == lv["clients"] * 2
            # client c's r-th request is a caption when c + r is even: half of each kind here
            assert sorted(x["kind"] for x in recs) == sorted(concurrency.request_kind(c, k)
                                                             for c in range(lv["clients"]) for k in range(2))
            assert all(x["tokens"] == want[x["kind"]] for x in recs)         # EOS ignored: exact counts
            assert all(x["decode_tokens"] == x["tokens"] - 1 for x in recs)
            assert lv["tokens"] == sum(want[x["kind"]] for x in recs)
            assert lv["tokens_per_s"] == pytest.approx(lv["tokens"] / lv["wall_s"])
            assert all(0 < x["ttft_s"] <= x["latency_s"] <= lv["wall_s"] for x in recs)
            assert lv["p50_latency_s"] <= lv["p95_latency_s"] <= max(x["latency_s"] for x in recs)
        a = s["result"]["arrival"]
        assert a["running"] == concurrency.ARRIVAL_RUNNING and a["ttft_alone_s"] > 0 and a["ttft_arrival_s"] > 0
        steps = s["result"]["decode_steps"]
        assert [d["rows"] for d in steps] == [1, 3]
        assert all(d["step_s"] > 0 and d["tokens_per_s"] == pytest.approx(d["rows"] / d["step_s"]) for d in steps)
    assert "clients" in stdout and "arrival" in stdout and "decode step with every row live" in stdout
    md = (out / "results.md").read_text()
    assert md.startswith("# engine.bench concurrency") and "CPU:" in md and "| system |" in md


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="torch / transformers not installed")
def test_quick_concurrency_transformers_runs_the_same_requests_serially(quick_concurrency):
    r, _, _ = quick_concurrency
    hf = next(s for s in r["systems"] if s["kind"] == "transformers")
    serial = hf["result"]["serial"]
    recs = serial["records"]
    assert [x["kind"] for x in recs] == ["caption", "detect", "caption", "detect"]
    want = {"caption": r["settings"]["new_tokens"], "detect": r["settings"]["detect_tokens"]}
    assert all(x["tokens"] == want[x["kind"]] for x in recs)
    # one after another: the wall time covers at least every latency
    assert serial["wall_s"] >= sum(x["latency_s"] for x in recs) * 0.999


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 17):
        v = rng.random(n).tolist()
        for q in (0.0, 0.5, 0.95, 1.0):
            assert concurrency.percentile(v, q) == pytest.approx(float(np.percentile(v, q * 100)))


def test_decode_time_share_of_a_shared_step():
    # 3 decode steps of 0.2 s each served 4 rows: this request's share is 3 * 0.2 / 4
    stats = SimpleNamespace(decode_step_s=0.6, decode_steps=3, decode_rows=12)
    result = SimpleNamespace(stats=stats, timings={"first_token": 1.5}, tokens=[1, 2, 3, 4])
    rec = concurrency.engine_record("caption", result, 2.0)
    assert rec.decode_time_share_s == pytest.approx(0.15) and rec.decode_tokens == 3 and rec.tokens == 4


def test_level_summary_hand_computed():
    recs = [concurrency.RequestRecord("caption", 2.0, 1.0, 10, 9, 0.9),
            concurrency.RequestRecord("detect", 4.0, 3.0, 6, 5, 0.1)]
    s = concurrency.LevelResult(2, 5.0, recs).summary()
    assert s["requests_per_s"] == pytest.approx(0.4) and s["tokens_per_s"] == pytest.approx(16 / 5)
    assert s["decode_tokens_per_s"] == pytest.approx(14 / 1.0)
    assert s["p50_latency_s"] == pytest.approx(3.0) and s["p95_latency_s"] == pytest.approx(3.9)


def test_goals():
    levels = [{"clients": 1, "tokens_per_s": 2.0, "decode_tokens_per_s": 5.0},
              {"clients": 8, "tokens_per_s": 3.0, "decode_tokens_per_s": 22.5}]
    systems = [{"id": "a", "result": {"levels": levels, "arrival": {"ttft_ratio": 1.6}}}]
    g = {x["goal"].split(" >=")[0].split(" <=")[0]: x for x in concurrency.goals(systems)}
    assert g["decode-phase tokens/s, 8 clients / 1 client"]["value"] == pytest.approx(4.5)
    assert g["decode-phase tokens/s, 8 clients / 1 client"]["met"]
    assert not g["arrival TTFT while 7 decode / alone"]["met"]


def test_request_images_stay_distinct_after_preprocessing():
    """Each request's image must miss the image-feature cache, even downscaled to 112 px."""
    import engine
    from engine.serving import image_key
    model = engine.load(progress=False)          # the default model: 112 px, the harshest downscale
    try:
        keys = {image_key(model.processor(concurrency.request_image(i), "caption en")["pixel_values"], "m")
                for i in range(40)}
    finally:
        model.close()
    assert len(keys) == 40


@pytest.mark.parametrize("text", ["", "0", "1,-2", "a,b"])
def test_bad_levels_are_refused(text):
    with pytest.raises(ValueError, match="--concurrency"):
        parse_levels(text)


def test_concurrency_defaults():
    args = resolve_args(build_parser().parse_args(["--concurrency", "1,8"]))
    assert args.levels == [1, 8] and args.preset == "paligemma2-3b-224"
    assert args.systems == "onnxruntime:int8,pytorch:fp32" and args.detect_tokens == 20
    assert str(args.out).endswith("paligemma2-3b-224-concurrency")


class _BurstHandle:
    """A request whose reader fell behind a fast model (the tiny one, ~1 ms a token, on a loaded CI
    machine): its first read returns most of the budget at once (RequestHandle.tokens() yields what
    accumulated since the last read), then the last 3 tokens one at a time."""

    def __init__(self, budget):
        self.budget, self.cancelled = budget, False

    def tokens(self):
        if self.budget > 3:
            yield [1] * (self.budget - 3)
        yield from ([2] for _ in range(min(3, self.budget)))

    def cancel(self):
        self.cancelled = True

    def result(self):
        return None


class _BurstModel:
    def __init__(self):
        self.handles = []

    def submit(self, image, prompt, *, max_new_tokens, ignore_eos):
        assert ignore_eos
        self.handles.append(_BurstHandle(max_new_tokens))
        return self.handles[-1]


def test_decode_steps_survives_a_reader_that_gets_its_tokens_in_one_chunk():
    """CI once saw StopIteration here: the stream ended before `steps` tokens were read after the
    first chunk. Now it measures what there was, and the budget leaves slack past `steps`."""
    model = _BurstModel()
    out = concurrency.decode_steps(model, [1, 3], steps=8, image_index=0)
    assert [o["rows"] for o in out] == [1, 3]
    assert all(o["step_s"] > 0 and o["tokens_per_s"] > 0 for o in out)
    assert all(h.cancelled for h in model.handles) and len(model.handles) == 4
    assert all(h.budget >= 1 + 4 * 8 for h in model.handles)


def test_decode_steps_refuses_a_request_that_ends_after_its_first_token():
    class OneToken(_BurstModel):
        def submit(self, image, prompt, *, max_new_tokens, ignore_eos):
            h = super().submit(image, prompt, max_new_tokens=1, ignore_eos=ignore_eos)
            return h

    with pytest.raises(RuntimeError, match="ended after its first token"):
        concurrency.decode_steps(OneToken(), [1], steps=8, image_index=0)
