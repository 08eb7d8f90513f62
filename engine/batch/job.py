"""Running one batch job: inputs -> Ray Data actor pool -> output parts -> merged output.

    read_inputs ─► skip ids already in the output (resume) ─► blocks of batch_size rows
        ─► ray.data.from_arrow ─► map_batches(BatchWorker, an actor pool of N workers)
        ─► iter_batches in the driver ─► parts (sink.py) ─► merge ─► summary

The model is exported once, here in the driver, before any worker starts; the workers load the
artifact by its path (see README "Batch jobs on Ray" for clusters). The driver writes every
output row itself, so the output needs no shared filesystem.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from .rows import OUTPUT_SCHEMA
from .sink import OutputStore
from .sources import read_inputs
from .spec import BatchError, JobSpec, WorkerSpec

FLUSH_ROWS = 256          # rows per part file, at most ...
FLUSH_SECONDS = 10.0      # ... or what finished in this long


@dataclass
class JobSummary:
    """What one run did. rows / errors: rows run now; skipped: ids found done in the output."""
    output: str
    rows: int = 0
    errors: int = 0
    skipped: int = 0
    total: int = 0                        # rows in the merged output
    wall_s: float = 0.0                   # the whole run, Ray start-up and merge included
    run_s: float = 0.0                    # first batch submitted -> last row received
    workers: int = 0
    threads_per_worker: int = 0
    rows_per_worker: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        rate = self.rows / self.run_s if self.run_s > 0 else 0.0
        lines = [f"batch: {self.rows} rows ({self.errors} with errors) in {self.wall_s:.1f} s wall "
                 f"({self.run_s:.1f} s running, {rate:.2f} rows/s); {self.skipped} already done; "
                 f"{self.total} rows in {self.output}",
                 f"batch: {self.workers} workers x {self.threads_per_worker} threads"]
        for name, n in sorted(self.rows_per_worker.items()):
            per = n / self.run_s if self.run_s > 0 else 0.0
            lines.append(f"  worker {name}: {n} rows, {per:.2f} rows/s")
        return "\n".join(lines)


def run_job(spec: JobSpec) -> JobSummary:
    """Run the job; returns its summary. Joins a running Ray (ray.is_initialized(), or
    spec.ray_address), else starts a local one sized to this machine and stops it at the end."""
    t0 = time.perf_counter()
    spec.check()
    prompt = spec.task.prompt_text()
    inputs = read_inputs(spec)
    store = OutputStore(spec.output)
    before = store.read_all()
    _check_same_task(before, spec.task.task, prompt, spec.output)
    todo = _not_done(inputs, before, spec.retry_errors)
    summary = JobSummary(output=spec.output, skipped=inputs.num_rows - todo.num_rows)
    if todo.num_rows:
        artifact = resolve_artifact(spec)
        _run_on_ray(spec, artifact, todo, store, summary)
    summary.total = store.merge().num_rows
    summary.wall_s = time.perf_counter() - t0
    return summary


def resolve_artifact(spec: JobSpec) -> Path:
    """The exported artifact the workers load: --model as is when it is an artifact, else the
    HF checkpoint (default: the bundled default model) exported once into the engine's cache."""
    from .. import _export_cached, default_model_path
    from ..artifact import MANIFEST, load_manifest

    path = Path(spec.model) if spec.model else default_model_path()
    if (path / MANIFEST).is_file():
        artifact = path
    elif (path / "config.json").is_file():
        artifact = _export_cached(path, spec.backend, spec.weights, 128, progress=True)
    else:
        raise BatchError(f"--model {path}: neither an exported artifact (manifest.json) nor an HF checkpoint "
                         "(config.json)")
    load_manifest(artifact, verify_checksums=True)     # a broken artifact fails here, not in every worker
    return artifact.resolve()


def _check_same_task(before: pa.Table, task: str, prompt: str, output: str) -> None:
    if before.num_rows == 0:
        return
    found = set(zip(before.column("task").to_pylist(), before.column("prompt").to_pylist()))
    other = found - {(task, prompt)}
    if other:
        t, p = sorted(other)[0]
        raise BatchError(f"{output} already holds rows of task {t!r} with prompt {p!r}; resume only continues "
                         f"the same task and prompt ({task!r}, {prompt!r}): pass another --output")


