"""Benchmark workers: each sample runs in its own fresh process, so its peak RSS is its own.

    python -m engine.bench.workers SPEC.json OUT.json

SPEC["kind"] is one of
    "export"        export a checkpoint for one backend and weight format into the engine's
                    cache (engine._export_cached, the same cache engine.load uses)
    "engine"        load an artifact, run one warm-up generate and one measured generate
    "transformers"  the same with transformers' PaliGemmaForConditionalGeneration (PyTorch)
and the worker writes one JSON object to OUT.json (peak RSS included). Both measured kinds
follow the same protocol: import the runtime (import_s), load the model (load_s), a first
2-token generate (warmup_s: lazy weight repacking, allocator warm-up), then one generate of
exactly `new_tokens` tokens (EOS ignored) that gives image_encode_s, prefill_s, ttft_s (image
in -> first token out, preprocessing included) and decode_s (the later new_tokens - 1 tokens).

Decode step split (engine only): `DecodeProfiler` wraps, in this process only, the model's graph
runner (runner.run) and the native attention function (engine.model's `_native.attention`) with
a perf_counter pair each, and the model's `_step` to know which calls belong to decode steps.
Two clock reads per call, ~40 calls per 3B step, next to steps of ~100 ms: the hot path is
unchanged elsewhere. _native.last_generate_stats() adds the C++ loop's own time (loop_s) and
the time inside the Python step function (step_fn_s).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

PROMPT = "caption en"
WARMUP_TOKENS = 2


def example_image():
    from ..__main__ import example_image as image   # the demo's generated scene (320 x 240)
    return image()


# ---------------------------------------------------------------------------- memory
def _status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (VmHWM: peak RSS of this process image; VmRSS: now)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process. VmHWM (Linux) belongs to this process image
    only; ru_maxrss (the fallback) may include the parent's RSS at fork time on Linux."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def memory_info() -> dict:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": _status_bytes("VmRSS"),
            "ru_maxrss_bytes": maxrss if sys.platform == "darwin" else maxrss * 1024}


# ---------------------------------------------------------------------------- engine profiling
class DecodeProfiler:
    """Times graph runs and attention calls made inside decode steps (see the module docstring)."""

    def __init__(self):
        self.in_step = False
        self.reset()

    def reset(self) -> None:
        self.graph_s = self.lm_head_s = self.attention_s = self.step_s = 0.0
        self.graph_calls = self.attention_calls = self.steps = 0

    def attach(self, model) -> "DecodeProfiler":
        from .. import model as model_module
        model.runner = _TimedRunner(model.runner, self)
        if not isinstance(model_module._native, _TimedNative):
            model_module._native = _TimedNative(model_module._native, self)   # PaliGemma.decoder's attention
        step = model._step

        def timed_step(*args, **kwargs):
            self.in_step = True
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.step_s += time.perf_counter() - t0
                self.steps += 1
                self.in_step = False

        model._step = timed_step
        return self

    def as_dict(self) -> dict:
        return {"graph_s": self.graph_s, "lm_head_s": self.lm_head_s, "attention_s": self.attention_s,
                "step_s": self.step_s, "steps": self.steps, "graph_calls": self.graph_calls,
                "attention_calls": self.attention_calls}


class _TimedRunner:
    """Stands in for the model's GraphRunner; times run() during decode steps."""

    def __init__(self, runner, profiler: DecodeProfiler):
        self._runner, self._prof = runner, profiler

    def run(self, graph, inputs):
        if not self._prof.in_step:
            return self._runner.run(graph, inputs)
        t0 = time.perf_counter()
        out = self._runner.run(graph, inputs)
        dt = time.perf_counter() - t0
        self._prof.graph_s += dt
        self._prof.graph_calls += 1
        if graph == "lm_head":
            self._prof.lm_head_s += dt
        return out

    def __getattr__(self, name):
        return getattr(self._runner, name)


class _TimedNative:
    """Stands in for engine._native inside engine.model; times attention() during decode steps."""

    def __init__(self, native, profiler: DecodeProfiler):
        self._native, self._prof = native, profiler

    def attention(self, *args, **kwargs):
        if not self._prof.in_step:
            return self._native.attention(*args, **kwargs)
        t0 = time.perf_counter()
        out = self._native.attention(*args, **kwargs)
        self._prof.attention_s += time.perf_counter() - t0
        self._prof.attention_calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self._native, name)


# ---------------------------------------------------------------------------- workers
def run_export(spec: dict) -> dict:
    from .. import _export_cached
    t0 = time.perf_counter()
    path = _export_cached(Path(spec["checkpoint"]), spec["backend"], spec["weights"], spec["group_size"],
                          progress=True)
    return {"artifact": str(path), "seconds": time.perf_counter() - t0}


