"""python -m engine.bench: our engine against transformers (PyTorch) on one model, one machine.

    python -m engine.bench [--preset paligemma-3b-224 | --checkpoint DIR] [--systems ...]
                           [--weights ...] [--workload caption,detect3] [--new-tokens 32]
                           [--detect-tokens N] [--repeats N] [--threads N] [--out DIR] [--quick]

Steps:
  1. the checkpoint: --checkpoint DIR (an HF PaliGemma directory), or a synthetic random-weight
     checkpoint of --preset, written once (bf16) to <cache>/synthetic/<preset> and reused;
  2. one export per (backend, weight format) of our systems, each in its own process, cached by
     engine's export cache (<cache>/artifacts/..., the same entries engine.load reuses);
  3. memory read bandwidth (C++ streaming sum, _native.memory_bandwidth) before and after;
  4. every sample in a fresh worker process (engine/bench/workers.py), the same thread count
     for all, systems interleaved across repeats (A B C A B C ...); one process loads the model
     once and runs the workloads in order, each with its own warm-up call;
  5. results.json (machine, versions, settings, every raw sample, summaries), results.md,
     chart.png and the tables on stdout (report.py).

Workloads (--workload, comma separated, default caption):
  caption   one prompt ("caption en"), exactly --new-tokens tokens (EOS ignored): load, first
            call (a 2-token generate, with its own TTFT: first-call TTFT / warm TTFT), TTFT,
            decode speed against the bandwidth limit, peak RSS, and for our engine where the
            time goes: the prefill split (share of the TTFT: vision graph, decoder graphs,
            attention, LM head, overhead) and the decode-step split;
  detect3   three labels on one image, end to end as users run it: ours `model.detect(image,
            [a, b, c], multi_label="joint")` (one prompt "detect a ; b ; c", greedy, EOS allowed,
            its default max_new_tokens or --detect-tokens), transformers the same prompt, EOS id
            and max_new_tokens through processor -> generate -> decode -> parse. Reported: the
            seconds of the whole call (after one warm-up call), its TTFT and the generated tokens.
Each workload has its own table in results.md and on stdout; ratios are against pytorch-bf16.
results.md starts with the CPU model, its SIMD flags and engine.cpu_features().

Systems (--systems, comma separated): `openvino`, `onnxruntime`, `pytorch` (alias
`transformers`), each optionally with a format: `openvino:int4`, `pytorch:bf16`. A bare engine
backend takes the --weights list (default: openvino int8,int4,bf16; onnxruntime int8); a bare
`pytorch` means fp32 and bf16. PyTorch systems are skipped, with a note, when torch or
transformers is not installed.

--quick: the whole path on the tiny-pg2 preset (8 new tokens, detect3 capped at 8 tokens, 1
repeat, openvino and onnxruntime int8 and PyTorch bf16 if installed) in well under a minute;
its timings mean nothing. `--quick --workload caption,detect3` runs both workloads.
--prepare-only: write the checkpoint and the exports into the cache, then stop.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import report, workers
from ..tasks import detect_prompt

ENGINE_BACKENDS = ("openvino", "onnxruntime")
DEFAULT_WEIGHTS = {"openvino": ("int8", "int4", "bf16"), "onnxruntime": ("int8",), "pytorch": ("fp32", "bf16")}
ALIASES = {"ov": "openvino", "ort": "onnxruntime", "transformers": "pytorch", "torch": "pytorch"}
PYTORCH_FORMATS = ("fp32", "bf16")
LIBRARIES = ("paligemma-edge", "numpy", "onnxruntime", "openvino", "onnx", "torch", "transformers", "matplotlib")
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
              "amx_bf16", "amx_int8", "asimd", "asimddp", "sve")
QUICK = {"preset": "tiny-pg2", "new_tokens": 8, "repeats": 1, "systems": "openvino:int8,onnxruntime:int8,pytorch:bf16",
         "bandwidth_bytes": 256 << 20, "detect_tokens": 8}
CONCURRENCY = {"preset": "paligemma2-3b-224", "systems": "onnxruntime:int8,pytorch:fp32", "detect_tokens": 20,
               "quick_detect_tokens": 4, "quick_arrival_tokens": 16}
FULL = {"preset": "paligemma-3b-224", "new_tokens": 32, "repeats": 3, "systems": "openvino,onnxruntime,pytorch",
        "bandwidth_bytes": 1 << 30, "detect_tokens": None}
# Fields of a worker result that belong to the process, copied into each workload's sample.
PROCESS_FIELDS = ("import_s", "load_s", "rss_after_load_bytes", "peak_rss_after_load_bytes", "attn_implementation",
                  "torch_threads", "pid", "process_wall_s", "rss_bytes", "ru_maxrss_bytes")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- systems
def have_transformers() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


# system variants: engine.load settings of an onnxruntime system, side by side with the plain one
VARIANTS = {"native-vision": {"vision": "native"}, "graph-vision": {"vision": "graph"},
            "native-decoder": {"decoder": "native"}, "graph-decoder": {"decoder": "graphs"},
            "all-graphs": {"decoder": "graphs", "vision": "graph"},
            "all-native": {"decoder": "native", "vision": "native"}}


def parse_systems(systems: str, weights: str | None, transformers_ok: bool) -> tuple[list[dict], list[str]]:
    """The systems to measure, in order, and notes (skipped systems)."""
    from export.quantize import WEIGHT_FORMATS

    weight_list = [w.strip() for w in weights.split(",") if w.strip()] if weights else None
    out, notes = [], []
    for item in (x.strip() for x in systems.split(",")):
        if not item:
            continue
        name, _, fmt = (item if ":" in item else item.replace("-", ":", 1)).partition(":")
        fmt, _, variant = fmt.partition(":")
        backend = ALIASES.get(name, name)
        if variant and (variant not in VARIANTS or backend != "onnxruntime"):
            raise ValueError(f"unknown system variant {item!r}; onnxruntime systems take "
                             f"{' or '.join(VARIANTS)} (onnxruntime:int8:native-vision)")
        if backend not in (*ENGINE_BACKENDS, "pytorch"):
            raise ValueError(f"unknown system {item!r}; use openvino, onnxruntime or pytorch, optionally "
                             "with a weight format (openvino:int4, pytorch:bf16)")
        if fmt:
            formats = [fmt]
        elif backend != "pytorch" and weight_list:
            formats = weight_list
        else:
            formats = list(DEFAULT_WEIGHTS[backend])
        allowed = PYTORCH_FORMATS if backend == "pytorch" else WEIGHT_FORMATS
        for f in formats:
            if f not in allowed:
                raise ValueError(f"{backend} does not take weight format {f!r}; use one of {', '.join(allowed)}")
        if backend == "pytorch" and not transformers_ok:
            notes.append("PyTorch systems skipped: torch / transformers are not installed "
                         "(pip install torch==2.13.0 transformers).")
            continue
        for f in formats:
            sid = f"{backend}-{f}" + (f"-{variant}" if variant else "")
            if all(s["id"] != sid for s in out):
                out.append({"id": sid, "kind": "transformers" if backend == "pytorch" else "engine",
                            "backend": backend, "weights": f, "samples": [], **VARIANTS.get(variant, {})})
    if not out:
        raise ValueError("no system to measure")
    return out, sorted(set(notes))


def parse_workloads(text: str) -> list[str]:
    """"caption,detect3" -> ["caption", "detect3"] (caption first: its warm-up is the process's
    first call)."""
    names = [w.strip() for w in text.split(",") if w.strip()]
    for w in names:
        if w not in workers.WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; use {' or '.join(workers.WORKLOADS)} (or both, comma separated)")
    if not names:
        raise ValueError("no workload; use caption, detect3 or caption,detect3")
    return [w for w in workers.WORKLOADS if w in names]


# ---------------------------------------------------------------------------- machine
def machine_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    from .. import cpu_features
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_count": os.cpu_count(), "memory_gb": memory, "platform": platform.platform(),
            "python": platform.python_version(), "simd_flags": [f for f in SIMD_FLAGS if f in flags],
            "cpu_flags": flags, "engine_cpu_features": cpu_features(), "loadavg_start": loadavg(),
            "cpuid_cap": cpuid_cap()}


def cpuid_cap() -> str | None:
    """The ISA that benchmarks/cpuid_cap.c (LD_PRELOAD) caps every runtime of this run to, if any:
    /proc/cpuinfo then lists flags that no process of the run sees."""
    if "cpuid_cap" not in os.environ.get("LD_PRELOAD", ""):
        return None
    return os.environ.get("CPUID_CAP") or "avx2"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- workers
def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def run_worker(spec: dict, threads: int, timeout: float, show_output: bool = False) -> dict:
    """Run one worker process; its JSON result, or {"error": ...} when it fails."""
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "engine.bench.workers", str(spec_path), str(out_path)]
        pipe = None if show_output else subprocess.PIPE
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=worker_env(threads), stdout=pipe, stderr=pipe, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out_path.is_file():
            tail = " | ".join((proc.stderr or "").strip().splitlines()[-6:])
            why = "killed (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode}"
            return {"error": f"worker {why}" + (f": {tail}" if tail else "")}
        result = json.loads(out_path.read_text())
        result["process_wall_s"] = wall
        return result


def prepare_checkpoint(args) -> tuple[Path, str]:
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not an HF PaliGemma checkpoint directory (no config.json)")
        return path, f"checkpoint {path}"
    from .. import default_cache_dir
    from ..synth import write_synthetic_checkpoint
    path = default_cache_dir() / "synthetic" / args.preset
    if not (path / "config.json").is_file():
        log(f"writing the synthetic {args.preset} checkpoint (random weights, bf16) once to {path}")
        write_synthetic_checkpoint(args.preset, path, seed=0, dtype="bf16", progress=True, force=True)
    return path, f"synthetic preset {args.preset} (random weights), {path}"


def prepare_artifacts(systems: list[dict], checkpoint: Path, args) -> None:
    """Export (or find in the cache) the artifact of every engine system, one process each."""
    done: dict[tuple[str, str], dict] = {}
    for s in systems:
        if s["kind"] != "engine":
            s["artifact"], s["disk_bytes"] = str(checkpoint), dir_bytes(checkpoint)
            s["load_files"] = sorted(str(f) for f in checkpoint.rglob("*") if f.is_file())
            continue
        key = (s["backend"], s["weights"])
        if key not in done:
            log(f"artifact for {s['id']} (exported once, then cached)")
            spec = {"kind": "export", "checkpoint": str(checkpoint), "backend": s["backend"],
                    "weights": s["weights"], "group_size": args.group_size, "threads": args.threads}
            res = run_worker(spec, args.threads, args.timeout, show_output=True)
            if "error" in res:
                raise RuntimeError(f"export for {s['id']} failed: {res['error']}")
            if res.get("first_load_s") is not None:
                log(f"{s['id']}: first load after the export {res['first_load_s']:.2f} s (writes the runtime's "
                    f"per-machine cache unless there: {(res.get('prepacked_bytes') or 0) / 1e9:.2f} GB)")
            done[key] = res
        res = done[key]
        s["artifact"] = res["artifact"]
        s["load_files"] = res.get("load_files")
        s["first_load_s"] = res.get("first_load_s")
        # what the system occupies on disk: the artifact, plus onnxruntime's prepacked weights
        s["disk_bytes"] = dir_bytes(Path(s["artifact"])) + (res.get("prepacked_bytes") or 0)


def measure_bandwidth(nbytes: int, threads: int, repeats: int = 5) -> float | None:
    from .. import _native
    try:
        return _native.memory_bandwidth(nbytes, threads, repeats)
    except (MemoryError, ValueError) as e:
        log(f"memory bandwidth probe failed: {e}")
        return None


def split_workloads(res: dict, workloads: list[str], extra: dict) -> dict[str, dict]:
    """One sample per workload from one worker result: the workload's own figures plus the
    process fields (import, load, ...); every workload gets the error of a failed worker."""
    if "error" in res:
        return {w: {"error": res["error"], **extra} for w in workloads}
    common = {k: res[k] for k in PROCESS_FIELDS if k in res}
    return {w: {"workload": w, **common, **res["workloads"][w], **extra} for w in workloads}


def sample_list(system: dict, workload: str) -> list[dict]:
    """Where a system keeps its samples: caption in system["samples"] (as before workloads
    existed), the others in system[workload]["samples"]."""
    return system["samples"] if workload == "caption" else system.setdefault(workload, {"samples": []})["samples"]


def warm_page_cache(paths: list[str]) -> tuple[int, float]:
    """Read every file once (bytes read, seconds): the page cache then holds what the next load
    reads, as after any recent use (the load goal is for a warm page cache). Without it, a load
    right after transformers fp32 (18 GB resident) reads its weights from disk again."""
    t0, total = time.perf_counter(), 0
    buf = bytearray(8 << 20)
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
        except OSError:
            pass
    return total, time.perf_counter() - t0


def run_samples(systems: list[dict], checkpoint: Path, args) -> None:
    total, k = args.repeats * len(systems), 0
    # system id -> what its last sample's load read (before its first sample: what the export
    # worker's load read, or the checkpoint directory), read once before each sample: a VM that
    # pages out idle file pages (DAMON) would otherwise give the first repeat a cold page cache
    load_files: dict[str, list[str] | None] = {s["id"]: s.pop("load_files", None) for s in systems}
    for r in range(args.repeats):
        for s in systems:      # interleaved: A B C A B C ...; one process runs every workload
            k += 1
            spec = {"kind": s["kind"], "backend": s["backend"], "weights": s["weights"],
                    "checkpoint": str(checkpoint), "artifact": s.get("artifact"), "threads": args.threads,
                    "new_tokens": args.new_tokens, "workloads": args.workloads, "detect_tokens": args.detect_tokens,
                    "vision": s.get("vision", args.vision), "decoder": s.get("decoder", "auto")}
            warmed = warm_page_cache(load_files[s["id"]]) if load_files.get(s["id"]) else None
            load = loadavg()
            res = run_worker(spec, args.threads, args.timeout)
            load_files[s["id"]] = res.pop("load_files", None)
            for w, sample in split_workloads(res, args.workloads, {"repeat": r, "loadavg_before": load}).items():
                sample_list(s, w).append(sample)
            head = f"[{k}/{total}] {s['id']} repeat {r + 1}:"
            if "error" in res:
                log(f"{head} FAILED {res['error']}")
                continue
            parts = [f"load {res['load_s']:.2f} s"]
            cap = res["workloads"].get("caption")
            if cap:
                steps = cap.get("decode_steps") or 0
                tps = steps / cap["decode_s"] if steps and cap["decode_s"] else 0.0
                parts.append(f"caption TTFT {cap['ttft_s']:.3f} s, {tps:.2f} tok/s")
            det = res["workloads"].get("detect3")
            if det:
                parts.append(f"detect3 {det['e2e_s']:.3f} s for {det['new_tokens']} tokens")
            if warmed:
                parts.insert(0, f"page cache warmed ({warmed[0] / 1e9:.1f} GB read in {warmed[1]:.1f} s)")
            log(f"{head} {', '.join(parts)}, peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB "
                f"({res['process_wall_s']:.0f} s, load avg {load[0] if load else '?'})")


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"synthetic preset (default {FULL['preset']}; see python -m engine.synth --list)")
    src.add_argument("--checkpoint", help="an HF PaliGemma checkpoint directory instead of a synthetic one")
    p.add_argument("--systems", help=f"comma separated (default {FULL['systems']}), e.g. openvino:int4,pytorch:bf16; "
                   "onnxruntime:int8:native-vision (or :graph-vision, :native-decoder, :graph-decoder, :all-graphs, "
                   ":all-native) loads with that vision or decoder setting, beside the plain one")
    p.add_argument("--weights", help="weight formats of bare engine backends, comma separated "
                                     "(default openvino int8,int4,bf16; onnxruntime int8); fp8 on request")
    p.add_argument("--workload", default="caption",
                   help="comma separated, run in this order in each worker: caption (one prompt, exactly "
                        "--new-tokens tokens) and/or detect3 (model.detect with three labels, end to end); "
                        "default caption")
    p.add_argument("--new-tokens", type=int,
                   help=f"caption tokens per sample, EOS ignored (default {FULL['new_tokens']})")
    p.add_argument("--detect-tokens", type=int,
                   help="detect3's max_new_tokens, EOS allowed (default: engine.tasks.detect's own, 128 "
                        "capped to the context; --quick: 8)")
    p.add_argument("--repeats", type=int, help=f"samples per system, interleaved (default {FULL['repeats']})")
    p.add_argument("--threads", type=int, default=None, help="threads for every system (default: all cores)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--vision", choices=("auto", "graph", "native"), default="auto",
                   help="engine.load(vision=...) for the onnxruntime systems: the native vision tower or the "
                        "graph (default auto; engine/runtime/native_vision.py)")
    p.add_argument("--out", help="results directory (default bench-results/<model>)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per worker (default 1800)")
    p.add_argument("--quick", action="store_true", help="the whole path on tiny-pg2 in well under a minute")
    p.add_argument("--prepare-only", action="store_true", help="create the checkpoint and exports (cached), then stop")
    c = p.add_argument_group("concurrency mode (engine/bench/concurrency.py)")
    c.add_argument("--concurrency", metavar="N,N,...",
                   help="instead of the workloads: N clients at once on one loaded model, for each N (e.g. "
                        "1,2,4,8); transformers runs the same requests one after another. Defaults in this mode: "
                        f"--preset {CONCURRENCY['preset']}, --systems {CONCURRENCY['systems']}, "
                        f"--detect-tokens {CONCURRENCY['detect_tokens']}")
    c.add_argument("--concurrency-requests", type=int, default=2,
                   help="requests per client, alternating caption and detect (default 2)")
    c.add_argument("--arrival-tokens", type=int, default=400,
                   help="tokens of the 7 long captions that decode while the arrival prefills (0: no arrival test)")
    c.add_argument("--arrival-whole", action="store_true",
                   help="also run the arrival test with whole (unchunked) prefills, in a second load")
    return p


def resolve_args(args) -> argparse.Namespace:
    defaults = QUICK if args.quick else FULL
    if args.concurrency:
        args.levels = parse_levels(args.concurrency)
        defaults = {**defaults, "systems": defaults["systems"] if args.quick else CONCURRENCY["systems"],
                    "preset": defaults["preset"] if args.quick else CONCURRENCY["preset"],
                    "detect_tokens": CONCURRENCY["quick_detect_tokens" if args.quick else "detect_tokens"]}
        if args.quick:
            args.arrival_tokens = min(args.arrival_tokens, CONCURRENCY["quick_arrival_tokens"])
        if args.concurrency_requests < 1 or args.arrival_tokens < 0:
            raise ValueError("--concurrency-requests must be >= 1 and --arrival-tokens >= 0")
    if args.preset is None and args.checkpoint is None:
        args.preset = defaults["preset"]
    for key in ("new_tokens", "repeats", "systems"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.bandwidth_bytes = defaults["bandwidth_bytes"]
    if args.detect_tokens is None:
        args.detect_tokens = defaults["detect_tokens"]
    elif args.detect_tokens < 1:
        raise ValueError(f"--detect-tokens must be >= 1, got {args.detect_tokens}")
    args.workloads = parse_workloads(args.workload)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for key in ("new_tokens", "repeats", "threads"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.preset is not None:
        from ..synth import preset_config
        preset_config(args.preset)    # ConfigError for an unknown preset, before any work
    name = args.preset or Path(args.checkpoint).resolve().name
    if args.concurrency:
        name += "-concurrency"
    args.out = Path(args.out) if args.out else Path("bench-results") / name
    return args


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency takes client counts >= 1, comma separated (e.g. 1,2,4,8), got {text!r}")
    return levels


def run_concurrency(systems: list[dict], checkpoint: Path, cfg, machine: dict, notes: list[str], args,
                    argv) -> int:
    """The concurrency mode: one worker per system (engine/bench/concurrency.py)."""
    from . import concurrency
    for s in systems:
        log(f"concurrency: {s['id']}")
        spec = {"kind": f"{s['kind']}-concurrency", "id": s["id"], "backend": s["backend"], "weights": s["weights"],
                "checkpoint": str(checkpoint), "artifact": s.get("artifact"), "threads": args.threads,
                "levels": args.levels, "per_client": args.concurrency_requests, "new_tokens": args.new_tokens,
                "detect_tokens": args.detect_tokens, "arrival_tokens": args.arrival_tokens,
                "arrival_whole": args.arrival_whole}
        res = run_worker(spec, args.threads, args.timeout * max(1, len(args.levels)), show_output=False)
        s["result"] = res
        if "error" in res:
            log(f"  {s['id']} FAILED {res['error']}")
    machine["loadavg_end"] = loadavg()
    results = {
        "schema": "paligemma-edge-bench-concurrency/1",
        "command": "python -m engine.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "settings": {"preset": args.preset, "checkpoint": str(checkpoint), "levels": args.levels,
                     "per_client": args.concurrency_requests, "new_tokens": args.new_tokens,
                     "detect_tokens": args.detect_tokens, "arrival_tokens": args.arrival_tokens,
                     "threads": args.threads, "caption_prompt": concurrency.CAPTION,
                     "detect_prompt": concurrency.DETECT},
        "machine": machine, "versions": versions(),
        "model": {"name": args.preset or checkpoint.name, "version": cfg.version,
                  "image_size": cfg.vision.image_size},
        "systems": systems,
        "notes": notes_for(machine, args, "") + notes,
    }
    results["goals"] = concurrency.goals(systems)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(concurrency.markdown_report(results, report.machine_lines(machine)))
    print("\n".join(report.machine_lines(machine)))
    print(concurrency.table(results, markdown=False))
    log(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 1 if any("error" in (s.get("result") or {}) for s in systems) else 0


def notes_for(machine: dict, args, source: str) -> list[str]:
    notes = []
    loads = [x[0] for x in (machine.get("loadavg_start"), machine.get("loadavg_end")) if x]
    if loads and max(loads) > 0.5:
        notes.append(f"The machine was shared while this ran (1-min load average {loads[0]:.2f} at start, "
                     f"{loads[-1]:.2f} at end, on {machine['cores']} cores): other processes competed for the "
                     "cores and memory bandwidth, so timings are noisy; compare ratios, and look at min-max.")
    if not args.checkpoint:
        notes.append("Synthetic checkpoint with random weights: generated text is noise, but every shape and "
                     "byte count is the real model's, so speed and memory are representative.")
    if args.quick:
        notes.append("--quick: a tiny model to exercise the whole path; its figures say nothing about performance.")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args = resolve_args(args)
        systems, notes = parse_systems(args.systems, args.weights, have_transformers())
    except Exception as e:  # noqa: BLE001 - bad arguments: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..config import PaliGemmaConfig
    from ..synth import parameter_count

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info()
    checkpoint, source = prepare_checkpoint(args)
    cfg = PaliGemmaConfig.from_file(checkpoint / "config.json")
    prepare_artifacts(systems, checkpoint, args)
    if args.prepare_only:
        for s in systems:
            log(f"{s['id']}: {s['artifact']} ({s['disk_bytes'] / 1e9:.2f} GB)")
        return 0

    if args.concurrency:
        return run_concurrency(systems, checkpoint, cfg, machine, notes, args, argv)
    log(f"memory bandwidth ({args.bandwidth_bytes >> 20} MiB, {args.threads} threads)")
    bw = [measure_bandwidth(args.bandwidth_bytes, args.threads)]
    run_samples(systems, checkpoint, args)
    bw.append(measure_bandwidth(args.bandwidth_bytes, args.threads))
    machine["loadavg_end"] = loadavg()
    bw_ok = [x for x in bw if x]

    prompt_tokens = next((x["prompt_tokens"] for s in systems for x in s["samples"] if x.get("prompt_tokens")), None)
    detect = [x for s in systems for x in s.get("detect3", {}).get("samples", []) if not x.get("error")]
    limits = report.analyze(systems, cfg, max(bw_ok) if bw_ok else None, args.group_size)
    results = {
        "schema": "paligemma-edge-bench/1",
        "command": "python -m engine.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "started": started,
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {"preset": args.preset, "checkpoint": str(checkpoint), "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "threads": args.threads, "group_size": args.group_size,
                     "prompt": workers.PROMPT, "image": "engine.__main__.example_image() (320x240)",
                     "workloads": args.workloads, "detect_labels": list(workers.DETECT_LABELS),
                     "detect_prompt": detect_prompt(list(workers.DETECT_LABELS)),
                     "detect_tokens": args.detect_tokens,
                     "detect_max_new_tokens": sorted({x["max_new_tokens"] for x in detect}),
                     "quick": args.quick, "order": "interleaved", "engine_load": "engine.load() (verify=True, stamped)",
                     "vision": args.vision},
        "machine": machine,
        "versions": versions(),
        "model": {"name": args.preset or checkpoint.name, "source": source, "version": cfg.version,
                  "params": parameter_count(cfg), "layer_params": limits["layer_params"],
                  "head_params": limits["head_params"], "image_size": cfg.vision.image_size,
                  "prompt_tokens": prompt_tokens},
        "bandwidth": {"samples_gbs": bw_ok, "best_gbs": max(bw_ok) if bw_ok else None,
                      "bytes": args.bandwidth_bytes, "threads": args.threads, "repeats": 5},
        "limits": limits,
        "baseline": report.BASELINE if any(s["id"] == report.BASELINE for s in systems) else None,
        "systems": systems,
        "targets": report.check_targets(systems),
        "notes": notes_for(machine, args, source) + notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    chart = report.write_chart(results, args.out / "chart.png")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(report.markdown_report(results, chart.name if chart else None))
    print(report.text_report(results))
    log(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}" + (f", {chart}" if chart else ""))
    failed = bool(report.failed_samples(systems))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
