"""Concurrency benchmark of the serving core (engine/serving): one loaded model, many clients.

    python benchmarks/serving_bench.py                                  # the default model
    python benchmarks/serving_bench.py --preset paligemma2-3b-224 --decoder-layers 4 \\
        --vision-layers 4 --weights int8 --backend openvino             # a slice of the 3B shapes

Synthetic presets are written once (random weights, engine.synth) under --work and exported by
engine.load. --decoder-layers / --vision-layers keep the preset's widths and vocabulary but fewer
layers, so a 2-core machine can run it; per-layer costs stay those of the full model.

Measures, with `--clients` concurrent clients (threads), each sending `--requests` requests
alternating a caption (--tokens tokens, EOS ignored) and a detect with three labels (--tokens):
  aggregate decode tokens/s (all generated tokens / wall time), requests/s, p50 / p95 latency;
then the arrival test: the TTFT of one caption that arrives while 7 long captions decode, against
its TTFT alone, and the longest gap between two tokens of a running request during that arrival's
prefill (the stall), with the default prefill chunking and with whole prefills.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import engine
from engine.serving import SchedulerConfig

LABELS = ["red circle", "blue square", "green triangle"]


def build_model_dir(args) -> Path:
    if args.preset is None:
        return engine.default_model_path()
    from engine.synth import preset_config, write_synthetic_checkpoint
    cfg = preset_config(args.preset)
    text, vision = cfg.text, cfg.vision
    if args.decoder_layers:
        n = args.decoder_layers
        text = dataclasses.replace(text, num_hidden_layers=n,
                                   layer_types=text.layer_types[:n] if text.layer_types else text.layer_types)
    if args.vision_layers:
        vision = dataclasses.replace(vision, num_hidden_layers=args.vision_layers)
    cfg = dataclasses.replace(cfg, text=text, vision=vision)
    out = Path(args.work) / f"{args.preset}-d{text.num_hidden_layers}-v{vision.num_hidden_layers}"
    if not (out / "config.json").is_file():
        write_synthetic_checkpoint(cfg, out, seed=0, dtype="bf16")
    return out


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def throughput(model, image, clients: int, requests: int, tokens: int) -> dict:
    latencies, generated = [], []
    lock = threading.Lock()

    def client(c):
        for r in range(requests):
            t0 = time.perf_counter()
            if (c + r) % 2 == 0:
                out = model.generate(image, "caption en", max_new_tokens=tokens, ignore_eos=True)
            else:
                out = model.generate(image, "detect " + " ; ".join(LABELS), max_new_tokens=tokens, ignore_eos=True)
            with lock:
                latencies.append(time.perf_counter() - t0)
                generated.append(len(out.tokens))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "wall_s": wall,
            "decode_tokens_per_s": sum(generated) / wall, "requests_per_s": len(latencies) / wall,
            "p50_latency_s": statistics.median(latencies), "p95_latency_s": percentile(latencies, 0.95)}


def arrival(model, image, running: int, tokens: int) -> dict:
    """TTFT of a caption arriving while `running` long captions decode; their largest token gap."""
    alone = model.generate(image, "caption en", max_new_tokens=2, ignore_eos=True).timings["first_token"]
    long_ones = [model.submit(image, "caption en", max_new_tokens=tokens, ignore_eos=True) for _ in range(running)]
    for h in long_ones:
        next(h.tokens())                               # every one is decoding now
    times: list[float] = []

    def watch(h):
        for _ in h.tokens():
            times.append(time.perf_counter())
            if len(times) > 10_000:
                return

    watcher = threading.Thread(target=watch, args=(long_ones[0],), daemon=True)
    watcher.start()
    time.sleep(0.5)
    t_arrive = time.perf_counter()
    new = model.generate(image, "caption en", max_new_tokens=2, ignore_eos=True)
    t_done = time.perf_counter()
    for h in long_ones:
        h.cancel()
    watcher.join(30)
    before = [b - a for a, b in zip(times, times[1:]) if b < t_arrive]
    during = [b - a for a, b in zip(times, times[1:]) if a >= t_arrive - 1e-3 and a <= t_done]
    return {"running": running, "ttft_alone_s": alone, "ttft_arrival_s": new.timings["first_token"],
            "ttft_ratio": new.timings["first_token"] / alone,
            "prefill_chunks": new.stats.prefill_chunks,
            "step_s_before": statistics.median(before) if before else None,
            "max_gap_during_prefill_s": max(during) if during else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="engine.synth preset (default: the bundled default model)")
    ap.add_argument("--decoder-layers", type=int, default=None)
    ap.add_argument("--vision-layers", type=int, default=None)
    ap.add_argument("--work", default="/tmp/serving-bench")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--weights", default="int8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--arrival-tokens", type=int, default=400)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    path = build_model_dir(args)
    image = engine.default_model_path() / "example.png"
    results = {"model": str(path), "backend": args.backend, "weights": args.weights, "threads": args.threads}
    model = engine.load(path, backend=args.backend, weights=args.weights, threads=args.threads, progress=False)
    model.generate(image, "caption en", max_new_tokens=2)             # warm-up
    results["throughput"] = []
    for c in (int(v) for v in args.clients.split(",")):
        r = throughput(model, image, c, args.requests, args.tokens)
        results["throughput"].append(r)
        print(json.dumps(r), flush=True)
    r = arrival(model, image, 7, args.arrival_tokens)
    r["policy"] = f"chunked ({model._scheduler._chunk} boundaries per step)"
    print(json.dumps(r), flush=True)
    results["arrival_chunked"] = r
    model.close()
    n_bounds = model.config.text.num_hidden_layers + 1
    whole = engine.load(path, backend=args.backend, weights=args.weights, threads=args.threads, progress=False,
                        serving=SchedulerConfig(prefill_chunk_layers=n_bounds))
    whole.generate(image, "caption en", max_new_tokens=2)
    r = arrival(whole, image, 7, args.arrival_tokens)
    r["policy"] = "whole prefill"
    print(json.dumps(r), flush=True)
    results["arrival_whole"] = r
    whole.close()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
