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
    return fig


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
        keys = [k for k, *_ in METRICS] + [k for k, _ in SPLIT]
        s["summary"] = {k: summarize(f.get(k) for f in s["figures"]) for k in keys}
    base = next((s for s in systems if s["id"] == BASELINE and s["figures"]), None)
    for s in systems:
        s["ratios"] = {k: ratio(_median(s, k), _median(base, k)) if base else None for k, *_ in METRICS}
    return {"layer_params": layer_params, "head_params": head_params, "formats": limits}


def _median(system: dict | None, key: str) -> float | None:
    st = (system or {}).get("summary", {}).get(key)
    return st["median"] if st else None


# ---------------------------------------------------------------------------- targets
TARGETS = (   # (label, metric, "ratio" or "value", comparison, threshold, formats it applies to)
    ("decode tok/s >= 3x PyTorch bf16", "tokens_per_s", "ratio", ">=", 3.0, ("int8",)),
    ("decode >= 80% of the int8 bandwidth limit", "pct_of_limit", "value", ">=", 80.0, ("int8",)),
    ("TTFT <= 0.7x PyTorch bf16", "ttft_s", "ratio", "<=", 0.7, None),
    ("peak RSS <= 0.5x PyTorch bf16", "peak_rss_gb", "ratio", "<=", 0.5, ("int8",)),
)


