"""Graph runtimes behind one small interface.

A `GraphRunner` runs the named graphs of an artifact (see export/graph_def.py for the graph
set and their inputs/outputs). One module per backend:

    ort_backend.py   onnxruntime (the artifact's onnx/ graphs)
    ov_backend.py    OpenVINO    (the artifact's openvino/ graphs)
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("openvino", "onnxruntime")


class GraphRunner(Protocol):
    backend: str                       # "onnxruntime" or "openvino"
    graph_names: list[str]

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph; inputs and outputs are float32 numpy arrays keyed by tensor name."""


def open_runner(backend: str, artifact_dir: str | Path, manifest: dict, threads: int | None = None) -> GraphRunner:
    """The runner of `backend` for a loaded, validated artifact manifest."""
    if backend == "onnxruntime":
        from .ort_backend import OrtRunner
        return OrtRunner(Path(artifact_dir), manifest, threads)
    if backend == "openvino":
        from .ov_backend import OvRunner
        return OvRunner(Path(artifact_dir), manifest, threads)
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
