"""onnxruntime backend: one InferenceSession per graph of the artifact's onnx/ directory.

Session settings (the same for every graph):
  - intra_op_num_threads = threads (None: onnxruntime's default, one per physical core),
    inter_op_num_threads = 1, sequential execution: the engine calls ~30 graphs one after the
    other, so parallelism lives inside each op.
  - "session.intra_op.allow_spinning" = "0": idle worker threads sleep instead of spinning
    between graphs (spinning burns the cores the C++ attention needs between two graph calls).
  - "session.disable_quant_qdq" = "1": lets constant folding fold DequantizeLinear. This only
    matters for fp8 artifacts (FLOAT8E4M3FN + DequantizeLinear): without it onnxruntime
    dequantizes every fp8 matrix on every call, 10x slower than fp32. With it the fp8 weights
    are expanded to fp32 once, at session creation (there is no fp8 GEMM on CPU).
  - one CPU memory arena shared by all sessions (registered in the onnxruntime environment,
    "session.use_env_allocators" = "1"), instead of one arena per session each keeping its own
    peak activations.
  - the vision graph runs with "memory.enable_memory_arena_shrinkage" = "cpu:0": its activations
    (at 448 px ~300 MB: 1,024 tokens, 16 heads of 1,024 x 1,024 scores) go back to the system
    after the call, so they do not stay in the shared arena while the decoder's own peak follows.
    3B-448 int8, native decoder, peak RSS after two generates 3797 -> 3464 MB; 224 px 3222 ->
    3208 MB; TTFT unchanged (Zen 4). Only the vision graph: it runs once per image, while the
    decoder graphs run back to back and would refault their memory on every call.
  - prepacked_cache (default on): each graph's optimized form, with the weights MLAS repacked,
    is written once per machine and onnxruntime version into the engine's cache, and later loads
    map it instead of repacking (engine/runtime/ort_prepacked.py). Those sessions are created
    with graph optimizations off: the cached graph is already optimized.

Weight formats in memory (see export/onnx_graphs.py): int8 and int4 stay compressed
(MatMulIntegerToFloat / MatMulNBits, prepacked by MLAS); fp32, fp16, bf16 and fp8 all end up fp32 in memory.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from ..artifact import REEXPORT, ArtifactError, Manifest
from . import RunnerBase, exporter_info
from . import ort_prepacked

log = logging.getLogger("engine")
_ENV_ARENA_REGISTERED = False
OPTIONS_TAG = "level=all|disable_quant_qdq=1"     # what _options() does to the optimized graph


def _register_env_arena(ort) -> None:
    """One shared CPU arena for every session of the process (created once)."""
    global _ENV_ARENA_REGISTERED
    if _ENV_ARENA_REGISTERED:
        return
    mem_info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(mem_info, ort.OrtArenaCfg(0, -1, -1, -1))
    _ENV_ARENA_REGISTERED = True


_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def load_error(path: Path, graph: str, e: Exception, ort_version: str, manifest: Manifest) -> ArtifactError:
    """The error for a graph onnxruntime cannot load. A graph whose ONNX IR version is newer than
    the installed onnxruntime reads (an artifact exported by another exporter version, or with
    an IR the exporter did not pin) gets both versions and the two ways out."""
    too_new = _IR_TOO_NEW.search(str(e))
    if too_new:
        onnx_info = exporter_info(manifest, "onnx")
        writer = f", written with onnx {onnx_info['onnx_version']}" if onnx_info.get("onnx_version") else ""
        return ArtifactError(
            f"{path}: graph {graph} has ONNX IR version {too_new[1]}{writer}, but the installed onnxruntime "
            f"{ort_version} reads IR versions up to {too_new[2]}. Upgrade onnxruntime "
            f"(pip install -U onnxruntime), or {REEXPORT} with this version of paligemma-edge, whose "
            f"exporter writes an IR version that every supported onnxruntime reads")
    return ArtifactError(f"{path}: onnxruntime {ort_version} cannot load graph {graph} ({e}); the artifact may "
                         f"be corrupted or from an incompatible exporter: {REEXPORT}")


def prepacked_entries(manifest: Manifest) -> list[Path]:
    """The prepacked-cache entries of an artifact's graphs that exist on this machine now."""
    import onnxruntime as ort
    root = ort_prepacked.cache_root()
    found = [ort_prepacked.entry_dir(root, name, manifest, rel, ort.__version__, OPTIONS_TAG)
             for name, rel in manifest.graphs.get("onnx", {}).items()]
    return [p for p in found if p.is_dir()]


def per_row_int8_only(manifest: Manifest) -> bool:
    """Whether every matrix of the artifact is a per-row int8 MatMulIntegerToFloat (export's "dq"):
    then a graph's rows are exact integer sums scaled per row and per column, the same with one
    row or many (tests/test_one_row_calls.py checks it bit for bit), while fp32 MatMul and
    MatMulNBits take other kernels, with other float summation orders, for a single row."""
    w = manifest.weights                     # a dict, checked when the manifest was read
    kernel = exporter_info(manifest, "onnx").get("int8_kernel", "")
    return (w.get("format") == "int8" and not w.get("fallbacks") and not w.get("mixed_precision")
            and "MatMulIntegerToFloat" in kernel)


