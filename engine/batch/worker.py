"""The Ray Data actor: loads the model once, then runs every batch it is given through
TaskRunner (rows.py), which submits all rows of the batch to the model's scheduler at once.

Ray restarts an actor that dies and retries its batch on another (Ray Data's actor pools run
with max_restarts=-1, max_task_retries=-1), so a dying worker costs time, never rows."""
from __future__ import annotations

import os

import pyarrow as pa

from .spec import WorkerSpec


class BatchWorker:
    """One model per actor; `__call__` takes an input batch (pyarrow) and returns output rows."""

    def __init__(self, spec: WorkerSpec):
        from .. import load
        from ..serving import SchedulerConfig
        from .rows import TaskRunner

        self.spec = spec
        serving = SchedulerConfig(max_queue=max(64, spec.max_in_flight))   # a whole batch is queued at once
        self.model = load(spec.artifact_dir, backend=spec.backend, threads=spec.threads, progress=False,
                          serving=serving)
        self.runner = TaskRunner.for_model(self.model, spec.task)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.spec.fault_marker is not None:
            _die_once(self.spec.fault_marker)
        return self.runner.run_batch(self.model, batch)


def _die_once(marker: str) -> None:
    """Fault injection for tests: the first worker to create `marker` exits at once, as a crashed
    process would (no exception, no clean-up); every later call goes on."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)
