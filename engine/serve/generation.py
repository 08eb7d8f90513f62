"""From an HTTP request to the serving core and back: submit, stream, stop strings, cancel.

A `Job` is what a route asks for (images, prompt, decoding options). `Generations` (one per app)
submits it with the model's public API (PaliGemma.submit -> RequestHandle) and follows it on a
worker thread of the app's own pool (RequestHandle.tokens is blocking); text pieces cross to the
event loop through an asyncio queue. Cancelling a `Run` (the client went away, a stop string
matched) calls RequestHandle.cancel(), which frees the request's place in the batch.

Errors become ApiError: a full queue 429 (Retry-After), bad options or a prompt over the
context 400 (with the token counts), a closed model 503.
"""
from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

from .. import tasks
from ..serving import QueueFullError, RequestHandle, SchedulerClosed, TextStream
from .errors import ApiError
from .metrics import Metrics

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class Job:
    """One generation as a route asks for it. temperature 0: greedy."""
    images: tuple                         # RGB PIL images, in prompt order
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    endpoint: str = ""


@dataclass
class Outcome:
    """What came back: one text per choice, the tokens generated, the engine's timings."""
    texts: list[str]
    finish_reasons: list[str]             # OpenAI's: "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict = field(default_factory=dict)
    raw_texts: list[str] = field(default_factory=list)   # the model's text (loc / seg tokens kept)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "timings": self.timings}


