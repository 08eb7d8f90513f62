"""Benchmark workers: each sample runs in its own fresh process, so its peak RSS is its own.

    python -m engine.bench.workers SPEC.json OUT.json

SPEC["kind"] is one of
    "export"        export a checkpoint for one backend and weight format into the engine's
                    cache (engine._export_cached, the same cache engine.load uses), then load it
                    once (first_load_s), which writes the runtime's per-machine cache (onnxruntime's
                    prepacked weights, OpenVINO's compiled graphs: prepacked_bytes on disk), so
                    that the measured loads use it as users' later loads do
    "engine"        load an artifact, then run SPEC["workloads"] in order
    "transformers"  the same with transformers' PaliGemmaForConditionalGeneration (PyTorch)
and the worker writes one JSON object to OUT.json: import_s, load_s, memory, and one result
per workload under "workloads". Both measured kinds follow the same protocol: import the
runtime (import_s), load the model (load_s), then per workload one warm-up call and one
measured call.

Workloads:
    caption   prompt "caption en", exactly `new_tokens` tokens (EOS ignored). Warm-up: a 2-token
              generate (warmup_s, and its own TTFT first_call_ttft_s: lazy weight repacking,
              allocator warm-up). The measured generate gives image_encode_s, prefill_s, ttft_s
              (image in -> first token out, preprocessing included) and decode_s (the later
              new_tokens - 1 tokens).
    detect3   three labels (DETECT_LABELS) on the same image, end to end as users run it: ours is
              `model.detect(image, labels, multi_label="joint")` (ONE prompt "detect a ; b ; c",
              greedy, EOS allowed, max_new_tokens = detect's default unless SPEC["detect_tokens"]);
              transformers runs that prompt (engine.tasks.detect_prompt) through processor ->
              generate -> decode -> engine.tasks.parse_detections with the same max_new_tokens and
              EOS id. One warm-up call (first_call_s), then the measured call: e2e_s, ttft_s,
              new_tokens (generated, EOS included when it ends the answer), detections.

Engine time split: every GenerationResult carries its request's stats (engine.serving.RequestStats:
seconds and calls of the vision graph, decoder graphs, attention and LM head during its prefill,
and of the decode steps it took part in, measured by the model's scheduler thread).
`PrefillSplit` / `DecodeSplit` are those figures in the report's terms. `GenerateProfiler` only
wraps the model's generate, to keep the GenerationResult that a task helper (model.detect) makes.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..tasks import DEFAULT_MAX_NEW_TOKENS, caption_prompt, detect_prompt

PROMPT = caption_prompt("en")
WARMUP_TOKENS = 2
DETECT_LABELS = ("red circle", "blue square", "green triangle")
WORKLOADS = ("caption", "detect3")


def example_image():
    from ..__main__ import example_image as image   # the demo's generated scene (320 x 240)
    return image()


def detect_max_new_tokens(prompt_tokens: int, max_context: int, override: int | None) -> int:
    """max_new_tokens of engine.tasks.detect: its default (128), capped so prompt + answer fit
    the context (mirrors engine.tasks._default_max_new_tokens), unless `override` is given."""
    if override:
        return override
    return max(1, min(DEFAULT_MAX_NEW_TOKENS["detect"], max_context - prompt_tokens))


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


def _peak_of(*readings: int | None) -> int:
    return max(v for v in readings if v)


def _peak(*readings: int | None) -> int:
    """Peak RSS so far: VmHWM now, or a larger RSS reading (see main)."""
    return _peak_of(_status_bytes("VmHWM"), *readings)


# ---------------------------------------------------------------------------- engine profiling
@dataclass
class PrefillSplit:
    """Seconds of a request's prefill (RequestStats.prefill), in the report's terms."""
    vision_s: float = 0.0           # the "vision" graph (image features)
    decoder_s: float = 0.0          # the decoder_i graphs on the prompt rows
    attention_s: float = 0.0        # native attention on the prompt rows
    lm_head_s: float = 0.0          # the lm_head graph (last prompt row)
    vision_calls: int = 0
    decoder_calls: int = 0
    attention_calls: int = 0
    lm_head_calls: int = 0

    @classmethod
    def of(cls, stats) -> "PrefillSplit":
        p = stats.prefill
        return cls(p.vision_s, p.decoder_s, p.attention_s, p.lm_head_s, p.vision_calls, p.decoder_calls,
                   p.attention_calls, p.lm_head_calls)


@dataclass
class DecodeSplit:
    """Seconds inside the decode steps of a request (RequestStats.decode), in the report's terms."""
    graph_s: float = 0.0            # every graph run (decoder_i and lm_head)
    lm_head_s: float = 0.0          # of which the lm_head graph
    attention_s: float = 0.0
    select_s: float = 0.0           # native token selection
    step_s: float = 0.0             # whole steps
    steps: int = 0
    graph_calls: int = 0
    attention_calls: int = 0

    @classmethod
    def of(cls, stats) -> "DecodeSplit":
        d = stats.decode
        return cls(d.decoder_s + d.lm_head_s, d.lm_head_s, d.attention_s, d.select_s, stats.decode_step_s,
                   stats.decode_steps, d.decoder_calls + d.lm_head_calls, d.attention_calls)


