"""engine.bench: the quick end-to-end run with both workloads (subprocess), the statistics / limit
math with hand-computed values, the prefill / decode splits, system and workload parsing, and
_native.memory_bandwidth."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from types import SimpleNamespace

from engine import _native, tasks
from engine.bench import report, workers
from engine.bench.__main__ import cpuid_cap, parse_systems, parse_workloads, split_workloads, warm_page_cache
from engine.synth import preset_config

HAVE_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m engine.bench --quick --workload caption,detect3 --out OUT` with its own cache directory."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    env = dict(os.environ, PALIGEMMA_EDGE_CACHE=str(tmp / "cache"))
    proc = subprocess.run([sys.executable, "-m", "engine.bench", "--quick", "--workload", "caption,detect3",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return out, proc.stdout


def test_quick_writes_all_outputs(quick_run):
    out, stdout = quick_run
    for name in ("results.json", "results.md", "chart.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT" in stdout and "openvino-int8" in stdout
    for title in ("first-call TTFT / warm TTFT", "prefill split", "decode step split", "detect3 call s"):
        assert title in stdout, title


def test_quick_results_json_is_complete(quick_run):
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    expected = {"openvino-int8", "onnxruntime-int8"} | ({"pytorch-bf16"} if HAVE_TRANSFORMERS else set())
    assert {s["id"] for s in r["systems"]} == expected
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert r["versions"]["numpy"] and r["versions"]["openvino"] and r["versions"]["onnxruntime"]
    assert r["bandwidth"]["best_gbs"] > 0
    assert r["settings"]["new_tokens"] == 8 and r["model"]["prompt_tokens"] > 16
    for fmt, lim in r["limits"]["formats"].items():
        assert lim["bytes_per_token"] > 0 and lim["tokens_per_s"] > 0, fmt
    for s in r["systems"]:
        assert len(s["samples"]) == r["settings"]["repeats"]
        for x in s["samples"]:                              # raw samples, as measured
            assert "error" not in x, x
            assert x["new_tokens"] == 8 and x["decode_steps"] == 7 and x["peak_rss_bytes"] > 0
        for key in ("load_s", "image_encode_s", "ttft_s", "ms_per_token", "tokens_per_s", "pct_of_limit",
                    "prefill_gflops", "peak_rss_gb", "rss_gb", "disk_gb"):
            st = s["summary"][key]
            assert st and st["min"] > 0 and st["min"] <= st["median"] <= st["max"], (s["id"], key)
        for x in s["samples"]:                              # first call: its own TTFT
            assert x["workload"] == "caption" and 0 < x["first_call_ttft_s"] <= x["warmup_s"], x
        st = s["summary"]["first_call_ttft_ratio"]
        assert st and st["median"] == pytest.approx(s["samples"][0]["first_call_ttft_s"] / s["samples"][0]["ttft_s"])
        if s["kind"] == "engine":
            shares = {k: s["summary"][k]["median"] for k in ("graph_share", "attention_share", "overhead_share")}
            assert all(0 <= v <= 1 for v in shares.values()), shares
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
            assert s["samples"][0]["split"]["graph_calls"] > 0 and s["samples"][0]["split"]["attention_calls"] > 0
            layers = preset_config("tiny-pg2").text.num_hidden_layers
            for x in s["samples"]:                          # prefill split: parts within the TTFT
                p = x["prefill_split"]
                parts = p["vision_s"] + p["decoder_s"] + p["attention_s"] + p["lm_head_s"]
                assert all(p[k] > 0 for k in ("vision_s", "decoder_s", "attention_s", "lm_head_s")), p
                assert parts <= x["ttft_s"], (parts, x["ttft_s"])
                assert (p["vision_calls"], p["decoder_calls"], p["attention_calls"], p["lm_head_calls"]) == \
                    (1, layers + 1, layers, 1)              # graphs decoder_0 .. decoder_L; lm_head apart
            pre = {k: s["summary"][k]["median"] for k, _ in report.PREFILL_SPLIT}
            assert all(0 <= v <= 1 for v in pre.values()) and sum(pre.values()) == pytest.approx(1.0, abs=1e-6)
        else:
            assert "prefill_split" not in s["samples"][0] and s["summary"]["prefill_vision_share"] is None
        if HAVE_TRANSFORMERS:
            assert r["baseline"] == report.BASELINE
            for key, *_ in report.METRICS:
                assert s["ratios"][key] is not None and s["ratios"][key] > 0, (s["id"], key)
            if s["id"] == report.BASELINE:
                assert s["ratios"]["ttft_s"] == pytest.approx(1.0)


def test_quick_detect3(quick_run):
    out, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    labels = list(workers.DETECT_LABELS)
    assert r["settings"]["workloads"] == ["caption", "detect3"] and r["settings"]["detect_labels"] == labels
    assert r["settings"]["detect_prompt"] == tasks.detect_prompt(labels) == "detect " + " ; ".join(labels)
    assert r["settings"]["detect_max_new_tokens"] == [8]             # --quick caps detect3 at 8 tokens
    prompt_tokens = set()
    for s in r["systems"]:
        d = s["detect3"]
        assert len(d["samples"]) == r["settings"]["repeats"]
        for x in d["samples"]:
            assert "error" not in x, x
            assert x["workload"] == "detect3" and x["prompt"] == r["settings"]["detect_prompt"]
            assert x["max_new_tokens"] == 8 and 0 < x["new_tokens"] <= 8 and len(x["tokens"]) == x["new_tokens"]
            assert 0 < x["ttft_s"] < x["e2e_s"] and x["first_call_s"] > 0 and x["detections"] >= 0
            assert x["finish_reason"] in ("eos", "length")
            prompt_tokens.add(x["prompt_tokens"])
        for key in ("e2e_s", "ttft_s", "new_tokens", "ms_per_token", "first_call_s"):
            st = d["summary"][key]
            assert st and st["min"] > 0 and st["min"] <= st["median"] <= st["max"], (s["id"], key)
        if HAVE_TRANSFORMERS:
            assert all(d["ratios"][k] > 0 for k in report.DETECT_RATIOS), d["ratios"]
    caption_prompt = r["model"]["prompt_tokens"]
    assert len(prompt_tokens) == 1 and prompt_tokens.pop() > caption_prompt    # same prompt for every system


def test_quick_results_md_is_well_formed(quick_run):
    out, _ = quick_run
    md = (out / "results.md").read_text()
    r = json.loads((out / "results.json").read_text())
    assert md.startswith("# Benchmark: tiny-pg2")
    top = md.split("## Setup")[0]                   # the machine first: CPU, SIMD flags, cpu_features()
    assert f"- CPU: {r['machine']['cpu']}" in top and "- SIMD flags" in top
    assert "- engine.cpu_features(): " in top and f"simd={r['machine']['engine_cpu_features']['simd']}" in top
    for section in ("## Caption", "### First call vs warm", "### Where the time goes", "## detect3",
                    "first-call TTFT / warm TTFT", "| vision graph % |", "detect3 call s"):
        assert section in md, section
    detect_md = md.split("## detect3")[1].split("## ")[0]
    for s in r["systems"]:
        assert f"| {s['id']} |" in md and f"| {s['id']} |" in detect_md
    for block in md.split("\n\n"):                 # every table: same column count in each row
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({row.count(" | ") for row in rows if not row.startswith("|---")}) == 1, block
    assert "![" in md and "chart.png" in md


# ---------------------------------------------------------------------------- statistics
def test_summarize():
    assert report.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert report.summarize([1, 2, 3, 10]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert report.summarize([None, 4.0]) == {"median": 4.0, "min": 4.0, "max": 4.0, "n": 1}
    assert report.summarize([]) is None and report.summarize([None]) is None


def test_ratio():
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(None, 4.0) is None and report.ratio(1.0, None) is None and report.ratio(1.0, 0.0) is None


# ---------------------------------------------------------------------------- limit math
def test_matrix_bytes():
    assert report.matrix_bytes("fp32", 4, 256) == 4096
    assert report.matrix_bytes("bf16", 4, 256) == 2048
    assert report.matrix_bytes("int8", 4, 256) == 1024 + 4 * 4          # + one fp32 scale per row
    assert report.matrix_bytes("fp8", 4, 256) == 1040
    assert report.matrix_bytes("int4", 4, 256, 128) == 512 + 4 * 4 * 2   # + one scale per group of 128
    with pytest.raises(ValueError):
        report.matrix_bytes("int3", 4, 256)


def test_weight_bytes_per_token_paligemma_3b():
    # Per layer: q, o 2048x2048; k, v 256x2048; gate, up 16384x2048; down 2048x16384
    # = 110,100,480 params; 18 layers = 1,981,808,640; tied LM head 257216 x 2048 = 526,778,368.
    cfg = preset_config("paligemma-3b-224")
    assert report.decoder_params(cfg) == (1_981_808_640, 526_778_368)
    params = 1_981_808_640 + 526_778_368
    rows = 18 * (2048 + 256 + 256 + 2048 + 16384 + 16384 + 2048) + 257216       # 966,848 output rows
    groups = 18 * (2048 * 16 * 2 + 256 * 16 * 2 + 16384 * 16 * 2 + 2048 * 128) + 257216 * 16
    assert report.weight_bytes_per_token(cfg, "bf16") == 2 * params == 5_017_174_016
    assert report.weight_bytes_per_token(cfg, "fp32") == 4 * params
    assert report.weight_bytes_per_token(cfg, "int8") == params + 4 * rows == 2_512_454_400
    # int4 is mixed (export/quantize.py): layer 0, every v_proj (256 x 2048) and the LM head stay int8
    int8_params = 110_100_480 + 17 * 256 * 2048 + 526_778_368
    int8_rows = (2048 + 256 + 256 + 2048 + 16384 + 16384 + 2048) + 17 * 256 + 257216
    int8_groups = (2048 * 16 * 2 + 256 * 16 * 2 + 16384 * 16 * 2 + 2048 * 128) + 17 * 256 * 16 + 257216 * 16
    assert report.weight_bytes_per_token(cfg, "int4", 128) == (
        (params - int8_params) // 2 + 4 * (groups - int8_groups) + int8_params + 4 * int8_rows) == 1_636_605_696


def test_int4_falls_back_to_int8_when_the_group_does_not_divide():
    cfg = preset_config("paligemma-3b-224")
    # group 8192 divides only down_proj's K = 16384: every other matrix is int8 (and layer 0's
    # down_proj is int8 anyway).
    layers, head = report.decode_matrices(cfg)
    int4_down = 17 * report.matrix_bytes("int4", 2048, 16384, 8192)
    expected = sum(report.matrix_bytes("int8", r, c) for r, c in [*layers, head]) \
        - 17 * report.matrix_bytes("int8", 2048, 16384) + int4_down
    assert report.weight_bytes_per_token(cfg, "int4", 8192) == expected


def test_limit_and_prefill_gflops():
    assert report.limit_tokens_per_s(28.0, 2_800_000_000) == pytest.approx(10.0)
    assert report.prefill_gflops(1_000_000_000, 0, 250, 5.0) == pytest.approx(100.0)
    assert report.prefill_gflops(1_000_000_000, 500_000_000, 250, 5.0) == pytest.approx(100.2)
    assert report.prefill_gflops(1, 1, 1, 0.0) is None


def test_sample_figures_and_split():
    sample = {"load_s": 2.0, "warmup_s": 1.0, "image_encode_s": 0.5, "ttft_s": 1.5, "prefill_s": 0.5,
              "decode_s": 1.0, "new_tokens": 5, "decode_steps": 4, "prompt_tokens": 100,
              "peak_rss_bytes": 3_000_000_000,
              "split": {"graph_s": 0.6, "lm_head_s": 0.15, "attention_s": 0.3}}
    f = report.sample_figures(sample, disk_bytes=2_500_000_000, limit_tps=8.0, layer_params=10**9, head_params=0)
    assert f["tokens_per_s"] == 4.0 and f["ms_per_token"] == 250.0 and f["pct_of_limit"] == 50.0
    assert f["prefill_gflops"] == pytest.approx(400.0)          # 2 * 1e9 * 100 / 0.5 s
    assert f["peak_rss_gb"] == 3.0 and f["disk_gb"] == 2.5
    assert f["graph_share"] == 0.6 and f["lm_head_share"] == 0.15 and f["attention_share"] == 0.3
    assert f["overhead_share"] == pytest.approx(0.1)
    no_split = report.sample_figures(dict(sample, split=None), disk_bytes=None, limit_tps=None,
                                     layer_params=1, head_params=0)
    assert "graph_share" not in no_split and no_split["pct_of_limit"] is None


def test_prefill_split_and_first_call_figures():
    sample = {"ttft_s": 2.0, "first_call_ttft_s": 3.0, "decode_s": 1.0, "decode_steps": 4,
              "prefill_split": {"vision_s": 0.5, "decoder_s": 0.8, "attention_s": 0.2, "lm_head_s": 0.1}}
    f = report.sample_figures(sample, disk_bytes=None, limit_tps=None, layer_params=1, head_params=0)
    assert f["prefill_vision_share"] == 0.25 and f["prefill_decoder_share"] == 0.4
    assert f["prefill_attention_share"] == 0.1 and f["prefill_lm_head_share"] == 0.05
    assert f["prefill_overhead_share"] == pytest.approx(0.2)        # 2.0 - 1.6 s of 2.0 s
    assert f["first_call_ttft_s"] == 3.0 and f["first_call_ttft_ratio"] == 1.5
    bare = report.sample_figures({"ttft_s": 2.0}, disk_bytes=None, limit_tps=None, layer_params=1, head_params=0)
    assert "prefill_vision_share" not in bare and bare["first_call_ttft_ratio"] is None


def test_detect_figures_and_ratios():
    def system(sid, kind, e2e, tokens):
        return {"id": sid, "kind": kind, "weights": "int8" if kind == "engine" else "bf16", "samples": [],
                "detect3": {"samples": [{"e2e_s": e2e * k, "ttft_s": 0.1 * k, "new_tokens": tokens,
                                         "first_call_s": 2 * e2e, "detections": 3} for k in (0.9, 1.0, 1.1)]}}
    systems = [system("openvino-int8", "engine", 1.0, 20), system("pytorch-bf16", "transformers", 4.0, 25)]
    report.analyze(systems, preset_config("tiny-pg2"), None, 128)
    ours, base = systems[0]["detect3"], systems[1]["detect3"]
    assert ours["summary"]["e2e_s"]["median"] == pytest.approx(1.0)
    assert ours["summary"]["ms_per_token"]["median"] == pytest.approx(50.0)
    assert ours["ratios"]["e2e_s"] == pytest.approx(0.25) and ours["ratios"]["ttft_s"] == pytest.approx(1.0)
    assert ours["ratios"]["ms_per_token"] == pytest.approx(50.0 / 160.0) and "new_tokens" not in ours["ratios"]
    assert base["ratios"]["e2e_s"] == pytest.approx(1.0)
    table = report.detect_table(systems)
    assert "(0.25x)" in table and "generated tokens" in table
    assert systems[0]["figures"] == [] and report.check_targets(systems) == []     # no caption: no targets


def test_detect_max_new_tokens_mirrors_engine_tasks():
    # engine.tasks.detect's default: 128, capped so the prompt plus the answer fit the context.
    for max_context, text_tokens in ((8192, 9), (300, 9), (40, 30)):
        model = SimpleNamespace(config=SimpleNamespace(num_image_tokens=256), max_context=max_context + 256,
                                tokenizer=SimpleNamespace(encode=lambda s, n=text_tokens: list(range(n))))
        prompt_tokens = 256 + 1 + text_tokens
        assert workers.detect_max_new_tokens(prompt_tokens, max_context + 256, None) == \
            tasks._default_max_new_tokens(model, "detect a ; b ; c", "detect")
    assert workers.detect_max_new_tokens(266, 8192, 8) == 8


def _fake(sid, kind, weights, tps, ttft, rss_gb):
    steps = 10
    return {"id": sid, "kind": kind, "backend": sid.split("-")[0], "weights": weights, "disk_bytes": 10**9,
            "samples": [{"decode_s": steps / (tps * k), "decode_steps": steps, "ttft_s": ttft * k,
                         "peak_rss_bytes": rss_gb * 1e9, "load_s": 1.0, "prompt_tokens": 260, "prefill_s": 1.0}
                        for k in (0.9, 1.0, 1.1)]}


def test_analyze_ratios_limits_and_targets():
    cfg = preset_config("paligemma-3b-224")
    systems = [_fake("openvino-int8", "engine", "int8", 7.0, 0.7, 3.0),
               _fake("pytorch-bf16", "transformers", "bf16", 2.0, 1.2, 6.6)]
    limits = report.analyze(systems, cfg, 25.12454400, 128)
    assert limits["formats"]["int8"]["tokens_per_s"] == pytest.approx(10.0)     # 25.12 GB/s / 2.512 GB
    ours, base = systems
    assert ours["summary"]["tokens_per_s"]["median"] == pytest.approx(7.0)
    assert ours["summary"]["tokens_per_s"]["min"] == pytest.approx(6.3)
    assert ours["summary"]["pct_of_limit"]["median"] == pytest.approx(70.0)
    assert ours["ratios"]["tokens_per_s"] == pytest.approx(3.5)
    assert ours["ratios"]["ttft_s"] == pytest.approx(0.7 / 1.2)
    assert ours["ratios"]["peak_rss_gb"] == pytest.approx(3.0 / 6.6)
    assert base["ratios"]["tokens_per_s"] == pytest.approx(1.0)
    met = {(t["target"], t["system"]): t["met"] for t in report.check_targets(systems)}
    assert met[("decode >= 85% of the int8 bandwidth limit", "openvino-int8")] is False    # 70%
    assert met[("TTFT <= 0.6x fastest transformers", "openvino-int8")] is True          # 0.58x bf16
    assert met[("peak RSS <= 0.5x transformers bf16", "openvino-int8")] is True         # 0.45x
    assert met[("load <= 2 s (int8)", "openvino-int8")] is True
    assert all(t["system"] != "pytorch-bf16" for t in report.check_targets(systems))
    # A faster transformers dtype becomes the TTFT reference: 0.7 / 0.9 = 0.78x, not met.
    systems.append(_fake("pytorch-fp32", "transformers", "fp32", 1.0, 0.9, 12.0))
    report.analyze(systems, cfg, 25.12454400, 128)
    rows = {(t["target"], t["system"]): t for t in report.check_targets(systems)}
    ttft = rows[("TTFT <= 0.6x fastest transformers", "openvino-int8")]
    assert ttft["against"] == "pytorch-fp32" and ttft["value"] == pytest.approx(0.7 / 0.9) and ttft["met"] is False
    assert rows[("peak RSS <= 0.5x transformers bf16", "openvino-int8")]["against"] == "pytorch-bf16"
    assert "openvino-int8" in report.main_table(systems) and "(3.50x)" in report.main_table(systems)


def test_analyze_without_baseline_gives_no_ratios():
    systems = [_fake("openvino-int8", "engine", "int8", 7.0, 0.7, 3.0)]
    report.analyze(systems, preset_config("paligemma-3b-224"), None, 128)
    assert all(v is None for v in systems[0]["ratios"].values())
    assert systems[0]["limit_tokens_per_s"] is None and systems[0]["summary"]["pct_of_limit"] is None


# ---------------------------------------------------------------------------- systems
def test_parse_systems():
    systems, notes = parse_systems("openvino,onnxruntime,pytorch", None, True)
    assert [s["id"] for s in systems] == ["openvino-int8", "openvino-int4", "openvino-bf16", "onnxruntime-int8",
                                          "pytorch-fp32", "pytorch-bf16"]
    assert notes == []
    systems, _ = parse_systems("ov,ort:int4,transformers:bf16,openvino-int8", "int8,fp8", True)
    assert [s["id"] for s in systems] == ["openvino-int8", "openvino-fp8", "onnxruntime-int4", "pytorch-bf16"]
    assert [s["kind"] for s in systems] == ["engine", "engine", "engine", "transformers"]
    systems, notes = parse_systems("openvino:int8,pytorch", None, False)
    assert [s["id"] for s in systems] == ["openvino-int8"] and "skipped" in notes[0]
    for bad in ("tensorflow", "openvino:int3", "pytorch:int8", ""):
        with pytest.raises(ValueError):
            parse_systems(bad, None, True)
    # variants: the same artifact loaded with another vision setting, measured beside the plain system
    systems, _ = parse_systems("onnxruntime:int8,onnxruntime:int8:native-vision,ort-int8", None, True)
    assert [(s["id"], s.get("vision")) for s in systems] == [("onnxruntime-int8", None),
                                                             ("onnxruntime-int8-native-vision", "native")]
    systems, _ = parse_systems("onnxruntime:int4:all-native", None, True)
    assert [(s["id"], s.get("decoder"), s.get("vision")) for s in systems] == [
        ("onnxruntime-int4-all-native", "native", "native")]
    for bad in ("openvino:int8:native-vision", "onnxruntime:int8:fast"):
        with pytest.raises(ValueError, match="onnxruntime systems take native-vision or graph-vision"):
            parse_systems(bad, None, True)


def test_cpuid_cap_is_read_from_the_preload_and_shown_in_results_md(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("CPUID_CAP", "avx512")
    assert cpuid_cap() is None                         # CPUID_CAP alone caps nothing
    monkeypatch.setenv("LD_PRELOAD", "/tmp/x/cpuid_cap.so")
    assert cpuid_cap() == "avx512"
    monkeypatch.delenv("CPUID_CAP")
    assert cpuid_cap() == "avx2"                       # the shim's default
    mach = {"cpu": "X", "cores": 2, "memory_gb": 8.0, "simd_flags": ["avx2", "avx512f"],
            "engine_cpu_features": {"best": "avx2"}}
    assert not any("CPUID capped" in line for line in report.machine_lines(mach))
    lines = report.machine_lines(dict(mach, cpuid_cap="avx2"))
    assert lines[-1].startswith("- CPUID capped to avx2 for every process of the run")


def test_parse_workloads():
    assert parse_workloads("caption") == ["caption"]
    assert parse_workloads("detect3, caption") == ["caption", "detect3"]      # caption runs first
    for bad in ("", "detect", "caption,foo"):
        with pytest.raises(ValueError):
            parse_workloads(bad)


def test_split_workloads():
    res = {"import_s": 1.0, "load_s": 2.0, "peak_rss_bytes": 9, "pid": 7,
           "workloads": {"caption": {"ttft_s": 0.5, "peak_rss_bytes": 5},
                         "detect3": {"e2e_s": 3.0, "peak_rss_bytes": 9}}}
    out = split_workloads(res, ["caption", "detect3"], {"repeat": 0})
    assert out["caption"] == {"workload": "caption", "import_s": 1.0, "load_s": 2.0, "pid": 7, "ttft_s": 0.5,
                              "peak_rss_bytes": 5, "repeat": 0}
    assert out["detect3"]["e2e_s"] == 3.0 and out["detect3"]["peak_rss_bytes"] == 9
    failed = split_workloads({"error": "boom"}, ["caption", "detect3"], {"repeat": 1})
    assert failed == {"caption": {"error": "boom", "repeat": 1}, "detect3": {"error": "boom", "repeat": 1}}


# ---------------------------------------------------------------------------- memory bandwidth
def test_memory_bandwidth_is_positive():
    gbs = _native.memory_bandwidth(64 << 20, 1, 2)
    assert isinstance(gbs, float) and 0 < gbs < 10_000
    assert _native.memory_bandwidth((64 << 20) + 8, 3, 1) > 0     # shares that do not divide evenly


@pytest.mark.parametrize("args", [(1000, 1, 1), (-1, 1, 1), (64 << 20, 0, 1), (64 << 20, 2000, 1),
                                  (64 << 20, 1, 0), (64 << 20, 1, -3)])
def test_memory_bandwidth_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        _native.memory_bandwidth(*args)


def test_memory_bandwidth_rejects_non_integers():
    with pytest.raises(TypeError):
        _native.memory_bandwidth("1GiB", 1, 1)


def test_load_files_and_page_cache_warming(tmp_path):
    """The files a sample's load mapped (and those of a checkpoint directory) are what the bench
    reads before the system's next sample; unreadable ones are skipped."""
    import mmap
    mapped = tmp_path / "weights.bin"
    mapped.write_bytes(b"\1" * 10000)
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "model.safetensors").write_bytes(b"\0" * 5000)
    with open(mapped, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
        files = workers.files_in_use(str(ckpt))
    assert str(mapped) in files
    assert {str(ckpt / "config.json"), str(ckpt / "sub" / "model.safetensors")} <= set(files)
    assert not any(p.startswith(("/proc/", "/dev/")) for p in files)
    read, seconds = warm_page_cache([str(mapped), str(ckpt / "sub" / "model.safetensors"), str(tmp_path / "gone")])
    assert read == 15000 and seconds >= 0


def test_prefill_ab_compares_artifacts_in_one_process():
    """benchmarks/prefill_ab.py on the default model given twice: one line per artifact with four
    min/median pairs; fewer than two artifacts is a usage error."""
    import engine
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "prefill_ab.py")
    model = str(engine.default_model_path())
    proc = subprocess.run([sys.executable, script, model, model, "--rounds", "1", "--size", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine.cpu_features()" in proc.stdout and "CPU:" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(model[-48:])]
    assert len(rows) == 2
    for row in rows:
        pairs = row[len(model[-48:]):].split()
        assert len(pairs) == 4 and all(float(a) <= float(b) for a, b in (p.split("/") for p in pairs))
    bad = subprocess.run([sys.executable, script, model], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least two artifacts" in bad.stderr
