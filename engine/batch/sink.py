"""The job's output, kept valid at every moment so that an interrupted run can be resumed.

    OUT.parquet | OUT.jsonl      the merged output: one row per input id, sorted by input index
    OUT.parquet.parts/           rows finished since the last merge, in part files
        part-000001.parquet      each written to a hidden temporary file, then renamed: a part
        part-000002.parquet      is either whole or absent, never torn

While a job runs, the driver appends finished rows as new parts; at its end it merges OUT and
the parts into a new OUT (written to a temporary file, then renamed over OUT) and removes the
parts. A run killed at any point leaves OUT (whole, or absent) plus whole parts: the next run
reads both, skips the ids they hold, and its merge keeps one row per id (the latest written:
parts in order, after OUT), so nothing is lost and nothing is duplicated.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa

from .rows import OUTPUT_SCHEMA
from .spec import BatchError

_PART_RE = re.compile(r"^part-(\d{6})\.(parquet|jsonl)$")


class OutputStore:
    """OUT and its parts directory (see the module docstring)."""

    def __init__(self, output: str | Path):
        self.path = Path(output)
        self.fmt = self.path.suffix.lower().lstrip(".")
        if self.fmt not in ("parquet", "jsonl"):
            raise BatchError(f"--output {output}: name a .parquet or .jsonl file")
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        if self.path.exists() and not self.path.is_file():
            raise BatchError(f"--output {output} exists and is not a file")
        if not self.path.parent.is_dir():
            raise BatchError(f"--output {output}: the folder {self.path.parent} does not exist")

    # ------------------------------------------------------------------ reading
    def part_files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.iterdir() if _PART_RE.match(p.name))

    def read_all(self) -> pa.Table:
        """OUT's rows, then the parts' rows in order (duplicates not yet removed)."""
        tables = [read_rows(self.path)] if self.path.is_file() else []
        tables += [read_rows(p) for p in self.part_files()]
        return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()

    # ------------------------------------------------------------------ writing
    def write_part(self, rows: pa.Table) -> Path:
        """Commit rows as the next part file (atomically)."""
        self.parts_dir.mkdir(exist_ok=True)
        last = max((int(_PART_RE.match(p.name).group(1)) for p in self.part_files()), default=0)
        dest = self.parts_dir / f"part-{last + 1:06d}.{self.fmt}"
        _write_atomic(rows, dest)
        return dest

    def merge(self) -> pa.Table:
        """Fold the parts into OUT (one row per id, the latest; sorted by index); returns OUT's rows."""
        rows = latest_per_id(self.read_all())
        if self.part_files() or not self.path.is_file():
            _write_atomic(rows, self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return rows


def latest_per_id(rows: pa.Table) -> pa.Table:
    """One row per id, the last one in `rows`; sorted by input index."""
    last: dict[str, int] = {}
    for i, row_id in enumerate(rows.column("id").to_pylist()):
        last[row_id] = i
    return rows.take(sorted(last.values())).sort_by("index")


def read_rows(path: Path) -> pa.Table:
    """Output rows of a parquet or JSON lines file, as OUTPUT_SCHEMA."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise BatchError(f"{path}: cannot read it as output of engine.batch ({type(e).__name__}: {e}); "
                         "move it away or pass another --output") from None


def _write_atomic(rows: pa.Table, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        if dest.suffix == ".parquet":
            import pyarrow.parquet as pq
            pq.write_table(rows, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