class GenerateProfiler:
    """Keeps the latest GenerationResult of a model's generate (a task helper's too):
    `last_result` / `last_max_new_tokens`."""

    def __init__(self):
        self.last_result = None
        self.last_max_new_tokens: int | None = None

    def attach(self, model) -> "GenerateProfiler":
        generate = model.generate

        def kept_generate(*args, **kwargs):     # tasks (model.detect) call model.generate too
            self.last_result = generate(*args, **kwargs)
            self.last_max_new_tokens = kwargs.get("max_new_tokens")
            return self.last_result

        model.generate = kept_generate
        return self


# ---------------------------------------------------------------------------- workers
def run_export(spec: dict) -> dict:
    from .. import _export_cached
    t0 = time.perf_counter()
    path = _export_cached(Path(spec["checkpoint"]), spec["backend"], spec["weights"], spec["group_size"],
                          progress=True)
    out = {"artifact": str(path), "seconds": time.perf_counter() - t0}
    import engine
    from engine.runtime import stamped_dir
    t0 = time.perf_counter()
    model = engine.load(path, spec["backend"], spec.get("threads"), progress=False)   # verifies, stamps
    out["first_load_s"] = time.perf_counter() - t0
    out["prepacked_bytes"] = sum(stamped_dir.disk_size(p) for p in model.runner.cache_entries() if p.is_dir())
    out["load_files"] = files_in_use()      # what a sample's load reads: warmed before the first sample
    model.close()
    return out


def files_in_use(*dirs: str) -> list[str]:
    """The regular files this process has mapped or open (its load's weights, graphs and caches),
    plus every file under `dirs`: what the next sample of this system reads at its load, so that
    the bench can warm the page cache with them first (the load goal is for a warm page cache)."""
    paths: set[str] = set()
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
                paths.add(parts[5])
        for fd in os.listdir("/proc/self/fd"):
            try:
                paths.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
    except OSError:                       # not Linux: nothing to warm
        pass
    for d in dirs:
        paths.update(str(f) for f in Path(d).rglob("*") if f.is_file())
    return sorted(p for p in paths if not p.startswith(("/dev/", "/proc/", "/sys/")) and os.path.isfile(p))


def run_engine(spec: dict) -> dict:
    import importlib
    t0 = time.perf_counter()
    importlib.import_module("openvino" if spec["backend"] == "openvino" else "onnxruntime")
    import engine
    import_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    vision = spec.get("vision", "auto") if spec["backend"] == "onnxruntime" else "auto"
    decoder = spec.get("decoder", "auto") if spec["backend"] == "onnxruntime" else "auto"
    model = engine.load(spec["artifact"], spec["backend"], spec["threads"], progress=False, vision=vision,
                        decoder=decoder)  # as users load
    load_s = time.perf_counter() - t0
    out = {"import_s": import_s, "load_s": load_s, "rss_after_load_bytes": _status_bytes("VmRSS"),
           "peak_rss_after_load_bytes": _status_bytes("VmHWM"), "load_files": files_in_use()}
    profiler = GenerateProfiler().attach(model)
    image = example_image()
    runs = {"caption": engine_caption, "detect3": engine_detect3}
    out["workloads"] = {w: runs[w](model, profiler, image, spec) for w in spec["workloads"]}
    model.close()
    return out


def engine_caption(model, profiler: GenerateProfiler, image, spec: dict) -> dict:
    n = spec["new_tokens"]
    prompt_tokens = len(model.processor(image, PROMPT)["input_ids"])
    t0 = time.perf_counter()
    first = model.generate(image, PROMPT, max_new_tokens=min(WARMUP_TOKENS, n), ignore_eos=True)
    warmup_s = time.perf_counter() - t0
    peak_after_warmup = _status_bytes("VmHWM")
    model.image_cache.clear()                # the measured call encodes its image like the first
    result = model.generate(image, PROMPT, max_new_tokens=n, ignore_eos=True)
    rss_after_generate = _status_bytes("VmRSS")
    t = result.timings
    return {"warmup_s": warmup_s, "first_call_ttft_s": first.timings["first_token"],
            "first_call_image_encode_s": first.timings["image_encode"], "first_call_prefill_s": first.timings["prefill"],
            "image_encode_s": t["image_encode"], "prefill_s": t["prefill"], "ttft_s": t["first_token"],
            "decode_s": t["decode"], "new_tokens": len(result.tokens), "decode_steps": result.stats.decode_steps,
            "prompt_tokens": prompt_tokens, "finish_reason": result.finish_reason, "tokens": result.tokens,
            "split": asdict(DecodeSplit.of(result.stats)), "prefill_split": asdict(PrefillSplit.of(result.stats)),
            "rss_after_generate_bytes": rss_after_generate, "peak_rss_after_warmup_bytes": peak_after_warmup,
            "peak_rss_bytes": _peak(rss_after_generate, peak_after_warmup)}


