"""Plain numpy PaliGemma (1 and 2): the executable spec of the model, in float32.

Everything the engine computes is defined here, as simply as possible, and tested against
Hugging Face transformers (tests/test_reference.py). The C++ kernels and exported graphs are
tested against these functions, so the building blocks are standalone and documented:

    layer_norm, rms_norm, gelu_tanh, softcap, rope, prefix_length, prefix_lm_mask, attention

and the model itself:

    ReferenceModel(config, weights)         weights: canonical name -> array (engine.layout)
    ReferenceModel.from_pretrained(dir)     through engine.checkpoint.Checkpoint.open
    .encode_image(pixel_values)             [N, 3, S, S] -> [N, num_patches, text_hidden]
    .logits(input_ids, pixel_values, token_type_ids)   -> [T, vocab]
    .generate(input_ids, pixel_values, max_new_tokens, token_type_ids, eos_token_id) -> list[int]

Conventions and decisions (see docs/ of each function for details):
- Positions count from 0 (HF counts from 1; RoPE is relative, so only rounding differs).
- The prefix block is the leading run of token_type_ids == 0 (image tokens, <bos>, prefix text,
  "\\n"); everything after it is the causal suffix. token_type_ids that put a 0 after a 1 are
  rejected (HF would merge every 0 position into one bidirectional block, looking across the
  suffix into the future; PaliGemma never produces that).
- Sliding window (PG2 sliding layers): exactly transformers' rule, key k is visible to query q if
  (k <= q and q - k < window) or (q and k both in the prefix block). The window limits only the
  causal part; the prefix block ignores it. A suffix query therefore loses sight of prefix keys
  more than window - 1 positions back. (big_vision has no window here; this only differs beyond
  4096 tokens, i.e. PG2 at 896 px.)
- generate() returns the new tokens including the eos that stopped it, like the new-token part of
  transformers' `generate` output.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .config import PaliGemmaConfig
from .errors import CheckpointError
from .layout import expected_tensors

F32 = np.float32


# ============================================================================ building blocks


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, like torch): (x - mean) / sqrt(var + eps) * w + b."""
    x = x.astype(F32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + F32(eps)) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Gemma RMSNorm, in fp32: x * rsqrt(mean(x^2) + eps) * (1 + w).

    Note the (1 + w): Gemma stores the norm weight as an offset from 1.
    """
    x = x.astype(F32)
    ms = (x * x).mean(-1, keepdims=True)
    return x / np.sqrt(ms + F32(eps)) * (F32(1) + weight.astype(F32))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (torch's gelu(approximate="tanh"), HF's gelu_pytorch_tanh)."""
    x = x.astype(F32)
    c = F32(math.sqrt(2.0 / math.pi))
    return F32(0.5) * x * (F32(1) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
    """Gemma 2 logit soft-capping cap * tanh(x / cap); a None cap means off."""
    if cap is None:
        return x
    return F32(cap) * np.tanh(x / F32(cap))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x @ W^T (+ b), with W in PyTorch's [out, in] orientation."""
    y = x @ weight.T
    return y if bias is None else y + bias


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary position embedding, half-split ("rotate_half") layout, not interleaved.

    x: [T, H, hd]; positions: [T] integers. Dimension i < hd/2 is paired with i + hd/2 and
    rotated by angle pos * inv_freq[i], inv_freq[i] = theta^(-2i/hd). Angles are computed in
    float64 and rounded once to fp32 (HF computes them in fp32; the difference is rounding).
    """
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = float(theta) ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)   # [hd/2]
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]     # [T, hd/2]
    cos = np.cos(ang).astype(F32)[:, None, :]                                # [T, 1, hd/2]
    sin = np.sin(ang).astype(F32)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) == x * cos + rotate_half(x) * sin
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def prefix_length(token_type_ids: Sequence[int] | np.ndarray | None, seq_len: int) -> int:
    """Length of the prefix block: the leading run of token_type_ids == 0.

    None means the whole sequence is prefix (what the processor gives for a prompt without
    suffix). Values must be 0 or 1, and no 0 may follow a 1: the prefix is one contiguous block
    at the start.
    """
    if token_type_ids is None:
        return seq_len
    tt = np.asarray(token_type_ids).reshape(-1)
    if tt.shape[0] != seq_len:
        raise ValueError(f"token_type_ids has {tt.shape[0]} entries for {seq_len} tokens; "
                         "give one per input token (0 = prefix, 1 = suffix)")
    if not np.isin(tt, (0, 1)).all():
        raise ValueError("token_type_ids must be 0 (prefix) or 1 (suffix)")
    p = int(np.argmax(tt == 1)) if (tt == 1).any() else seq_len
    if (tt[p:] == 0).any():
        raise ValueError("token_type_ids has a 0 after a 1; the prefix (0s) must be one block at "
                         "the start, followed only by suffix tokens (1s)")
    return p


def prefix_lm_mask(q_pos: np.ndarray, k_pos: np.ndarray, prefix_len: int,
                   window: int | None = None) -> np.ndarray:
    """Which keys each query may attend to: bool [Tq, Tk], True = visible.

    q_pos [Tq], k_pos [Tk]: absolute positions (0-based) of the queries and keys, so the same
    function serves prefill (q_pos = k_pos = 0..T-1) and cached decoding (q_pos = [t]).

        visible(q, k) = (k <= q and (window is None or q - k < window))
                        or (q < prefix_len and k < prefix_len)

    The first term is the causal part, limited by the sliding window; the second is the
    bidirectional prefix block, which ignores the window (transformers' rule).
    """
    q = np.asarray(q_pos)[:, None]   # [Tq, 1]
    k = np.asarray(k_pos)[None, :]   # [1, Tk]
    causal = k <= q
    if window is not None:
        causal = causal & (q - k < window)
    in_prefix = (q < prefix_len) & (k < prefix_len)
    return causal | in_prefix


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
              scale: float, cap: float | None = None) -> np.ndarray:
    """Multi-head attention with grouped key/value heads (GQA / MQA), in fp32.

    q: [Tq, H, hd]; k, v: [Tk, KV, hd] with H a multiple of KV (query head h uses kv head
    h // (H / KV)); mask: bool [Tq, Tk] (True = visible) or None for full attention.
    Order: s = (q . k) * scale, then softcap (Gemma 2), then mask, then softmax.
    Returns [Tq, H, hd].
    """
    n_heads, n_kv = q.shape[1], k.shape[1]
    group = n_heads // n_kv
    k = np.repeat(k, group, axis=1)                                # [Tk, H, hd]
    v = np.repeat(v, group, axis=1)                                # [Tk, H, hd]
    s = np.matmul(q.transpose(1, 0, 2), k.transpose(1, 2, 0))      # [H, Tq, Tk]
    s = softcap(s * F32(scale), cap)
    if mask is not None:
        s = np.where(mask[None], s, F32(-np.inf))
    s = s - s.max(-1, keepdims=True)   # every row has a visible key (the diagonal)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    o = np.matmul(p, v.transpose(1, 0, 2))                         # [H, Tq, hd]
    return o.transpose(1, 0, 2)                                    # [Tq, H, hd]


# ============================================================================ KV cache


class KVCache:
    """Keys and values of every position seen so far, per decoder layer: [T, KV, hd] each.

    Sliding layers keep every position too and let the mask hide old ones. (An engine may drop
    keys older than window - 1 positions on those layers once all queries are suffix tokens: a
    suffix query sees prefix keys only through the windowed causal part.)
    """

    def __init__(self, num_layers: int):
        self.k: list[np.ndarray | None] = [None] * num_layers
        self.v: list[np.ndarray | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add this step's k, v [T, KV, hd]; return all keys and values of the layer so far."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = np.concatenate([self.k[layer], k])
            self.v[layer] = np.concatenate([self.v[layer], v])
        return self.k[layer], self.v[layer]


# ============================================================================ model


class ReferenceModel:
    """PaliGemma 1 / 2 forward pass and greedy decoding, one sequence at a time, in fp32.

    weights: canonical tensor names (engine.layout) -> arrays of any float dtype (fp32, fp16, or
    bf16 as ml_dtypes, possibly memory-mapped). Every tensor the config needs is checked and
    converted to a float32 copy here, at init. That costs 4 bytes per parameter: fine for tests
    and tiny models, about 12 GB for PaliGemma 3B, 39 GB for 10B. Tensors the model does not use
    (e.g. the SigLIP pooling head) are ignored.
    """

    def __init__(self, config: PaliGemmaConfig, weights: Mapping[str, np.ndarray]):
        self.config = config
        self.w: dict[str, np.ndarray] = {}
        missing = []
        for name, shape in expected_tensors(config).items():
            if name not in weights:
                missing.append(name)
                continue
            arr = np.asarray(weights[name]).astype(F32)
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(arr.shape)}, but the config "
                                      f"needs {tuple(shape)}")
            self.w[name] = arr
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"weights lack {len(missing)} tensors the config needs, e.g. "
                                  f"{', '.join(missing[:5])}{more}")

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike) -> "ReferenceModel":
        """Load an HF PaliGemma checkpoint directory (config.json + safetensors)."""
        from .checkpoint import Checkpoint   # imported here: the reference works without it
        with Checkpoint.open(checkpoint_dir) as ckpt:   # __init__ copies, so the maps can close
            return cls(ckpt.config, ckpt.tensors)

    # ------------------------------------------------------------------ vision

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """SigLIP vision tower + projector: [N, C, S, S] -> [N, num_patches, text_hidden].

        pixel_values are the processor's output, already normalized to [-1, 1].
        """
        v = self.config.vision
        px = np.asarray(pixel_values, F32)
        expect = (v.num_channels, v.image_size, v.image_size)
        if px.ndim != 4 or px.shape[1:] != expect:
            raise ValueError(f"pixel_values has shape {px.shape}; expected [N, {expect[0]}, "
                             f"{expect[1]}, {expect[2]}] for this checkpoint")
        return np.stack([self._encode_one_image(img) for img in px])

    def _encode_one_image(self, img: np.ndarray) -> np.ndarray:
        v, w = self.config.vision, self.w
        P, g = v.patch_size, v.image_size // v.patch_size
        C, D, H = v.num_channels, v.hidden_size, v.num_attention_heads
        # Patch conv (kernel = stride = P) as a matmul over flattened (C, P, P) patches, taken
        # row-major over the g x g grid like the conv output's flatten.
        patches = img.reshape(C, g, P, g, P).transpose(1, 3, 0, 2, 4).reshape(g * g, C * P * P)
        conv_w = w["vision.embeddings.patch_embedding.weight"].reshape(D, C * P * P)
        x = linear(patches, conv_w, w["vision.embeddings.patch_embedding.bias"])   # [np, Dv]
        x = x + w["vision.embeddings.position_embedding.weight"]                   # learned positions
        n = x.shape[0]
        for i in range(v.num_hidden_layers):
            pre = f"vision.encoder.layers.{i}."
            # pre-LN attention block, full bidirectional attention over the patches
            h = layer_norm(x, w[pre + "layer_norm1.weight"], w[pre + "layer_norm1.bias"], v.layer_norm_eps)
            q = linear(h, w[pre + "self_attn.q_proj.weight"], w[pre + "self_attn.q_proj.bias"])
            k = linear(h, w[pre + "self_attn.k_proj.weight"], w[pre + "self_attn.k_proj.bias"])
            val = linear(h, w[pre + "self_attn.v_proj.weight"], w[pre + "self_attn.v_proj.bias"])
            shape = (n, H, v.head_dim)
            o = attention(q.reshape(shape), k.reshape(shape), val.reshape(shape), None,
                          scale=v.head_dim ** -0.5)                                # [np, H, hd]
            x = x + linear(o.reshape(n, D), w[pre + "self_attn.out_proj.weight"],
                           w[pre + "self_attn.out_proj.bias"])
            # pre-LN MLP block
            h = layer_norm(x, w[pre + "layer_norm2.weight"], w[pre + "layer_norm2.bias"], v.layer_norm_eps)
            h = gelu_tanh(linear(h, w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"]))
            x = x + linear(h, w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"])
        x = layer_norm(x, w["vision.post_layernorm.weight"], w["vision.post_layernorm.bias"], v.layer_norm_eps)
        return linear(x, w["projector.weight"], w["projector.bias"])                # [np, D]

    # ------------------------------------------------------------------ embeddings

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """Input embeddings [T, D]: text tokens E[id] * sqrt(D); image features at <image> tokens.

        image_features: [N, num_patches, D] from encode_image (or None). They fill the <image>
        positions in order and are NOT scaled by sqrt(D). Their count must equal the number of
        <image> tokens. sqrt(D) is rounded to fp32 (HF rounds it to the weight dtype: in bf16
        that would be 45.25 for D = 2048 and 48.0 for D = 2304).
        """
        cfg, E = self.config, self.w["text.embed_tokens.weight"]
        ids = np.asarray(input_ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.text.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.text.vocab_size}); got "
                             f"{int(ids.min())}..{int(ids.max())}")
        is_image = ids == cfg.image_token_index
        n_tokens = int(is_image.sum())
        feats = (np.zeros((0, E.shape[1]), F32) if image_features is None
                 else np.asarray(image_features, F32).reshape(-1, E.shape[1]))
        if n_tokens != feats.shape[0]:
            n_img = 0 if image_features is None else np.asarray(image_features).shape[0]
            raise ValueError(
                f"the prompt has {n_tokens} <image> tokens (id {cfg.image_token_index}) but "
                f"{n_img} image(s) give {feats.shape[0]} features ({cfg.num_image_tokens} per image); "
                f"put {cfg.num_image_tokens} <image> tokens per image before <bos>")
        x = self.embed_text(ids)   # [T, D]
        x[is_image] = feats
        return x

    def embed_text(self, input_ids: np.ndarray) -> np.ndarray:
        """E[id] * sqrt(D) for every id, <image> included: [T, D]. Used alone for generated
        tokens, which are never image features (a generated <image> id stays a plain token, as
        in transformers)."""
        ids = np.asarray(input_ids).reshape(-1)
        return self.w["text.embed_tokens.weight"][ids] * F32(math.sqrt(self.config.text.hidden_size))

    # ------------------------------------------------------------------ decoder

    def _attention_block(self, i: int, h: np.ndarray, positions: np.ndarray, prefix_len: int,
                         cache: KVCache | None) -> np.ndarray:
        """Self-attention of decoder layer i on normed input h [T, D] -> [T, D]."""
        t, w = self.config.text, self.w
        pre = f"text.layers.{i}.self_attn."
        T = h.shape[0]
        q = linear(h, w[pre + "q_proj.weight"]).reshape(T, t.num_attention_heads, t.head_dim)
        k = linear(h, w[pre + "k_proj.weight"]).reshape(T, t.num_key_value_heads, t.head_dim)
        v = linear(h, w[pre + "v_proj.weight"]).reshape(T, t.num_key_value_heads, t.head_dim)
        q = rope(q, positions, t.rope_theta)
        k = rope(k, positions, t.rope_theta)
        if cache is not None:   # keys / values of all positions so far, this step's included
            k, v = cache.append(i, k, v)
        k_pos = np.arange(k.shape[0])   # cached keys sit at positions 0..Tk-1
        mask = prefix_lm_mask(positions, k_pos, prefix_len, t.layer_window(i))   # [T, Tk]
        o = attention(q, k, v, mask, t.attn_scale, t.attn_logit_softcapping)    # [T, H, hd]
        return linear(o.reshape(T, -1), w[pre + "o_proj.weight"])

    def _mlp(self, i: int, h: np.ndarray) -> np.ndarray:
        """Gated MLP: down(gelu_tanh(gate(h)) * up(h))."""
        pre = f"text.layers.{i}.mlp."
        gate = gelu_tanh(linear(h, self.w[pre + "gate_proj.weight"]))
        return linear(gate * linear(h, self.w[pre + "up_proj.weight"]), self.w[pre + "down_proj.weight"])

    def decode(self, x: np.ndarray, positions: np.ndarray, prefix_len: int,
               cache: KVCache | None = None) -> np.ndarray:
        """Gemma / Gemma 2 decoder on embeddings x [T, D] at `positions` -> final-normed [T, D].

        Gemma 1:  x += attn(norm(x));                    x += mlp(norm(x))
        Gemma 2:  x += post_attn_norm(attn(norm(x)));    x += post_ff_norm(mlp(pre_ff_norm(x)))
        (Gemma 1's pre-MLP norm is named post_attention_layernorm in the checkpoint.)
        """
        t, w = self.config.text, self.w
        eps = t.rms_norm_eps
        positions = np.asarray(positions)
        for i in range(t.num_hidden_layers):
            pre = f"text.layers.{i}."
            h = rms_norm(x, w[pre + "input_layernorm.weight"], eps)
            a = self._attention_block(i, h, positions, prefix_len, cache)
            if t.is_gemma2:
                a = rms_norm(a, w[pre + "post_attention_layernorm.weight"], eps)
                h = rms_norm(x + a, w[pre + "pre_feedforward_layernorm.weight"], eps)
            else:
                h = rms_norm(x + a, w[pre + "post_attention_layernorm.weight"], eps)
            x = x + a
            m = self._mlp(i, h)
            if t.is_gemma2:
                m = rms_norm(m, w[pre + "post_feedforward_layernorm.weight"], eps)
            x = x + m
        return rms_norm(x, w["text.norm.weight"], eps)

    def lm_head(self, h: np.ndarray) -> np.ndarray:
        """Final-normed hidden states [T, D] -> logits [T, vocab]: h @ E^T (tied) or lm_head,
        then the final softcap (PG2)."""
        t = self.config.text
        head = self.w["text.embed_tokens.weight"] if t.tie_word_embeddings else self.w["lm_head.weight"]
        return softcap(h @ head.T, t.final_logit_softcapping)

    # ------------------------------------------------------------------ public entry points

    def _prefill(self, input_ids, pixel_values, token_type_ids, cache: KVCache | None):
        ids = np.asarray(input_ids).reshape(-1)
        if ids.size == 0:
            raise ValueError("input_ids is empty")
        feats = None if pixel_values is None else self.encode_image(pixel_values)
        x = self.embed(ids, feats)
        prefix_len = prefix_length(token_type_ids, ids.size)
        return self.decode(x, np.arange(ids.size), prefix_len, cache), prefix_len

    def logits(self, input_ids: Sequence[int] | np.ndarray, pixel_values: np.ndarray | None = None,
               token_type_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Logits [T, vocab] (fp32) for one sequence.

        input_ids [T] with num_image_tokens <image> tokens per image; pixel_values [N, C, S, S]
        or None (then the prompt must hold no <image> token); token_type_ids [T]: 0 for the
        prefix block, 1 for the suffix (None: the whole sequence is prefix).
        """
        h, _ = self._prefill(input_ids, pixel_values, token_type_ids, cache=None)
        return self.lm_head(h)

    def generate(self, input_ids: Sequence[int] | np.ndarray, pixel_values: np.ndarray | None,
                 max_new_tokens: int, token_type_ids: Sequence[int] | np.ndarray | None = None,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding with a KV cache: prefill the prompt once, then one token per step.

        Generated tokens are suffix tokens (token_type_ids 1): causal, windowed on sliding
        layers. Stops after max_new_tokens or at eos_token_id (None: config.eos_token_id; an id
        outside the vocabulary such as -1 never stops). Returns the new tokens, including the
        eos that stopped decoding, like the new-token part of transformers' generate output.
        """
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        cache = KVCache(self.config.text.num_hidden_layers)
        h, prefix_len = self._prefill(input_ids, pixel_values, token_type_ids, cache)
        next_logits = self.lm_head(h[-1:])[0]   # [vocab]
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(np.argmax(next_logits))   # first maximum on ties, like torch.argmax
            out.append(tok)
            if tok == eos or len(out) == max_new_tokens:
                break
            pos = cache.length   # the new token's position
            x = self.embed_text(np.array([tok]))
            h = self.decode(x, np.array([pos]), prefix_len, cache)
            next_logits = self.lm_head(h)[0]
        return out
