"""OpenVINO backend: one compiled model (CPU) and one reused InferRequest per graph of the
artifact's openvino/ directory.

Compile settings (the same for every graph, one shared ov.Core):
  - INFERENCE_NUM_THREADS = threads (None: OpenVINO's default, one per core), NUM_STREAMS 1,
    PERFORMANCE_HINT LATENCY: the engine runs ~30 graphs one after the other.
  - INFERENCE_PRECISION_HINT = `precision`, "f32" by default for every artifact. The CPU
    plugin's own default is bf16 on CPUs with avx512_bf16 / AMX, which costs accuracy (bf16
    activations keep ~3 significant digits) even for fp32 artifacts. precision="bf16" is
    opt-in: FullyConnected layers run in bf16 (faster prefill on such CPUs), and fp16 / bf16
    weights then stay 16-bit in memory.
  - DYNAMIC_QUANTIZATION_GROUP_SIZE = `dynamic_quantization`: for int8 / int4 weights the CPU
    plugin quantizes the activations to int8 per group of this many values and uses integer
    dot products (the plugin's default, 32, kept here, like the ONNX backend's int8
    activations). Measured 1.4x (PaliGemma-3B decoder layer, T=260) to 1.7x faster int8
    prefill; it adds a small activation rounding error (tests' tiny models: int8 logit cosine
    vs the fp32 reference 0.9994 -> 0.9988). 0 turns it off: exact dequantized-weight math in
    f32 (the tests' exactness checks use it).
  - Graphs are compiled from their .xml path, so the .bin weights are memory-mapped, not read.
  - compiled_cache (default on): each compiled graph is kept in the engine's per-machine cache
    and later loads import it (engine/runtime/ov_compiled.py): 3B int8 compile 1.7-1.9 s ->
    import 0.45-0.6 s.
  - warm_up (default on): the plugin repacks a graph's weights lazily, at its first inference,
    and allocates its activations for the rows of that call. So the runner runs every graph once
    at load on zeros: the vision tower on one image, the others on one row block (`row_block`
    rows, below). On one row, the decoder graphs took 1.3 s at load for 3B int8 and the first
    generate went from 1.23-1.29x a warm one to 1.07-1.12x (2-core AVX2, quiet). The vision tower
    was left out at first (its warm-up is a whole image's compute), but its first run faulted in
    its repacked weights, 437 MB at 224 px, and took 0.65-0.9 s against 0.38-0.42 s warm on the
    2-core Intel Xeon: with it, 3B-224 int8, fresh processes alternating, three each, load
    1.56-1.91 -> 2.27-3.46 s and first generate / warm 1.06-1.16 -> 1.01-1.13. The first 64-row
    blocks then still faulted in 221 MB of activations (~56,000 pages, 0.6-0.9 s on this VM in
    its slow phases); warming on a whole block instead of one row, three rounds alternating:
    load 2.63-2.95 -> 3.05-4.19 s, first / warm 1.00-1.46 -> 1.02-1.23.
    warm_up="full" also runs every other graph on zeros of the row counts of a prompt's calls
    (the image tokens + 8 rows, in row blocks): the plugin's first run at a new size costs more
    than the repack. Before the row blocks (whole prompts per call; 3B-224 int8, 2 Zen 4 cores,
    two processes each): load 1.8-4.2 -> 6.1-6.4 s, first generate / warm 1.16-1.34 ->
    1.01-1.09. For a service that loads once and must answer its first caller as fast as its
    later ones.

Row blocks (`row_block`, default 64): engine.model.run_rows gives the decoder and LM-head graphs
at most this many rows per call. The plugin allocates each compiled graph's activations for the
largest row count it has run and keeps them, and each graph is its own compiled model: a 3B-224
prefill of 260 rows faulted in ~45 MB per decoder graph, 1.2 GB in all, at the first generate
(its prefill 5.2-5.5 s against 2.2-2.9 s warm, RSS +1.2 GB for the process's life; at 448 px
it would be four times that). In blocks of 64 rows the first generate's prefill took 2.7-3.3 s,
peak RSS 4.34-4.42 -> 3.56-3.61 GB, and the warm prefill no slower (2-core Intel Xeon, AVX-512
VNNI, fresh processes; 32 rows: 3.0-3.3 s, 128 rows: first 3.8 s). Rows are independent tokens and
every block has two rows or more, so the results are those of one call (tests).

Weights in memory (see export/openvino_graphs.py): int8 and int4 stay compressed (FullyConnected
with i8 / i4 weights); fp32, fp8 (and fp16 / bf16 under the f32 hint) are fp32 in memory. The
plugin repacks the weights of each graph into anonymous memory at the graph's first inference,
after which the .bin pages it read are never touched again but stay mapped, counting once more
in the process RSS. With `release_weight_pages` (default on) the runner drops those pages from
its address space (madvise MADV_DONTNEED on the read-only file mapping) after a graph's first
run: they remain in the page cache, and if the plugin ever reads them again they fault back in
from the file, so this never changes results. It halves the RSS of an int8 artifact.

Measured on a synthetic PaliGemma-3B-224 (2 busy shared cores, all 20 graphs run once):
RSS int8 artifact 2.9 GB (5.6 GB without releasing the weight pages), bf16 artifact 11.1 GB
with the f32 hint and 5.6 GB with the bf16 hint.

Per call: inputs are passed to the InferRequest without a copy (share_inputs) and outputs are
copied out (the next run of the same graph reuses the request's output buffers).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..artifact import ArtifactError, Manifest
from . import RunnerBase, exporter_info, ov_compiled, row_blocks

log = logging.getLogger("engine")

PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}
ROW_BLOCK = 64
_MADV_DONTNEED = 4


class OvRunner(RunnerBase):
    """GraphRunner for OpenVINO (CPU device).

    artifact_dir: the artifact directory; manifest: its validated manifest
    (engine.artifact.load_manifest); threads: inference threads per graph (None: default).
    precision: "f32" (default) or "bf16" (see the module docstring). dynamic_quantization:
    activation group size for int8 / int4 weights, 0 = off, None = the plugin's default (32).
    compiled_cache: import / keep the compiled graphs in the engine's cache (ov_compiled.py).
    warm_up: True: run each graph once at load (the vision tower on one image, the others on one
    row block); "full": the others also at a prompt's row counts; False: nothing (see the module
    docstring). row_block: the most rows a row-wise graph call takes (engine.model.run_rows;
    None: any; see the module docstring).
    """

    backend = "openvino"

    def __init__(self, artifact_dir: str | os.PathLike, manifest: Manifest, threads: int | None = None, *,
                 precision: str = "f32", dynamic_quantization: int | None = None,
                 compiled_cache: bool = True, warm_up: bool | str = True, release_weight_pages: bool = True,
                 progress: bool | None = None, skip: tuple[str, ...] = (), row_block: int | None = ROW_BLOCK):
        import openvino as ov

        self.artifact_dir = Path(artifact_dir)
        graphs = manifest.graphs.get("openvino")
        if not graphs:
            raise ArtifactError(f"{self.artifact_dir}: the artifact has no OpenVINO graphs; re-export with "
                                "`python -m export CHECKPOINT --out DIR --format openvino` (or both), or run "
                                "it with the onnxruntime backend")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(sorted(set(PRECISIONS)))}, got {precision!r}")
        if dynamic_quantization is not None and (not isinstance(dynamic_quantization, int)
                                                 or dynamic_quantization < 0):
            raise ValueError(f"dynamic_quantization must be a group size >= 0 (0 = off) or None, "
                             f"got {dynamic_quantization!r}")
        if row_block is not None and (not isinstance(row_block, int) or isinstance(row_block, bool) or row_block < 3):
            raise ValueError(f"row_block must be an integer >= 3 or None, got {row_block!r}")
        self.row_block = row_block
        self.threads = threads
        self.precision = PRECISIONS[precision]
        self.graph_names = [g for g in graphs if g not in skip]   # skip: graphs the model computes itself
        self.release_weight_pages = release_weight_pages and sys.platform.startswith("linux")
        config = {"INFERENCE_PRECISION_HINT": self.precision, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_MMAP": True}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        if dynamic_quantization is not None:
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = dynamic_quantization
        self.config = config
        self.core = ov.Core()
        use_cache = (compiled_cache and ov_compiled.enabled_by_env()
                     and isinstance(getattr(manifest, "files", None), dict))
        cache_problems: list[str] = []
        self._cache_entries: list[Path] = []

        from tqdm import tqdm
        show = sys.stderr.isatty() if progress is None else progress
        self._compiled, self._requests = {}, {}
        self._inputs: dict[str, list[str]] = {}
        self._outputs: dict[str, list[str]] = {}
        self._mapped: dict[str, list[Path]] = {}   # files a graph maps until its first run
        for name in tqdm(self.graph_names, desc="loading openvino graphs", disable=not show, file=sys.stderr,
                         dynamic_ncols=True):
            xml = self.artifact_dir / graphs[name]
            if not xml.is_file() or not xml.with_suffix(".bin").is_file():
                raise ArtifactError(f"{xml}: graph {name} (.xml + .bin) is missing; re-export the artifact")
            try:
                got = None
                # only graphs whose content the manifest vouches for (sha256 of .xml and .bin)
                if use_cache and len(ov_compiled.graph_files(manifest, graphs[name])) == 2:
                    entry = ov_compiled.entry_dir(ov_compiled.cache_root(), name, manifest, graphs[name], xml,
                                                  ov.get_version(), config)
                    got = ov_compiled.compile_graph(self.core, xml, config, entry, cache_problems)
                    self._cache_entries.append(entry)
                compiled, blobs = got if got is not None else (self.core.compile_model(str(xml), "CPU", config), [])
            except Exception as e:  # OpenVINO raises RuntimeError with its own message
                exported = exporter_info(manifest, "openvino").get("openvino_version")
                versions = (f" (exported with OpenVINO {exported}, installed OpenVINO {ov.get_version()}: upgrade "
                            "openvino, pip install -U openvino, or re-export with this one)"
                            if exported and exported != ov.get_version() else "")
                raise ArtifactError(f"{xml}: OpenVINO cannot load graph {name} ({e}){versions}; the artifact "
                                    "may be corrupted or from an incompatible exporter: re-export it") from None
            self._compiled[name] = compiled
            self._requests[name] = compiled.create_infer_request()
            self._inputs[name] = [p.get_any_name() for p in compiled.inputs]
            self._outputs[name] = [p.get_any_name() for p in compiled.outputs]
            self._mapped[name] = [xml.with_suffix(".bin"), *blobs]
        if cache_problems:
            log.warning("engine: %d OpenVINO graphs loaded without the compiled-model cache (%s); set "
                        "%s=0 to stop trying", len(cache_problems), cache_problems[0], ov_compiled.ENV_SWITCH)
        if warm_up not in (True, False, "full"):
            raise ValueError(f"warm_up must be True, False or 'full', got {warm_up!r}")
        self.warmup_seconds = 0.0
        if warm_up:
            t0 = time.perf_counter()
            rows = row_block or 1    # True: one block's rows, so that the block's activations are faulted in too
            if "vision" in self.graph_names:
                features = next(iter(self.run("vision", self._zero_rows("vision", 1)).values()))
                if warm_up == "full":   # one prompt's worth: the image tokens plus a few prompt tokens
                    rows = int(np.prod(features.shape[:-1])) + 8
            # the row counts of run_rows' calls on `rows` rows (one block for True)
            sizes = sorted({b - a for a, b in row_blocks(rows, row_block)}) if row_block else [rows]
            for name in self.graph_names:
                if name != "vision":    # the LM head runs on a prompt's last row: one row is its size
                    for size in ([1] if name == "lm_head" else sizes):
                        self.run(name, self._zero_rows(name, size))
            self.warmup_seconds = time.perf_counter() - t0

    def cache_entries(self) -> list[Path]:
        """The compiled-model cache entries of this runner's graphs (those that exist now)."""
        return [p for p in self._cache_entries if p.is_dir()]

    def _zero_rows(self, graph: str, rows: int) -> dict[str, np.ndarray]:
        """Inputs of zeros whose dynamic dimensions are `rows`."""
        return {p.get_any_name(): np.zeros([d.get_length() if d.is_static else rows for d in p.get_partial_shape()],
                                           np.float32) for p in self._compiled[graph].inputs}

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; inputs and outputs are float32 arrays keyed by tensor name."""
        feed = self._feed(graph, inputs)
        req = self._requests[graph]
        try:
            req.infer(feed, share_inputs=True, share_outputs=False)
        except Exception as e:  # OpenVINO raises RuntimeError with its own message
            raise self._failed(graph, feed, e) from None
        out = {n: req.get_tensor(n).data.copy() for n in self._outputs[graph]}
        mapped = self._mapped.pop(graph, None)   # first run of this graph: weights are repacked now
        if mapped is not None and self.release_weight_pages:
            for path in mapped:
                release_file_pages(path)
        return out

    def runtime_weight_precisions(self, graph: str) -> dict[str, int]:
        """{runtime precision: count} of the FullyConnected / MatMul layers of the compiled graph
        (e.g. {"i8": 7} when int8 weights stay int8)."""
        counts: dict[str, int] = {}
        for op in self._compiled[self._check_graph(graph)].get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if rt["layerType"].astype(str) in ("FullyConnected", "MatMul"):
                p = rt["runtimePrecision"].astype(str)
                counts[p] = counts.get(p, 0) + 1
        return counts

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()


def release_file_pages(path: str | os.PathLike) -> int:
    """Drop this process's pages of the read-only memory mappings of `path` (madvise
    MADV_DONTNEED). The pages stay in the page cache and fault back in from the file if touched
    again, so contents never change. Returns the bytes of mappings released (0 if unsupported)."""
    try:
        target = os.path.realpath(path)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        released = 0
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if (len(parts) < 6 or "w" in parts[1] or not parts[5].strip().endswith(os.path.basename(target))
                        or os.path.realpath(parts[5].strip()) != target):
                    continue
                start, end = (int(v, 16) for v in parts[0].split("-"))
                if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                    released += end - start
        return released
    except (OSError, AttributeError, ValueError):
        return 0
