"""Benchmark math and output: statistics over repeats, the bandwidth-bound decode limit, ratios
against the baseline (PyTorch bf16), and the three outputs (stdout table, results.md, chart).

The physical limit of one decode step: every decoder linear weight and the LM head are read once
from memory per token (batch 1), so

    limit tokens/s = memory read bandwidth / weight bytes read per token

with the bytes of the weight format as stored (int8: 1 byte + one fp32 scale per output row;
int4: half a byte + one fp32 scale per group, for the matrices the exporter makes int4 - the LM
head, decoder layer 0 and v_proj are int8 in an int4 artifact; fp8: 1 byte + a scale per row;
bf16 / fp16: 2 bytes; fp32: 4 bytes). Embedding lookups (one row), norms, the KV cache and activations are
left out: they are small at these context lengths. The limit is the format's; a runtime that
widens weights in memory (OpenVINO's f32 inference hint turns bf16 weights into fp32) reads more
than that and cannot reach it.

Prefill GFLOP/s counts the matrix work only: 2 * decoder linear params * prompt tokens, plus the
LM head once (for the last position), over the prefill time.

Workloads: `caption` fills system["samples"], "figures", "summary" and "ratios" (METRICS, the
splits, FIRST_CALL); `detect3` fills system["detect3"] with the same keys (DETECT_METRICS).
Time splits of our engine: the prefill split is a share of the caption TTFT (vision graph,
decoder graphs, attention, LM head, and the rest: preprocessing, embedding, KV cache set-up,
first-token selection); the decode split a share of the decode time.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..config import PaliGemmaConfig
from ..layout import expected_tensors

BASELINE = "pytorch-bf16"

# (key, label, unit). Every figure is a median over the repeats with [min, max].
METRICS = (
    ("load_s", "load", "s"),
    ("warmup_s", "1st call", "s"),
    ("image_encode_s", "image enc", "s"),
    ("ttft_s", "TTFT", "s"),
    ("ms_per_token", "time/token", "ms"),
    ("tokens_per_s", "decode", "tok/s"),
    ("pct_of_limit", "of BW limit", "%"),
    ("prefill_gflops", "prefill", "GFLOP/s"),
    ("peak_rss_gb", "peak RSS", "GB"),
    ("rss_gb", "RSS after", "GB"),
    ("disk_gb", "disk", "GB"),
)
SPLIT = (("graph_share", "graphs"), ("lm_head_share", "of which LM head"),
         ("attention_share", "attention"), ("overhead_share", "overhead"))
PREFILL_SPLIT = (("prefill_vision_share", "vision graph"), ("prefill_decoder_share", "decoder graphs"),
                 ("prefill_attention_share", "attention"), ("prefill_lm_head_share", "LM head"),
                 ("prefill_overhead_share", "overhead"))
FIRST_CALL = (("warmup_s", "1st call", "s"), ("first_call_ttft_s", "first-call TTFT", "s"),
              ("ttft_s", "warm TTFT", "s"), ("first_call_ttft_ratio", "first-call TTFT / warm TTFT", ""),
              ("first_call_image_encode_s", "first-call image enc", "s"), ("image_encode_s", "warm image enc", "s"),
              ("first_call_prefill_s", "first-call prefill", "s"), ("prefill_s", "warm prefill", "s"))
DETECT_METRICS = (("e2e_s", "detect3 call", "s"), ("ttft_s", "TTFT", "s"), ("new_tokens", "generated tokens", ""),
                  ("ms_per_token", "call / token", "ms"), ("first_call_s", "1st call", "s"),
                  ("detections", "detections", ""))
DETECT_RATIOS = ("e2e_s", "ttft_s", "ms_per_token", "first_call_s")     # the rest are counts
COUNTS = ("new_tokens", "detections")


# ---------------------------------------------------------------------------- statistics
def summarize(values) -> dict | None:
    """{"median", "min", "max", "n"} of the non-None values; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


