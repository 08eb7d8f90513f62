"""The export cache: artifacts that `engine.load()` exported from HF checkpoints.

They live in `<default_cache_dir()>/artifacts/<checkpoint>-<format>-<weights>-<key>`, where the
key hashes the checkpoint's path and files (name, size, mtime) and the export options (see
`cache_key_dir`). What this module guarantees:

- One exporter per artifact at a time: an export holds an exclusive lock on
  `locks/<name>.lock` (fcntl.flock; where there is none, the export still writes into a
  temporary directory and renames it into place, and the later of two racing exports discards
  its copy). The exporter itself (export.pipeline) never leaves a loadable half-artifact.
- The cache heals itself: a cached artifact that fails verification (a changed byte, a missing
  or truncated file, a mangled manifest) is exported again, with one warning line on stderr,
  and the load goes on. An artifact directory given by the user is never touched: its error stands.
- `python -m engine cache list|verify|clear` shows, checks and removes cached artifacts
  (`cache_command`), and lists and removes the runtimes' per-machine caches: onnxruntime's
  prepacked weights (engine/runtime/ort_prepacked.py), OpenVINO's compiled graphs
  (engine/runtime/ov_compiled.py) and the native decoder's and vision tower's packed weights
  (engine/runtime/native_decoder.py, native_vision.py), which `clear` with no names removes too.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .artifact import MANIFEST, ArtifactError, load_manifest, remove_stamps, stamp_covers

log = logging.getLogger("engine")

ARTIFACTS = "artifacts"
LOCKS = "locks"
LOCK_SUFFIX = ".lock"


def artifacts_dir() -> Path:
    """Where cached exports live: <default_cache_dir()>/artifacts."""
    from . import default_cache_dir
    return default_cache_dir() / ARTIFACTS


def is_cached_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory in the export cache (one that the engine made and may remake)."""
    return Path(path).resolve().parent == artifacts_dir().resolve()


# ---------------------------------------------------------------------------- export and heal
@dataclass(frozen=True)
class ExportRequest:
    """What a cached artifact is made from: an HF checkpoint directory and the export options."""
    checkpoint: Path
    fmt: str               # "onnx" or "openvino"
    weights: str
    group_size: int