class StopMatcher:
    """Cuts a stream of text pieces at the first stop string. Holds back the tail that could be
    the start of a stop string, so that no stop text is ever sent."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can go out now ('' after a stop)."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = min(self.hold, len(self.pending))
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def cut(self, text: str) -> tuple[str, bool]:
        """A whole text cut at its first stop string; (text, whether one matched)."""
        idx = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[:min(idx)], True) if idx else (text, False)


class Run:
    """One submitted job followed on a worker thread: `pieces()` yields its text as it comes
    (stop strings applied), then `outcome` is set. cancel() stops the generation."""

    def __init__(self, owner: "Generations", job: Job, handle: RequestHandle, prompt_tokens: int):
        self._owner = owner
        self.job = job
        self.handle = handle
        self.prompt_tokens = prompt_tokens
        self.outcome: Outcome | None = None

    def cancel(self) -> None:
        self.handle.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces of choice 0 (n must be 1). Sets self.outcome at the end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = StopMatcher(self.job.stop)
        tokenizer = self._owner.model.tokenizer

        def put(kind, value):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def follow():                      # worker thread: the blocking side of the handle
            try:
                text = TextStream(tokenizer)
                for new in self.handle.tokens():
                    for tok in new:         # one token at a time, as engine.serving.follow_stream
                        out = stop.feed(text.add([tok]))
                        if out:
                            put("piece", out)
                        if stop.stopped:
                            self.handle.cancel()
                            break
                    if stop.stopped:
                        break
                result = self.handle.result()
                if not stop.stopped and result.finish_reason != "cancelled":
                    tail = stop.feed(text.flush(result.tokens)) + stop.flush()
                    if tail:
                        put("piece", tail)
                put("done", result)
            except BaseException as e:      # noqa: BLE001 - handed to the event loop
                put("error", e)

        future = loop.run_in_executor(self._owner.executor, follow)
        try:
            sent = []
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    sent.append(value)
                    yield value
                elif kind == "error":
                    raise self._owner.api_error(value)
                else:
                    result = value
                    reason = "stop" if stop.stopped else FINISH_REASONS[result.finish_reason]
                    text = "".join(sent) if stop.stopped else result.text
                    self.outcome = Outcome([text], [reason], self.prompt_tokens, len(result.tokens),
                                           result.timings, [result.text])
                    self._owner.record(self.job, self.outcome)
                    return
        finally:
            if self.outcome is None:          # the consumer left early: stop the generation
                self.handle.cancel()
            if not future.done():             # the worker ends once the scheduler has dropped the request
                await asyncio.wrap_future(future)

    async def wait(self, is_disconnected=None, poll_s: float = 0.25) -> Outcome:
        """The whole outcome (any n). `is_disconnected`: an async callable polled while waiting;
        when it says True the generation is cancelled and ApiError 499 is raised."""
        if self.job.n == 1:
            task = asyncio.ensure_future(self._collect())
        else:
            task = asyncio.ensure_future(self._wait_batch())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll_s)
                if done:
                    return task.result()
                if is_disconnected is not None and await is_disconnected():
                    self.cancel()
                    await asyncio.wait({task})
                    raise ApiError(499, "the client closed the connection; the generation was cancelled",
                                   code="client_closed")
        finally:
            if not task.done():
                self.cancel()
                task.cancel()

    async def _collect(self) -> Outcome:
        async for _ in self.pieces():
            pass
        return self.outcome

    async def _wait_batch(self) -> Outcome:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._owner.executor, self.handle.result)
        except BaseException as e:  # noqa: BLE001
            raise self._owner.api_error(e) from None
        stop = StopMatcher(self.job.stop)
        texts, reasons = [], []
        for r in results:
            text, hit = stop.cut(r.text)
            texts.append(text)
            reasons.append("stop" if hit else FINISH_REASONS[r.finish_reason])
        timings = dict(results[0].timings)
        outcome = Outcome(texts, reasons, self.prompt_tokens * len(results), sum(len(r.tokens) for r in results),
                          timings, [r.text for r in results])
        self._owner.record(self.job, outcome)
        return outcome


class Generations:
    """The app's door to the model: counts prompts, checks the context, submits, records metrics."""

    def __init__(self, model, executor: ThreadPoolExecutor, metrics: Metrics):
        self.model = model
        self.executor = executor
        self.metrics = metrics

    def prompt_tokens(self, n_images: int, prompt: str) -> int:
        """Tokens of one prompt as the processor builds it: image tokens, <bos>, prompt, "\\n"."""
        return n_images * self.model.config.num_image_tokens + 1 + len(self.model.tokenizer.encode(prompt + "\n"))

    def default_max_tokens(self, task: str, n_prompt: int) -> int:
        """The task's default (engine.tasks.DEFAULT_MAX_NEW_TOKENS, 64 for a free prompt), capped
        to the room left in the context (as engine.tasks does)."""
        default = tasks.DEFAULT_MAX_NEW_TOKENS.get(task, 64)
        return max(1, min(default, self.model.max_context - n_prompt))

    def start(self, job: Job) -> Run:
        n_prompt = self.prompt_tokens(len(job.images), job.prompt)
        context = self.model.max_context
        if n_prompt + job.max_new_tokens > context:
            raise ApiError(400, f"the prompt takes {n_prompt} tokens ({len(job.images)} image(s) x "
                                f"{self.model.config.num_image_tokens} image tokens + text) and max_tokens is "
                                f"{job.max_new_tokens}: {n_prompt + job.max_new_tokens} tokens exceed the model's "
                                f"context of {context}; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded",
                           details={"prompt_tokens": n_prompt, "max_tokens": job.max_new_tokens,
                                    "context_length": context})
        image = list(job.images) if len(job.images) > 1 else job.images[0]
        kwargs = dict(do_sample=job.temperature > 0, temperature=job.temperature if job.temperature > 0 else 1.0,
                      top_p=job.top_p, top_k=job.top_k, seed=job.seed, ignore_eos=job.ignore_eos)
        try:
            if job.n == 1:
                handle = self.model.submit(image, job.prompt, job.max_new_tokens, **kwargs)
            else:
                handle = self.model.submit([image] * job.n, [job.prompt] * job.n, job.max_new_tokens, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise self.api_error(e) from None
        return Run(self, job, handle, n_prompt)

    def api_error(self, e: BaseException) -> ApiError:
        if isinstance(e, ApiError):
            return e
        if isinstance(e, QueueFullError):
            retry = max(1, math.ceil(self.metrics.recent_latency_s))
            return ApiError(429, f"the server is busy: {e}; retry after {retry} s", code="queue_full",
                            headers={"Retry-After": str(retry)})
        if isinstance(e, SchedulerClosed):
            return ApiError(503, f"the model is not serving: {e}", code="model_closed",
                            headers={"Retry-After": "5"})
        if isinstance(e, ValueError):           # engine errors on bad options are ValueErrors
            return ApiError(400, str(e), code="invalid_value")
        return ApiError(500, f"internal error while generating: {type(e).__name__}: {e}", code="internal_error")

    def record(self, job: Job, outcome: Outcome) -> None:
        self.metrics.generation(job.endpoint, outcome.prompt_tokens, outcome.completion_tokens,
                                outcome.timings.get("first_token"))