def engine_detect3(model, profiler: GenerateProfiler, image, spec: dict) -> dict:
    labels = list(DETECT_LABELS)
    # the joint prompt, which transformers runs too (model.detect's default asks one prompt per label)
    gen = {"multi_label": "joint", **({"max_new_tokens": spec["detect_tokens"]} if spec.get("detect_tokens") else {})}
    t0 = time.perf_counter()
    model.detect(image, labels, **gen)
    first_call_s = time.perf_counter() - t0
    model.image_cache.clear()                # the measured call encodes its image like the first
    t0 = time.perf_counter()
    detections = model.detect(image, labels, **gen)
    e2e_s = time.perf_counter() - t0
    result = profiler.last_result            # the GenerationResult inside model.detect
    prompt = detect_prompt(labels)
    return {"first_call_s": first_call_s, "e2e_s": e2e_s, "ttft_s": result.timings["first_token"],
            "new_tokens": len(result.tokens), "max_new_tokens": profiler.last_max_new_tokens,
            "prompt": prompt, "prompt_tokens": len(model.processor(image, prompt)["input_ids"]),
            "finish_reason": result.finish_reason, "tokens": result.tokens, "detections": len(detections),
            "rss_after_generate_bytes": _status_bytes("VmRSS"), "peak_rss_bytes": _peak(_status_bytes("VmRSS"))}


@dataclass
class HFRun:
    """One transformers generate: clock marks and the new tokens."""
    start: float                 # before preprocessing
    preprocess_s: float
    vision_s: float              # vision tower + projector (forward hooks)
    vision_end: float
    token_times: list[float]     # logits of each generated token ready (just before it is chosen)
    end: float
    tokens: list[int]
    prompt_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start


class TransformersRunner:
    """transformers' PaliGemmaForConditionalGeneration loaded as a user would (sdpa attention where
    the model has it), with clock marks: vision tower start / projector end (forward hooks), and
    the logits of every generated token (a pass-through logits processor, called right before the
    token is chosen)."""

    def __init__(self, spec: dict):
        t0 = time.perf_counter()
        import torch
        import transformers
        from transformers import AutoProcessor, LogitsProcessorList, PaliGemmaForConditionalGeneration
        self.import_s = time.perf_counter() - t0
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(spec["threads"])
        self.torch, self.processors = torch, LogitsProcessorList
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["weights"]]
        t0 = time.perf_counter()
        try:
            model = PaliGemmaForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=self.dtype,
                                                                      attn_implementation="sdpa")
            self.attn = "sdpa"
        except ValueError:          # Gemma 2 (PaliGemma 2) has no sdpa path in transformers
            model = PaliGemmaForConditionalGeneration.from_pretrained(spec["checkpoint"], dtype=self.dtype,
                                                                      attn_implementation="eager")
            self.attn = "eager"
        self.model = model.eval()
        self.processor = AutoProcessor.from_pretrained(spec["checkpoint"])
        self.load_s = time.perf_counter() - t0
        from ..config import PaliGemmaConfig
        self.cfg = PaliGemmaConfig.from_file(Path(spec["checkpoint"]) / "config.json")  # the EOS id we use
        self.marks: dict[str, float] = {}

        def vision_start(module, args) -> None:         # a hook's return value would replace the input
            self.marks.setdefault("vision0", time.perf_counter())

        def vision_end(module, args, output) -> None:
            self.marks.setdefault("vision1", time.perf_counter())

        model.model.vision_tower.register_forward_pre_hook(vision_start)
        model.model.multi_modal_projector.register_forward_hook(vision_end)

    def generate(self, image, prompt: str, max_new_tokens: int, *, ignore_eos: bool = True) -> HFRun:
        from transformers import LogitsProcessor

        class Stamp(LogitsProcessor):
            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        self.marks.clear()
        stamp = Stamp()
        start = time.perf_counter()
        enc = self.processor(images=image, text=prompt, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        preprocess_s = time.perf_counter() - start
        stop = {"min_new_tokens": max_new_tokens} if ignore_eos else {"eos_token_id": self.cfg.eos_token_id}
        with self.torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      logits_processor=self.processors([stamp]), **stop)
        end = time.perf_counter()
        n_prompt = int(inputs["input_ids"].shape[1])
        vision0, vision1 = self.marks["vision0"], self.marks["vision1"]
        return HFRun(start, preprocess_s, vision1 - vision0, vision1, stamp.times, end, ids[0, n_prompt:].tolist(),
                     n_prompt)