def cache_key_dir(req: ExportRequest) -> Path:
    """The cache directory of `req`: the key covers the checkpoint's resolved path, its files'
    names, sizes and mtimes, the options, the engine version and the exporter revision."""
    import hashlib

    from . import EXPORT_REVISION, __version__
    ckpt = req.checkpoint.resolve()
    h = hashlib.sha256()
    h.update(f"{ckpt}|{req.fmt}|{req.weights}|{req.group_size}|{__version__}|{EXPORT_REVISION}".encode())
    for f in sorted(req.checkpoint.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return artifacts_dir() / f"{ckpt.name}-{req.fmt}-{req.weights}-{h.hexdigest()[:12]}"


def cached_export(req: ExportRequest, progress: bool = True) -> Path:
    """The cached artifact of `req`, exported now (under the lock) unless it is already there."""
    out = cache_key_dir(req)
    if (out / MANIFEST).is_file():
        _touch(out)
        return out
    with export_lock(out):
        if not (out / MANIFEST).is_file():     # another process may have made it meanwhile
            if progress:
                print(f"exporting {req.checkpoint} ({req.weights}, {req.fmt}) once into {out}", file=sys.stderr)
            _export(req, out, progress)
    return out


def reexport(req: ExportRequest, out: Path, error: ArtifactError, seen: tuple | None,
             progress: bool = True) -> Path:
    """Export the cached artifact `out` again after `error` (it failed verification); `seen`:
    `manifest_identity(out)` before the failed load. When another process replaced the artifact
    since (the manifest's identity changed), its fresh copy is kept. The export's progress is
    shown on a terminal only: in a log the warning is the one line a heal writes."""
    with export_lock(out):
        if manifest_identity(out) == seen or not (out / MANIFEST).is_file():
            log.warning("engine: the cached export %s failed verification (%s); exporting it again",
                        out, _reason(error, out))
            _export(req, out, progress and sys.stderr.isatty())   # in a log: that one line only
    return out


def manifest_identity(out: Path) -> tuple | None:
    """Changes whenever the artifact is replaced: manifest.json's inode, size and mtime."""
    try:
        st = (out / MANIFEST).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _export(req: ExportRequest, out: Path, progress: bool) -> None:
    from export.pipeline import export_checkpoint
    seg = req.checkpoint / "vae-oid.npz"      # a mask decoder next to the weights ships with the export
    try:
        export_checkpoint(req.checkpoint, out, formats=(req.fmt,), weights=req.weights,
                          group_size=req.group_size, progress=progress,
                          seg_decoder=seg if seg.is_file() else None, force=out.exists())
    except ArtifactError:
        # Without a lock another process can win the rename; its artifact is as good as ours.
        if not (out / MANIFEST).is_file():
            raise


def _reason(error: Exception, out: Path) -> str:
    """The first clause of an ArtifactError, without the directory it names."""
    text = str(error)
    for prefix in (f"{out}/{MANIFEST}: ", f"{out}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text.split(";")[0]


def _touch(out: Path) -> None:
    """Record a use (the directory's mtime is the cache's "last used"); best effort."""
    try:
        os.utime(out)
    except OSError:
        pass


@contextlib.contextmanager
def export_lock(out: Path, *, blocking: bool = True):
    """Hold the exclusive export lock of the cached artifact `out`. Yields False (and holds
    nothing) when not blocking and another process holds it; True otherwise."""
    lock_path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:           # no flock (Windows): rename-into-place alone keeps artifacts whole
        yield True
        return
    with open(lock_path(out), "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_path(out: Path) -> Path:
    """<cache>/locks/<name>.lock: next to the artifacts, not among them."""
    return out.parent.parent / LOCKS / f"{out.name}{LOCK_SUFFIX}"


# ---------------------------------------------------------------------------- list / verify / clear
@dataclass(frozen=True)
class CachedArtifact:
    """One directory of the export cache, as `cache list` shows it."""
    name: str
    path: str
    size: int                     # bytes on disk
    format: str                   # "onnx", "openvino", or "?" when the manifest is unreadable
    weights: str
    checkpoint: str               # the checkpoint it was exported from
    last_used: float              # seconds since the epoch (the directory's mtime)
    state: str                    # "verified", "unverified", "incomplete" or "corrupt: ..."


def cached_artifacts() -> list[CachedArtifact]:
    """Every artifact in the cache (not verified: see `verify_artifact`), by name."""
    root = artifacts_dir()
    if not root.is_dir():
        return []
    return [describe(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def describe(path: Path) -> CachedArtifact:
    """What the cache knows of one artifact without hashing it: sizes and the manifest checked,
    "verified" when a verification stamp covers every file as it is now."""
    fmt = weights = checkpoint = "?"
    if not (path / MANIFEST).is_file():
        state = "incomplete"
    else:
        try:
            manifest = load_manifest(path, verify_checksums=False)
            fmt = "+".join(sorted(manifest.graphs)) or "?"
            weights = str(manifest.weights.get("format", "?"))
            checkpoint = str(manifest.source.get("path", "?"))
            state = "verified" if stamp_covers(path, manifest) else "unverified"
        except ArtifactError as e:
            state = f"corrupt: {_reason(e, path)}"
    return CachedArtifact(name=path.name, path=str(path), size=_disk_size(path), format=fmt, weights=weights,
                          checkpoint=checkpoint, last_used=path.stat().st_mtime, state=state)


def verify_artifact(path: Path) -> CachedArtifact:
    """Hash every file of a cached artifact (recorded verifications are not trusted: the stamp
    is dropped first and written anew when all is well); its description with the outcome."""
    remove_stamps(path)
    info = describe(path)
    if info.state in ("verified", "unverified"):
        try:
            load_manifest(path, verify_checksums=True)
            info = CachedArtifact(**{**asdict(info), "state": "verified"})
        except ArtifactError as e:
            info = CachedArtifact(**{**asdict(info), "state": f"corrupt: {_reason(e, path)}"})
    return info


def leftovers() -> list[Path]:
    """Interrupted exports' staging directories and replaced artifacts nobody is writing now."""
    root = artifacts_dir()
    if not root.is_dir():
        return []
    return [p for p in sorted(root.iterdir())
            if p.is_dir() and p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name)
            and time.time() - p.stat().st_mtime > 3600]


def remove_artifact(path: Path) -> bool:
    """Remove a cached artifact and its lock file; False (nothing removed) while it is being exported."""
    with export_lock(path, blocking=False) as got:
        if not got:
            return False
        remove_stamps(path)
        shutil.rmtree(path, ignore_errors=True)
        lock_path(path).unlink(missing_ok=True)
    return True


def select(items: list[CachedArtifact], names: list[str], older_than: float | None) -> list[CachedArtifact]:
    """Artifacts matching any of `names` (exact names or shell patterns; all when empty) and,
    with older_than (seconds), last used longer ago than that."""
    chosen = [a for a in items if not names or any(fnmatch.fnmatchcase(a.name, n) for n in names)]
    if names and not chosen:
        known = ", ".join(a.name for a in items) or "the cache is empty"
        raise ArtifactError(f"no cached artifact matches {' '.join(names)} ({known}); "
                            "see `python -m engine cache list`")
    if older_than is not None:
        now = time.time()
        chosen = [a for a in chosen if now - a.last_used > older_than]
    return chosen


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    m = _AGE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age; write a number and a unit: 90s, 30m, 12h, 7d, 2w")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _disk_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _table(items: list[CachedArtifact]) -> str:
    rows = [("NAME", "SIZE", "FORMAT", "WEIGHTS", "LAST USED", "STATE", "CHECKPOINT")]
    rows += [(a.name, _human(a.size), a.format, a.weights, _ago(a.last_used), a.state, a.checkpoint) for a in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


# ---------------------------------------------------------------------------- command line
def add_cache_parser(sub) -> None:
    """`cache list|verify|clear` under the engine's subcommands (engine/__main__.py)."""
    c = sub.add_parser("cache", help="list, verify or clear the artifacts that load() exported into the cache",
                       description=f"The export cache ($PALIGEMMA_EDGE_CACHE, else $XDG_CACHE_HOME/paligemma-edge, "
                                   f"else ~/.cache/paligemma-edge; the artifacts are under {ARTIFACTS}/).")
    cs = c.add_subparsers(dest="cache_command", required=True, parser_class=type(c))
    ls = cs.add_parser("list", help="each cached artifact: size, format, weights, last use, state, checkpoint")
    ls.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    v = cs.add_parser("verify", help="hash every file of the cached artifacts (all, or the ones named)")
    v.add_argument("names", nargs="*", metavar="NAME", help="artifact names or shell patterns (default: all)")
    v.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cl = cs.add_parser("clear", help="remove cached artifacts (all, or the ones selected); asks nothing")
    cl.add_argument("names", nargs="*", metavar="NAME", help="artifact names or shell patterns (default: all)")
    cl.add_argument("--older-than", type=parse_age, metavar="AGE",
                    help="only artifacts last used longer ago than AGE: 90s, 30m, 12h, 7d, 2w")
    cl.add_argument("--corrupt", action="store_true", help="only artifacts that fail verification")
    c.set_defaults(func=cache_command)


def cache_command(args: argparse.Namespace) -> int:
    """Run `cache list|verify|clear`; 0 on success, 1 when `verify` found a bad artifact."""
    from .runtime import native_decoder, native_vision, ort_prepacked, ov_compiled, stamped_dir
    root = artifacts_dir()
    runtime_caches = (("ort_prepacked", "onnxruntime prepacked weights", ort_prepacked),
                      ("ov_compiled", "OpenVINO compiled blobs", ov_compiled),
                      ("native_decoder", "native decoder packed weights", native_decoder),
                      ("native_vision", "native vision packed weights", native_vision))
    if args.cache_command == "list":
        items = cached_artifacts()
        found = {key: module.entries() for key, _, module in runtime_caches}
        sizes = {key: sum(stamped_dir.disk_size(p) for p in found[key]) for key in found}
        if args.json:
            print(json.dumps({"cache": str(root), "artifacts": [asdict(a) for a in items],
                              **{key: {"path": str(module.cache_root()), "graphs": len(found[key]), "size": sizes[key]}
                                 for key, _, module in runtime_caches}}, indent=1))
            return 0
        if not items:
            print(f"the cache {root} holds no artifacts")
        else:
            print(_table(items))
            print(f"{len(items)} artifacts, {_human(sum(a.size for a in items))} in {root}")
        for key, label, module in runtime_caches:
            if found[key]:
                print(f"{label}: {len(found[key])} graphs, {_human(sizes[key])} in {module.cache_root()}")
        return 0
    if args.cache_command == "verify":
        items = [verify_artifact(Path(a.path)) for a in select(cached_artifacts(), args.names, None)]
        bad = [a for a in items if a.state != "verified"]
        if args.json:
            print(json.dumps({"cache": str(root), "artifacts": [asdict(a) for a in items]}, indent=1))
        elif items:
            print(_table(items))
            print(f"{len(items) - len(bad)} of {len(items)} artifacts verified"
                  + (f"; {len(bad)} bad: `python -m engine cache clear --corrupt` removes them, the next load "
                     "exports them again" if bad else ""))
        else:
            print(f"the cache {root} holds no artifacts")
        return 1 if bad else 0
    chosen = select(cached_artifacts(), args.names, args.older_than)
    if args.corrupt:
        chosen = [verify_artifact(Path(a.path)) for a in chosen]
        chosen = [a for a in chosen if a.state != "verified"]
    removed = freed = 0
    for a in chosen:
        if remove_artifact(Path(a.path)):
            removed, freed = removed + 1, freed + a.size
            print(f"removed {a.name} ({_human(a.size)}, {a.state})")
        else:
            print(f"kept {a.name}: another process is exporting it now")
    if not args.names and args.older_than is None and not args.corrupt:
        for p in leftovers():
            shutil.rmtree(p, ignore_errors=True)
            print(f"removed {p.name} (left by an interrupted export)")
    print(f"removed {removed} artifacts, {_human(freed)} freed from {root}" if removed
          else f"nothing removed from {root}")
    if not args.names:
        for _, label, module in runtime_caches:
            graphs, cache_freed = module.clear(args.older_than, args.corrupt)
            if graphs:
                print(f"removed the {label} of {graphs} graphs, {_human(cache_freed)} freed")
    return 0
