"""The scheduler: one thread per loaded model that runs every graph and every decode step for all
of the model's callers (continuous batching).

    callers ──submit──► bounded queue ──► prefill (one request at a time, in chunks) ──┐
                                                                                        ▼
                 results ◄── select_step (one C++ call, all rows) ◄── one decode step for
                                                                       every live request

Each iteration of the loop:
  1. drops cancelled requests (their KV caches go with them) and takes queued requests while
     fewer than `max_active` are in flight;
  2. advances the prefill at the head of the prefill queue: one image through the vision graph,
     or `prefill_chunk_layers` decoder-layer boundaries of its prompt rows (the whole prefill at
     once when no other request is decoding);
  3. runs one decode step: the next row of every live sequence (all requests, beams included) goes
     through each decoder graph in ONE call per layer boundary, attention goes through one
     _native.attention_plan call per layer (each request on its own cache), and one
     _native.select_step call chooses the tokens of every row, including the first token of the
     requests whose prefill just ended.
So a request arriving while others decode joins the running batch at the next step boundary, and
the Python -> C++ calls per step do not grow with the number of live requests.

Exactness: a request's result is what it gives alone. Its prefill runs in its own graph calls
(the same calls whatever else is running, however they are interleaved); its images go through
the vision graph one image per call; decode rows of several requests share graph calls, whose
rows are independent (row i of a call depends on input row i only; calls get at least two rows,
see PaliGemma.run_rows), and each request's attention and token selection touch only its own
cache and state.

Failures: an error in a request's own work (vision, prefill, its decoder) fails that request alone.
An error inside a shared decode step fails the requests of that step; the scheduler goes on.
"""
from __future__ import annotations

import threading
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import _native
from .image_cache import FeatureCache
from .request import (QueueFullError, Request, RequestHandle, RequestStats, SchedulerClosed, StepTimes,
                      _Channel, now)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import GenerationResult, PaliGemma


