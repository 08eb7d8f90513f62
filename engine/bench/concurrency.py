"""The concurrency mode of python -m engine.bench: one loaded model, many clients at once.

    python -m engine.bench --concurrency 1,2,4,8 [--preset paligemma2-3b-224] \\
        [--systems onnxruntime:int8,pytorch:fp32] [--concurrency-requests 2] [--new-tokens 32] \\
        [--detect-tokens 20] [--arrival-tokens 400]

Requests. Client c's r-th request is a caption when (c + r) is even, else a detect with three
labels: the prompts "caption en" (--new-tokens tokens) and "detect red circle ; blue square ;
green triangle" (--detect-tokens tokens), both greedy with EOS ignored, so every system does
the same work whatever its random weights say. Every request has its own image (the bench scene
with one pixel changed), so the image-feature cache never serves one request from another's
work: an arrival pays its whole vision graph, as a new user's photo would.

Engine systems (one worker process each, the model loaded once): for each client count, that
many threads send their requests through model.generate at once (the scheduler batches them).
Reported per count: wall time, requests/s, p50 / p95 latency and TTFT per request, tokens/s end
to end (all generated tokens / wall) and the decode-phase rate (tokens of decode steps per second
of decode-step time, from each request's RequestStats: it shows what batching does to decode).
Then the decode step with every row live, for each count (decode_steps): the kernel-level
scaling, apart from how many clients happen to be decoding rather than prefilling at a time.
Then the arrival test: the TTFT of a caption that arrives while 7 long captions decode, against
its TTFT alone, and the longest gap between two tokens of a running request while it prefills.

Transformers systems: the same requests one after another (a caption, then a detect, repeated
--concurrency-requests times), which is how one transformers model serves callers; their
requests/s is the serial rate, the same at every client count.

Goals (issue 13): aggregate decode tokens/s at 8 clients >= 4x one client, measured as the
decode-phase rate (end-to-end tokens/s of short prefill-bound requests cannot scale 4x: their
prefills are compute-bound and one after another, so they are reported beside it, not judged);
arrival TTFT <= 1.5x alone.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

from ..tasks import caption_prompt, detect_prompt

LABELS = ("red circle", "blue square", "green triangle")
CAPTION = caption_prompt("en")
DETECT = detect_prompt(list(LABELS))
ARRIVAL_RUNNING = 7
GOALS = (  # (label, key, comparison, threshold)
    ("decode-phase tokens/s, 8 clients / 1 client", "decode_scaling_8x", ">=", 4.0),
    ("arrival TTFT while 7 decode / alone", "arrival_ttft_ratio", "<=", 1.5),
)


@dataclass
class RequestRecord:
    """One request as its client saw it."""
    kind: str                     # "caption" or "detect"
    latency_s: float              # call -> result (preprocessing included)
    ttft_s: float
    tokens: int
    decode_tokens: int = 0        # tokens that came from decode steps (all but the first)
    decode_time_share_s: float = 0.0   # this request's share of its decode steps' time


@dataclass
class LevelResult:
    clients: int
    wall_s: float
    requests: list[RequestRecord] = field(default_factory=list)

    def summary(self) -> dict:
        lat = [r.latency_s for r in self.requests]
        ttft = [r.ttft_s for r in self.requests]
        tokens = sum(r.tokens for r in self.requests)
        dec_tokens = sum(r.decode_tokens for r in self.requests)
        dec_time = sum(r.decode_time_share_s for r in self.requests)
        return {"clients": self.clients, "requests": len(self.requests), "wall_s": self.wall_s,
                "requests_per_s": len(self.requests) / self.wall_s, "tokens": tokens,
                "tokens_per_s": tokens / self.wall_s,
                "decode_tokens_per_s": dec_tokens / dec_time if dec_time else None,
                "p50_latency_s": statistics.median(lat), "p95_latency_s": percentile(lat, 0.95),
                "p50_ttft_s": statistics.median(ttft), "p95_ttft_s": percentile(ttft, 0.95)}


def percentile(values, q: float) -> float:
    """The q-quantile by linear interpolation between order statistics (numpy's default)."""
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def request_image(index: int):
    """The bench scene with one pixel changed per index: a distinct image (and pixel hash) each."""
    from .workers import example_image
    img = example_image()
    w, _ = img.size
    img.putpixel((index % w, (index // w) % 8), (index % 251, (index * 7) % 253, (index * 13) % 255))
    return img


def request_kind(client: int, r: int) -> str:
    return "caption" if (client + r) % 2 == 0 else "detect"


# ---------------------------------------------------------------------------- engine
def engine_record(kind: str, result, latency_s: float) -> RequestRecord:
    st = result.stats
    # A decode step's time serves all its rows: this request's share is step time / rows.
    share = st.decode_step_s * st.decode_steps / st.decode_rows if st.decode_rows else 0.0
    return RequestRecord(kind, latency_s, result.timings["first_token"], len(result.tokens), st.decode_steps, share)


def engine_level(model, clients: int, per_client: int, tokens: dict[str, int], first_image: int) -> LevelResult:
    records: list[RequestRecord] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for r in range(per_client):
                kind = request_kind(c, r)
                image = request_image(first_image + c * per_client + r)
                t0 = time.perf_counter()
                out = model.generate(image, CAPTION if kind == "caption" else DETECT,
                                     max_new_tokens=tokens[kind], ignore_eos=True)
                rec = engine_record(kind, out, time.perf_counter() - t0)
                with lock:
                    records.append(rec)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return LevelResult(clients, wall, records)


def arrival(model, running: int, long_tokens: int, first_image: int) -> dict:
    """TTFT of a caption arriving while `running` long captions decode, against alone; the largest
    token gap of a running request during the arrival's prefill."""
    alone = model.generate(request_image(first_image), CAPTION, max_new_tokens=2, ignore_eos=True)
    handles = [model.submit(request_image(first_image + 1 + i), CAPTION, max_new_tokens=long_tokens, ignore_eos=True)
               for i in range(running)]
    for h in handles:
        next(h.tokens())                           # every one is decoding now
    stamps: list[float] = []

    def watch(h):
        for _ in h.tokens():
            stamps.append(time.perf_counter())

    watcher = threading.Thread(target=watch, args=(handles[-1],), daemon=True)
    watcher.start()
    time.sleep(0.5)
    t_arrive = time.perf_counter()
    new = model.generate(request_image(first_image + 1 + running), CAPTION, max_new_tokens=2, ignore_eos=True)
    t_done = time.perf_counter()
    still_running = sum(not h.done() for h in handles)
    for h in handles:
        h.cancel()
    watcher.join(60)
    before = [b - a for a, b in zip(stamps, stamps[1:]) if b < t_arrive]
    during = [b - a for a, b in zip(stamps, stamps[1:]) if t_arrive - 1e-3 <= a <= t_done]
    ttft_alone, ttft_new = alone.timings["first_token"], new.timings["first_token"]
    return {"running": running, "still_running_at_end": still_running, "ttft_alone_s": ttft_alone,
            "ttft_arrival_s": ttft_new, "ttft_ratio": ttft_new / ttft_alone,
            "prefill_chunks": new.stats.prefill_chunks,
            "step_s_before": statistics.median(before) if before else None,
            "max_gap_during_prefill_s": max(during) if during else None}


def decode_steps(model, row_counts: list[int], steps: int, image_index: int) -> list[dict]:
    """The decode step itself, apart from how clients' prefills and decodes overlap: for each
    count, that many captions of one image (its features cached after the first) are submitted
    at once; once the last one has its first token every one decodes and no prefill is left, and
    the step time is the mean time per token of the last one over the next `steps` tokens."""
    image = request_image(image_index)
    out = []
    for rows in row_counts:
        # the first ones decode while the later ones prefill; the slack (cancelled below, never
        # decoded) covers a reader that falls behind a fast model and gets its tokens in chunks
        budget = 6 * rows + 4 * steps + 8
        handles = [model.submit(image, CAPTION, max_new_tokens=budget, ignore_eos=True) for _ in range(rows)]
        tokens = handles[-1].tokens()
        next(tokens)                                  # the last prefill is done: all `rows` decode now
        t0, seen = time.perf_counter(), 0
        for chunk in tokens:
            seen += len(chunk)
            if seen >= steps:
                break
        if seen == 0:
            raise RuntimeError(f"decode_steps: the {rows}-row request ended after its first token; "
                               f"raise its budget ({budget} tokens)")
        step_s = (time.perf_counter() - t0) / seen
        for h in handles:
            h.cancel()
        for h in handles:
            h.result()
        out.append({"rows": rows, "step_s": step_s, "tokens_per_s": rows / step_s})
    return out


def run_engine(spec: dict) -> dict:
    import engine
    from ..serving import SchedulerConfig

    t0 = time.perf_counter()
    model = engine.load(spec["artifact"], spec["backend"], spec["threads"], verify=False, progress=False)
    load_s = time.perf_counter() - t0
    tokens = {"caption": spec["new_tokens"], "detect": spec["detect_tokens"]}
    model.generate(request_image(10_000), CAPTION, max_new_tokens=2, ignore_eos=True)     # warm-up
    levels, image = [], 0
    for clients in spec["levels"]:
        level = engine_level(model, clients, spec["per_client"], tokens, image)
        image += clients * spec["per_client"]
        levels.append({**level.summary(), "records": [asdict(r) for r in level.requests]})
        _log(f"  {spec['id']} {clients} client(s): {levels[-1]['tokens_per_s']:.2f} tok/s, "
             f"{levels[-1]['requests_per_s']:.3f} req/s, p95 {levels[-1]['p95_latency_s']:.1f} s")
    out = {"load_s": load_s, "levels": levels,
           "decode_steps": decode_steps(model, spec["levels"], spec.get("step_tokens", 8), 40_000)}
    _log(f"  {spec['id']} decode steps: " + ", ".join(f"{d['rows']} rows {d['step_s'] * 1e3:.0f} ms"
                                                       for d in out["decode_steps"]))
    if spec["arrival_tokens"]:
        out["arrival"] = arrival(model, ARRIVAL_RUNNING, spec["arrival_tokens"], 20_000)
        out["arrival"]["policy"] = "chunked prefill (default SchedulerConfig)"
        _log(f"  {spec['id']} arrival: TTFT {out['arrival']['ttft_ratio']:.2f}x alone")
    model.close()
    if spec["arrival_tokens"] and spec.get("arrival_whole"):
        n_bounds = model.config.text.num_hidden_layers + 1
        whole = engine.load(spec["artifact"], spec["backend"], spec["threads"], verify=False, progress=False,
                            serving=SchedulerConfig(prefill_chunk_layers=n_bounds))
        whole.generate(request_image(10_000), CAPTION, max_new_tokens=2, ignore_eos=True)
        out["arrival_whole"] = arrival(whole, ARRIVAL_RUNNING, spec["arrival_tokens"], 30_000)
        out["arrival_whole"]["policy"] = "whole prefill (prefill_chunk_layers = all boundaries)"
        whole.close()
    return out


# ---------------------------------------------------------------------------- transformers
def run_transformers(spec: dict) -> dict:
    """The same requests, one after another, through transformers' generate."""
    from .workers import TransformersRunner
    hf = TransformersRunner(spec)
    tokens = {"caption": spec["new_tokens"], "detect": spec["detect_tokens"]}
    hf.generate(request_image(10_000), CAPTION, 2)                    # warm-up
    records = []
    t_all = time.perf_counter()
    for r in range(spec["per_client"] * 2):                           # caption, detect, caption, ...
        kind = request_kind(0, r)
        run = hf.generate(request_image(r), CAPTION if kind == "caption" else DETECT, tokens[kind])
        decode_s = run.end - run.token_times[0]
        records.append(RequestRecord(kind, run.end - run.start, run.ttft_s, len(run.tokens), len(run.tokens) - 1,
                                     decode_s))
    level = LevelResult(1, time.perf_counter() - t_all, records)
    return {"load_s": hf.load_s, "serial": {**level.summary(), "records": [asdict(x) for x in records]}}


def _log(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- report
def goals(systems: list[dict]) -> list[dict]:
    """Each goal for each engine system that has the figures."""
    out = []
    for s in systems:
        res = s.get("result") or {}
        by_clients = {lv["clients"]: lv for lv in res.get("levels", [])}
        values = {}
        if 1 in by_clients and 8 in by_clients and by_clients[1]["decode_tokens_per_s"]:
            values["decode_scaling_8x"] = by_clients[8]["decode_tokens_per_s"] / by_clients[1]["decode_tokens_per_s"]
        if res.get("arrival"):
            values["arrival_ttft_ratio"] = res["arrival"]["ttft_ratio"]
        for label, key, cmp, threshold in GOALS:
            if key in values:
                v = values[key]
                met = v >= threshold if cmp == ">=" else v <= threshold
                out.append({"system": s["id"], "goal": f"{label} {cmp} {threshold:g}", "value": v, "met": met})
    return out


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: dict, markdown: bool) -> str:
    head = ["system", "clients", "requests", "req/s", "tok/s end to end", "decode-phase tok/s", "p50 latency s",
            "p95 latency s", "p50 TTFT s", "p95 TTFT s"]
    rows, failures = [], []
    for s in results["systems"]:
        res = s.get("result") or {}
        if "error" in res:
            rows.append([s["id"], "failed"] + [""] * (len(head) - 2))
            failures.append(f"{s['id']} failed: {res['error']}")
            continue
        levels = res.get("levels") or ([dict(res["serial"], clients="serial")] if res.get("serial") else [])
        for lv in levels:
            rows.append([s["id"], str(lv["clients"]), str(lv["requests"]), _fmt(lv["requests_per_s"], 3),
                         _fmt(lv["tokens_per_s"]), _fmt(lv["decode_tokens_per_s"]), _fmt(lv["p50_latency_s"], 1),
                         _fmt(lv["p95_latency_s"], 1), _fmt(lv["p50_ttft_s"], 1), _fmt(lv["p95_ttft_s"], 1)])
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]]
    for s in results["systems"]:
        for key in ("arrival", "arrival_whole"):
            a = (s.get("result") or {}).get(key)
            if a:
                lines.append(("- " if markdown else "") +
                             f"{s['id']} arrival ({a['policy']}): TTFT {a['ttft_arrival_s']:.2f} s while "
                             f"{a['running']} decode vs {a['ttft_alone_s']:.2f} s alone = {a['ttft_ratio']:.2f}x; "
                             f"decode step before {_fmt(a['step_s_before'], 3)} s, longest token gap during its "
                             f"prefill {_fmt(a['max_gap_during_prefill_s'], 2)} s ({a['prefill_chunks']} chunks)")
        steps = (s.get("result") or {}).get("decode_steps")
        if steps:
            one = next((d for d in steps if d["rows"] == 1), None)
            lines.append(("- " if markdown else "") + f"{s['id']} decode step with every row live (no prefill "
                         "in between): " + ", ".join(
                             f"{d['rows']} row(s) {d['step_s'] * 1e3:.0f} ms = {d['tokens_per_s']:.1f} tok/s"
                             + (f" ({d['tokens_per_s'] / one['tokens_per_s']:.2f}x one row)" if one and d is not one
                                else "") for d in steps))
    lines += [("- " if markdown else "") + f for f in failures]
    for g in results["goals"]:
        lines.append(("- " if markdown else "") + f"goal {g['system']}: {g['goal']}: {g['value']:.2f} "
                     f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def markdown_report(results: dict, machine_lines: list[str]) -> str:
    st = results["settings"]
    return "\n".join([
        f"# engine.bench concurrency: {results['model']['name']}", "",
        f"`{results['command']}`", "", *machine_lines, "",
        f"Requests: caption ({st['new_tokens']} tokens) and detect with 3 labels ({st['detect_tokens']} tokens), "
        f"greedy, EOS ignored, a distinct image each; {st['per_client']} per client; {st['threads']} threads. "
        "Transformers runs the same requests one after another.", "",
        table(results, markdown=True), "",
        *[f"- {n}" for n in results["notes"]], ""])