def _not_done(inputs: pa.Table, before: pa.Table, retry_errors: bool) -> pa.Table:
    ids = before.column("id").to_pylist()
    errors = before.column("error").to_pylist()
    done = {i for i, e in zip(ids, errors) if e is None or not retry_errors}
    keep = [i not in done for i in inputs.column("id").to_pylist()]
    return inputs.filter(pa.array(keep, pa.bool_()))


def _run_on_ray(spec: JobSpec, artifact: Path, todo: pa.Table, store: OutputStore, summary: JobSummary) -> None:
    import ray

    started = _connect(spec)
    try:
        import ray.data
        from .worker import BatchWorker

        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads, workers = _sizing(spec, cpus)
        summary.workers, summary.threads_per_worker = workers, threads
        ctx = ray.data.DataContext.get_current()
        quiet = {"enable_progress_bars": False,          # ours below counts rows
                 "print_on_execution_start": False, "enable_auto_log_stats": False}
        saved = {k: getattr(ctx, k) for k in quiet}       # the caller's settings come back at the end
        for k, v in quiet.items():
            setattr(ctx, k, v)
        wspec = WorkerSpec(str(artifact), spec.backend, threads, spec.task, spec.batch_size, spec.fault_marker)
        n_blocks = -(-todo.num_rows // spec.batch_size)     # one block per batch; built here in the driver
        ds = ray.data.from_items(todo.to_pylist(), override_num_blocks=n_blocks).map_batches(
            BatchWorker, fn_constructor_args=(wspec,), compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads, batch_size=None, batch_format="pyarrow")
        try:
            _collect(ds, todo.num_rows, store, summary, _show_progress(spec), spec.interrupt_after_rows)
        finally:
            for k, v in saved.items():
                setattr(ctx, k, v)
    finally:
        if started:
            ray.shutdown()


def _connect(spec: JobSpec) -> bool:
    """Connect to Ray; True when this call started a local instance (to stop at the end)."""
    import ray

    if spec.ray_address is not None:
        if ray.is_initialized():
            raise BatchError("Ray is already initialized in this process; drop --ray-address, or run the job "
                             "in a fresh process")
        ray.init(address=spec.ray_address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    if ray.is_initialized():
        return False
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _sizing(spec: JobSpec, cpus: int) -> tuple[int, int]:
    """(threads per worker, workers). Defaults: 2 threads per worker (1 on a 1-CPU cluster) and as
    many workers as the cluster's CPUs hold; each worker reserves its threads as Ray CPUs."""
    threads = spec.threads_per_worker or (min(2, cpus) if spec.workers is None else max(1, cpus // spec.workers))
    workers = spec.workers or max(1, cpus // threads)
    if workers * threads > cpus:
        raise BatchError(f"{workers} workers x {threads} threads need {workers * threads} CPUs, but the Ray cluster "
                         f"has {cpus}; lower --workers or --threads-per-worker")
    return threads, workers


def _show_progress(spec: JobSpec) -> bool:
    return spec.progress if spec.progress is not None else sys.stderr.isatty()


def _collect(ds, n_rows: int, store: OutputStore, summary: JobSummary, progress: bool,
             interrupt_after_rows: int | None = None) -> None:
    """Receive finished rows, commit them as parts every FLUSH_ROWS rows / FLUSH_SECONDS, count
    them. On any exit (KeyboardInterrupt included) the rows received so far are committed.
    interrupt_after_rows (tests): behave as if Ctrl-C came once that many rows arrived."""
    from tqdm import tqdm

    pending: list[pa.Table] = []
    per_worker: Counter = Counter()
    bar = tqdm(total=n_rows, unit="row", desc="batch", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t_start = last_flush = time.perf_counter()

    def flush() -> None:
        nonlocal last_flush
        if pending:
            store.write_part(pa.concat_tables(pending))
            pending.clear()
        last_flush = time.perf_counter()

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch = batch.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
            pending.append(batch)
            errors = sum(e is not None for e in batch.column("error").to_pylist())
            summary.rows += batch.num_rows
            summary.errors += errors
            per_worker.update(batch.column("worker").to_pylist())
            bar.update(batch.num_rows)
            if errors:
                bar.set_postfix(errors=summary.errors)
            if sum(t.num_rows for t in pending) >= FLUSH_ROWS or time.perf_counter() - last_flush >= FLUSH_SECONDS:
                flush()
            if interrupt_after_rows is not None and summary.rows >= interrupt_after_rows:
                raise KeyboardInterrupt
    finally:
        flush()
        bar.close()
        summary.run_s = time.perf_counter() - t_start
        summary.rows_per_worker = dict(per_worker)
