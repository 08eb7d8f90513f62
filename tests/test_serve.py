"""python -m engine serve (engine/serve) on 127.0.0.1, against the engine itself as the oracle:
the real `openai` client, the task endpoints, every bad-input case, disconnects, and a load test
(32 clients x 8 mixed requests, each equal to its serial result)."""
from __future__ import annotations

import base64
import io
import json
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import (ServerThread, b64, chat_body, data_url, png_bytes, require_server_libs,
                           wait_until)

require_server_libs()
openai = pytest.importorskip("openai", reason="the openai client is missing: pip install -e '.[test]'")
import httpx  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import engine  # noqa: E402
from engine import draw  # noqa: E402
from engine.serve.app import ServeConfig  # noqa: E402
from engine.rle import decode as rle_decode  # noqa: E402
from engine.serving import SchedulerConfig  # noqa: E402

EXAMPLE = engine.default_model_path() / "example.png"
LABELS = ["blue square", "green square"]


@pytest.fixture(scope="module")
def model():
    m = engine.load()
    yield m
    m.close()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    shutil.copy(EXAMPLE, d / "example.png")
    return d


@pytest.fixture(scope="module")
def server(model, media_dir):
    s = ServerThread(model, ServeConfig(model_name="paligemma-test", media_dir=media_dir))
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A second server with tight limits: an API key, a queue of 1 behind 1 live request, a
    256 KiB body limit, 1 MP images."""
    m = engine.load(serving=SchedulerConfig(max_queue=1, max_active=1))
    s = ServerThread(m, ServeConfig(api_key="s3cret", max_body_bytes=256 << 10, max_image_pixels=1_000_000))
    s.wait_ready()
    yield s, m
    s.stop()
    m.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def example_bytes():
    return EXAMPLE.read_bytes()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def caption_messages(url, prompt="caption en"):
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, image_part(url)]}]


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]


# --------------------------------------------------------------------------- OpenAI API, real client
def test_chat_caption_equals_engine_caption(client, model, example_bytes):
    want = model.caption(EXAMPLE)
    r = client.chat.completions.create(model="paligemma-test", messages=caption_messages(data_url(example_bytes)),
                                       temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(want.tokens)
    prompt_ids = model.processor(Image.open(EXAMPLE), "caption en")["input_ids"]
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    timings = r.usage.model_extra["timings"]
    assert timings["first_token"] > 0 and timings["total"] >= timings["first_token"]
    assert r.object == "chat.completion" and r.model == "paligemma-test"


def test_chat_caption_streamed_equals_engine_caption(client, model, example_bytes):
    want = model.caption(EXAMPLE).text
    stream = client.chat.completions.create(model="x", messages=caption_messages(b64(example_bytes)), stream=True,
                                            stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == want
    assert len([p for p in pieces if p]) > 3                 # it did stream, piece by piece
    assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens > 0


def test_stream_ends_with_done(http, example_bytes):
    with http.stream("POST", "/v1/chat/completions", json=chat_body("caption en", b64(example_bytes),
                                                                    stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] > 0


def test_sampling_with_seed_equals_engine(client, model, example_bytes):
    want = model.generate(EXAMPLE, "caption en", max_new_tokens=64, do_sample=True, temperature=1.5, top_p=0.9,
                          seed=7).text
    got = [client.chat.completions.create(model="x", messages=caption_messages(data_url(example_bytes)),
                                          temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
           for _ in range(2)]
    assert got == [want, want]


def test_n_choices_and_stop(client, model, example_bytes):
    want = model.caption(EXAMPLE).text
    r = client.chat.completions.create(model="x", messages=caption_messages(data_url(example_bytes)), n=2)
    assert [c.message.content for c in r.choices] == [want, want] and [c.index for c in r.choices] == [0, 1]
    word = want.split()[2]                                       # cut before the third word
    r = client.chat.completions.create(model="x", messages=caption_messages(data_url(example_bytes)), stop=[word])
    assert r.choices[0].message.content == want[:want.index(word)]
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="x", messages=caption_messages(data_url(example_bytes)),
                                            stop=word, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[:want.index(word)]


def test_max_tokens_length(client, model, example_bytes):
    want = model.caption(EXAMPLE, max_new_tokens=3)
    r = client.chat.completions.create(model="x", messages=caption_messages(data_url(example_bytes)), max_tokens=3)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_models_list(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == ["paligemma-test"]
    assert models.data[0].model_extra["context_length"] == model.max_context


def test_media_dir_file_url(client, model, media_dir):
    r = client.chat.completions.create(model="x", messages=caption_messages(f"file://{media_dir / 'example.png'}"))
    assert r.choices[0].message.content == model.caption(EXAMPLE).text


# --------------------------------------------------------------------------- task endpoints
def test_detect_equals_model_detect(client, model, example_bytes):
    """Through the openai client's own POST (its auth, retries off, error mapping)."""
    want = model.detect(EXAMPLE, LABELS)
    assert want, "the default model finds something in its example scene"
    body = client.post("/detect", body={"image": b64(example_bytes), "labels": LABELS, "overlay": True},
                       cast_to=object)
    assert [(d["label"], tuple(d["box"])) for d in body["detections"]] == [(d.label, d.box) for d in want]
    assert body["image"] == {"width": 224, "height": 224}
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))))
    assert np.array_equal(overlay, np.asarray(draw.draw_detections(EXAMPLE, want)))


