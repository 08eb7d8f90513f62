"""Inputs of a batch job: image files (DIR, GLOB) or a table (FILE.parquet, FILE.jsonl) with a
path or bytes column, read into one Arrow table of rows:

    index  int64    the row's position in the input (outputs are sorted by it)
    id     string   DIR: the path relative to DIR; GLOB: the matched path; tables: --id-column,
                    else the path, else the row number. Unique: resume skips rows by id.
    path   string   an absolute image path (null when the row carries bytes)
    data   binary   encoded image bytes (null when the row carries a path)

The driver reads the listing (ids and paths, or the bytes of a bytes column); the workers read
and decode the images, so a bad image is recorded on its row there.
"""
from __future__ import annotations

import base64
import binascii
import glob
import json
from pathlib import Path

import pyarrow as pa

from .spec import BatchError, JobSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INPUT_SCHEMA = pa.schema([("index", pa.int64()), ("id", pa.string()), ("path", pa.string()),
                          ("data", pa.binary())])


def read_inputs(spec: JobSpec) -> pa.Table:
    """The job's input rows (INPUT_SCHEMA). Raises BatchError when there are none or they are ambiguous."""
    src = spec.input
    p = Path(src)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BatchError(f"--input {src}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        return _table([f.relative_to(p).as_posix() for f in files], [str(f.resolve()) for f in files], None)
    if p.is_file() and p.suffix.lower() == ".parquet":
        return _from_columns(_read_parquet(p), p, spec)
    if p.is_file() and p.suffix.lower() == ".jsonl":
        return _from_columns(_read_jsonl(p), p, spec)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return _table([src], [str(p.resolve())], None)
    if p.is_file():
        raise BatchError(f"--input {src}: give a directory, a glob, an image file, or a .parquet / .jsonl table")
    matches = sorted(m for m in glob.glob(src, recursive=True) if Path(m).is_file())
    if not matches:
        raise BatchError(f"--input {src}: no such directory or table, and no file matches it as a glob")
    return _table(matches, [str(Path(m).resolve()) for m in matches], None)


def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException) as e:
        raise BatchError(f"--input {path}: cannot read the parquet file ({e})") from None


def _read_jsonl(path: Path) -> dict[str, list]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BatchError(f"--input {path}: line {n} is not JSON ({e})") from None
    keys = {k for r in rows if isinstance(r, dict) for k in r}
    if any(not isinstance(r, dict) for r in rows):
        raise BatchError(f"--input {path}: every line must be a JSON object")
    return {k: [r.get(k) for r in rows] for k in sorted(keys)}


def _from_columns(cols: dict[str, list], table_path: Path, spec: JobSpec) -> pa.Table:
    n = len(next(iter(cols.values()), []))
    if n == 0:
        raise BatchError(f"--input {table_path}: the table has no rows")
    names = ", ".join(cols) or "(none)"
    path_col, bytes_col = spec.path_column, spec.bytes_column
    if path_col is None and bytes_col is None:
        if "path" in cols:
            path_col = "path"
        elif "bytes" in cols:
            bytes_col = "bytes"
        else:
            raise BatchError(f"--input {table_path}: name the image column with --path-column or --bytes-column "
                             f"(the table has: {names})")
    col = path_col or bytes_col
    if col not in cols:
        raise BatchError(f"--input {table_path}: no column {col!r} (the table has: {names})")
    if spec.id_column is not None and spec.id_column not in cols:
        raise BatchError(f"--input {table_path}: no id column {spec.id_column!r} (the table has: {names})")

    paths = data = None
    if path_col:
        base = table_path.resolve().parent          # relative paths: from the table's folder
        paths = [None if v is None else str((base / str(v)).resolve()) for v in cols[path_col]]
    else:
        data = [_as_bytes(v, bytes_col, i, table_path) for i, v in enumerate(cols[bytes_col])]
    if spec.id_column is not None:
        ids = [None if v is None else str(v) for v in cols[spec.id_column]]
    elif path_col:
        ids = [None if v is None else str(v) for v in cols[path_col]]
    else:
        ids = [str(i) for i in range(n)]
    if any(i is None for i in ids):
        raise BatchError(f"--input {table_path}: row {ids.index(None)} has no id (a null id or path)")
    return _table(ids, paths, data)


def _as_bytes(v, column: str, row: int, table_path: Path) -> bytes | None:
    """Image bytes of a bytes-column cell: binary (parquet) or base64 text (JSON lines)."""
    if v is None or isinstance(v, bytes):
        return v
    if isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            return v.encode()          # not base64: left to the worker, which records it as a bad image
    raise BatchError(f"--input {table_path}: column {column!r} row {row} holds a {type(v).__name__}; "
                     "it must hold image bytes (parquet binary, or base64 text in JSON lines)")


def _table(ids: list[str], paths: list[str | None] | None, data: list[bytes | None] | None) -> pa.Table:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise BatchError(f"the input has the id {i!r} twice; ids must be unique because resume skips rows by "
                             "id (name a unique column with --id-column)")
        seen.add(i)
    n = len(ids)
    return pa.table({"index": pa.array(range(n), pa.int64()), "id": pa.array(ids, pa.string()),
                     "path": pa.array(paths if paths is not None else [None] * n, pa.string()),
                     "data": pa.array(data if data is not None else [None] * n, pa.binary())},
                    schema=INPUT_SCHEMA)