@dataclass(frozen=True)
class SchedulerConfig:
    """max_queue: requests waiting to start; submit raises QueueFullError beyond it.
    max_active: requests in prefill or decode at once (each holds its own KV cache).
    prefill_chunk_layers: decoder-layer boundaries of a prefill per loop iteration while other
      requests decode (None: a quarter of them, rounded up, so a prefill is spread over 4 steps).
    image_cache_bytes: bound of the image-feature LRU cache (0: off)."""
    max_queue: int = 64
    max_active: int = 16
    prefill_chunk_layers: int | None = None
    image_cache_bytes: int = 256 << 20

    def __post_init__(self):
        for name in ("max_queue", "max_active"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        c = self.prefill_chunk_layers
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise ValueError(f"prefill_chunk_layers must be an integer >= 1 or None, got {c!r}")


@dataclass(frozen=True)
class SchedulerState:
    """A snapshot of the scheduler (Scheduler.state())."""
    queued: int
    prefilling: int
    decoding: int
    kv_cache_bytes: int              # KV caches of the requests in flight
    image_cache_bytes: int
    image_cache_entries: int
    thread_alive: bool


@dataclass(eq=False)
class _Live:
    """One request in the scheduler: its inputs and everything it changes (its KV cache, its
    decode state, its prefill progress, its timings). Only the scheduler thread touches it."""
    request: Request
    channel: _Channel
    t_call: float                            # the caller's call began (preprocessing included)
    t_submit: float
    stats: RequestStats = field(default_factory=RequestStats)
    t_taken: float = 0.0
    t_vision: float = 0.0
    t_prefill: float = 0.0
    t_first: float = 0.0
    features: dict = field(default_factory=dict)   # image key -> features [P, D]
    cache: object = None                     # _native.KVCache
    hidden: np.ndarray | None = None         # prefill rows between boundaries [rows, D]
    attn: np.ndarray | None = None
    plan: object = None                      # _native.AttentionPlan of the prefill rows
    boundary: int = 0                        # next decoder boundary of the prefill
    decoder: object = None                   # _native.Decoder once the prefill is done

    @property
    def images_left(self) -> list:
        seen, out = set(self.features), []
        for p in self.request.prompts:
            for img in p.images:
                if img.key not in seen:
                    seen.add(img.key)
                    out.append(img)
        return out


class Scheduler:
    """Runs all requests of one model on one thread (see the module docstring).

    submit(request, t_call) -> RequestHandle: never blocks; raises QueueFullError when max_queue
    requests are waiting, SchedulerClosed after close(). close(): fails what is queued or running
    with SchedulerClosed and joins the thread. The thread starts on the first submit; it holds
    the model only weakly, and stops when the model is garbage collected.
    """

    def __init__(self, model: "PaliGemma", config: SchedulerConfig, image_cache: FeatureCache):
        self.config = config
        self.image_cache = image_cache
        self._model_ref = weakref.ref(model)
        n_layers = model.config.text.num_hidden_layers
        self._chunk = config.prefill_chunk_layers or -(-(n_layers + 1) // 4)
        self._cond = threading.Condition()
        self._queue: deque[_Live] = deque()
        self._prefilling: deque[_Live] = deque()
        self._ready: list[_Live] = []          # prefill done, first token not chosen yet
        self._decoding: list[_Live] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._crashed: BaseException | None = None

    # ------------------------------------------------------------------ caller side
    def submit(self, request: Request, t_call: float) -> RequestHandle:
        channel = _Channel(len(request.prompts))
        live = _Live(request, channel, t_call, now())
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the model was closed; load it again to send requests")
            if self._crashed is not None:
                raise SchedulerClosed(f"the model's scheduler stopped on an internal error ({self._crashed!r}); "
                                      "load the model again") from self._crashed
            if len(self._queue) >= self.config.max_queue:
                raise QueueFullError(f"the model's request queue is full ({self.config.max_queue} requests "
                                     "waiting); retry later, or load the model with a larger max_queue "
                                     "(engine.load(..., serving=SchedulerConfig(max_queue=N)))")
            self._queue.append(live)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="paligemma-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return RequestHandle(channel, request.batched)

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def state(self) -> SchedulerState:
        with self._cond:                     # the scheduler thread moves requests under this lock
            live = list(self._prefilling) + self._ready + self._decoding
            queued, prefilling = len(self._queue), len(self._prefilling)
            decoding = len(self._ready) + len(self._decoding)
        caches = [x.cache for x in live]
        return SchedulerState(
            queued=queued, prefilling=prefilling, decoding=decoding,
            kv_cache_bytes=sum(c.nbytes for c in caches if c is not None),
            image_cache_bytes=self.image_cache.nbytes, image_cache_entries=len(self.image_cache),
            thread_alive=self._thread is not None and self._thread.is_alive())

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._busy():
                        self._cond.wait()
                    if self._closed:
                        return
                    self._drop_cancelled()
                    while self._queue and self._active() < self.config.max_active:
                        live = self._queue.popleft()
                        live.t_taken = now()
                        live.stats.queue_s = live.t_taken - live.t_submit
                        self._prefilling.append(live)
                model = self._model_ref()
                if model is None:
                    return
                self._iteration(model)
                del model
        except BaseException as e:   # a bug in the loop itself: fail everyone, refuse new work
            self._crashed = e
            traceback.print_exc()
        finally:
            with self._cond:
                self._closed = True
                everyone = list(self._queue) + list(self._prefilling) + self._ready + self._decoding
                self._queue.clear()
                self._prefilling.clear()
                self._ready, self._decoding = [], []
            for live in everyone:
                self._fail(live, SchedulerClosed("the model was closed before this request finished; "
                                                 "load it again and resend the request"))

    def _busy(self) -> bool:
        return bool(self._queue or self._prefilling or self._ready or self._decoding)

    def _active(self) -> int:
        return len(self._prefilling) + len(self._ready) + len(self._decoding)

    def _drop_cancelled(self) -> None:
        """Finish the cancelled requests with what they have; their caches are released here."""
        for group in (self._queue, self._prefilling):
            for live in [x for x in group if x.channel.cancel_requested]:
                group.remove(live)
                self._finish(live, None)
        for group in (self._ready, self._decoding):
            keep = [x for x in group if not x.channel.cancel_requested]
            for live in group:
                if live.channel.cancel_requested:
                    self._finish(live, live.decoder.results())
            group[:] = keep

    def _iteration(self, model: "PaliGemma") -> None:
        if self._prefilling:
            live = self._prefilling[0]
            others_decoding = bool(self._decoding or self._ready)
            try:
                done = self._prefill_some(model, live, whole=not others_decoding)
            except Exception as e:      # this request's own work: it fails alone
                with self._cond:
                    self._prefilling.popleft()
                self._fail(live, e)
            else:
                if done:
                    with self._cond:
                        self._prefilling.popleft()
                        self._ready.append(live)
        if self._decoding or self._ready:
            self._decode_step(model)

    # ------------------------------------------------------------------ prefill
    def _prefill_some(self, model: "PaliGemma", live: _Live, whole: bool) -> bool:
        """Advance `live`'s prefill by one chunk (all of it if `whole`); True when it is done.
        A chunk is one vision-graph call (an image not in the cache) or `self._chunk` decoder
        boundaries of the prompt rows."""
        live.stats.prefill_chunks += 1
        times = live.stats.prefill
        if live.hidden is None:                      # images first, then the prompt rows
            for img in live.images_left:
                live.stats.images += 1
                feats = self.image_cache.get(img.key)
                if feats is not None:
                    live.stats.images_cached += 1
                    live.features[img.key] = feats
                    continue
                feats = model.encode_image(img.pixel_values, times)
                self.image_cache.put(img.key, feats)
                live.features[img.key] = feats
                if not whole and live.images_left:
                    return False                     # one vision call per iteration while others decode
            live.t_vision = now()
            self._start_prefill(model, live)
        n_bounds = model.config.text.num_hidden_layers + 1
        stop = n_bounds if whole else min(n_bounds, live.boundary + self._chunk)
        live.hidden, live.attn = model.run_boundaries(live.hidden, live.attn, live.plan, live.boundary, stop,
                                                      times)
        live.boundary = stop
        if stop < n_bounds:
            return False
        last_rows, row = [], 0
        for p in live.request.prompts:
            row += len(p.input_ids)
            last_rows.append(row - 1)
        first_logits = model.logits(live.hidden[last_rows], times)             # [prompts, V]
        s = live.request.settings
        prompts = live.request.prompts
        live.decoder = _native.Decoder(
            live.cache, first_logits, [p.input_ids.tolist() for p in prompts], [len(p.input_ids) for p in prompts],
            [i * s.num_beams + j for i in range(len(prompts)) for j in range(s.num_beams)], **s.decoder_kwargs())
        live.hidden = live.attn = live.plan = None
        live.t_prefill = now()
        return True

    def _start_prefill(self, model: "PaliGemma", live: _Live) -> None:
        """The request's KV cache, its prompt rows (embeddings with image features) and their plan."""
        prompts, nb = live.request.prompts, live.request.settings.num_beams
        live.cache = model.new_cache(len(prompts) * nb, min(model.max_context, live.request.capacity))
        plan = _native.AttentionPlan()
        rows = []
        for i, p in enumerate(prompts):
            slot = i * nb
            live.cache.set_prefix_length(slot, p.prefix_length)
            feats = [live.features[img.key] for img in p.images]
            rows.append(model.prompt_rows(p.input_ids, np.stack(feats) if feats else None))
            plan.add(live.cache, [slot], np.arange(len(p.input_ids), dtype=np.int32))
        live.hidden = rows[0] if len(rows) == 1 else np.concatenate(rows)
        live.attn = None
        live.plan = plan
        live.boundary = 0

    # ------------------------------------------------------------------ decode
    def _decode_step(self, model: "PaliGemma") -> None:
        started, new = self._decoding, self._ready
        everyone = started + new
        t0 = now()
        times = StepTimes()
        n_rows = 0
        try:
            logits = None
            if started:
                rows = _native.decode_rows([x.decoder for x in started])
                n_rows = len(rows.tokens)
                hidden = model.embed(rows.tokens)
                hidden, _ = model.run_boundaries(hidden, None, rows.plan, 0, model.config.text.num_hidden_layers + 1,
                                                 times)
                logits = model.logits(hidden, times)
            t_sel = now()
            sel = _native.select_step([x.decoder for x in everyone], logits)
            times.select_s += now() - t_sel
        except Exception as e:         # a shared step: its requests fail, the scheduler goes on
            with self._cond:
                self._decoding, self._ready = [], []
            for live in everyone:
                self._fail(live, e)
            return
        t_end = now()
        step_s = t_end - t0
        keep, finished = [], []
        acc, acc_tokens, acc_seqs, done = sel.accepted, sel.accepted_tokens, sel.accepted_sequences, sel.done
        offset = 0
        for i, live in enumerate(everyone):
            if i < len(started):                 # it fed rows to this step
                st = live.stats
                st.decode_steps += 1
                st.decode_rows += n_rows
                st.decode_step_s += step_s
                st.decode.add(times)
            else:                                # its first tokens: chosen from its prefill logits
                live.t_first = t_end
            n = int(acc[i])
            if n:
                ch = live.channel
                seqs = acc_seqs[offset:offset + n].tolist()
                toks = acc_tokens[offset:offset + n].tolist()
                with ch.cond:
                    for seq, tok in zip(seqs, toks):
                        ch.tokens[seq].append(tok)
                    ch.cond.notify_all()
                offset += n
            (finished if done[i] else keep).append(live)
        with self._cond:
            self._decoding, self._ready = keep, []
        # Handed over only now: a caller woken by its result sees serving_state() without it.
        for live in finished:
            self._finish(live, live.decoder.results())

    # ------------------------------------------------------------------ results
    def _finish(self, live: _Live, results: list[dict] | None) -> None:
        """Resolve the handle with results (None or a cancelled request: what it has so far)."""
        from ..model import GenerationResult
        model = self._model_ref()
        t_end = now()
        cancelled = live.channel.cancel_requested
        n = len(live.request.prompts)
        if results is None:
            results = [{"tokens": [], "finish_reason": "cancelled", "score": None} for _ in range(n)]
        t_vision = live.t_vision or t_end
        t_prefill = live.t_prefill or t_end
        first = live.t_first or t_end
        out = []
        for r in results:
            tokens = [int(t) for t in r["tokens"]]
            reason = "cancelled" if cancelled else r["finish_reason"]
            decode_s = t_end - first
            timings = {"image_encode": t_vision - live.t_call, "prefill": t_prefill - t_vision,
                       "first_token": first - live.t_call, "decode": decode_s, "total": t_end - live.t_call,
                       "new_tokens": len(tokens),
                       "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else None,
                       "load": model.load_seconds if model is not None else None,
                       "queue": live.stats.queue_s}
            text = model.tokenizer.decode(tokens) if model is not None else ""
            out.append(GenerationResult(text, tokens, reason, r["score"] if not cancelled else None, timings,
                                        live.stats))
        self._hand_over(live, results=out)

    def _fail(self, live: _Live, error: BaseException) -> None:
        self._hand_over(live, error=error)

    def _hand_over(self, live: _Live, *, results: list | None = None, error: BaseException | None = None) -> None:
        """Free the request's cache and hand its results (or its error) to the caller."""
        self._release(live)
        ch = live.channel
        with ch.cond:
            ch.results, ch.error = results, error
            ch.finished = True
            ch.cond.notify_all()

    @staticmethod
    def _release(live: _Live) -> None:
        live.decoder = live.cache = live.plan = live.hidden = live.attn = None
        live.features = {}
