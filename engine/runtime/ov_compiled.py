"""A per-machine cache of OpenVINO's compiled models (its CACHE_DIR blobs), kept safe.

Why: compiling the 20-odd graphs of a 3B int8 artifact is 1.7-1.9 s of every load; importing
them from OpenVINO's compiled blobs is 0.45-0.6 s (measured on this project's 2-core AVX2 machine;
outputs bit-identical). OpenVINO's own cache is not safe to point at a shared directory: it names
a blob by a hash of the model's path and the compile options, so an artifact re-exported in place
would be served a stale blob unless the files' dates differ, and a damaged blob is not detected.

Where: `<default_cache_dir()>/ov-compiled/<graph>-<key>/` holds the one blob OpenVINO writes for
the graph and stamp.json. The key hashes the graph's .xml / .bin by content (their sha256 in the
manifest, which loading verifies), the graph's absolute path (OpenVINO's own blob name depends on
it), the OpenVINO version, the CPU's flags and the compile options. The stamp also records the
.xml / .bin sizes and mtimes: OpenVINO recompiles when they change, so the entry is then written
again (quietly). Integrity as for the onnxruntime cache (engine/runtime/stamped_dir.py): the blob
is hashed once, when written; a later load hashes it only when its stat changed; a bad entry is
removed and written again with one warning, and the load never fails because of the cache.

Cost: the blob holds the graph's weights as compiled (about the artifact's openvino/ size again
on disk: 2.3 GB for PaliGemma 2 3B int8) and the first load writes it (3B int8: 4.7 s instead
of 1.7 s). The blob is memory-mapped at import, so its pages are released after the graph's
first run, as the .bin's are (engine/runtime/ov_backend.py). No room (less than 1 GiB would stay
free) or an unwritable cache: the graph is compiled without it, with one warning.
`engine.load(..., prepacked_cache=False)` or PALIGEMMA_EDGE_OV_COMPILED=0 turns it off; `python
-m engine cache clear` removes the entries.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ..artifact import Manifest
from . import stamped_dir
from .stamped_dir import disk_size  # noqa: F401 - this module's API

log = logging.getLogger("engine")

SUBDIR = "ov-compiled"
ENV_SWITCH = "PALIGEMMA_EDGE_OV_COMPILED"


def cache_root() -> Path:
    from .. import default_cache_dir
    return default_cache_dir() / SUBDIR


def enabled_by_env() -> bool:
    return stamped_dir.env_enabled(ENV_SWITCH)


def graph_files(manifest: Manifest, xml_rel: str) -> list[str]:
    """The manifest paths of a graph: its .xml and .bin."""
    return [rel for rel in (xml_rel, str(Path(xml_rel).with_suffix(".bin"))) if rel in manifest.files]


def entry_dir(root: Path, name: str, manifest: Manifest, xml_rel: str, xml: Path, ov_version: str,
              config: dict) -> Path:
    parts = [f"v{stamped_dir.VERSION}", ov_version, stamped_dir.cpu_tag(), str(Path(xml).resolve()),
             "|".join(f"{k}={config[k]}" for k in sorted(config) if k != "CACHE_DIR")]
    parts += [f"{rel}={manifest.files[rel].sha256}" for rel in graph_files(manifest, xml_rel)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return root / f"{name}-{key}"


def source_tag(xml: Path) -> list[list[int]]:
    """Sizes and mtimes of the graph's .xml and .bin: OpenVINO compiles again when they change."""
    stats = [p.stat() for p in (xml, xml.with_suffix(".bin"))]
    return [[st.st_size, st.st_mtime_ns] for st in stats]


def compile_graph(core, xml: Path, config: dict, entry: Path, problems: list[str]):
    """(compiled model, files it maps) for graph `xml`, through its cache entry: imported from
    the entry when it is sound, else compiled and written into it. None when the cache cannot
    serve (the caller compiles without it, and its errors are the user's to see)."""
    problem, quiet = ("absent", True) if not entry.is_dir() else (stamped_dir.check(entry), False)
    if problem is None and (stamped_dir.read_stamp(entry) or {}).get("source") != source_tag(xml):
        problem, quiet = "the graph's files were rewritten or touched since", True
    if problem is None:
        stamped_dir.touch(entry)
        try:
            compiled = core.compile_model(str(xml), "CPU", {**config, "CACHE_DIR": str(entry)})
        except Exception as e:  # noqa: BLE001 - OpenVINO's own types; the entry is useless, drop it
            problems.append(f"{entry.name}: the cached blob does not load ({e})")
            shutil.rmtree(entry, ignore_errors=True)
            return None
        if not stamped_dir.unchanged_since_stamp(entry):
            stamped_dir.seal(entry, source=source_tag(xml))   # OpenVINO compiled again (from the verified graph)
        return compiled, [entry / f for f in os.listdir(entry) if f != stamped_dir.STAMP]
    if entry.is_dir():
        (log.info if quiet else log.warning)("engine: the cached OpenVINO blob %s is %s (%s); compiling again",
                                             entry, "stale" if quiet else "bad", problem)
        shutil.rmtree(entry, ignore_errors=True)
    root = entry.parent
    size = sum(p.stat().st_size for p in (xml, xml.with_suffix(".bin")))
    if not stamped_dir.has_room(root, size):
        problems.append(f"less than {stamped_dir.MIN_FREE_BYTES >> 30} GiB would stay free in {root}")
        return None
    try:
        tmp = stamped_dir.new_tmp(entry)
    except OSError as e:
        problems.append(f"{root} cannot be written ({e})")
        return None
    try:
        compiled = core.compile_model(str(xml), "CPU", {**config, "CACHE_DIR": str(tmp)})
        if not any(f != stamped_dir.STAMP for f in os.listdir(tmp)):
            problems.append("OpenVINO wrote no compiled blob")
            return compiled, []
        stamped_dir.seal(tmp, source=source_tag(xml))
        stamped_dir.install(tmp, entry)
        return compiled, []                # compiled from the artifact: it maps the .bin
    except OSError as e:
        problems.append(f"{root} cannot be written ({e})")
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftovers(root: Path | None = None) -> list[Path]:
    return stamped_dir.leftovers(root or cache_root())


def entries(root: Path | None = None) -> list[Path]:
    return stamped_dir.entries(root or cache_root())


def clear(older_than: float | None = None, corrupt: bool = False) -> tuple[int, int]:
    """Remove entries (all; or unused for more than older_than seconds; or only the bad ones) and
    interrupted writes; (entries removed, bytes freed)."""
    return stamped_dir.clear(cache_root(), older_than, corrupt)
