"""Graph runtimes behind one small interface.

A `GraphRunner` runs the named graphs of an artifact (see export/graph_def.py for the graph
set and their inputs/outputs). One module per backend:

    ort_backend.py   onnxruntime (the artifact's onnx/ graphs)
    ov_backend.py    OpenVINO    (the artifact's openvino/ graphs)
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..artifact import Manifest

BACKENDS = ("openvino", "onnxruntime")
# onnxruntime's per-row int8 graphs reach the first token 1.4-2x sooner than OpenVINO int8 on the
# x86 CPUs measured (AVX2 without VNNI, AVX-512 VNNI; README Performance), so it is the default.
DEFAULT_BACKEND = "onnxruntime"


class GraphRunner(Protocol):
    backend: str                       # "onnxruntime" or "openvino"
    graph_names: list[str]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; inputs and outputs are float32 numpy arrays keyed by tensor name."""


class RunnerBase:
    """What both backends share: graph and tensor names, input checks, error messages.
    Subclasses fill `graph_names`, `_inputs` and `_outputs` (graph -> tensor names)."""

    graph_names: list[str]
    # True when a one-row call of a row-wise graph (decoder_i) gives its row bit for bit what a
    # call of several rows gives it, so callers need not pad one row to two (engine.model.run_rows).
    one_row_exact: bool = False
    # The most rows engine.model.run_rows gives one call of a row-wise graph (it splits larger
    # calls into blocks of this many rows); None: any number (ov_backend.py says why OpenVINO has one).
    row_block: int | None = None
    _inputs: dict[str, list[str]]
    _outputs: dict[str, list[str]]

    def input_names(self, graph: str) -> list[str]:
        return list(self._inputs[self._check_graph(graph)])

    def output_names(self, graph: str) -> list[str]:
        return list(self._outputs[self._check_graph(graph)])

    def _check_graph(self, graph: str) -> str:
        if graph not in self._inputs:
            raise ValueError(f"unknown graph {graph!r}; this artifact has {', '.join(self.graph_names)}")
        return graph

    def _feed(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's inputs as contiguous float32 arrays, after checking their names."""
        names = self._inputs[self._check_graph(graph)]
        if len(inputs) != len(names) or any(n not in inputs for n in names):
            raise ValueError(f"graph {graph} takes inputs {names}, got {sorted(inputs)}")
        return {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in names}

    @staticmethod
    def _failed(graph: str, feed: dict[str, np.ndarray], e: Exception) -> ValueError:
        shapes = {n: tuple(a.shape) for n, a in feed.items()}
        return ValueError(f"graph {graph} failed on inputs {shapes}: {e}")


def row_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive blocks of `block` rows covering n rows, none of one row (a
    one-row tail takes a row of the block before it: 65 rows by 64 are 63 + 2), so every block
    takes the several-row path of engine.model.run_rows."""
    if block < 3:   # so that the block before a one-row tail keeps two rows when it gives one
        raise ValueError(f"row blocks need at least 3 rows each, got {block}")
    bounds = list(range(0, n, block)) + [n]
    if n > block and n - bounds[-2] == 1:
        bounds[-2] -= 1
    return list(zip(bounds[:-1], bounds[1:]))


def exporter_info(manifest: Manifest, backend: str) -> dict:
    """What the exporter recorded for `backend` ("onnx", "openvino") in manifest.weights
    (opset, ir_version, onnx_version / openvino_version); {} when absent (older manifests)."""
    weights = getattr(manifest, "weights", None)
    backends = weights.get("backends") if isinstance(weights, dict) else None
    info = backends.get(backend) if isinstance(backends, dict) else None
    return info if isinstance(info, dict) else {}


def open_runner(backend: str, artifact_dir: str | Path, manifest: Manifest, threads: int | None = None,
                skip: tuple[str, ...] = (), prepacked_cache: bool = True, warm_up: bool | str = True) -> GraphRunner:
    """The runner of `backend` for a loaded, validated artifact manifest (engine.artifact.load_manifest).
    skip: graph names not to load (the model computes them itself). prepacked_cache: keep each
    graph's load-time work in the engine's per-machine cache (onnxruntime: its repacked weights,
    ort_prepacked.py; OpenVINO: its compiled model, ov_compiled.py). warm_up: OpenVINO only, run
    each graph once at load (the vision tower on a zero image, the others on one row block), so
    that its lazy weight repacking is done; "full": the others also at a prompt's size, so the
    first generate is as fast as later ones (ov_backend.py)."""
    if backend == "onnxruntime":
        from .ort_backend import OrtRunner
        runner = OrtRunner(Path(artifact_dir), manifest, threads, skip=skip, prepacked_cache=prepacked_cache)
    elif backend == "openvino":
        from .ov_backend import OvRunner
        runner = OvRunner(Path(artifact_dir), manifest, threads, skip=skip, compiled_cache=prepacked_cache,
                          warm_up=warm_up)
    else:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    release_freed_heap()
    return runner


def release_freed_heap() -> bool:
    """Give the heap memory that is free back to the OS (glibc's malloc_trim(0)). Creating the
    sessions allocates and frees 100-150 MB (3B int8, onnxruntime: graph parsing, optimization
    passes) that glibc otherwise keeps mapped, in the process's RSS for its whole life. Only
    free memory is released, so nothing changes but the RSS. False where the C library has no
    malloc_trim (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
