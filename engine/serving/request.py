"""What one request is, and how its caller follows it.

    GenerationSettings   how to decode (frozen, validated in the caller's thread)
    PreparedPrompt       one prompt after the processor: ids, prefix length, its images
    ImageInput           one image's pixels and the key of its features (engine/serving/image_cache.py)
    Request              prompts + settings: what the caller submits
    RequestStats         where one request's time went (comes back with its results)
    RequestHandle        the caller's side: result(), cancel(), tokens as they come
    TextStream           token ids -> text pieces, holding back an unfinished UTF-8 character

The scheduler thread and the caller share only a `_Channel` (a lock, a condition and the
request's outcome). The handle owns the channel's consumer side: when the handle is garbage
collected (the consumer went away), the request is cancelled.
"""
from __future__ import annotations

import numbers
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..model import GenerationResult
    from ..tokenizer import Tokenizer


class QueueFullError(RuntimeError):
    """The model's request queue is full: retry later, or load the model with a larger queue
    (engine.load(..., serving=SchedulerConfig(max_queue=N)))."""


class SchedulerClosed(RuntimeError):
    """The model was closed: it takes no more requests."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationSettings:
    """How one request decodes; the options of PaliGemma.generate (HF semantics).
    Checked on creation, in the caller's thread, so that bad options fail before any compute."""
    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_ids: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        def fail(message):
            raise ValueError(message)

        if not isinstance(self.max_new_tokens, numbers.Integral) or self.max_new_tokens < 1:
            fail(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.num_beams, numbers.Integral) or self.num_beams < 1:
            fail(f"num_beams must be >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.do_sample:
            fail("beam sampling (num_beams > 1 with do_sample=True) is not supported; use do_sample=False "
                 "for beam search, or num_beams=1 to sample")
        if self.do_sample and not (self.temperature > 0 and np.isfinite(self.temperature)):
            fail(f"temperature must be a finite number > 0 when do_sample=True, got {self.temperature!r}; "
                 "for deterministic output use do_sample=False (greedy)")
        if not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            fail(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            fail(f"repetition_penalty must be a finite number > 0 (1 disables it), got {self.repetition_penalty!r}")
        if not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            fail(f"seed must be >= 0 (an integer), got {self.seed!r}")
        if not np.isfinite(self.length_penalty):
            fail(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            fail(f"early_stopping must be True, False or \"never\" (as in transformers); got {self.early_stopping!r}")

    def check_vocab(self, vocab_size: int) -> None:
        for name in ("eos_token_ids", "stop_token_ids"):
            for t in getattr(self, name):
                if not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
                    raise ValueError(f"{name} contains {t!r}, outside the vocabulary [0, {vocab_size}); "
                                     "pass token ids of the model's tokenizer")

    def decoder_kwargs(self) -> dict:
        """Keyword arguments of _native.Decoder."""
        return dict(max_new_tokens=int(self.max_new_tokens), do_sample=bool(self.do_sample),
                    temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
                    repetition_penalty=float(self.repetition_penalty), seed=int(self.seed),
                    num_beams=int(self.num_beams), length_penalty=float(self.length_penalty),
                    early_stopping=self.early_stopping, eos_token_ids=list(self.eos_token_ids),
                    stop_token_ids=list(self.stop_token_ids) or None)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its pixels [3, S, S] and the key of its features in the cache
    (sha256 of the pixels, shape and dtype, plus the model's identity)."""
    pixel_values: np.ndarray
    key: str


@dataclass(frozen=True)
class PreparedPrompt:
    """One prompt after the processor: ids [T] with `<image>` placeholders, the length of its
    bidirectional prefix (image tokens + prompt), and its images in placeholder order."""
    input_ids: np.ndarray
    prefix_length: int
    images: tuple[ImageInput, ...]


@dataclass(frozen=True)
class Request:
    """What a caller submits: one or more prompts decoded with the same settings. A batch of
    prompts equals running each alone (sampling: prompt b with seed + b)."""
    prompts: tuple[PreparedPrompt, ...]
    settings: GenerationSettings
    batched: bool = False             # the caller passed a list of prompts: result() is a list

    @property
    def capacity(self) -> int:
        """KV cache positions per slot: the longest prompt plus max_new_tokens."""
        return max(len(p.input_ids) for p in self.prompts) + self.settings.max_new_tokens


# --------------------------------------------------------------------------- stats
@dataclass
class StepTimes:
    """Seconds in graph runs and attention calls, and their counts."""
    vision_s: float = 0.0
    decoder_s: float = 0.0           # decoder_i graphs
    lm_head_s: float = 0.0
    attention_s: float = 0.0
    select_s: float = 0.0            # token selection (decode only)
    vision_calls: int = 0
    decoder_calls: int = 0
    lm_head_calls: int = 0
    attention_calls: int = 0

    def add_graph(self, graph: str, seconds: float) -> None:
        if graph == "vision":
            self.vision_s += seconds
            self.vision_calls += 1
        elif graph == "lm_head":
            self.lm_head_s += seconds
            self.lm_head_calls += 1
        else:
            self.decoder_s += seconds
            self.decoder_calls += 1

    def add(self, other: "StepTimes") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class RequestStats:
    """Where one request's time went. `prefill` counts this request's own graph runs and attention
    calls (vision included); `decode` the decode steps it took part in, whole (each step also
    served the other live requests: `decode_rows` is the sum of the rows of those steps)."""
    queue_s: float = 0.0              # submitted -> taken by the scheduler
    images: int = 0                   # images of the request
    images_cached: int = 0            # of which found in the image-feature cache
    prefill_chunks: int = 0           # scheduler iterations its prefill was spread over
    prefill: StepTimes = field(default_factory=StepTimes)
    decode_steps: int = 0
    decode_rows: int = 0
    decode_step_s: float = 0.0        # wall time of those steps
    decode: StepTimes = field(default_factory=StepTimes)


# --------------------------------------------------------------------------- caller side
class _Channel:
    """What the scheduler thread and the caller share for one request."""

    def __init__(self, n_sequences: int):
        self.cond = threading.Condition()
        self.tokens: list[list[int]] = [[] for _ in range(n_sequences)]   # accepted so far
        self.finished = False
        self.results: list[GenerationResult] | None = None
        self.error: BaseException | None = None
        self.cancel_requested = False

    def cancel(self) -> None:
        with self.cond:
            self.cancel_requested = True
            self.cond.notify_all()


class RequestHandle:
    """A submitted request (PaliGemma.submit). Thread-safe.

    result(timeout=None): wait and return the GenerationResult (a list for a batched request);
      raises the request's error, or TimeoutError. A cancelled request returns what it had:
      finish_reason "cancelled" and the tokens accepted so far (beams: none).
    cancel(): ask the scheduler to stop the request; its cache slots are freed before the next
      step. A request that already finished keeps its result.
    tokens(): yields lists of newly accepted token ids of sequence 0 as they come.
    Dropping the last reference to an unfinished handle cancels its request.
    """

    def __init__(self, channel: _Channel, batched: bool):
        self._channel = channel
        self._batched = batched
        self._finalizer = weakref.finalize(self, channel.cancel)   # the consumer went away

    def cancel(self) -> None:
        self._channel.cancel()

    def done(self) -> bool:
        return self._channel.finished

    @property
    def cancelled(self) -> bool:
        return self._channel.cancel_requested

    def result(self, timeout: float | None = None):
        ch = self._channel
        with ch.cond:
            if not ch.cond.wait_for(lambda: ch.finished, timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s; call result() again "
                                   "to keep waiting, or cancel()")
        if ch.error is not None:
            raise ch.error
        return ch.results if self._batched else ch.results[0]

    def tokens(self) -> Iterator[list[int]]:
        """New token ids of sequence 0 as they are accepted, until the request ends. Beam search
        accepts its tokens only at the end. Closing the generator early does not cancel."""
        ch, seen = self._channel, 0
        while True:
            with ch.cond:
                ch.cond.wait_for(lambda: len(ch.tokens[0]) > seen or ch.finished)
                new = ch.tokens[0][seen:]
                finished = ch.finished
            seen += len(new)
            if new:
                yield new
            if finished and seen >= len(ch.tokens[0]):
                return


class TextStream:
    """Turns token ids into text pieces whose concatenation is the final text: a piece is let out
    only once the decoded text ends outside a UTF-8 character (byte-fallback tokens)."""

    def __init__(self, tokenizer: "Tokenizer"):
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._emitted = ""

    def add(self, tokens: Sequence[int]) -> str:
        self._tokens.extend(int(t) for t in tokens)
        text = self._tokenizer.decode(self._tokens)
        if text.endswith("\ufffd"):          # maybe a UTF-8 sequence cut short: wait for its next byte
            return ""
        return self._take(text)

    def flush(self, final_tokens: Sequence[int]) -> str:
        """The text held back at the end (an unfinished UTF-8 sequence), given the final tokens."""
        return self._take(self._tokenizer.decode(list(final_tokens)))

    def _take(self, text: str) -> str:
        if len(text) > len(self._emitted) and text.startswith(self._emitted):
            piece = text[len(self._emitted):]
            self._emitted = text
            return piece
        return ""


def follow_stream(handle: RequestHandle, tokenizer: "Tokenizer", stream: Callable[[str], object]):
    """Calls stream(piece) in this thread for each text piece of `handle`'s sequence 0; a stream
    that returns False cancels the request. Returns the handle's result (finish_reason
    "cancelled" with the tokens so far when the stream stopped it)."""
    text = TextStream(tokenizer)
    for new in handle.tokens():
        # one token at a time: the pieces do not depend on how many tokens each wake-up brought
        if any(piece and stream(piece) is False for piece in map(text.add, ([t] for t in new))):
            handle.cancel()
            break
    result = handle.result()
    if result.finish_reason != "cancelled":
        tail = text.flush(result.tokens)
        if tail:
            stream(tail)
    return result


def now() -> float:
    return time.perf_counter()