# ---------------------------------------------------------------------------- physical limit
def matrix_bytes(fmt: str, rows: int, cols: int, group_size: int = 128) -> int:
    """Bytes of a [rows, cols] weight matrix stored in `fmt` (scales included)."""
    n = rows * cols
    if fmt == "fp32":
        return 4 * n
    if fmt in ("fp16", "bf16"):
        return 2 * n
    if fmt in ("int8", "fp8"):
        return n + 4 * rows
    if fmt == "int4":
        return n // 2 + 4 * rows * (cols // group_size)
    raise ValueError(f"unknown weight format {fmt!r}")


def decode_matrices(cfg: PaliGemmaConfig) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Shapes of the matrices one decode step reads: the decoder layers' linear weights, and the
    LM head (the tied embedding, or lm_head.weight when untied)."""
    shapes = expected_tensors(cfg)
    layers = [tuple(s) for name, s in shapes.items()
              if name.startswith("text.layers.") and name.endswith(".weight") and len(s) == 2]
    head = shapes["text.embed_tokens.weight"] if cfg.text.tie_word_embeddings else shapes["lm_head.weight"]
    return layers, tuple(head)


def weight_bytes_per_token(cfg: PaliGemmaConfig, fmt: str, group_size: int = 128) -> int:
    """Weight bytes read per decoded token in format `fmt`, each matrix in the format the exporter
    gives it (export.quantize.matrix_format): int4 keeps decoder layer 0, every v_proj and the LM
    head at int8, and falls back to int8 where group_size does not divide the input size."""
    from export.quantize import matrix_format   # the exporter's rule (numpy + ml_dtypes only)
    shapes = expected_tensors(cfg)
    head = "text.embed_tokens.weight" if cfg.text.tie_word_embeddings else "lm_head.weight"
    names = [name for name, s in shapes.items()
             if name.startswith("text.layers.") and name.endswith(".weight") and len(s) == 2] + [head]
    total = 0
    for name in names:
        rows, cols = shapes[name]
        total += matrix_bytes(matrix_format(name, fmt, cols, group_size), rows, cols, group_size)
    return total


def decoder_params(cfg: PaliGemmaConfig) -> tuple[int, int]:
    """(decoder linear params per token, LM head params)."""
    layers, head = decode_matrices(cfg)
    return sum(r * c for r, c in layers), head[0] * head[1]


def limit_tokens_per_s(bandwidth_gbs: float, bytes_per_token: int) -> float:
    """Bandwidth-bound decode speed: bandwidth (GB/s, 1e9 B/s) / bytes read per token."""
    return bandwidth_gbs * 1e9 / bytes_per_token


def prefill_gflops(layer_params: int, head_params: int, prompt_tokens: int, prefill_s: float) -> float | None:
    """Matrix GFLOP/s of a prefill: 2 * (layer params * prompt tokens + head params) / time."""
    if not prefill_s or prefill_s <= 0:
        return None
    return 2.0 * (layer_params * prompt_tokens + head_params) / prefill_s / 1e9


# ---------------------------------------------------------------------------- per-sample figures
def sample_figures(sample: dict, *, disk_bytes: int | None, limit_tps: float | None,
                   layer_params: int, head_params: int) -> dict:
    """The METRICS (and the decode split shares) of one raw worker sample."""
    steps = sample.get("decode_steps") or max(0, (sample.get("new_tokens") or 0) - 1)
    decode_s = sample.get("decode_s")
    tps = steps / decode_s if steps and decode_s else None
    fig = {
        "load_s": sample.get("load_s"),
        "warmup_s": sample.get("warmup_s"),
        "image_encode_s": sample.get("image_encode_s"),
        "ttft_s": sample.get("ttft_s"),
        "ms_per_token": 1e3 * decode_s / steps if steps and decode_s else None,
        "tokens_per_s": tps,
        "pct_of_limit": 100.0 * tps / limit_tps if tps and limit_tps else None,
        "prefill_gflops": prefill_gflops(layer_params, head_params, sample.get("prompt_tokens") or 0,
                                         sample.get("prefill_s") or 0),
        "peak_rss_gb": sample["peak_rss_bytes"] / 1e9 if sample.get("peak_rss_bytes") else None,
        "rss_gb": sample["rss_after_generate_bytes"] / 1e9 if sample.get("rss_after_generate_bytes") else None,
        "disk_gb": disk_bytes / 1e9 if disk_bytes else None,
    }
    fig.update(split_shares(sample.get("split"), decode_s))
    fig.update(prefill_split_shares(sample.get("prefill_split"), sample.get("ttft_s")))
    first, warm = sample.get("first_call_ttft_s"), sample.get("ttft_s")
    fig["first_call_ttft_s"] = first
    fig["first_call_image_encode_s"] = sample.get("first_call_image_encode_s")
    fig["first_call_prefill_s"] = sample.get("first_call_prefill_s")
    fig["prefill_s"] = sample.get("prefill_s")
    fig["first_call_ttft_ratio"] = first / warm if first and warm else None
    return fig


def prefill_split_shares(split: dict | None, ttft_s: float | None) -> dict:
    """Shares of the TTFT (image in -> first token out): the vision graph, the decoder graphs
    and native attention on the prompt rows, the LM head, and the rest (overhead). Empty for
    systems without a split."""
    if not split or not ttft_s:
        return {}
    parts = {"prefill_vision_share": split["vision_s"], "prefill_decoder_share": split["decoder_s"],
             "prefill_attention_share": split["attention_s"], "prefill_lm_head_share": split["lm_head_s"]}
    shares = {k: v / ttft_s for k, v in parts.items()}
    shares["prefill_overhead_share"] = max(0.0, ttft_s - sum(parts.values())) / ttft_s
    return shares


def detect_figures(sample: dict) -> dict:
    """DETECT_METRICS of one detect3 sample."""
    e2e, n = sample.get("e2e_s"), sample.get("new_tokens")
    return {"e2e_s": e2e, "ttft_s": sample.get("ttft_s"), "new_tokens": n,
            "ms_per_token": 1e3 * e2e / n if e2e and n else None, "first_call_s": sample.get("first_call_s"),
            "detections": sample.get("detections")}


def split_shares(split: dict | None, decode_s: float | None) -> dict:
    """Shares of the decode time (= steps * step time): graph execution (of which the LM head
    graph), native attention, and everything else (embedding, Python glue, the C++ loop's token
    selection, callbacks). Empty for systems without a split."""
    if not split or not decode_s:
        return {}
    graph, attention = split["graph_s"], split["attention_s"]
    return {"graph_share": graph / decode_s, "lm_head_share": split["lm_head_s"] / decode_s,
            "attention_share": attention / decode_s,
            "overhead_share": max(0.0, decode_s - graph - attention) / decode_s}


def analyze(systems: list[dict], cfg: PaliGemmaConfig, bandwidth_gbs: float | None, group_size: int) -> dict:
    """Fill every system dict (id, weights, samples, disk_bytes) with bytes_per_token, limit,
    figures per sample, summary per metric and ratios against BASELINE; returns the limits."""
    layer_params, head_params = decoder_params(cfg)
    limits = {}
    for s in systems:
        fmt = s["weights"]
        if fmt not in limits:
            b = weight_bytes_per_token(cfg, fmt, group_size)
            limits[fmt] = {"bytes_per_token": b,
                           "tokens_per_s": limit_tokens_per_s(bandwidth_gbs, b) if bandwidth_gbs else None}
        s["bytes_per_token"] = limits[fmt]["bytes_per_token"]
        s["limit_tokens_per_s"] = limits[fmt]["tokens_per_s"]
        ok = [x for x in s["samples"] if not x.get("error")]
        s["figures"] = [sample_figures(x, disk_bytes=s.get("disk_bytes"), limit_tps=s["limit_tokens_per_s"],
                                       layer_params=layer_params, head_params=head_params) for x in ok]
        keys = [k for k, *_ in (*METRICS, *FIRST_CALL)] + [k for k, _ in (*SPLIT, *PREFILL_SPLIT)]
        s["summary"] = {k: summarize(f.get(k) for f in s["figures"]) for k in keys}
        if "detect3" in s:
            d = s["detect3"]
            d["figures"] = [detect_figures(x) for x in d["samples"] if not x.get("error")]
            d["summary"] = {k: summarize(f.get(k) for f in d["figures"]) for k, *_ in DETECT_METRICS}
    base = next((s for s in systems if s["id"] == BASELINE and s["figures"]), None)
    for s in systems:
        s["ratios"] = {k: ratio(_median(s, k), _median(base, k)) if base else None for k, *_ in METRICS}
    base = next((s["detect3"] for s in systems if s["id"] == BASELINE and "detect3" in s), None)
    for s in systems:
        if "detect3" in s:
            d = s["detect3"]
            d["ratios"] = {k: ratio(_median(d, k), _median(base, k)) if base else None for k in DETECT_RATIOS}
    return {"layer_params": layer_params, "head_params": head_params, "formats": limits}


def _median(system: dict | None, key: str) -> float | None:
    """The median of `key` in a system (or a system's workload dict: system["detect3"])."""
    st = (system or {}).get("summary", {}).get(key)
    return st["median"] if st else None


# ---------------------------------------------------------------------------- targets
# The performance goals (issue 12). "fastest transformers": the PyTorch system with the lowest
# median of that metric in this run (fp32 on AVX2-only CPUs, bf16 where bf16 is native).
TARGETS = (   # (label, metric, against: None (a value) / "fastest" / a system id, comparison, threshold, formats)
    ("TTFT <= 0.6x fastest transformers", "ttft_s", "fastest", "<=", 0.6, None),
    ("detect3 call <= 0.5x fastest transformers", "detect3.e2e_s", "fastest", "<=", 0.5, None),
    ("first-call TTFT <= 1.3x warm", "first_call_ttft_ratio", None, "<=", 1.3, None),
    ("load <= 2 s (int8)", "load_s", None, "<=", 2.0, ("int8",)),
    ("decode >= 85% of the int8 bandwidth limit", "pct_of_limit", None, ">=", 85.0, ("int8",)),
    ("decode >= 60% of the int4 bandwidth limit", "pct_of_limit", None, ">=", 60.0, ("int4",)),
    ("peak RSS <= 0.5x transformers bf16", "peak_rss_gb", BASELINE, "<=", 0.5, ("int8",)),
)


def _metric(system: dict, key: str) -> float | None:
    """The median of `key` ("detect3.e2e_s": of the detect3 workload) in one system."""
    if key.startswith("detect3."):
        return _median(system.get("detect3"), key.split(".", 1)[1])
    return _median(system, key)


def check_targets(systems: list[dict]) -> list[dict]:
    """Each target for each of our systems it applies to: the value and whether it is met."""
    rows = []
    torch = [s for s in systems if s["kind"] != "engine" and s.get("figures")]
    for label, key, against, op, threshold, formats in TARGETS:
        base, base_id = None, None
        if against == "fastest":
            timed = [(v, s["id"]) for s in torch if (v := _metric(s, key)) is not None]
            base, base_id = min(timed) if timed else (None, None)
        elif against is not None:
            ref = next((s for s in torch if s["id"] == against), None)
            base, base_id = (_metric(ref, key), against) if ref else (None, None)
        for s in systems:
            if s["kind"] != "engine" or (formats and s["weights"] not in formats) or not s["figures"]:
                continue
            value = _metric(s, key)
            if against is not None:
                value = ratio(value, base)
            met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
            rows.append({"target": label, "system": s["id"], "value": value,
                         "kind": "ratio" if against else "value", "against": base_id,
                         "threshold": threshold, "met": met})
    return rows


# ---------------------------------------------------------------------------- text output
def _num(v: float | None) -> str:
    """About three significant digits, no exponent for the usual ranges: 1234, 56.7, 8.90, 0.0123."""
    if v is None or not math.isfinite(v):
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 10**8 else f"{n / 1e6:.3f} M"


def cell(system: dict, key: str, *, spread: bool, workload: str = "caption") -> str:
    """Median [min–max] (ratio vs BASELINE) of `key` in a system's caption or detect3 figures."""
    figures = system if workload == "caption" else system[workload]
    st = figures["summary"].get(key)
    if not st:
        return "-"
    num = _num if key not in COUNTS else (lambda v: f"{v:g}")   # counts: 8, 7.5
    text = num(st["median"])
    if spread and st["n"] > 1:
        text += f" [{num(st['min'])}–{num(st['max'])}]"
    r = figures["ratios"].get(key)
    if r is not None and system["id"] != BASELINE:
        text += f" ({r:.2f}x)"
    return text


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main_table(systems: list[dict], *, markdown: bool = False) -> str:
    header = ["system"] + [f"{label} {unit}" for _, label, unit in METRICS]
    rows = [[s["id"]] + [cell(s, k, spread=markdown) for k, _, _ in METRICS] for s in systems]
    return _table(header, rows, markdown)


def _header(label: str, unit: str) -> str:
    return f"{label} {unit}".strip()


def _split_table(systems: list[dict], total: tuple[str, str, float], parts, markdown: bool) -> str:
    """One row per engine system: the total (key, header, scale) and each part's share in %."""
    key, title, scale = total
    header = ["system", title] + [f"{label} %" for _, label in parts]
    rows = []
    for s in systems:
        if s["kind"] != "engine" or all(_median(s, k) is None for k, _ in parts):
            continue
        pct = lambda k: _num(100 * _median(s, k)) if _median(s, k) is not None else "-"  # noqa: E731
        t = _median(s, key)
        rows.append([s["id"], _num(t * scale if t is not None else None)] + [pct(k) for k, _ in parts])
    return _table(header, rows, markdown) if rows else ""


def split_table(systems: list[dict], *, markdown: bool = False) -> str:
    """Decode step split: shares of the decode time."""
    return _split_table(systems, ("ms_per_token", "step ms", 1.0), SPLIT, markdown)


def prefill_split_table(systems: list[dict], *, markdown: bool = False) -> str:
    """Prefill split: shares of the TTFT."""
    return _split_table(systems, ("ttft_s", "TTFT ms", 1e3), PREFILL_SPLIT, markdown)


def first_call_table(systems: list[dict], *, markdown: bool = False) -> str:
    """First generate in a fresh process against the warm one, per system."""
    header = ["system"] + [_header(label, unit) for _, label, unit in FIRST_CALL]
    rows = [[s["id"]] + [_num(_median(s, k)) for k, *_ in FIRST_CALL] for s in systems if s["figures"]]
    return _table(header, rows, markdown) if rows else ""


def detect_table(systems: list[dict], *, markdown: bool = False) -> str:
    """The detect3 workload: one row per system that ran it."""
    header = ["system"] + [_header(label, unit) for _, label, unit in DETECT_METRICS]
    rows = [[s["id"]] + [cell(s, k, spread=markdown, workload="detect3") for k, *_ in DETECT_METRICS]
            for s in systems if s.get("detect3", {}).get("figures")]
    return _table(header, rows, markdown) if rows else ""


def limits_table(limits: dict, bandwidth_gbs: float | None, *, markdown: bool = False) -> str:
    header = ["weights", "GB read / token", "limit tok/s" + (f" at {bandwidth_gbs:.1f} GB/s" if bandwidth_gbs else "")]
    rows = [[fmt, _num(v["bytes_per_token"] / 1e9), _num(v["tokens_per_s"])] for fmt, v in limits.items()]
    return _table(header, rows, markdown)


def targets_table(targets: list[dict], *, markdown: bool = False) -> str:
    rows = []
    for t in targets:
        v = t["value"]
        if v is None:
            shown = "-"
        elif t["kind"] == "ratio":
            shown = f"{v:.2f}x {t.get('against') or ''}".strip()
        else:
            shown = _num(v)
        rows.append([t["target"], t["system"], shown, {True: "met", False: "NOT met", None: "n/a"}[t["met"]]])
    return _table(["target", "system", "value", "status"], rows, markdown) if rows else ""


def failed_samples(systems: list[dict]) -> list[str]:
    """"system (workload): error" for every failed sample."""
    return [f"{s['id']} ({x.get('workload', w)}): {x['error']}" for s in systems
            for w, samples in (("caption", s["samples"]), ("detect3", s.get("detect3", {}).get("samples", [])))
            for x in samples if x.get("error")]


def detect_setup(results: dict) -> str:
    """One line on what detect3 runs."""
    st = results["settings"]
    sample = next((x for s in results["systems"] for x in s.get("detect3", {}).get("samples", [])
                   if not x.get("error")), {})
    return (f"detect3: `model.detect(image, {st['detect_labels']})` = one prompt {st['detect_prompt']!r} + the "
            f"image = {sample.get('prompt_tokens', '?')} tokens, greedy, EOS allowed, max_new_tokens "
            f"{', '.join(map(str, st['detect_max_new_tokens'])) or '?'}; one warm-up call, then the measured call")


def text_report(results: dict) -> str:
    """The stdout report: one table per workload (median, ratio vs PyTorch bf16), the first-call
    and split tables, limits, targets."""
    systems, st = results["systems"], results["settings"]
    bw = results["bandwidth"]["best_gbs"]
    parts = [f"{results['model']['name']}: {st['repeats']} repeat(s), {st['threads']} thread(s); "
             f"medians, (ratio vs {BASELINE})"]
    if "caption" in st["workloads"]:
        parts += [f"caption: {st['new_tokens']} new tokens", main_table(systems),
                  "first call (fresh process) vs warm", first_call_table(systems)]
        prefill = prefill_split_table(systems)
        if prefill:
            parts += ["prefill split (share of the TTFT)", prefill]
        split = split_table(systems)
        if split:
            parts += ["decode step split (share of the decode time)", split]
    if "detect3" in st["workloads"]:
        parts += [detect_setup(results), detect_table(systems)]
    parts += [f"bandwidth-bound decode limit (memory read {_num(bw)} GB/s)",
              limits_table(results["limits"]["formats"], bw)]
    targets = targets_table(results["targets"])
    if targets:
        parts += ["targets", targets]
    failed = failed_samples(systems)
    if failed:
        parts += ["failed samples"] + failed
    parts += results["notes"]
    return "\n\n".join(p for p in parts if p) + "\n"


def machine_lines(mach: dict) -> list[str]:
    """The CPU, its SIMD flags and what the native core uses: the first lines of results.md."""
    features = mach.get("engine_cpu_features") or {}
    return [f"- CPU: {mach['cpu']} ({mach['cores']} cores visible, {mach['memory_gb']:.1f} GB RAM)",
            f"- SIMD flags (/proc/cpuinfo): {', '.join(mach['simd_flags']) or 'none'}",
            "- engine.cpu_features(): " + (", ".join(f"{k}={v}" for k, v in features.items()) or "-")] + (
        [f"- CPUID capped to {mach['cpuid_cap']} for every process of the run (benchmarks/cpuid_cap.c): "
         "onnxruntime, OpenVINO, torch and the engine see no flag above it"] if mach.get("cpuid_cap") else [])


def markdown_report(results: dict, chart_name: str | None) -> str:
    m, st, mach, bw = results["model"], results["settings"], results["machine"], results["bandwidth"]
    systems = results["systems"]
    lines = [f"# Benchmark: {m['name']}", "",
             f"Generated by `{results['command']}` on {results['started']}.", "", *machine_lines(mach), ""]
    lines += ["\n>\n".join(f"> {n}" for n in results["notes"]), ""]
    workloads = []
    if "caption" in st["workloads"]:
        workloads.append(f"caption: prompt {st['prompt']!r} + one {m['image_size']} px image = "
                         f"{m['prompt_tokens']} tokens; {st['new_tokens']} new tokens forced (EOS ignored)")
    if "detect3" in st["workloads"]:
        workloads.append(detect_setup(results))
    lines += ["## Setup", "",
              f"- model: {m['name']} ({m['source']}), {_count(m['params'])} parameters; decoder linear "
              f"{_count(m['layer_params'])} + LM head {_count(m['head_params'])}",
              *(f"- {w}" for w in workloads),
              f"- {st['repeats']} repeat(s), systems interleaved, each sample a fresh process that runs "
              f"the workloads in order ({', '.join(st['workloads'])}); image: {st['image']}",
              f"- threads: {st['threads']} for every system" + (f"; onnxruntime systems loaded with vision={st['vision']!r}"
                                                                if st.get("vision", "auto") != "auto" else ""),
              f"- load average {mach['loadavg_start']} at start, {mach['loadavg_end']} at end",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), ""]
    if "caption" in st["workloads"]:
        lines += ["## Caption", "",
                  f"Median [min–max] over the repeats; (ratio vs {BASELINE}). TTFT: image in -> first token "
                  "out, preprocessing included. `1st call`: the first (2-token) generate after loading "
                  "(lazy weight repacking, allocator warm-up), not counted in the other figures.", "",
                  main_table(systems, markdown=True), ""]
        if chart_name:
            lines += [f"![TTFT, decode speed and peak RSS]({chart_name})", ""]
        lines += ["### First call vs warm", "",
                  "The first generate of a fresh process (2 tokens) against the measured one: its TTFT "
                  "over the warm TTFT, and both split into the image encoding and the prefill after it (medians).", "", first_call_table(systems, markdown=True), ""]
        prefill, split = prefill_split_table(systems, markdown=True), split_table(systems, markdown=True)
        if prefill or split:
            lines += ["### Where the time goes (our engine)", ""]
        if prefill:
            lines += ["Prefill: shares of the TTFT. The vision graph, the decoder graphs (decoder_i on the "
                      "prompt rows), native attention on the prompt rows, the LM head (last row; native int8 or its graph), and "
                      "overhead: the rest (preprocessing, embedding, KV cache set-up, first-token selection).",
                      "", prefill, ""]
        if split:
            lines += ["Decode: shares of the decode time. Graph execution (the decoder graphs and the LM head, "
                      "native int8 or its graph), native attention (_native.attention), and overhead (embedding, Python "
                      "glue, the C++ loop's token selection; all the rest).", "", split, ""]
    if "detect3" in st["workloads"]:
        lines += ["## detect3", "", detect_setup(results) + ". Median [min–max] over the repeats; "
                  f"(ratio vs {BASELINE}). `detect3 call`: end to end (preprocessing, generate, decoding and "
                  "parsing the boxes); `call / token`: that over the generated tokens, which differ between "
                  "systems when they stop at different points.", "", detect_table(systems, markdown=True), ""]
    lines += ["## Physical limit", "",
              f"Memory read bandwidth (C++ streaming sum over {bw['bytes'] / 2**30:.2f} GiB, "
              f"{bw['threads']} threads, best of {bw['repeats']}): samples "
              f"{', '.join(f'{x:.1f}' for x in bw['samples_gbs'])} GB/s, best {_num(bw['best_gbs'])} GB/s.",
              "Decode limit = bandwidth / weight bytes read per token (decoder linear weights + LM head "
              "in the format, scales included).", "",
              limits_table(results["limits"]["formats"], bw["best_gbs"], markdown=True), ""]
    targets = targets_table(results["targets"], markdown=True)
    if targets:
        lines += ["## Targets", "", targets, ""]
    attn = sorted({x.get("attn_implementation") for s in systems
                   for x in (*s["samples"], *s.get("detect3", {}).get("samples", [])) if x.get("attn_implementation")})
    lines += ["## Method", "",
              "- every sample is a fresh process: import the runtime, load (`load`), then each workload: "
              "caption: a 2-token warm-up generate (`1st call`, with its own TTFT), then one measured generate "
              "of exactly the new tokens; detect3: one warm-up detect call, then the measured one",
              "- page cache: before each sample of a system, the bench reads once the files its previous sample "
              "had mapped or open after loading (ours: graphs, runtime caches, packed weights; transformers: its "
              "checkpoint directory; before the first sample: what the export step's load had open, or the "
              "checkpoint), so every load starts from a warm page cache, as the load goal states (otherwise a "
              "load right after transformers fp32, 18 GB resident, reads from disk, and a host that pages out "
              "idle file pages gives the first repeat a cold one)",
              "- this engine: `engine.load(artifact, backend, threads)`, as users load (checksums verified against the "
              "stamp the export worker's first load wrote: files unchanged since are not hashed again), "
              "`generate(..., ignore_eos=True)` and `model.detect(image, labels)`; its timings come from "
              "`result.timings`; the prefill and decode splits from perf_counter pairs around runner.run, "
              "_native.attention and the decode step function (engine/bench/workers.py)",
              "- transformers: `PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=...)` with "
              f"{' / '.join(attn) or 'sdpa'} attention, `torch.set_num_threads(threads)`, the processor's "
              "input_ids, attention_mask, token_type_ids and pixel_values, greedy `generate` (caption: "
              "`min_new_tokens = max_new_tokens`; detect3: our detect's prompt, max_new_tokens and EOS id, "
              "then `processor.decode` and engine.tasks.parse_detections); image encode from forward hooks "
              "on the vision tower and projector, token times from a pass-through logits processor",
              "- decode: the new tokens after the first, time/token = decode time / (tokens - 1); peak RSS: "
              "VmHWM of the worker process at the end of the caption workload; disk: the artifact directory "
              "(ours) or the checkpoint directory (transformers, bf16 safetensors for both dtypes); `RSS "
              "after`: VmRSS right after the measured generate, the model still loaded",
              "- prefill GFLOP/s = 2 x (decoder linear params x prompt tokens + LM head params) / prefill time", ""]
    failed = failed_samples(systems)
    if failed:
        lines += ["## Failed samples", "", *(f"- {f}" for f in failed), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- chart
def write_chart(results: dict, path: Path) -> Path | None:
    """Three panels of the caption workload (TTFT, decode tokens/s, peak RSS), one bar per system
    with min-max whiskers. Returns None when matplotlib is not installed or caption did not run."""
    if not any(s["figures"] for s in results["systems"]):
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    systems = [s for s in results["systems"] if s["figures"]]
    panels = (("ttft_s", "time to first token (s)"), ("tokens_per_s", "decode tokens/s"),
              ("peak_rss_gb", "peak RSS (GB)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 1.4 + 0.55 * max(3, len(systems))), constrained_layout=True)
    names = [s["id"] for s in systems]
    colors = ["#1f77b4" if s["kind"] == "engine" else "#d62728" for s in systems]
    for ax, (key, title) in zip(axes, panels):
        stats = [s["summary"].get(key) for s in systems]
        med = [st["median"] if st else 0.0 for st in stats]
        err = [[m - st["min"] if st else 0 for m, st in zip(med, stats)],
               [st["max"] - m if st else 0 for m, st in zip(med, stats)]]
        y = range(len(systems))
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(list(y), names if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        top = max([*med, *(st["max"] for st in stats if st)], default=0.0) or 1.0
        limit = (results["limits"]["formats"].get("int8") or {}).get("tokens_per_s")
        if key == "tokens_per_s" and limit and limit < 2 * top:   # the int8 bandwidth limit, when in range
            ax.axvline(limit, color="gray", ls="--", lw=1)
            ax.text(limit, len(systems) - 0.6, "int8 limit ", color="gray", fontsize=8, ha="right")
            top = max(top, limit)
        for i, v in enumerate(med):
            ax.text(v + 0.02 * top, i + 0.25, _num(v), va="center", fontsize=9)
        ax.set_xlim(0, top * 1.2)
    st = results["settings"]
    fig.suptitle(f"{results['model']['name']}: {st['threads']} threads, {st['new_tokens']} new tokens, "
                 f"median and min-max of {st['repeats']} (blue: this engine, red: transformers)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