def test_detect_boxes_in_original_pixels(http, model, example_bytes):
    big = Image.open(EXAMPLE).convert("RGB").resize((448, 336))
    want = model.detect(big, LABELS)
    r = http.post("/v1/detect", files={"image": ("big.png", png_bytes(big), "image/png")},
                  data={"labels": " ; ".join(LABELS)})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 448, "height": 336}
    assert [(d["label"], tuple(d["box"])) for d in r.json()["detections"]] == [(d.label, d.box) for d in want]
    segs = model.segment(big, "blue square")
    r = http.post("/v1/segment", files={"image": ("big.png", png_bytes(big), "image/png")},
                  data={"labels": "blue square", "overlay": "true"})
    assert r.status_code == 200, r.text
    got = r.json()["segments"]
    assert [(s["label"], tuple(s["box"])) for s in got] == [(s.label, s.box) for s in segs]
    assert all(np.array_equal(rle_decode(g["mask"]), w.mask) for g, w in zip(got, segs))
    assert rle_decode(got[0]["mask"]).shape == (336, 448)


def test_segment_rle_decodes_to_model_masks(client, model, example_bytes):
    want = model.segment(EXAMPLE, "blue square")
    assert want and all(s.mask is not None for s in want)
    body = client.post("/segment", body={"image": data_url(example_bytes), "labels": "blue square", "overlay": True},
                       cast_to=object)
    got = body["segments"]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["label"] == w.label and tuple(g["box"]) == w.box
        assert np.array_equal(rle_decode(g["mask"]), w.mask)
        assert g["mask_area"] == int(w.mask.sum())
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))))
    assert np.array_equal(overlay, np.asarray(draw.draw_segments(EXAMPLE, want)))
    with pytest.raises(openai.BadRequestError) as e:                    # errors map to the client's types
        client.post("/segment", body={"image": data_url(example_bytes)}, cast_to=object)
    assert e.value.status_code == 400 and e.value.body["param"] == "labels"


def test_text_tasks_equal_model(http, model, example_bytes):
    cases = [("caption", {"lang": "en"}, model.caption(EXAMPLE)),
             ("answer", {"question": "how many squares?"}, model.answer(EXAMPLE, "how many squares?")),
             ("ocr", {}, model.ocr(EXAMPLE))]
    for task, fields, want in cases:
        r = http.post(f"/v1/{task}", json={"image": data_url(example_bytes), **fields})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == want.text and r.json()["task"] == task


def test_task_stream(http, model, example_bytes):
    want = model.detect(EXAMPLE, LABELS)
    with http.stream("POST", "/v1/detect", json={"image": b64(example_bytes), "labels": LABELS,
                                                 "stream": True}) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    result = json.loads(events[-2])["result"]
    text = "".join(json.loads(e)["text"] for e in events[:-2])
    assert text.strip() == result["text"]
    assert [(d["label"], tuple(d["box"])) for d in result["detections"]] == [(d.label, d.box) for d in want]


