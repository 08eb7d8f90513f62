"""The PaliGemma model: shared read-only weights and graphs, and the calls that run requests.

    image(s) ─► processor ─► "vision" graph ─► image features ─┐     (one image per call, cached)
    prompt ──► tokenizer ──► ids ─► embedding table ────────────┤
                                                                ▼
        prefill: decoder_0 ─► attention ─► decoder_1 ─► … ─► decoder_L ─► lm_head (last rows)
        decode:  every live row of every request through the same graphs, one call per boundary

What a loaded model holds is read-only and shared by every caller: the compiled graphs, the
embedding table, tokenizer, processor, config and mask decoder, plus the model's own attention
thread pool and image-feature cache. Everything a request changes (its KV cache, its decode
state, its timings) lives in the serving core (engine/serving), whose scheduler thread runs all
graph calls of the model.

Thread safety: `generate`, `submit` and every task helper (caption, answer, ocr, detect, segment)
may be called from any number of threads at once, on both backends; concurrent requests are
batched together, and each result equals what the same call gives alone.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import _native
from .artifact import REEXPORT, ArtifactError, Manifest, load_manifest
from .config import PaliGemmaConfig
from .embedding import load_embedding, load_final_norm
from .processor import Processor
from .reference import rms_norm
from .runtime import DEFAULT_BACKEND, open_runner, row_blocks
from .runtime import native_decoder, native_vision
from .runtime.native_decoder import DECODER_MODES, NativeDecoder
from .serving.image_cache import FeatureCache, image_key
from .serving.request import (GenerationSettings, ImageInput, PreparedPrompt, Request, RequestHandle, RequestStats,
                              StepTimes, follow_stream, now)
from .serving.scheduler import Scheduler, SchedulerConfig, SchedulerState
from .tokenizer import Tokenizer

KV_DTYPES = ("f32", "f16", "int8")
QUANTIZED_WEIGHTS = ("int8", "int4", "fp8")
log = logging.getLogger("engine")


def resolve_kv_dtype(kv_dtype: str, weight_format: str | None) -> str:
    """The KV cache storage for `kv_dtype`: "auto" is f16 for quantized weights (int8, int4, fp8),
    f32 for float ones (fp32 / fp16 / bf16 artifacts stay transformers-exact). f16 keys and values
    round at 2^-11 relative, far below the weights' int8 rounding; they halve the cache (3B at 224
    px: 61 -> 31 MB per request, 448 px: 230 -> 115 MB) and the bytes each decode step's attention
    reads."""
    if kv_dtype == "auto":
        return "f16" if weight_format in QUANTIZED_WEIGHTS else "f32"
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be 'auto' or one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


@dataclass
class GenerationResult:
    """One generated sequence. `text` keeps loc and seg tokens; `tokens` excludes the prompt."""
    text: str
    tokens: list[int]
    finish_reason: str                   # "eos", "stop", "length" or "cancelled"
    score: float | None = None           # beam score (HF sequences_scores) with num_beams > 1
    timings: dict = field(default_factory=dict)   # seconds; see PaliGemma.generate
    stats: RequestStats | None = field(default=None, compare=False, repr=False)   # engine.serving.RequestStats

    def __str__(self) -> str:
        return self.text


class PaliGemma:
    """A loaded artifact on one backend. Build it with `engine.load(...)`.

    threads: the model's threads (each graph's intra-op threads and the model's own attention
    pool; None: one per core). serving: the scheduler's limits (engine.serving.SchedulerConfig:
    max_queue, max_active, prefill_chunk_layers, image_cache_bytes). lm_head: "auto" computes the
    LM head natively from the int8 embedding table when the artifact allows it (an int8 table of
    tied embeddings with final_norm.npy: no second copy of the 257k x D matrix in the runtime,
    and its graph is not loaded), else runs the lm_head graph; "graph" always runs the graph;
    "native" requires the native head. prepacked_cache, warm_up: see engine.runtime.open_runner.
    decoder: "auto" computes the decoder graphs in the C++ core where it was measured faster
    (onnxruntime backend, int8 or int4 artifact, AVX-512 VNNI without AMX, the amx level;
    engine/runtime/native_decoder.py),
    "graphs" always runs the backend's graphs, "native" requires the core (any CPU: AVX-512
    VNNI, AVX2 and NEON-sdot kernels, else the scalar twin). vision: the same choice for the vision
    graph (engine/runtime/native_vision.py): "auto" (the core where it was measured no slower:
    AVX-512 VNNI without AMX), "graph" or "native"."""

    def __init__(self, artifact_dir: str | Path, backend: str = DEFAULT_BACKEND, threads: int | None = None,
                 *, verify: bool = True, kv_dtype: str = "auto",
                 serving: SchedulerConfig | None = None, lm_head: str = "auto", prepacked_cache: bool = True,
                 warm_up: bool | str = True, decoder: str = "auto", vision: str = "auto"):
        t0 = time.perf_counter()
        if decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {', '.join(DECODER_MODES)}, got {decoder!r}")
        if vision not in native_vision.VISION_MODES:
            raise ValueError(f"vision must be one of {', '.join(native_vision.VISION_MODES)}, got {vision!r}")
        if lm_head not in ("auto", "graph", "native"):
            raise ValueError(f"lm_head must be 'auto', 'graph' or 'native', got {lm_head!r}")
        self.artifact_dir = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.artifact_dir, verify_checksums=verify)
        self.config: PaliGemmaConfig = self.manifest.config
        self.backend = backend
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.manifest.weights.get("format"))
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads
        emb = self.manifest.embedding
        # the final norm weight [D] when the LM head runs natively on the int8 table, else None
        self._final_norm = None if lm_head == "graph" else load_final_norm(self.artifact_dir, emb, self.config)
        if lm_head == "native" and self._final_norm is None:
            raise ArtifactError(f"{self.artifact_dir}: lm_head='native' needs an int8 embedding table with "
                                f"final_norm.npy (int8 / int4 / fp8 exports of tied-embedding checkpoints by "
                                f"this version); {REEXPORT}, or use lm_head='auto'")
        self._native_decoder: NativeDecoder | None = self._open_native(
            "decoder", decoder, backend, native_decoder, native_decoder.open_native_decoder, "native decoder")
        self._native_vision: native_vision.NativeVision | None = self._open_native(
            "vision", vision, backend, native_vision, native_vision.open_native_vision, "native vision tower")
        self._decoder_kind = "native" if self._native_decoder is not None else "graphs"
        self._vision_kind = "native" if self._native_vision is not None else "graph"
        # This model's threads for attention and the native decoder. With the native decoder they
        # run the whole step (~110 calls per token), so idle threads spin (ThreadPool's default,
        # 200 us) before sleeping (a wake-up costs 5-10 us on a VM; Zen 4: decoder part 74 -> 66 ms
        # per token); between graph runs they sleep at once, leaving the cores to the runtime's.
        n_threads = threads or os.cpu_count() or 1
        self._pool = (_native.ThreadPool(n_threads) if self._native_decoder is not None
                      else _native.ThreadPool(n_threads, spin_us=0))
        skip = ("lm_head",) if self._final_norm is not None else ()
        if self._native_decoder is not None:
            skip += tuple(self._native_decoder.boundaries)
        if self._native_vision is not None:
            skip += (native_vision.GRAPH,)
        self.runner = open_runner(backend, self.artifact_dir, self.manifest, threads, skip=skip,
                                  prepacked_cache=prepacked_cache, warm_up=warm_up)
        manifest_bytes = (self.artifact_dir / "manifest.json").read_bytes()
        # Who computed a cached image feature: the artifact's content, the backend and its settings,
        # and whether the graph or the core's vision tower ran (their features differ in the last bits).
        self.identity = hashlib.sha256(manifest_bytes + f"|{backend}|{getattr(self.runner, 'config', '')}"
                                       f"|vision={self.vision_kind}".encode()).hexdigest()
        self._embed_table, self._embed_scales = load_embedding(self.artifact_dir, emb, self.config)  # [V, D], [V]
        self._embed_scale = np.float32(emb.scale)
        tokenizer = Tokenizer(self.artifact_dir / self.manifest.tokenizer, self.config.image_token_index)
        v = self.config.vision
        self.processor = Processor(tokenizer, v.image_size, self.config.num_image_tokens,
                                   self.config.image_token_index, **self.manifest.preprocessing.processor_kwargs())
        self.tokenizer = tokenizer
        self._seg_lock = threading.Lock()
        t = self.config.text
        self._layer_windows = [t.layer_window(i) for i in range(t.num_hidden_layers)]
        serving = serving if serving is not None else SchedulerConfig()
        self.image_cache = FeatureCache(serving.image_cache_bytes)
        self._scheduler = Scheduler(self, serving, self.image_cache)
        weakref.finalize(self, self._scheduler.close)   # a model dropped without close()
        self.load_seconds = time.perf_counter() - t0

    def _open_native(self, option: str, mode: str, backend: str, module, open_fn, what: str):
        """The core's stand-in for the `option` graphs ("decoder": engine/runtime/native_decoder.py,
        "vision": native_vision.py) for mode "auto" / "native", or None (the backend's graphs run).
        `what` names the stand-in in a warning and an error."""
        if mode not in ("auto", "native") or (mode == "auto" and not module.enabled_by_env()):
            return None
        reason = module.unsupported_reason(backend, self.manifest)
        if reason is None and mode == "auto":
            reason = module.auto_declines()
        if reason is None:
            try:
                return open_fn(self.artifact_dir, self.manifest, self.config)
            except (OSError, ValueError) as e:
                reason = f"its packed weights could not be written or read ({e})"
                if mode == "auto":      # an expected case is silent; a failing cache is not
                    log.warning("engine: the %s's %s; the backend's %s graphs run instead", what, reason, option)
        if mode == "native":
            raise ArtifactError(f"{self.artifact_dir}: {option}='native' cannot run: {reason}; use {option}='auto'")
        return None

    @property
    def vision_kind(self) -> str:
        """"native" when the C++ core computes the vision graph, else "graph" (fixed at load)."""
        return self._vision_kind

    @property
    def decoder_kind(self) -> str:
        """"native" when the C++ core computes the decoder graphs, else "graphs" (fixed at load)."""
        return self._decoder_kind

    # ------------------------------------------------------------------ building blocks
    @property
    def max_context(self) -> int:
        return self.config.text.max_position_embeddings

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [N, 3, S, S] -> image features [N, P, D], in one graph call."""
        if self._native_vision is not None:
            return self._native_vision.run(pixel_values, self._pool)
        return self.runner.run("vision", {"pixel_values": pixel_values})["image_features"]

    def encode_image(self, pixel_values: np.ndarray, times: StepTimes | None = None) -> np.ndarray:
        """One image's pixel values [3, S, S] -> its features [P, D]. Always one image per call,
        so an image's features never depend on what else is encoded (nor on the cache)."""
        t0 = time.perf_counter()
        feats = self.encode_images(pixel_values[None])[0]
        if times is not None:
            times.add_graph("vision", time.perf_counter() - t0)
        return feats

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [T] -> embeddings [T, D] (dequantized rows * sqrt(D) in checkpoint dtype)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.asarray(self._embed_table[ids], dtype=np.float32)
        if self._embed_scales is not None:
            rows *= self._embed_scales[ids, None]
        return rows * self._embed_scale

    def prompt_rows(self, input_ids: np.ndarray, image_features: np.ndarray | None) -> np.ndarray:
        """One prompt's input rows [T, D]: token embeddings, image features [N, P, D] at the
        `<image>` placeholders."""
        ids = np.asarray(input_ids, dtype=np.int64)
        hidden = self.embed(ids)
        image_rows = np.flatnonzero(ids == self.config.image_token_index)
        n_feat = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if len(image_rows) != n_feat:
            raise ValueError(f"the prompt has {len(image_rows)} <image> tokens but the images give {n_feat} "
                             "features")
        if n_feat:
            hidden[image_rows] = image_features.reshape(n_feat, -1)
        return hidden

    def run_rows(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """runner.run on rows that are independent tokens, in calls of at most runner.row_block
        rows (row_blocks; OpenVINO: 64) and at least two rows per call: a call
        with one row is padded with a copy of it. Some kernels take another path for one row
        (OpenVINO int8 / int4 differ by ~1e-6 between one row and several), while calls of two or
        more rows give each row the same result whatever the others are, so a request gives the
        same tokens alone or batched with others. Runners whose one-row calls are exact
        (runner.one_row_exact: onnxruntime per-row int8) run one row as is: a 3B decoder graph
        takes 3.2 ms for one row against 3.5 ms for two (Zen 4), ~7 ms per one-row decode step."""
        n = len(next(iter(inputs.values())))
        block = self.runner.row_block
        if block is not None and n > block:
            outs = [self.runner.run(graph, {k: v[a:b] for k, v in inputs.items()}) for a, b in row_blocks(n, block)]
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        if n != 1 or self.runner.one_row_exact:
            return self.runner.run(graph, inputs)
        out = self.runner.run(graph, {k: np.concatenate([v, v]) for k, v in inputs.items()})
        return {k: v[:1] for k, v in out.items()}

    def run_boundaries(self, hidden: np.ndarray, attn: np.ndarray | None, plan, start: int, stop: int,
                       times: StepTimes | None = None):
        """Decoder boundaries [start, stop) of rows `hidden` [n, D] (and `attn` [n, H*hd], the
        attention output of the boundary before `start`): graph decoder_i finishes layer i - 1 and
        starts layer i, whose attention runs on the caches and slots of `plan` (an AttentionPlan
        of these rows). Returns (hidden, attn) after boundary stop - 1; after the last boundary
        (L), hidden is the last layer's output and attn None."""
        t = self.config.text
        n_layers = t.num_hidden_layers
        # the native boundaries' temporaries, allocated once for these boundaries, not once each
        scratch = _native.DecoderScratch() if self._native_decoder is not None else None
        for i in range(start, stop):
            inputs = {"hidden": hidden} if i == 0 else {"hidden": hidden, "attn": attn}
            t0 = time.perf_counter()
            if self._native_decoder is not None:
                out = self._native_decoder.run(f"decoder_{i}", inputs, self._pool, scratch)
            else:
                out = self.run_rows(f"decoder_{i}", inputs)
            t1 = time.perf_counter()
            if times is not None:
                times.add_graph(f"decoder_{i}", t1 - t0)
            if i > 0:
                hidden = out["hidden_out"]
            if i == n_layers:
                return hidden, None
            attn = _native.attention_plan(plan, i, out["q"], out["k"], out["v"], scale=t.attn_scale,
                                          softcap=t.attn_logit_softcapping, window=self._layer_windows[i],
                                          rope_theta=t.rope_theta, pool=self._pool)
            if times is not None:
                times.attention_s += time.perf_counter() - t1
                times.attention_calls += 1
        return hidden, attn

    def logits(self, hidden_rows: np.ndarray, times: StepTimes | None = None) -> np.ndarray:
        """hidden [n, D] -> logits [n, V] (final norm, LM head, softcap)."""
        t0 = time.perf_counter()
        if self._final_norm is not None:
            logits = self._native_logits(hidden_rows)
        else:
            logits = self.run_rows("lm_head", {"hidden": hidden_rows})["logits"]
        if times is not None:
            times.add_graph("lm_head", time.perf_counter() - t0)
        return logits

    def _native_logits(self, hidden: np.ndarray) -> np.ndarray:
        """The lm_head graph's computation on the int8 table [V, D] (memory-mapped, shared with
        the token lookup): Gemma's final RMSNorm in fp32, int8 x int8 products (_native.matmul_int8:
        per-row activation quantization, the table's per-row scales), Gemma 2's final softcap."""
        t = self.config.text
        x = rms_norm(hidden, self._final_norm, t.rms_norm_eps)              # [n, D], as the graph
        logits = _native.matmul_int8(np.ascontiguousarray(x, np.float32), self._embed_table, self._embed_scales,
                                     pool=self._pool)                       # [n, V]
        cap = t.final_logit_softcapping
        if cap:
            logits = np.tanh(logits * np.float32(1.0 / cap)) * np.float32(cap)
        return logits

    def new_cache(self, num_slots: int, capacity: int):
        t = self.config.text
        return _native.KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, num_slots, capacity,
                               self.kv_dtype)

    # ------------------------------------------------------------------ requests
    def generate(self, image, prompt, max_new_tokens: int = 32, *, num_beams: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, length_penalty: float = 1.0, early_stopping=False,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 stream: Callable[[str], object] | None = None):
        """Generate text for an image (or several) and a prompt. Thread-safe (see the module docstring).

        `image` is an image (path, bytes, PIL image or array) or, for a multi-image prompt, a list
        of images: the prompt is then `<image>`*P for each image in order, `<bos>`, prompt, "\\n".
        For a batch, pass a list of prompts and a list of the same length whose items are images
        (or lists of images); the result is then a list of results, each equal to running that
        item alone (with sampling, item b equals a lone run with seed `seed + b`).
        `stream(text_piece)` receives the decoded text of every accepted token, in the calling
        thread (batch size 1, num_beams 1); returning False stops the request (finish_reason
        "cancelled", the text so far). With `ignore_eos` the sequence always runs to max_new_tokens.

        Timings (seconds) in `result.timings`: image_encode (preprocessing + vision graph), prefill,
        first_token (image in -> first token out, preprocessing included), decode (all later
        tokens), total, queue (waiting for a free place), and decode_tokens_per_s;
        `result.stats` splits them further (engine.serving.RequestStats).
        """
        batched = isinstance(prompt, (list, tuple))
        if stream is not None and (batched or num_beams > 1):
            raise ValueError("stream works with one prompt and num_beams=1")
        handle = self.submit(image, prompt, max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed, length_penalty=length_penalty,
                             early_stopping=early_stopping, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
        if stream is None:
            return handle.result()
        return follow_stream(handle, self.tokenizer, stream)

    def submit(self, image, prompt, max_new_tokens: int = 32, *, num_beams: int = 1, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
               seed: int = 0, length_penalty: float = 1.0, early_stopping=False,
               stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False) -> RequestHandle:
        """generate() without waiting: returns a RequestHandle (result(), cancel(), tokens()).

        Inputs are checked and preprocessed here, in the calling thread, so bad input raises at
        once; a full queue raises engine.serving.QueueFullError at once."""
        t_call = now()
        batched = isinstance(prompt, (list, tuple))
        prompts = list(prompt) if batched else [prompt]
        if batched and not prompts:
            raise ValueError("the prompt list is empty; pass at least one prompt")
        if batched and not isinstance(image, (list, tuple)):
            raise ValueError(f"a batch of {len(prompts)} prompts needs a list of images (one image or list "
                             f"of images per prompt), got a {type(image).__name__}")
        images = list(image) if batched else [image]
        if batched and len(images) != len(prompts):
            raise ValueError(f"a batch needs one image (or list of images) per prompt: got {len(images)} "
                             f"images for {len(prompts)} prompts")
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
            length_penalty=length_penalty, early_stopping=early_stopping,
            eos_token_ids=() if ignore_eos else (self.config.eos_token_id,),
            stop_token_ids=tuple(stop_token_ids) if stop_token_ids else ())
        settings.check_vocab(self.config.text.vocab_size)
        prepared = tuple(self._prepare(i, img, p, settings.max_new_tokens)
                         for i, (img, p) in enumerate(zip(images, prompts)))
        return self._scheduler.submit(Request(prepared, settings, batched), t_call)

    def _prepare(self, index: int, image, prompt, max_new_tokens: int) -> PreparedPrompt:
        """Processor output of one prompt, checked against the context, with its image keys."""
        b = self.processor(image, prompt)
        n_prompt = len(b["input_ids"])
        if n_prompt + max_new_tokens > self.max_context:
            n_img = int((b["input_ids"] == self.config.image_token_index).sum())
            raise ValueError(f"prompt {index}: {n_img} image tokens + {n_prompt - n_img} text tokens + "
                             f"max_new_tokens {max_new_tokens} = {n_prompt + max_new_tokens} exceeds the "
                             f"model's context of {self.max_context} tokens; shorten the prompt or lower "
                             "max_new_tokens")
        images = tuple(ImageInput(px, image_key(px, self.identity)) for px in b["pixel_values"])
        return PreparedPrompt(np.asarray(b["input_ids"], dtype=np.int64), int((b["token_type_ids"] == 0).sum()),
                              images)

    def serving_state(self) -> SchedulerState:
        """Requests queued / in prefill / decoding, KV cache and image-cache bytes (a snapshot)."""
        return self._scheduler.state()

    def close(self) -> None:
        """Stop the scheduler thread (requests still queued or running fail with
        engine.serving.SchedulerClosed) and release the graphs."""
        self._scheduler.close()
        close = getattr(self.runner, "close", None)
        if close:
            close()
        self._pool = None                 # the attention threads stop with it
        # the native decoder's and vision tower's weight maps (2.3 GB for 3B) go with their last user
        self._native_decoder = self._native_vision = None

    # ------------------------------------------------------------------ tasks (engine/tasks.py)
    def caption(self, image, lang: str = "en", **gen) -> GenerationResult:
        """Caption an image (`caption {lang}`); gen: generate() options."""
        from . import tasks
        return tasks.caption(self, image, lang, **gen)

    def answer(self, image, question: str, lang: str = "en", **gen) -> GenerationResult:
        """Answer a question about an image (`answer {lang} {question}`)."""
        from . import tasks
        return tasks.answer(self, image, question, lang, **gen)

    def ocr(self, image, **gen) -> GenerationResult:
        """Read the text in an image (`ocr`)."""
        from . import tasks
        return tasks.ocr(self, image, **gen)

    def detect(self, image, labels, multi_label: str | None = None, **gen):
        """Detect objects: labels ["cat", "dog"] or "cat ; dog" -> list[engine.Detection].
        multi_label: "per_label" (default: one prompt per label, submitted together) or "joint"
        (one prompt "detect cat ; dog", for checkpoints trained on it); see engine/tasks.py."""
        from . import tasks
        return tasks.detect(self, image, labels, multi_label, **gen)

    def segment(self, image, labels, multi_label: str | None = None, **gen):
        """Segment objects -> list[engine.Segment] (masks need a mask decoder, see seg_decoder).
        multi_label: as in detect."""
        from . import tasks
        return tasks.segment(self, image, labels, multi_label, **gen)

    @property
    def seg_decoder(self):
        """The VQ-VAE mask decoder (engine.masks.SegDecoder) or None. Loaded on first use from the
        artifact's seg_decoder.npz when the manifest lists one; `load_seg_decoder` sets another."""
        with self._seg_lock:                 # task helpers may ask from several threads at once
            if not hasattr(self, "_seg_decoder"):
                rel = self.manifest.seg_decoder
                decoder = None
                if rel:
                    from .masks import SegDecoder
                    decoder = SegDecoder.from_npz(self.artifact_dir / rel)
                self._seg_decoder = decoder
            return self._seg_decoder

    def load_seg_decoder(self, path):
        """Use the mask decoder in `path` (big_vision's vae-oid.npz) for segment(); returns it."""
        from .masks import SegDecoder
        decoder = SegDecoder.from_npz(path)
        with self._seg_lock:
            self._seg_decoder = decoder
        return decoder
