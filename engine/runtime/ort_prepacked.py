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

Integrity, as for artifacts (engine/artifact.py): the files are hashed (sha256) once, when the
entry is written, and stamp.json records each file's sha256 with its size, mtime, ctime, inode
and device; a later load hashes only a file whose five values changed, and an entry that fails
(a changed byte, a truncated or missing file, a mangled stamp) is removed and written again, with
one warning, and the load goes on. The mtime of the written files is set into the past before
they are hashed, so that any later write changes it (no same-clock-tick blind spot).

Writes go to a temporary directory renamed into place: an interrupted write leaves no entry, and
of two processes writing the same entry the later discards its copy and uses the first.

Cost: the first load writes each graph once more with both the original and the packed weights:
about 2x the artifact's onnx/ on disk (4.6 GB for PaliGemma 2 3B int8 without the LM head) and a
first load slower by the write and the hash. When the cache's file system would keep less than
1 GiB free, or the cache cannot be written, the model loads without it (one warning).
`engine.load(..., prepacked_cache=False)` or PALIGEMMA_EDGE_ORT_PREPACKED=0 turns it off;
`python -m engine cache clear` removes the entries.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from ..artifact import Manifest, sha256_file, write_atomic

log = logging.getLogger("engine")

SUBDIR = "ort-prepacked"
STAMP = "stamp.json"
GRAPH, DATA = "graph.onnx", "graph.data"
CACHE_VERSION = 1
ENV_SWITCH = "PALIGEMMA_EDGE_ORT_PREPACKED"
MIN_FREE_BYTES = 1 << 30          # never fill the cache's file system past this


def cache_root() -> Path:
    from .. import default_cache_dir
    return default_cache_dir() / SUBDIR


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_tag() -> str:
    """What MLAS's choice of kernels (and so of packed layouts) depends on: the CPU's feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return f"{platform.machine()}|{' '.join(sorted(line.split(':', 1)[1].split()))}"
    except OSError:
        pass
    from .. import cpu_features
    return f"{platform.machine()}|{sorted(cpu_features().items())}"


def graph_files(manifest: Manifest, graph_rel: str) -> list[str]:
    """The manifest paths of a graph: its .onnx and its external data file, when listed."""
    data = str(Path(graph_rel).with_suffix(".data"))
    return [rel for rel in (graph_rel, data) if rel in manifest.files]


def entry_dir(root: Path, name: str, manifest: Manifest, graph_rel: str, ort_version: str, options_tag: str) -> Path:
    parts = [f"v{CACHE_VERSION}", ort_version, cpu_tag(), options_tag]
    parts += [f"{rel}={manifest.files[rel].sha256}" for rel in graph_files(manifest, graph_rel)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return root / f"{name}-{key}"


def _file_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def check_entry(entry: Path) -> str | None:
    """None when the entry's files are what its stamp recorded, else what is wrong. Files whose
    stat changed are hashed; when their hashes still match, the stamp is refreshed."""
    try:
        stamp = json.loads((entry / STAMP).read_text(encoding="utf-8"))
        files = stamp["files"]
        if stamp.get("version") != CACHE_VERSION or sorted(files) != sorted([GRAPH, DATA]):
            return "its stamp is from another version"
    except (OSError, ValueError, KeyError, TypeError):
        return "its stamp is missing or unreadable"
    changed = False
    for rel, rec in files.items():
        try:
            st = (entry / rel).stat()
        except OSError:
            return f"{rel} is missing"
        if not isinstance(rec, dict) or st.st_size != rec.get("size"):
            return f"{rel} has {st.st_size} bytes, its stamp says {rec.get('size') if isinstance(rec, dict) else '?'}"
        if _file_key(st) == rec.get("key"):
            continue
        if sha256_file(entry / rel) != rec.get("sha256"):
            return f"{rel} changed (checksum mismatch)"
        rec["key"], changed = _file_key(st), True
    if changed:
        try:
            write_atomic(entry / STAMP, json.dumps(stamp, indent=0))
        except OSError:
            pass                  # read-only cache: the next load hashes again
    return None


def seal_entry(directory: Path) -> None:
    """Date the written files into the past, hash them and write the stamp."""
    past = time.time() - 60.0
    files = {}
    for rel in (GRAPH, DATA):
        path = directory / rel
        os.utime(path, (past, past))
        sha = sha256_file(path)
        files[rel] = {"size": path.stat().st_size, "sha256": sha, "key": _file_key(path.stat())}
    write_atomic(directory / STAMP, json.dumps({"version": CACHE_VERSION, "files": files}, indent=0))


def has_room(root: Path, source_bytes: int) -> bool:
    """Whether writing ~2x source_bytes keeps MIN_FREE_BYTES free on the cache's file system."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free - 2 * source_bytes >= MIN_FREE_BYTES
    except OSError:
        return False


def write_entry(ort, source: Path, entry: Path, options) -> None:
    """Create a session of `source` that saves its optimized graph with the packed weights into
    a temporary directory, seal it, and rename it to `entry` (kept if another process won)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        options.optimized_model_filepath = str(tmp / GRAPH)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")   # small ones (shape inputs) inline
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        if not (tmp / DATA).exists():     # a graph without initializers: an empty data file keeps the layout
            (tmp / DATA).touch()
        seal_entry(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftovers(root: Path | None = None) -> list[Path]:
    """Temporary directories of interrupted writes."""
    root = root or cache_root()
    return sorted(p for p in root.glob(".*") if p.is_dir()) if root.is_dir() else []


def entries(root: Path | None = None) -> list[Path]:
    """The cache's entries (directories), by name."""
    root = root or cache_root()
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def touch(entry: Path) -> None:
    """Record a use (the entry directory's mtime: `cache clear --older-than` reads it)."""
    try:
        os.utime(entry)
    except OSError:
        pass


def clear(older_than: float | None = None, corrupt: bool = False) -> tuple[int, int]:
    """Remove entries (all; or unused for more than older_than seconds; or only those failing
    check_entry) and interrupted writes; (entries removed, bytes freed)."""
    removed = freed = 0
    now = time.time()
    for entry in entries():
        if older_than is not None and now - entry.stat().st_mtime <= older_than:
            continue
        if corrupt and check_entry(entry) is None:
            continue
        size = disk_size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed, freed = removed + 1, freed + size
    if older_than is None and not corrupt:
        for tmp in leftovers():
            if now - tmp.stat().st_mtime > 3600:          # not a write in progress
                shutil.rmtree(tmp, ignore_errors=True)
    return removed, freed