def check_targets(systems: list[dict]) -> list[dict]:
    """Each target for each of our systems it applies to: the value and whether it is met."""
    rows = []
    for label, key, kind, op, threshold, formats in TARGETS:
        for s in systems:
            if s["kind"] != "engine" or (formats and s["weights"] not in formats):
                continue
            value = s["ratios"].get(key) if kind == "ratio" else _median(s, key)
            met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
            rows.append({"target": label, "system": s["id"], "value": value, "kind": kind,
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


def cell(system: dict, key: str, *, spread: bool) -> str:
    st = system["summary"].get(key)
    if not st:
        return "-"
    text = _num(st["median"])
    if spread and st["n"] > 1:
        text += f" [{_num(st['min'])}–{_num(st['max'])}]"
    r = system["ratios"].get(key)
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


def split_table(systems: list[dict], *, markdown: bool = False) -> str:
    header = ["system", "step ms"] + [f"{label} %" for _, label in SPLIT]
    rows = []
    for s in systems:
        if s["kind"] != "engine":
            continue
        pct = lambda k: _num(100 * _median(s, k)) if _median(s, k) is not None else "-"  # noqa: E731
        rows.append([s["id"], _num(_median(s, "ms_per_token"))] + [pct(k) for k, _ in SPLIT])
    return _table(header, rows, markdown) if rows else ""


def limits_table(limits: dict, bandwidth_gbs: float | None, *, markdown: bool = False) -> str:
    header = ["weights", "GB read / token", "limit tok/s" + (f" at {bandwidth_gbs:.1f} GB/s" if bandwidth_gbs else "")]
    rows = [[fmt, _num(v["bytes_per_token"] / 1e9), _num(v["tokens_per_s"])] for fmt, v in limits.items()]
    return _table(header, rows, markdown)


def targets_table(targets: list[dict], *, markdown: bool = False) -> str:
    rows = []
    for t in targets:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.2f}x" if t["kind"] == "ratio" else f"{v:.0f}% (>= {t['threshold']:.0f}%)")
        rows.append([t["target"], t["system"], shown, {True: "met", False: "NOT met", None: "n/a"}[t["met"]]])
    return _table(["target", "system", "value", "status"], rows, markdown) if rows else ""


def text_report(results: dict) -> str:
    """The stdout report: figures (median, ratio vs PyTorch bf16), split, limits, targets."""
    systems = results["systems"]
    bw = results["bandwidth"]["best_gbs"]
    parts = [f"{results['model']['name']}: {results['settings']['new_tokens']} new tokens, "
             f"{results['settings']['repeats']} repeat(s), {results['settings']['threads']} thread(s); "
             f"medians, (ratio vs {BASELINE})", main_table(systems)]
    split = split_table(systems)
    if split:
        parts += ["decode step split (share of the decode time)", split]
    parts += [f"bandwidth-bound decode limit (memory read {_num(bw)} GB/s)",
              limits_table(results["limits"]["formats"], bw)]
    targets = targets_table(results["targets"])
    if targets:
        parts += ["targets", targets]
    failed = [f"{s['id']}: {x['error']}" for s in systems for x in s["samples"] if x.get("error")]
    if failed:
        parts += ["failed samples"] + failed
    parts += results["notes"]
    return "\n\n".join(parts) + "\n"


def markdown_report(results: dict, chart_name: str | None) -> str:
    m, st, mach, bw = results["model"], results["settings"], results["machine"], results["bandwidth"]
    systems = results["systems"]
    lines = [f"# Benchmark: {m['name']}", "",
             f"Generated by `{results['command']}` on {results['started']}.", ""]
    lines += ["\n>\n".join(f"> {n}" for n in results["notes"]), ""]
    lines += ["## Setup", "",
              f"- model: {m['name']} ({m['source']}), {_count(m['params'])} parameters; decoder linear "
              f"{_count(m['layer_params'])} + LM head {_count(m['head_params'])}",
              f"- prompt: {st['prompt']!r} + one {m['image_size']} px image = {m['prompt_tokens']} tokens; "
              f"{st['new_tokens']} new tokens forced (EOS ignored); {st['repeats']} repeat(s), systems "
              "interleaved, each sample in a fresh process",
              f"- threads: {st['threads']} for every system",
              f"- machine: {mach['cpu']} ({mach['cores']} cores visible, {mach['memory_gb']:.1f} GB RAM), "
              f"load average {mach['loadavg_start']} at start, {mach['loadavg_end']} at end",
              f"- SIMD flags: {', '.join(mach['simd_flags']) or 'none'}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), ""]
    lines += ["## Results", "",
              f"Median [min–max] over the repeats; (ratio vs {BASELINE}). TTFT: image in -> first token "
              "out, preprocessing included. `1st call`: the first (2-token) generate after loading "
              "(lazy weight repacking, allocator warm-up), not counted in the other figures.", "",
              main_table(systems, markdown=True), ""]
    if chart_name:
        lines += [f"![TTFT, decode speed and peak RSS]({chart_name})", ""]
    split = split_table(systems, markdown=True)
    if split:
        lines += ["## Decode step split (our engine)", "",
                  "Shares of the decode time: graph execution (runner.run of the decoder and LM head "
                  "graphs), native attention (_native.attention), and overhead (embedding, Python "
                  "glue, the C++ loop's token selection; all the rest).", "", split, ""]
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
    attn = sorted({x.get("attn_implementation") for s in systems for x in s["samples"] if x.get("attn_implementation")})
    lines += ["## Method", "",
              "- every sample is a fresh process: import the runtime, load (`load`), a 2-token warm-up "
              "generate (`1st call`), then one measured generate of exactly the new tokens",
              "- this engine: `engine.load(artifact, backend, threads, verify=False)` (no checksum pass), "
              "`generate(..., ignore_eos=True)`; its timings come from `result.timings`",
              "- transformers: `PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=...)` with "
              f"{' / '.join(attn) or 'sdpa'} attention, `torch.set_num_threads(threads)`, the processor's "
              "input_ids, attention_mask, token_type_ids and pixel_values, `generate(min_new_tokens = "
              "max_new_tokens)`; image encode from forward hooks on the vision tower and projector, token "
              "times from a pass-through logits processor",
              "- decode: the new tokens after the first, time/token = decode time / (tokens - 1); peak RSS: "
              "VmHWM of the worker process; disk: the artifact directory (ours) or the checkpoint directory "
              "(transformers, bf16 safetensors for both dtypes); `RSS after`: VmRSS right after the measured "
              "generate, the model still loaded",
              "- prefill GFLOP/s = 2 x (decoder linear params x prompt tokens + LM head params) / prefill time", ""]
    failed = [f"- {s['id']}: {x['error']}" for s in systems for x in s["samples"] if x.get("error")]
    if failed:
        lines += ["## Failed samples", "", *failed, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- chart
def write_chart(results: dict, path: Path) -> Path | None:
    """Three panels (TTFT, decode tokens/s, peak RSS), one bar per system with min-max whiskers.
    Returns None when matplotlib is not installed."""
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