class OrtRunner(RunnerBase):
    """GraphRunner for onnxruntime (CPU execution provider).

    artifact_dir: the artifact directory; manifest: its validated manifest
    (engine.artifact.load_manifest); threads: intra-op threads per session (None: default).
    prepacked_cache: map the repacked weights from the engine's cache (written at the first load;
    also off when $PALIGEMMA_EDGE_ORT_PREPACKED=0). Every session is created here, with a
    progress bar when stderr is a terminal.
    """

    backend = "onnxruntime"

    def __init__(self, artifact_dir: str | os.PathLike, manifest: Manifest, threads: int | None = None,
                 *, progress: bool | None = None, spinning: bool = False,
                 load_threads: int = 2, skip: tuple[str, ...] = (), prepacked_cache: bool = True):
        import onnxruntime as ort

        self.artifact_dir = Path(artifact_dir)
        graphs = manifest.graphs.get("onnx")
        if not graphs:
            raise ArtifactError(f"{self.artifact_dir}: the artifact has no ONNX graphs; re-export with "
                                "`python -m export CHECKPOINT --out DIR --format onnx` (or both), or "
                                "run it with the openvino backend")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        if not isinstance(load_threads, int) or load_threads < 1:
            raise ValueError(f"load_threads must be a positive integer, got {load_threads!r}")
        self.threads = threads
        self.graph_names = [g for g in graphs if g not in skip]   # skip: graphs the model computes itself
        _register_env_arena(ort)
        self._ort, self._spinning, self._manifest = ort, spinning, manifest
        use_cache = prepacked_cache and ort_prepacked.enabled_by_env()
        cache_problems: list[str] = []          # why a graph loaded without the cache (one warning)

        def create(name: str):
            path = self.artifact_dir / graphs[name]
            if use_cache:
                sess = self._cached_session(name, path, manifest, cache_problems)
                if sess is not None:
                    return name, sess
            try:
                return name, ort.InferenceSession(str(path), self._options(), providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise load_error(path, name, e, ort.__version__, manifest) from None

        from concurrent.futures import ThreadPoolExecutor
        from tqdm import tqdm
        show = sys.stderr.isatty() if progress is None else progress
        self._sessions = {}
        with tqdm(total=len(self.graph_names), desc="loading onnx graphs", disable=not show, file=sys.stderr,
                  dynamic_ncols=True) as bar, ThreadPoolExecutor(load_threads) as pool:
            # Creating a session is mostly MLAS repacking the weights (0.3 s per 3B decoder graph),
            # and it releases the GIL: two threads load a 3B int8 artifact in 2/3 of the time.
            for name, sess in pool.map(create, self.graph_names):
                self._sessions[name] = sess
                bar.update()
        if cache_problems:
            log.warning("engine: %d onnxruntime graphs loaded without the prepacked-weights cache (%s); "
                        "set PALIGEMMA_EDGE_ORT_PREPACKED=0 to stop trying", len(cache_problems), cache_problems[0])
        shrink = ort.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._run_options = {"vision": shrink}     # graph -> RunOptions (None: the defaults)
        self._inputs = {n: [i.name for i in s.get_inputs()] for n, s in self._sessions.items()}
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self._sessions.items()}
        self.one_row_exact = per_row_int8_only(manifest)

    def cache_entries(self) -> list[Path]:
        """This artifact's prepacked-cache entries on this machine now."""
        return prepacked_entries(self._manifest)

    def _options(self):
        """Options of one session (a fresh object per session: they are created on several threads)."""
        ort = self._ort
        opts = ort.SessionOptions()
        if self.threads is not None:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spinning else "0")
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        opts.add_session_config_entry("session.use_env_allocators", "1")
        return opts

    def _cached_session(self, name: str, path: Path, manifest: Manifest, problems: list[str]):
        """The session of graph `name` made from its prepacked-cache entry (written first when it
        is absent or bad); None when the cache cannot serve it (the caller loads the artifact's
        graph, whose errors are the user's to see)."""
        ort = self._ort
        root = ort_prepacked.cache_root()
        entry = ort_prepacked.entry_dir(root, name, manifest, manifest.graphs["onnx"][name], ort.__version__,
                                        OPTIONS_TAG)
        problem = ort_prepacked.check_entry(entry) if entry.is_dir() else "absent"
        if problem is not None:
            if entry.is_dir():
                log.warning("engine: the cached onnxruntime weights %s are bad (%s); writing them again", entry, problem)
                shutil.rmtree(entry, ignore_errors=True)
            size = sum(manifest.files[rel].size for rel in ort_prepacked.graph_files(manifest, manifest.graphs["onnx"][name]))
            if not ort_prepacked.has_room(root, size):
                problems.append(f"less than {ort_prepacked.MIN_FREE_BYTES >> 30} GiB would stay free in {root}")
                return None
            try:
                ort_prepacked.write_entry(ort, path, entry, self._options())
            except Exception as e:  # noqa: BLE001 - a bad source graph raises again, clearly, from the plain load
                problems.append(f"{name}: {type(e).__name__}: {e}")
                return None
        ort_prepacked.touch(entry)
        opts = self._options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(entry / ort_prepacked.GRAPH), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own types; the entry is useless, drop it
            problems.append(f"{name}: the cached graph does not load ({e})")
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; inputs and outputs are float32 arrays keyed by tensor name."""
        feed = self._feed(graph, inputs)
        try:
            outs = self._sessions[graph].run(self._outputs[graph], feed, self._run_options.get(graph))
        except Exception as e:  # onnxruntime raises its own exception types
            raise self._failed(graph, feed, e) from None
        return dict(zip(self._outputs[graph], outs))

    def close(self) -> None:
        self._sessions.clear()
