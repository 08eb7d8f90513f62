"""What a batch job is: the task every row runs (TaskSpec), where rows come from and go
(JobSpec), and what a worker needs to load its model (WorkerSpec). Plain frozen dataclasses:
they travel to Ray workers by pickling."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineError
from ..runtime import DEFAULT_BACKEND

TASKS = ("caption", "answer", "ocr", "detect", "segment", "run")
OUTPUT_FORMATS = (".parquet", ".jsonl")


class BatchError(EngineError, ValueError):
    """A batch job cannot start: bad input, output or options. The message says what to change."""


@dataclass(frozen=True)
class TaskSpec:
    """The task every row runs and how it decodes. `prompt` is built from these by `prompt_text`."""
    task: str
    lang: str = "en"
    question: str | None = None          # answer
    labels: str | None = None            # detect, segment: "cat ; dog"
    prompt: str | None = None            # run: sent as is
    max_new_tokens: int | None = None    # None: the task's default, capped to the context
    num_beams: int = 1

    def prompt_text(self) -> str:
        """The model prompt; raises BatchError when the task's option is missing or bad."""
        from .. import tasks
        try:
            if self.task == "caption":
                return tasks.caption_prompt(self.lang)
            if self.task == "answer":
                if self.question is None:
                    raise BatchError("answer needs --question, e.g. --question 'how many shapes are there'")
                return tasks.answer_prompt(self.question, self.lang)
            if self.task == "ocr":
                return tasks.ocr_prompt()
            if self.task in ("detect", "segment"):
                if self.labels is None:
                    raise BatchError(f"{self.task} needs --labels, e.g. --labels 'cat ; dog'")
                return (tasks.detect_prompt if self.task == "detect" else tasks.segment_prompt)(self.labels)
            if self.task == "run":
                if not self.prompt or not self.prompt.strip():
                    raise BatchError("run needs a non-empty --prompt, e.g. --prompt 'caption de'")
                return self.prompt
        except BatchError:
            raise
        except ValueError as e:
            raise BatchError(str(e)) from None
        raise BatchError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class WorkerSpec:
    """What one Ray worker needs: the exported artifact (by path, see README "Batch jobs on Ray"),
    its backend and threads, the task, and how many rows it may have in flight."""
    artifact_dir: str
    backend: str
    threads: int
    task: TaskSpec
    max_in_flight: int
    fault_marker: str | None = None      # tests: the first worker to create this file dies (os._exit)


@dataclass(frozen=True)
class JobSpec:
    """One `python -m engine.batch` run."""
    task: TaskSpec
    input: str                           # DIR, GLOB, FILE.parquet or FILE.jsonl
    output: str                          # OUT.parquet or OUT.jsonl
    model: str | None = None             # artifact or HF checkpoint dir; None: the default model
    backend: str = DEFAULT_BACKEND
    weights: str = "int8"
    workers: int | None = None           # None: as many as the cluster's CPUs allow
    threads_per_worker: int | None = None
    ray_address: str | None = None       # None: a local Ray for this job
    path_column: str | None = None       # tables: the column with image paths ...
    bytes_column: str | None = None      # ... or with encoded image bytes
    id_column: str | None = None         # tables: the row id (default: the path, else the row number)
    batch_size: int = 16                 # rows per Ray Data batch, in flight together in one worker
    retry_errors: bool = False           # resume: run again the rows that ended with an error
    progress: bool | None = None         # None: a bar when stderr is a terminal
    fault_marker: str | None = None      # tests only (WorkerSpec.fault_marker)
    interrupt_after_rows: int | None = None   # tests only: the driver stops (KeyboardInterrupt) past this many rows

    @property
    def output_format(self) -> str:
        return Path(self.output).suffix.lower()

    def check(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise BatchError(f"--output {self.output}: name a .parquet or .jsonl file")
        if self.task.task not in TASKS:
            raise BatchError(f"unknown task {self.task.task!r}; use one of {', '.join(TASKS)}")
        for name in ("workers", "threads_per_worker"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise BatchError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.batch_size < 1:
            raise BatchError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.path_column and self.bytes_column:
            raise BatchError("give either --path-column or --bytes-column, not both")
        self.task.prompt_text()