def run_transformers(spec: dict) -> dict:
    hf = TransformersRunner(spec)
    out = {"import_s": hf.import_s, "load_s": hf.load_s, "rss_after_load_bytes": _status_bytes("VmRSS"),
           "peak_rss_after_load_bytes": _status_bytes("VmHWM"), "attn_implementation": hf.attn,
           "torch_threads": hf.torch.get_num_threads(), "load_files": files_in_use(spec["checkpoint"])}
    cfg, processor = hf.cfg, hf.processor
    image = example_image()

    def generate(prompt: str, max_new_tokens: int, *, ignore_eos: bool) -> HFRun:
        return hf.generate(image, prompt, max_new_tokens, ignore_eos=ignore_eos)

    def caption() -> dict:
        n = spec["new_tokens"]
        t0 = time.perf_counter()
        first = generate(PROMPT, min(WARMUP_TOKENS, n), ignore_eos=True)
        warmup_s = time.perf_counter() - t0
        peak_after_warmup = _status_bytes("VmHWM")
        run = generate(PROMPT, n, ignore_eos=True)
        rss_after_generate = _status_bytes("VmRSS")
        return {"warmup_s": warmup_s, "first_call_ttft_s": first.ttft_s,
                "first_call_image_encode_s": first.preprocess_s + first.vision_s,
                "first_call_prefill_s": first.token_times[0] - first.vision_end,
                "image_encode_s": run.preprocess_s + run.vision_s, "prefill_s": run.token_times[0] - run.vision_end,
                "ttft_s": run.ttft_s, "decode_s": run.end - run.token_times[0], "new_tokens": len(run.tokens),
                "decode_steps": len(run.tokens) - 1, "prompt_tokens": run.prompt_tokens, "tokens": run.tokens,
                "rss_after_generate_bytes": rss_after_generate, "peak_rss_after_warmup_bytes": peak_after_warmup,
                "peak_rss_bytes": _peak(rss_after_generate, peak_after_warmup)}

    def detect3() -> dict:
        from ..tasks import parse_detections
        prompt = detect_prompt(list(DETECT_LABELS))
        n_prompt = int(processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1])
        max_new = detect_max_new_tokens(n_prompt, cfg.text.max_position_embeddings, spec.get("detect_tokens"))

        def call() -> tuple[HFRun, int]:      # what a transformers user runs: generate, decode, parse
            run = generate(prompt, max_new, ignore_eos=False)
            text = processor.decode(run.tokens, skip_special_tokens=True)
            return run, len(parse_detections(text, *image.size))

        t0 = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run, detections = call()
        e2e_s = time.perf_counter() - t0
        eos = bool(run.tokens) and run.tokens[-1] == cfg.eos_token_id
        return {"first_call_s": first_call_s, "e2e_s": e2e_s, "ttft_s": run.ttft_s, "new_tokens": len(run.tokens),
                "max_new_tokens": max_new, "prompt": prompt, "prompt_tokens": run.prompt_tokens,
                "finish_reason": "eos" if eos else "length", "tokens": run.tokens, "detections": detections,
                "rss_after_generate_bytes": _status_bytes("VmRSS"), "peak_rss_bytes": _peak(_status_bytes("VmRSS"))}

    runs = {"caption": caption, "detect3": detect3}
    out["workloads"] = {w: runs[w]() for w in spec["workloads"]}
    return out


def _concurrency(kind: str):
    def run(spec: dict) -> dict:
        from . import concurrency
        return getattr(concurrency, f"run_{kind}")(spec)
    return run


WORKERS = {"export": run_export, "engine": run_engine, "transformers": run_transformers,
           "engine-concurrency": _concurrency("engine"), "transformers-concurrency": _concurrency("transformers")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m engine.bench.workers SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = WORKERS[spec["kind"]](spec)
    result.update(memory_info())    # peak RSS of the whole process (rss_bytes: now, the model freed)
    # The kernel folds per-CPU RSS counters in lazily, so readings can disagree by a few pages: a
    # peak is the largest of the readings up to then.
    at_load = [result.get("rss_after_load_bytes"), result.get("peak_rss_after_load_bytes")]
    for w in result.get("workloads", {}).values():
        w["peak_rss_bytes"] = _peak_of(w["peak_rss_bytes"], *at_load)
    result["peak_rss_bytes"] = _peak_of(result["peak_rss_bytes"], *at_load,
                                        *(w["peak_rss_bytes"] for w in result.get("workloads", {}).values()))
    result["pid"] = os.getpid()
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
