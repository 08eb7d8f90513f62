"""Cache entries of files a runtime derives from an artifact's graphs, sealed with a stamp.

Both runtime caches use it: onnxruntime's prepacked weights (ort_prepacked.py) and OpenVINO's
compiled models (ov_compiled.py). An entry is a directory of files plus `stamp.json`, which records
each file's sha256 with its size, mtime, ctime, inode and device (as artifacts do,
engine/artifact.py). A check hashes only the files whose five values changed; an entry whose
files differ from the stamp (a changed byte, a truncated, missing or extra file, a mangled stamp)
is reported bad, and its user removes it and writes it again. Files are dated into the past
before they are hashed, so that any later write changes their mtime.

Entries are written into a temporary directory beside them and renamed into place
(`install`): an interrupted write leaves no entry, and of two writers the later keeps the first.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from ..artifact import sha256_file, write_atomic

STAMP = "stamp.json"
VERSION = 1
MIN_FREE_BYTES = 1 << 30          # never fill the cache's file system past this


def env_enabled(switch: str) -> bool:
    """A cache's environment switch: on unless set to 0 / false / no / off."""
    return os.environ.get(switch, "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_tag() -> str:
    """What a runtime's choice of kernels (and so of packed layouts) depends on: the CPU's flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return f"{platform.machine()}|{' '.join(sorted(line.split(':', 1)[1].split()))}"
    except OSError:
        pass
    from .. import cpu_features
    return f"{platform.machine()}|{sorted(cpu_features().items())}"


def file_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _files_on_disk(entry: Path) -> list[str]:
    return sorted(p.name for p in entry.iterdir() if p.name != STAMP)


def read_stamp(entry: Path) -> dict | None:
    try:
        stamp = json.loads((entry / STAMP).read_text(encoding="utf-8"))
        return stamp if isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def check(entry: Path, expected: set[str] | None = None) -> str | None:
    """None when the entry's files are what its stamp recorded (and, given `expected`, exactly
    those names), else what is wrong. Files whose stat changed are hashed; when their hashes
    still match, the stamp is refreshed."""
    stamp = read_stamp(entry)
    if stamp is None:
        return "its stamp is missing or unreadable"
    files = stamp["files"]
    if stamp.get("version") != VERSION or (expected is not None and set(files) != expected):
        return "its stamp is from another version"
    try:
        on_disk = _files_on_disk(entry)
    except OSError:
        return "it cannot be read"
    if on_disk != sorted(files):
        extra, missing = sorted(set(on_disk) - set(files)), sorted(set(files) - set(on_disk))
        return f"{missing[0]} is missing" if missing else f"it holds a file its stamp does not list ({extra[0]})"
    changed = False
    for rel, rec in files.items():
        try:
            st = (entry / rel).stat()
        except OSError:
            return f"{rel} is missing"
        if not isinstance(rec, dict) or st.st_size != rec.get("size"):
            return f"{rel} has {st.st_size} bytes, its stamp says {rec.get('size') if isinstance(rec, dict) else '?'}"
        if file_key(st) == rec.get("key"):
            continue
        if sha256_file(entry / rel) != rec.get("sha256"):
            return f"{rel} changed (checksum mismatch)"
        rec["key"], changed = file_key(st), True
    if changed:
        try:
            write_atomic(entry / STAMP, json.dumps(stamp, indent=0))
        except OSError:
            pass                  # read-only cache: the next load hashes again
    return None


def unchanged_since_stamp(entry: Path) -> bool:
    """Whether the entry's file names and stat values are still those of its stamp (no hashing)."""
    stamp = read_stamp(entry)
    try:
        return (stamp is not None and _files_on_disk(entry) == sorted(stamp["files"])
                and all(file_key((entry / rel).stat()) == rec.get("key") for rel, rec in stamp["files"].items()))
    except (OSError, AttributeError):
        return False


def seal(directory: Path, **extra) -> None:
    """Date the directory's files into the past, hash them and write the stamp (with `extra`)."""
    past = time.time() - 60.0
    files = {}
    for rel in _files_on_disk(directory):
        path = directory / rel
        os.utime(path, (past, past))
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path), "key": file_key(path.stat())}
    write_atomic(directory / STAMP, json.dumps({"version": VERSION, "files": files, **extra}, indent=0))


def new_tmp(entry: Path) -> Path:
    """A temporary directory beside `entry` to write it in."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))


def install(tmp: Path, entry: Path) -> None:
    """Rename the sealed `tmp` to `entry`; when another process installed it first, keep theirs."""
    try:
        os.rename(tmp, entry)
    except OSError:
        if not entry.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def has_room(root: Path, write_bytes: int) -> bool:
    """Whether writing write_bytes keeps MIN_FREE_BYTES free on the cache's file system."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free - write_bytes >= MIN_FREE_BYTES
    except OSError:
        return False


def leftovers(root: Path) -> list[Path]:
    """Temporary directories of interrupted writes."""
    return sorted(p for p in root.glob(".*") if p.is_dir()) if root.is_dir() else []


def entries(root: Path) -> list[Path]:
    """The cache's entries (directories), by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def touch(entry: Path) -> None:
    """Record a use (the entry directory's mtime: `cache clear --older-than` reads it)."""
    try:
        os.utime(entry)
    except OSError:
        pass


def clear(root: Path, older_than: float | None = None, corrupt: bool = False,
          expected: set[str] | None = None) -> tuple[int, int]:
    """Remove entries (all; or unused for more than older_than seconds; or only those failing
    `check`) and interrupted writes; (entries removed, bytes freed)."""
    removed = freed = 0
    now = time.time()
    for entry in entries(root):
        if older_than is not None and now - entry.stat().st_mtime <= older_than:
            continue
        if corrupt and check(entry, expected) is None:
            continue
        size = disk_size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed, freed = removed + 1, freed + size
    if older_than is None and not corrupt:
        for tmp in leftovers(root):
            if now - tmp.stat().st_mtime > 3600:          # not a write in progress
                shutil.rmtree(tmp, ignore_errors=True)
    return removed, freed