# --------------------------------------------------------------------------- bad input
def test_bad_input_cases(http, example_bytes, media_dir, tmp_path):
    ok = b64(example_bytes)
    post = lambda body, path="/v1/chat/completions": http.post(path, json=body)  # noqa: E731
    assert_error(post(chat_body("caption en", "https://example.com/cat.jpg")), 400, "remote image URLs")
    assert_error(post(chat_body("caption en", b64(b"this is not an image at all"))), 400, "cannot decode")
    assert_error(post(chat_body("caption en", "!!!not base64!!!")), 400, "base64")
    bomb = Image.new("1", (10_000, 10_000))                     # 100 MP, a few KB as PNG
    e = assert_error(post(chat_body("caption en", b64(png_bytes(bomb)))), 400, "decompression bomb")
    assert e["code"] == "image_too_large"
    outside = tmp_path / "outside.png"
    outside.write_bytes(example_bytes)
    assert_error(post(chat_body("caption en", f"file://{outside}")), 400, "outside the media directory")
    assert_error(post(chat_body("caption en", f"file://{media_dir}/../{media_dir.name}/../x.png")), 400)
    e = assert_error(post(chat_body("caption en", ok, max_tokens=5000)), 400, "context")
    assert e["code"] == "context_length_exceeded" and e["max_tokens"] == 5000 and e["context_length"] == 1024
    assert e["prompt_tokens"] == 74
    for bad, param in [({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
                       ({"max_tokens": 0}, "max_tokens"), ({"seed": -1}, "seed"), ({"stream": "maybe"}, "stream"),
                       ({"frobnicate": 1}, "frobnicate"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
                       ({"n": 99}, "n"), ({"n": 2, "stream": True}, "n"), ({"stop": ["a"] * 5}, "stop"),
                       ({"logprobs": True}, "logprobs")]:
        e = assert_error(post(chat_body("caption en", ok, **bad)), 400)
        assert e["param"] == param, (bad, e)
    assert_error(post({"messages": [{"role": "user", "content": "caption en"}]}), 400, "no image")
    assert_error(post({"messages": [{"role": "user", "content": [image_part(ok)]}]}), 400, "no text")
    assert_error(post({"messages": [{"role": "assistant", "content": "hi"}]}), 400, "last message")
    assert_error(post({"messages": []}), 400)
    assert_error(http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
                 400)
    assert_error(post({"image": ok}, "/v1/detect"), 400, "labels")
    assert_error(post({"image": ok, "labels": [""]}, "/v1/detect"), 400, "empty label")
    assert_error(post({"image": ok, "question": "x"}, "/v1/caption"), 400, "no question")
    assert_error(post({"image": ok}, "/v1/answer"), 400, "question")
    assert_error(post({"image": ok, "lang": "e n"}, "/v1/caption"), 400, "lang")
    assert_error(post({"image": ok, "overlay": True}, "/v1/ocr"), 400, "overlay")
    assert_error(post({"labels": ["x"]}, "/v1/detect"), 400, "no image")
    assert_error(post({"image": ok, "labels": "x", "color": "red"}, "/v1/detect"), 400, "unknown parameter")
    assert_error(http.post("/v1/detect", files={"image": ("x.png", b"garbage", "image/png")}, data={"labels": "x"}),
                 400, "cannot decode")
    assert_error(http.get("/v1/nothing"), 404)
    assert http.get("/health").status_code == 200              # still up


def test_limits_api_key_body_and_queue(limited, example_bytes):
    server, model = limited
    key = {"Authorization": "Bearer s3cret"}
    body = chat_body("caption en", b64(example_bytes))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        assert_error(c.post("/v1/chat/completions", json=body), 401, "missing API key")
        assert_error(c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401,
                     "wrong API key")
        assert_error(c.get("/metrics"), 401)
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        assert c.post("/v1/chat/completions", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
        big = b64(png_bytes(noisy))                                   # ~640 KB of base64
        assert len(big) > 256 << 10
        assert_error(c.post("/v1/chat/completions", json=chat_body("caption en", big), headers=key), 413, "limit")
        def chunks(data, size=64 << 10):                              # no Content-Length: chunked upload
            for i in range(0, len(data), size):
                yield data[i:i + size]

        for path, payload, ctype in [
                ("/v1/chat/completions", json.dumps(chat_body("caption en", big)).encode(), "application/json"),
                ("/v1/detect", json.dumps({"image": big, "labels": "x"}).encode(), "application/json")]:
            r = c.post(path, content=chunks(payload), headers={**key, "content-type": ctype})
            assert_error(r, 413, "limit")
        small_bomb = Image.new("1", (2000, 1000))                     # 2 MP > the 1 MP limit, tiny as PNG
        assert_error(c.post("/v1/detect", headers=key, json={"image": b64(png_bytes(small_bomb)), "labels": "x"}),
                     400, "decompression bomb")
    # one live request and one queued: the others get 429 with Retry-After
    long_body = chat_body("caption en", b64(example_bytes), max_tokens=300, ignore_eos=True)

    def send(_):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/v1/chat/completions", json=long_body, headers=key)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(429) >= 1 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 300
    assert wait_until(lambda: model.serving_state().queued + model.serving_state().decoding == 0, 10)


# --------------------------------------------------------------------------- disconnects
def test_stream_disconnect_cancels_generation(server, model, example_bytes):
    body = chat_body("caption en", b64(example_bytes), max_tokens=800, ignore_eos=True, stream=True)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = r.iter_lines()
            got = [next(chunks) for _ in range(6)]
            assert any('"content"' in line for line in got)
            state = model.serving_state()
            assert state.prefilling + state.decoding == 1
        # leaving the block closed the connection mid-stream
    assert wait_until(lambda: model.serving_state().decoding + model.serving_state().prefilling == 0, 5)


def test_non_stream_disconnect_cancels_generation(server, model, example_bytes, monkeypatch):
    # The default model decodes 800 tokens in under 1 s on a fast CPU; 10 ms more per decode step
    # makes this request take over 8 s on any machine, so only a cancellation ends it within 5 s.
    real_logits = model.logits

    def slow_logits(hidden, times=None):
        time.sleep(0.01)
        return real_logits(hidden, times)

    monkeypatch.setattr(model, "logits", slow_logits)
    body = chat_body("caption en", b64(example_bytes), max_tokens=800, ignore_eos=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    t0 = time.monotonic()
    assert wait_until(lambda: model.serving_state().decoding + model.serving_state().prefilling == 0, 5)
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- load
def test_load_32_clients_mixed_requests_equal_serial(server, model, example_bytes):
    """32 concurrent clients x 8 mixed requests: each answer equals its serial result, no 5xx."""
    flipped = ImageOps.mirror(Image.open(EXAMPLE).convert("RGB"))
    images = {"example": example_bytes, "mirror": png_bytes(flipped)}
    pil = {"example": Image.open(EXAMPLE).convert("RGB"), "mirror": flipped}
    kinds = ["chat", "chat_stream", "detect", "segment", "answer"]
    serial = {}
    for name, img in pil.items():            # the oracle: each request alone, on the engine
        serial[("chat", name)] = serial[("chat_stream", name)] = model.caption(img).text
        serial[("detect", name)] = [(d.label, d.box) for d in model.detect(img, LABELS)]
        serial[("segment", name)] = [(s.label, s.box, s.mask) for s in model.segment(img, "blue square")]
        serial[("answer", name)] = model.answer(img, "what is on the left?").text
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)

    def one(kind, name, c):
        img = images[name]
        if kind == "chat":
            r = oai.chat.completions.create(model="x", messages=caption_messages(data_url(img)))
            return r.choices[0].message.content
        if kind == "chat_stream":
            s = oai.chat.completions.create(model="x", messages=caption_messages(data_url(img)), stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        if kind == "detect":
            r = c.post("/v1/detect", json={"image": b64(img), "labels": LABELS})
            r.raise_for_status()
            return [(d["label"], tuple(d["box"])) for d in r.json()["detections"]]
        if kind == "segment":
            r = c.post("/v1/segment", files={"image": ("i.png", img, "image/png")}, data={"labels": "blue square"})
            r.raise_for_status()
            return [(s["label"], tuple(s["box"]), rle_decode(s["mask"])) for s in r.json()["segments"]]
        r = c.post("/v1/answer", json={"image": b64(img), "question": "what is on the left?"})
        r.raise_for_status()
        return r.json()["text"]

    def client_run(i):
        out = []
        with httpx.Client(base_url=server.url, timeout=300) as c:
            for j in range(8):
                kind, name = kinds[(i + j) % len(kinds)], ("example", "mirror")[(i * 8 + j) % 2]
                t0 = time.perf_counter()
                got = one(kind, name, c)
                out.append((kind, name, got, time.perf_counter() - t0))
        return out

    before = {k: v for k, v in server.app.state.server.metrics.requests.items()}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = [r for rs in pool.map(client_run, range(32)) for r in rs]
    wall = time.perf_counter() - t0
    assert len(results) == 256
    for kind, name, got, _ in results:
        want = serial[(kind, name)]
        if kind == "segment":
            assert [(label, box) for label, box, _ in got] == [(label, box) for label, box, _ in want]
            assert all(np.array_equal(g[2], w[2]) for g, w in zip(got, want))
        else:
            assert got == want, (kind, name)
    counts = server.app.state.server.metrics.requests
    new = {k: counts[k] - before.get(k, 0) for k in counts if counts[k] != before.get(k, 0)}
    assert sum(new.values()) == 256 and all(status == 200 for _, status in new), new
    lat = sorted(x[3] for x in results)
    p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    print(f"\nload: 32 clients x 8 mixed requests in {wall:.1f} s ({256 / wall:.1f} req/s), latency "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s")


# --------------------------------------------------------------------------- operations
def test_health_and_metrics(http, example_bytes):
    h = http.get("/health").json()
    assert h["status"] == "ok" and h["ready"] is True
    http.post("/v1/caption", json={"image": b64(example_bytes)})
    text = http.get("/metrics").text
    for name in ("paligemma_requests_total{endpoint=\"/v1/caption\",status=\"200\"}", "paligemma_queue_depth ",
                 "paligemma_live_requests ", "paligemma_generated_tokens_total{endpoint=\"/v1/caption\"}",
                 "paligemma_time_to_first_token_seconds_bucket{endpoint=\"/v1/caption\",le=\"+Inf\"}",
                 "paligemma_request_duration_seconds_count{endpoint=\"/v1/caption\"}", "paligemma_ready 1"):
        assert name in text, name
    assert "# TYPE paligemma_request_duration_seconds histogram" in text


def test_metrics_belong_to_the_app(model):
    """Two apps in one process count separately (no global registry)."""
    from engine.serve import create_app
    a, b = create_app(model, ServeConfig(warmup=False)), create_app(model, ServeConfig(warmup=False))
    a.state.server.metrics.request_started()
    a.state.server.metrics.request_finished("/v1/ocr", 200, 0.1)
    assert a.state.server.metrics.requests_total("/v1/ocr", 200) == 1
    assert b.state.server.metrics.requests_total("/v1/ocr", 200) == 0


def test_access_log_line_per_request(http, example_bytes, caplog):
    with caplog.at_level("INFO", logger="engine.serve.access"):
        http.post("/v1/caption", json={"image": b64(example_bytes)}, headers={"X-Request-Id": "abc123"})
        assert wait_until(lambda: any("abc123" in r.getMessage() for r in caplog.records), 5)
    lines = [json.loads(r.getMessage()) for r in caplog.records if "abc123" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert line["path"] == "/v1/caption" and line["status"] == 200 and line["completion_tokens"] > 0
    assert line["ms"] > 0 and line["method"] == "POST"


def test_kiosk_page_served_locally(http):
    page = http.get("/")
    assert page.status_code == 200 and 'capture="environment"' in page.text
    assert "http://" not in page.text and "https://" not in page.text          # no CDN
    for asset in ("/static/kiosk.js", "/static/kiosk.css"):
        r = http.get(asset)
        assert r.status_code == 200 and "https://" not in r.text
    assert_error(http.get("/static/../app.py"), 404)


def test_health_ready_only_once_loaded_and_warm(example_bytes):
    """While the loader runs, /health is 503 "loading" and /v1/* 503 with Retry-After; a loader
    that fails leaves /health 503 "error" with the reason."""
    gate = threading.Event()

    def slow_loader():                  # the app owns (and closes) what its loader returns
        gate.wait(60)
        return engine.load()

    s = ServerThread(slow_loader, ServeConfig())
    try:
        assert wait_until(lambda: _get(s.url + "/health") is not None, 30)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(s.url + "/v1/caption", json={"image": b64(example_bytes)})
        assert_error(r, 503, "loading")
        assert r.headers["Retry-After"]
        gate.set()
        s.wait_ready(60)
        metrics = httpx.get(s.url + "/metrics").text      # the warm-up generation ran before "ready"
        assert "paligemma_image_cache_entries 1" in metrics and "paligemma_ready 1" in metrics
        assert httpx.post(s.url + "/v1/caption", json={"image": b64(example_bytes)}).status_code == 200
    finally:
        gate.set()
        s.stop()

    def broken_loader():
        raise FileNotFoundError("no model at /nowhere")

    s = ServerThread(broken_loader, ServeConfig())
    try:
        assert wait_until(lambda: (_get(s.url + "/health") or {}).get("status") == "error", 30)
        assert "no model at /nowhere" in httpx.get(s.url + "/health").json()["error"]
        assert_error(httpx.post(s.url + "/v1/ocr", json={"image": b64(example_bytes)}), 503, "failed to load")
    finally:
        s.stop()


def _get(url):
    try:
        return httpx.get(url, timeout=5).json()
    except httpx.HTTPError:
        return None


# --------------------------------------------------------------------------- over-limit uploads
def _raw_response(sock) -> tuple[str, dict, bytes]:
    """One HTTP/1.1 response read off a raw socket: status line, headers, body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before answering: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def test_over_limit_upload_gets_its_413_not_a_reset(limited):
    """A client that sends its headers, then (after the server has decided) a 2 MiB body with a
    Content-Length over the 256 KiB limit, must read the 413, not 'connection reset'; the
    connection then still serves the next request."""
    import socket
    server, _ = limited
    size = 2 << 20
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
            s.sendall(f"POST /v1/detect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
            time.sleep(0.2)                                   # the guard has seen the headers by now
            s.sendall(b"x" * size)
            status, headers, body = _raw_response(s)
            assert status.startswith("HTTP/1.1 413"), status
            assert json.loads(body)["error"]["code"] == "body_too_large"
            assert headers.get("connection") != "close"
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _raw_response(s)[0].startswith("HTTP/1.1 200")


def test_over_limit_upload_with_expect_continue_is_refused_before_the_body(limited):
    """`Expect: 100-continue`: the client waits; it gets the 413 (and a close) without sending a byte."""
    import socket
    server, _ = limited
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 999999999\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = _raw_response(s)
        assert status.startswith("HTTP/1.1 413"), status
        assert headers["connection"] == "close" and "limit" in json.loads(body)["error"]["message"]


def test_drain_body_stops_at_its_bound():
    import asyncio

    from engine.serve.middleware import drain_body

    def receiver(messages):
        it = iter(messages)

        async def receive():
            return next(it)
        return receive

    part = {"type": "http.request", "body": b"x" * 100, "more_body": True}
    last = {"type": "http.request", "body": b"x" * 100, "more_body": False}
    assert asyncio.run(drain_body(receiver([part, part, last]), 300)) is True
    assert asyncio.run(drain_body(receiver([part, part, part, last]), 300)) is False     # 400 > 300
    assert asyncio.run(drain_body(receiver([part] * 10 + [last]), 250)) is False         # stops reading early
    assert asyncio.run(drain_body(receiver([part, {"type": "http.disconnect"}]), 300)) is False