def run_engine(spec: dict) -> dict:
    import importlib
    t0 = time.perf_counter()
    importlib.import_module("openvino" if spec["backend"] == "openvino" else "onnxruntime")
    import engine
    from engine import _native
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = engine.load(spec["artifact"], spec["backend"], spec["threads"], verify=False, progress=False)
    load_s = time.perf_counter() - t0
    rss_after_load, peak_after_load = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    profiler = DecodeProfiler().attach(model)
    image, n = example_image(), spec["new_tokens"]
    prompt_tokens = len(model.processor(image, PROMPT)["input_ids"])

    t0 = time.perf_counter()
    model.generate(image, PROMPT, max_new_tokens=min(WARMUP_TOKENS, n), ignore_eos=True)
    warmup_s = time.perf_counter() - t0
    peak_after_warmup = _status_bytes("VmHWM")
    profiler.reset()
    result = model.generate(image, PROMPT, max_new_tokens=n, ignore_eos=True)
    loop = _native.last_generate_stats() or {}
    rss_after_generate = _status_bytes("VmRSS")
    t = result.timings
    split = profiler.as_dict()
    split.update({k: loop.get(k) for k in ("step_fn_s", "loop_s", "stream_s", "total_s")})
    model.close()
    return {"import_s": import_s, "load_s": load_s, "warmup_s": warmup_s,
            "image_encode_s": t["image_encode"], "prefill_s": t["prefill"], "ttft_s": t["first_token"],
            "decode_s": t["decode"], "new_tokens": len(result.tokens), "decode_steps": loop.get("steps"),
            "prompt_tokens": prompt_tokens, "finish_reason": result.finish_reason, "tokens": result.tokens,
            "split": split, "rss_after_load_bytes": rss_after_load, "rss_after_generate_bytes": rss_after_generate,
            "peak_rss_after_load_bytes": peak_after_load, "peak_rss_after_warmup_bytes": peak_after_warmup}


def run_transformers(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList, PaliGemmaForConditionalGeneration
    import_s = time.perf_counter() - t0
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["weights"]]

    t0 = time.perf_counter()
    try:
        model = PaliGemmaForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=dtype,
                                                                  attn_implementation="sdpa")
        attn = "sdpa"
    except ValueError:          # Gemma 2 (PaliGemma 2) has no sdpa path in transformers
        model = PaliGemmaForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=dtype,
                                                                  attn_implementation="eager")
        attn = "eager"
    model.eval()
    processor = AutoProcessor.from_pretrained(spec["checkpoint"])
    load_s = time.perf_counter() - t0
    rss_after_load, peak_after_load = _status_bytes("VmRSS"), _status_bytes("VmHWM")

    # Clock marks: vision tower start / projector end (forward hooks), and the logits of every
    # generated token (a pass-through logits processor, called right before the token is chosen).
    marks: dict[str, float] = {}

    def vision_start(module, args):
        marks.setdefault("vision0", time.perf_counter())

    def vision_end(module, args, output):
        marks.setdefault("vision1", time.perf_counter())

    model.model.vision_tower.register_forward_pre_hook(vision_start)
    model.model.multi_modal_projector.register_forward_hook(vision_end)

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    image, n = example_image(), spec["new_tokens"]

    def generate(max_new_tokens: int):
        marks.clear()
        stamp = Stamp()
        start = time.perf_counter()
        enc = processor(images=image, text=PROMPT, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        preprocess_s = time.perf_counter() - start
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, logits_processor=LogitsProcessorList([stamp]))
        end = time.perf_counter()
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        return start, preprocess_s, stamp.times, end, new, int(inputs["input_ids"].shape[1])

    t0 = time.perf_counter()
    generate(min(WARMUP_TOKENS, n))
    warmup_s = time.perf_counter() - t0
    peak_after_warmup = _status_bytes("VmHWM")
    start, preprocess_s, times, end, tokens, prompt_tokens = generate(n)
    rss_after_generate = _status_bytes("VmRSS")
    first = times[0]
    return {"import_s": import_s, "load_s": load_s, "warmup_s": warmup_s,
            "image_encode_s": preprocess_s + (marks["vision1"] - marks["vision0"]),
            "prefill_s": first - marks["vision1"], "ttft_s": first - start, "decode_s": end - first,
            "new_tokens": len(tokens), "decode_steps": len(tokens) - 1, "prompt_tokens": prompt_tokens,
            "tokens": tokens, "attn_implementation": attn, "torch_threads": torch.get_num_threads(),
            "rss_after_load_bytes": rss_after_load, "rss_after_generate_bytes": rss_after_generate,
            "peak_rss_after_load_bytes": peak_after_load, "peak_rss_after_warmup_bytes": peak_after_warmup}


WORKERS = {"export": run_export, "engine": run_engine, "transformers": run_transformers}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m engine.bench.workers SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = WORKERS[spec["kind"]](spec)
    result.update(memory_info())    # peak RSS of the whole process (rss_bytes: now, the model freed)
    # The kernel folds per-CPU RSS counters in lazily, so readings can disagree by a few pages: the
    # peak is the largest of them.
    result["peak_rss_bytes"] = max(v for k, v in result.items() if k.endswith("_bytes") and "rss" in k
                                   and k != "ru_maxrss_bytes" and v)
    result["pid"] = os.getpid()
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
