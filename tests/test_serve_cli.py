"""`python -m engine serve` as a process: it logs its address at once, turns ready, serves, and on
SIGTERM stops accepting, finishes the requests in flight and exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serve_helpers import b64, chat_body, require_server_libs, wait_until

require_server_libs()
import httpx  # noqa: E402

import engine  # noqa: E402

EXAMPLE = engine.default_model_path() / "example.png"
ROOT = Path(__file__).resolve().parents[1]


def start_server(tmp_path, *args, env=None):
    log = tmp_path / "server.log"
    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", "0", *args], cwd=ROOT,
                            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    f.close()
    found = []

    def listening():
        found[:] = re.findall(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        return bool(found) or proc.poll() is not None

    assert wait_until(listening, 60), log.read_text()
    assert found, f"the server exited: {log.read_text()}"
    return proc, found[0], log


def test_serve_help():
    out = subprocess.run([sys.executable, "-m", "engine", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--backend", "--weights", "--threads", "--host", "--port", "--max-queue", "--max-batch",
                 "--max-body-mb", "--api-key", "--media-dir", "--grace-seconds"):
        assert flag in out.stdout, flag


def test_bad_flags_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine", "serve", "--media-dir", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a directory" in out.stderr


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    proc, url, log = start_server(tmp_path, "--grace-seconds", "60", env={"PALIGEMMA_API_KEY": "k"})
    try:
        t0 = time.monotonic()
        assert wait_until(lambda: _ready(url), 120), log.read_text()
        print(f"\nserver ready {time.monotonic() - t0:.1f} s after it logged its address")
        headers = {"Authorization": "Bearer k"}
        image = b64(EXAMPLE.read_bytes())
        results = {}

        def send(i):
            body = chat_body("caption en", image, max_tokens=400, ignore_eos=True, stream=(i == 0))
            try:
                with httpx.Client(timeout=120) as c:
                    if i == 0:
                        with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
                            lines = [line for line in r.iter_lines() if line]
                        results[i] = (r.status_code, lines[-1])
                    else:
                        r = c.post(url + "/v1/chat/completions", json=body, headers=headers)
                        results[i] = (r.status_code, r.json()["usage"]["completion_tokens"])
            except Exception as e:  # noqa: BLE001
                results[i] = ("error", repr(e))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_until(lambda: _live(url, headers) >= 1, 30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = False
        try:                                   # no longer accepting, while the requests still run
            httpx.get(url + "/health", timeout=5)
        except httpx.ConnectError:
            refused = True
        still_running = sum(t.is_alive() for t in threads)
        for t in threads:
            t.join(120)
        assert proc.wait(90) == 0, log.read_text()
        assert refused
        print(f"requests still in flight when a new connection was refused: {still_running} of 3")
        assert results[0] == (200, "data: [DONE]"), results
        assert results[1] == (200, 400) and results[2] == (200, 400), results
        text = log.read_text()
        assert "Traceback" not in text, text
        access = [line for line in text.splitlines() if '"path":"/v1/chat/completions"' in line]
        assert len(access) == 3 and all('"status":200' in line for line in access), text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ready(url):
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _live(url, headers):
    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=5).text
    except httpx.HTTPError:
        return 0
    m = re.search(r"^paligemma_live_requests (\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def test_sigterm_grace_is_bounded(tmp_path):
    """A request longer than --grace-seconds is cut when the grace ends; the server still exits 0."""
    # The default model's context (1,024) holds at most ~900 new tokens, which six batched streams
    # decode in under 2 s on a fast CPU. A tiny synthetic model has an 8,192-token context: six
    # 8,000-token streams take several seconds on any machine, far longer than the 1 s grace.
    from engine.synth import write_synthetic_checkpoint
    ckpt = write_synthetic_checkpoint("tiny-pg2", tmp_path / "ckpt", seed=0, dtype="fp32", progress=False)
    proc, url, log = start_server(tmp_path, "--grace-seconds", "1", "--model", str(ckpt))
    try:
        assert wait_until(lambda: _ready(url), 120), log.read_text()
        body = chat_body("caption en", b64(EXAMPLE.read_bytes()), max_tokens=8000, ignore_eos=True, stream=True)
        streams: list[list[str]] = [[] for _ in range(6)]

        def send(pieces):
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line:
                            pieces.append(line)
            except httpx.HTTPError:
                pass                                # the server closed the stream: expected

        threads = [threading.Thread(target=send, args=(p,)) for p in streams]
        for t in threads:
            t.start()
        assert wait_until(lambda: all(len(p) >= 4 for p in streams), 60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
        finished = sum("data: [DONE]" in p for p in streams)
        print(f"\nexited {took:.1f} s after SIGTERM with --grace-seconds 1; {finished} of 6 streams finished")
        assert took < 20
        assert finished < len(streams)                   # the grace cut what was still running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
