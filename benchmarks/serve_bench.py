"""HTTP serving benchmark: `python -m engine serve` on the default model, 1 / 8 / 32 concurrent
clients, requests/s and latency percentiles.

    python benchmarks/serve_bench.py                       # -> benchmarks/results/serve/serve_bench.json
    python benchmarks/serve_bench.py --clients 1 8 32 --requests 8 --model DIR

The server runs as its own process (`python -m engine serve --port 0`), as it would in use; the
clients are threads of this process, each with its own keep-alive connection, sending
`--requests` requests in turn from a fixed mix: a caption through /v1/chat/completions (the
OpenAI shape), a detect with one label and a segment with one label through the task endpoints,
each on the bundled example image sent as base64. A warm-up round runs first. Latency is the
client's wall time per request (connection reuse, JSON and base64 included); requests/s is all
requests of a level over its wall time. The machine may be shared: compare levels within one run.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "engine" / "default_model" / "example.png"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "server.log"
    cmd = [sys.executable, "-m", "engine", "serve", "--port", "0", "--no-access-log",
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text())
        if m:
            url = m.group(1)
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url, log
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become ready:\n{log.read_text()}")


def request_mix(image_b64: str):
    chat = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "caption en"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64}}]}]}
    return [("caption", "/v1/chat/completions", chat),
            ("detect", "/v1/detect", {"image": image_b64, "labels": ["blue square"]}),
            ("segment", "/v1/segment", {"image": image_b64, "labels": ["green square"]})]


def run_level(url: str, clients: int, requests: int, mix) -> dict:
    latencies: list[tuple[str, float]] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int):
        with httpx.Client(base_url=url, timeout=600) as c:
            for j in range(requests):
                kind, path, body = mix[(i + j) % len(mix)]
                t0 = time.perf_counter()
                r = c.post(path, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    latencies.append((kind, dt))
                    tokens[0] += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(x for _, x in latencies)

    def pct(q):
        return lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else None

    by_kind = {k: round(statistics.median([x for kk, x in latencies if kk == k]), 4)
               for k in sorted({k for k, _ in latencies})}
    return {"clients": clients, "requests": clients * requests, "ok": len(lat), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 3),
            "generated_tokens_per_s": round(tokens[0] / wall, 1), "p50_s": round(pct(0.5), 4),
            "p95_s": round(pct(0.95), 4), "max_s": round(lat[-1], 4), "p50_by_kind_s": by_kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="artifact or HF checkpoint dir (default: the bundled default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=8, help="requests per client (default 8)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve" / "serve_bench.json"))
    args = p.parse_args(argv)

    image_b64 = base64.b64encode(EXAMPLE.read_bytes()).decode()
    mix = request_mix(image_b64)
    load_before = os.getloadavg()
    proc, url, log = start_server(args)
    try:
        run_level(url, 2, len(mix), mix)                       # warm-up: every request kind once or more
        levels = []
        for n in args.clients:
            level = run_level(url, n, args.requests, mix)
            levels.append(level)
            print(f"{n:3d} clients: {level['requests_per_s']:6.2f} req/s, p50 {level['p50_s'] * 1e3:7.0f} ms, "
                  f"p95 {level['p95_s'] * 1e3:7.0f} ms, {level['generated_tokens_per_s']:6.1f} generated tokens/s, "
                  f"{level['errors']} errors", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    result = {"benchmark": "serve_bench", "server": f"python -m engine serve --max-batch {args.max_batch} "
                                                     f"--max-queue {args.max_queue}",
              "model": args.model or "default (engine/default_model)", "mix": [k for k, _, _ in mix],
              "requests_per_client": args.requests, "cpu": cpu_model(), "cores": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in load_before], "python": platform.python_version(),
              "server_exit_code": rc, "levels": levels,
              "note": "shared, noisy machine: compare the levels of one run, not runs of different days"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (server exit code {rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
