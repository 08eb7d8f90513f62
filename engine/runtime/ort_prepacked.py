"""A per-machine cache of the weights onnxruntime repacks when it creates a session.

Why: creating an onnxruntime session for a graph with int8 / int4 / fp32 weights is mostly MLAS
repacking them into its GEMM layout, on the heap, at every load (the 3B vision tower: 1.55 s to
create, 0.29 s from the cache). onnxruntime can write the optimized graph with the repacked
weights in its external data file (`session.save_external_prepacked_constant_initializers`); a
session made from that file maps them instead of repacking, and the pages are file-backed (the
kernel may drop them under memory pressure) instead of anonymous.

Where: `<default_cache_dir()>/ort-prepacked/<graph>-<key>/` holds graph.onnx, graph.data and
stamp.json. The key hashes what the packed layout depends on: the graph's files by content (their
sha256 in the artifact's manifest, not their path), the onnxruntime version, the CPU (MLAS picks
its layout by ISA: the flags line of /proc/cpuinfo) and the session options that shape the
optimized graph. An artifact moved or copied keeps its entries; another machine or onnxruntime
makes new ones.

Integrity (engine/runtime/stamped_dir.py, as for artifacts): the files are hashed once, when the
entry is written, and a later load hashes only a file whose size, mtime, ctime, inode or device
changed; an entry that fails (a changed byte, a truncated, missing or extra file, a mangled
stamp) is removed and written again, with one warning, and the load goes on. Writes go to a
temporary directory renamed into place.

Cost: the first load writes each graph once more with both the original and the packed weights:
about 2x the artifact's onnx/ on disk (4.6 GB for PaliGemma 2 3B int8 without the LM head) and a
first load slower by the write and the hash. When the cache's file system would keep less than
1 GiB free, or the cache cannot be written, the model loads without it (one warning).
`engine.load(..., prepacked_cache=False)` or PALIGEMMA_EDGE_ORT_PREPACKED=0 turns it off;
`python -m engine cache clear` removes the entries.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from ..artifact import Manifest
from . import stamped_dir
from .stamped_dir import MIN_FREE_BYTES, STAMP, cpu_tag, disk_size, touch  # noqa: F401 - this module's API

SUBDIR = "ort-prepacked"
GRAPH, DATA = "graph.onnx", "graph.data"
FILES = {GRAPH, DATA}
CACHE_VERSION = stamped_dir.VERSION
ENV_SWITCH = "PALIGEMMA_EDGE_ORT_PREPACKED"
_file_key = stamped_dir.file_key


def cache_root() -> Path:
    from .. import default_cache_dir
    return default_cache_dir() / SUBDIR


def enabled_by_env() -> bool:
    return stamped_dir.env_enabled(ENV_SWITCH)


def graph_files(manifest: Manifest, graph_rel: str) -> list[str]:
    """The manifest paths of a graph: its .onnx and its external data file, when listed."""
    data = str(Path(graph_rel).with_suffix(".data"))
    return [rel for rel in (graph_rel, data) if rel in manifest.files]


def entry_dir(root: Path, name: str, manifest: Manifest, graph_rel: str, ort_version: str, options_tag: str) -> Path:
    parts = [f"v{CACHE_VERSION}", ort_version, cpu_tag(), options_tag]
    parts += [f"{rel}={manifest.files[rel].sha256}" for rel in graph_files(manifest, graph_rel)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return root / f"{name}-{key}"


def check_entry(entry: Path) -> str | None:
    """None when the entry's files are what its stamp recorded, else what is wrong."""
    return stamped_dir.check(entry, FILES)


def has_room(root: Path, source_bytes: int) -> bool:
    """Whether writing ~2x source_bytes (original + packed weights) keeps MIN_FREE_BYTES free."""
    return stamped_dir.has_room(root, 2 * source_bytes)


def write_entry(ort, source: Path, entry: Path, options) -> None:
    """Create a session of `source` that saves its optimized graph with the packed weights into
    a temporary directory, seal it, and rename it to `entry` (kept if another process won)."""
    tmp = stamped_dir.new_tmp(entry)
    try:
        options.optimized_model_filepath = str(tmp / GRAPH)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")   # small ones (shape inputs) inline
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        if not (tmp / DATA).exists():     # a graph without initializers: an empty data file keeps the layout
            (tmp / DATA).touch()
        stamped_dir.seal(tmp)
        stamped_dir.install(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftovers(root: Path | None = None) -> list[Path]:
    """Temporary directories of interrupted writes."""
    return stamped_dir.leftovers(root or cache_root())


def entries(root: Path | None = None) -> list[Path]:
    """The cache's entries (directories), by name."""
    return stamped_dir.entries(root or cache_root())


def clear(older_than: float | None = None, corrupt: bool = False) -> tuple[int, int]:
    """Remove entries (all; or unused for more than older_than seconds; or only those failing
    check_entry) and interrupted writes; (entries removed, bytes freed)."""
    return stamped_dir.clear(cache_root(), older_than, corrupt, FILES)
