"""Batch jobs on Ray Data: `python -m engine.batch TASK --input ... --output ...`.

    spec.py      TaskSpec, JobSpec, WorkerSpec, BatchError
    sources.py   inputs: DIR, GLOB, FILE.parquet, FILE.jsonl -> one Arrow table of rows
    rows.py      one batch through a loaded model (every row submitted at once) -> output rows
    worker.py    BatchWorker, the Ray Data actor: one model per worker
    sink.py      OutputStore: atomic part files, merge, resume state
    job.py       run_job: Ray (local or a cluster), the actor pool, progress, summary
    __main__.py  the command line

Ray (`pip install "paligemma-edge[batch]"`) is imported only when a job runs on it.
"""
from .spec import BatchError, JobSpec, TaskSpec, WorkerSpec

__all__ = ["BatchError", "JobSpec", "JobSummary", "TaskSpec", "WorkerSpec", "run_job"]


def __getattr__(name):          # job.py imports pyarrow: only when asked for
    if name in ("run_job", "JobSummary"):
        from . import job
        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
