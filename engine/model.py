"""The PaliGemma session: encode images, prefill, then decode through the native loop.

    image(s) ─► processor ─► "vision" graph ─► image features ─┐
    prompt ──► tokenizer ──► ids ─► embedding table ────────────┤
                                                                ▼
        prefill: decoder_0 ─► attention ─► decoder_1 ─► … ─► decoder_L ─► lm_head (last row)
        decode:  _native.generate(step) calls `step(tokens, positions, slots)` per token, which
                 runs the same graphs on one row per live sequence.

The graphs (export/graph_def.py) do the matrix work in onnxruntime or OpenVINO; the native core
owns the KV cache and the attention (RoPE, prefix-LM mask, softcap, window, GQA). Weights are
read-only and shared by every call; everything a call changes (the KV cache, the sequences)
is created per call, so one `PaliGemma` may serve calls one after another.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import _native
from .artifact import Manifest, load_manifest
from .config import PaliGemmaConfig
from .processor import Processor
from .runtime import open_runner
from .tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """One generated sequence. `text` keeps loc and seg tokens; `tokens` excludes the prompt."""
    text: str
    tokens: list[int]
    finish_reason: str                   # "eos", "stop" or "length"
    score: float | None = None           # beam score (HF sequences_scores) with num_beams > 1
    timings: dict = field(default_factory=dict)   # seconds; see PaliGemma.generate

    def __str__(self) -> str:
        return self.text


class PaliGemma:
    """A loaded artifact on one backend. Build it with `engine.load(...)`."""

    def __init__(self, artifact_dir: str | Path, backend: str = "openvino", threads: int | None = None,
                 *, verify: bool = True, kv_dtype: str = "f32", warmup: bool | None = None):
        t0 = time.perf_counter()
        self.artifact_dir = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.artifact_dir, verify_checksums=verify)
        self.config: PaliGemmaConfig = self.manifest.config
        self.backend = backend
        self.kv_dtype = kv_dtype
        if threads is not None:
            _native.set_num_threads(int(threads))
        self.runner = open_runner(backend, self.artifact_dir, self.manifest, threads)
        emb = self.manifest.embedding
        self._embed_table = np.load(self.artifact_dir / emb.table, mmap_mode="r")        # [V, D]
        self._embed_scales = np.load(self.artifact_dir / emb.scales) if emb.scales else None  # [V]
        self._embed_scale = np.float32(emb.scale)
        tokenizer = Tokenizer(self.artifact_dir / self.manifest.tokenizer, self.config.image_token_index)
        v = self.config.vision
        self.processor = Processor(tokenizer, v.image_size, self.config.num_image_tokens,
                                   self.config.image_token_index, **self.manifest.preprocessing.processor_kwargs())
        self.tokenizer = tokenizer
        t = self.config.text
        self._layer_windows = [t.layer_window(i) for i in range(t.num_hidden_layers)]
        self.warmup_seconds = 0.0
        if warmup if warmup is not None else backend == "openvino":
            t1 = time.perf_counter()
            self.warm_up()
            self.warmup_seconds = time.perf_counter() - t1
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ building blocks
    @property
    def max_context(self) -> int:
        return self.config.text.max_position_embeddings

    def warm_up(self) -> None:
        """Run every graph once on one zero row (one zero image for the vision graph).

        OpenVINO repacks each graph's weights at its first inference (1-2 s per graph at 3B
        int4), which would otherwise land on the first request; load() does this by default on
        that backend. onnxruntime prepacks at session creation and needs no warm-up."""
        t, v = self.config.text, self.config.vision
        self.encode_images(np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32))
        hidden = np.zeros((1, t.hidden_size), np.float32)                     # [1, D]
        attn = np.zeros((1, t.num_attention_heads * t.head_dim), np.float32)  # [1, H*hd]
        for i in range(t.num_hidden_layers + 1):
            self.runner.run(f"decoder_{i}", {"hidden": hidden} if i == 0 else {"hidden": hidden, "attn": attn})
        self.logits(hidden)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [N, 3, S, S] -> image features [N, P, D]."""
        return self.runner.run("vision", {"pixel_values": pixel_values})["image_features"]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [T] -> embeddings [T, D] (dequantized rows * sqrt(D) in checkpoint dtype)."""
        rows = np.asarray(self._embed_table[ids], dtype=np.float32)
        if self._embed_scales is not None:
            rows *= self._embed_scales[ids, None]
        return rows * self._embed_scale

    def decoder(self, hidden: np.ndarray, cache, slots: Sequence[int], positions: np.ndarray) -> np.ndarray:
        """Run every decoder layer on `hidden` [N*T, D] (slot-major rows) appending to the cache."""
        t = self.config.text
        n_layers = t.num_hidden_layers
        attn = None
        for i in range(n_layers + 1):
            inputs = {"hidden": hidden} if i == 0 else {"hidden": hidden, "attn": attn}
            out = self.runner.run(f"decoder_{i}", inputs)
            if i > 0:
                hidden = out["hidden_out"]
            if i == n_layers:
                break
            attn = _native.attention(cache, i, out["q"], out["k"], out["v"], list(slots), positions,
                                     scale=t.attn_scale, softcap=t.attn_logit_softcapping,
                                     window=self._layer_windows[i], rope_theta=t.rope_theta)
        return hidden

    def logits(self, hidden_rows: np.ndarray) -> np.ndarray:
        """hidden [n, D] -> logits [n, V] (final norm, LM head, softcap)."""
        return self.runner.run("lm_head", {"hidden": hidden_rows})["logits"]

    def new_cache(self, num_slots: int, capacity: int):
        t = self.config.text
        return _native.KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, num_slots, capacity,
                               self.kv_dtype)

    def prefill(self, cache, slot: int, input_ids: np.ndarray, image_features: np.ndarray | None,
                prefix_length: int) -> np.ndarray:
        """Embed one prompt, run it through the decoder into `slot`; returns its last logits [V]."""
        ids = np.asarray(input_ids, dtype=np.int64)
        hidden = self.embed(ids)                                          # [T, D]
        image_rows = np.flatnonzero(ids == self.config.image_token_index)
        n_feat = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if len(image_rows) != n_feat:
            raise ValueError(f"the prompt has {len(image_rows)} <image> tokens but the images give {n_feat} "
                             "features")
        if n_feat:
            hidden[image_rows] = image_features.reshape(n_feat, -1)
        cache.set_prefix_length(slot, prefix_length)
        positions = np.arange(len(ids), dtype=np.int32)
        hidden = self.decoder(hidden, cache, [slot], positions)
        return self.logits(hidden[-1:])[0]

    def _step(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, cache) -> np.ndarray:
        """One decode step for the live sequences: tokens/positions/slots [n] -> logits [n, V]."""
        hidden = self.embed(np.asarray(tokens, dtype=np.int64))
        hidden = self.decoder(hidden, cache, [int(s) for s in slots], np.asarray(positions, dtype=np.int32))
        return self.logits(hidden)

    # ------------------------------------------------------------------ generate
    def generate(self, image, prompt, max_new_tokens: int = 32, *, num_beams: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, length_penalty: float = 1.0, early_stopping=False,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 stream: Callable[[str], None] | None = None):
        """Generate text for an image (or several) and a prompt.

        `image` is an image (path, bytes, PIL image or array) or, for a multi-image prompt, a list
        of images: the prompt is then `<image>`*P for each image in order, `<bos>`, prompt, "\\n".
        For a batch, pass a list of prompts and a list of the same length whose items are images
        (or lists of images); the result is then a list of results, each equal to running that
        item alone (with sampling, item b equals a lone run with seed `seed + b`). `stream(text_piece)` receives the decoded text of every accepted token (batch
        size 1, num_beams 1). With `ignore_eos` the sequence always runs to max_new_tokens.

        Timings (seconds) in `result.timings`: image_encode (preprocessing + vision graph), prefill,
        first_token (image in -> first token out, preprocessing included), decode (all later
        tokens), total, and decode_tokens_per_s.
        """
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
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if stream is not None and (batched or num_beams > 1):
            raise ValueError("stream works with one prompt and num_beams=1")

        t_start = time.perf_counter()
        batch = [self.processor(img, p) for img, p in zip(images, prompts)]
        # Context budget, checked before any compute.
        for i, b in enumerate(batch):
            n_prompt = len(b["input_ids"])
            if n_prompt + max_new_tokens > self.max_context:
                n_img = int((b["input_ids"] == self.config.image_token_index).sum())
                raise ValueError(f"prompt {i}: {n_img} image tokens + {n_prompt - n_img} text tokens + "
                                 f"max_new_tokens {max_new_tokens} = {n_prompt + max_new_tokens} exceeds the "
                                 f"model's context of {self.max_context} tokens; shorten the prompt or lower "
                                 "max_new_tokens")
        pixel_values = [b["pixel_values"] for b in batch]
        features = self.encode_images(np.concatenate(pixel_values)) if sum(len(p) for p in pixel_values) else None
        t_vision = time.perf_counter()

        capacity = min(self.max_context, max(len(b["input_ids"]) for b in batch) + max_new_tokens)
        cache = self.new_cache(len(batch) * num_beams, capacity)
        max_new_tokens = int(max_new_tokens)
        first_logits, offset = [], 0
        for i, b in enumerate(batch):
            n = len(b["pixel_values"])
            feats = features[offset:offset + n] if n else None
            offset += n
            prefix = int((b["token_type_ids"] == 0).sum())
            first_logits.append(self.prefill(cache, i * num_beams, b["input_ids"], feats, prefix))
        t_prefill = time.perf_counter()

        first_token_time: list[float] = []
        decoded: list[int] = []
        emitted = [""]

        def step(tokens, positions, slots):
            return self._step(tokens, positions, slots, cache)

        def on_token(seq: int, token: int) -> None:
            # First accepted token of any sequence: the end of time-to-first-token.
            if not first_token_time:
                first_token_time.append(time.perf_counter())
            if stream is not None:      # one prompt, greedy/sampling: stream decoded text pieces
                decoded.append(token)
                text = self.tokenizer.decode(decoded)
                if text.endswith("\ufffd"):    # maybe a UTF-8 sequence cut short: wait for its next byte
                    return
                if len(text) > len(emitted[0]) and text.startswith(emitted[0]):
                    stream(text[len(emitted[0]):])
                    emitted[0] = text

        eos = [] if ignore_eos else [self.config.eos_token_id]
        results = _native.generate(
            step, cache, np.stack(first_logits).astype(np.float32),
            [b["input_ids"].tolist() for b in batch], [len(b["input_ids"]) for b in batch],
            [i * num_beams + j for i in range(len(batch)) for j in range(num_beams)],
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, num_beams=num_beams,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_ids=eos,
            stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
            stream=on_token if num_beams == 1 else None)
        t_end = time.perf_counter()
        if stream is not None:          # text held back at the end (an unfinished UTF-8 sequence)
            text = self.tokenizer.decode(results[0]["tokens"])
            if len(text) > len(emitted[0]) and text.startswith(emitted[0]):
                stream(text[len(emitted[0]):])

        # Beam search accepts tokens only at the end; its first token is known after prefill.
        first = first_token_time[0] if first_token_time else t_prefill
        out = []
        for r in results:
            n_new = len(r["tokens"])
            decode_s = t_end - first
            timings = {
                "image_encode": t_vision - t_start,
                "prefill": t_prefill - t_vision,
                "first_token": first - t_start,
                "decode": decode_s,
                "total": t_end - t_start,
                "new_tokens": n_new,
                "decode_tokens_per_s": (n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else None,
                "load": self.load_seconds,
            }
            out.append(GenerationResult(self.tokenizer.decode(r["tokens"]), list(r["tokens"]),
                                        r["finish_reason"], r.get("score"), timings))
        return out if batched else out[0]

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close:
            close()

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

    def detect(self, image, labels, **gen):
        """Detect objects: labels ["cat", "dog"] or "cat ; dog" -> list[engine.Detection]."""
        from . import tasks
        return tasks.detect(self, image, labels, **gen)

    def segment(self, image, labels, **gen):
        """Segment objects -> list[engine.Segment] (masks need a mask decoder, see seg_decoder)."""
        from . import tasks
        return tasks.segment(self, image, labels, **gen)

    @property
    def seg_decoder(self):
        """The VQ-VAE mask decoder (engine.masks.SegDecoder) or None. Loaded on first use from the
        artifact's seg_decoder.npz when the manifest lists one; `load_seg_decoder` sets another."""
        if not hasattr(self, "_seg_decoder"):
            rel = self.manifest.seg_decoder
            self._seg_decoder = None
            if rel:
                from .masks import SegDecoder
                self._seg_decoder = SegDecoder.from_npz(self.artifact_dir / rel)
        return self._seg_decoder

    def load_seg_decoder(self, path):
        """Use the mask decoder in `path` (big_vision's vae-oid.npz) for segment(); returns it."""
        from .masks import SegDecoder
        self._seg_decoder = SegDecoder.from_npz(path)
        return self._seg_decoder
