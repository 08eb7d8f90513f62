"""One worker's work on one batch of input rows, and the output row format.

Every row of a batch is read, decoded and submitted to the model (PaliGemma.submit) before any
result is awaited, so the rows of a batch are decoded together by the model's scheduler.
A row that fails (unreadable or undecodable image, a prompt that overflows the context) gets its
error on its own row; the other rows are unaffected.

Output rows (OUTPUT_SCHEMA; the same fields in parquet and JSON lines):
    index, id, path             the input row (sources.py)
    task, prompt                what ran
    text                        the generated text (tasks: stripped, as engine.tasks returns it)
    finish_reason, new_tokens   "eos" / "stop" / "length"; tokens generated
    width, height               the original image size (after EXIF orientation)
    labels, boxes               detect / segment: boxes [x0, y0, x1, y1] in pixels of the original image
    masks                       segment: COCO RLE {"size": [h, w], "counts"} (engine/rle.py), null
                                when the model has no mask decoder; detect and other tasks: null
    read_s, queue_s, first_token_s, total_s    seconds: image read + decode; waiting for the
                                scheduler; submit -> first token; submit -> result
    worker                      host:pid of the worker that ran the row
    error                       null, or "ErrorType: message" (then the result fields are null)
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import pyarrow as pa

from .. import rle, tasks
from ..processor import load_image
from .spec import TaskSpec

RLE_TYPE = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.list_(pa.int64()))])
OUTPUT_SCHEMA = pa.schema([
    ("index", pa.int64()), ("id", pa.string()), ("path", pa.string()),
    ("task", pa.string()), ("prompt", pa.string()),
    ("text", pa.string()), ("finish_reason", pa.string()), ("new_tokens", pa.int64()),
    ("width", pa.int64()), ("height", pa.int64()),
    ("labels", pa.list_(pa.string())), ("boxes", pa.list_(pa.list_(pa.float64()))), ("masks", pa.list_(RLE_TYPE)),
    ("read_s", pa.float64()), ("queue_s", pa.float64()), ("first_token_s", pa.float64()), ("total_s", pa.float64()),
    ("worker", pa.string()), ("error", pa.string()),
])


@dataclass(frozen=True)
class TaskRunner:
    """A task bound to a loaded model: its prompt and max_new_tokens, computed once per worker."""
    task: TaskSpec
    prompt: str
    max_new_tokens: int
    worker: str

    @classmethod
    def for_model(cls, model, task: TaskSpec) -> "TaskRunner":
        prompt = task.prompt_text()
        if task.max_new_tokens is not None:
            max_new = task.max_new_tokens
        else:       # the task's default capped to the context, as engine.tasks and the CLI do
            n_prompt = model.config.num_image_tokens + 1 + len(model.tokenizer.encode(prompt + "\n"))
            default = tasks.DEFAULT_MAX_NEW_TOKENS.get(task.task, 64)
            max_new = max(1, min(default, model.max_context - n_prompt))
        return cls(task, prompt, max_new, f"{socket.gethostname()}:{os.getpid()}")

    def run_batch(self, model, batch: pa.Table) -> pa.Table:
        """Input rows (sources.INPUT_SCHEMA) -> output rows (OUTPUT_SCHEMA), in the same order."""
        started = []
        for row in batch.select(["index", "id", "path", "data"]).to_pylist():
            started.append(self._start(model, row))
        rows = [self._finish(model, *s) for s in started]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)

    def _start(self, model, row: dict):
        """Read the image and submit the row; (row, size, handle, read_s, error)."""
        t0 = time.perf_counter()
        try:
            image = load_image(row["data"] if row["data"] is not None else row["path"])
            read_s = time.perf_counter() - t0
            handle = model.submit(image, self.prompt, self.max_new_tokens, num_beams=self.task.num_beams)
            return row, image.size, handle, read_s, None
        except Exception as e:  # noqa: BLE001 - a bad row is recorded on its row, never fatal
            return row, None, None, time.perf_counter() - t0, e

    def _finish(self, model, row: dict, size, handle, read_s: float, error: BaseException | None) -> dict:
        out = {"index": row["index"], "id": row["id"], "path": row["path"], "task": self.task.task,
               "prompt": self.prompt, "read_s": read_s, "worker": self.worker}
        if error is None:
            try:
                out.update(self._result(model, handle.result(), size))
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            out["error"] = f"{type(error).__name__}: {error}"
        return out

    def _result(self, model, result, size) -> dict:
        width, height = size
        text = result.text
        if self.task.task != "run":            # as engine.tasks: drop an echoed prompt, strip
            echo = self.prompt + "\n"
            text = (text[len(echo):] if text.startswith(echo) else text).strip()
        t = result.timings
        out = {"text": text, "finish_reason": result.finish_reason, "new_tokens": len(result.tokens),
               "width": width, "height": height, "queue_s": t.get("queue"), "first_token_s": t.get("first_token"),
               "total_s": t.get("total")}
        if self.task.task == "detect":
            found = tasks.parse_detections(result.text, width, height)
            out.update(labels=[d.label for d in found], boxes=[list(d.box) for d in found])
        elif self.task.task == "segment":
            found = tasks.parse_segments(result.text, width, height, model.seg_decoder)
            out.update(labels=[s.label for s in found], boxes=[list(s.box) for s in found],
                       masks=None if model.seg_decoder is None else [rle.encode(s.mask) for s in found])
        return out
