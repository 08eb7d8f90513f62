"""The graphs of an exported PaliGemma, written once against a small `Builder` interface.

The ONNX builder (onnx_graphs.py), the OpenVINO builder (openvino_graphs.py) and the eager
numpy builder below (used by tests) all implement the same ops, so the model's structure
lives in this one file.

The split with the native core (csrc/): graphs do the matrix work, C++ owns the KV cache and
the decoder's attention (RoPE, prefix-LM mask, softcap, window, softmax). Per decoder layer:

    graph "decoder_0":            hidden [T, D]                -> q0, k0, v0
    graph "decoder_i" (0<i<L):    hidden [T, D], attn [T, H*hd] -> hidden_out [T, D], q_i, k_i, v_i
    graph "decoder_L":            hidden [T, D], attn [T, H*hd] -> hidden_out [T, D]
    graph "lm_head":              hidden [n, D]                -> logits [n, V]
    graph "vision":               pixel_values [N, 3, S, S]    -> image_features [N, P, D]

where decoder_i finishes layer i-1 (o_proj, Gemma 2 post-attention norm, residual, MLP block)
and starts layer i (input norm, q/k/v projections, un-rotated: C++ applies RoPE). q is
[T, H, hd], k and v are [T, KV, hd]. Rows of T are independent tokens, so a batch of decode
steps of several sequences is simply T rows. lm_head takes only the rows whose logits are
needed (the last prompt position, or one row per live sequence when decoding).

The token embedding is not a graph: the engine gathers rows of the (possibly quantized)
embedding table and multiplies by sqrt(D) rounded to the checkpoint dtype, as HF does.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from engine.config import PaliGemmaConfig

Tensor = Any  # a backend's value handle


class Builder(Protocol):
    """The ops the graphs use. `linear` receives canonical weight names; the builder owns the
    weight format (float, int8, int4, fp8) and how the runtime keeps it compressed."""

    def input(self, name: str, shape: list, dtype: str = "float32") -> Tensor: ...
    def output(self, x: Tensor, name: str) -> None: ...
    def linear(self, x: Tensor, weight: str, bias: str | None = None, *,
               weight_array: np.ndarray | None = None) -> Tensor:
        """x [..., K] @ W^T (+ b) with W [O, K] from `weight` (or `weight_array` if given)."""
    def constant(self, array: np.ndarray) -> Tensor: ...
    def weight(self, name: str) -> Tensor:
        """A small float tensor (norm weights, biases, position embeddings), kept in fp32."""
    def add(self, a: Tensor, b: Tensor) -> Tensor: ...
    def mul(self, a: Tensor, b: Tensor) -> Tensor: ...
    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor: ...
    def softmax(self, x: Tensor, axis: int = -1) -> Tensor: ...
    def tanh(self, x: Tensor) -> Tensor: ...
    def gelu_tanh(self, x: Tensor) -> Tensor: ...
    def reshape(self, x: Tensor, shape: list[int]) -> Tensor:
        """Reshape with ONNX semantics: 0 copies the input dimension, -1 is inferred."""
    def transpose(self, x: Tensor, perm: list[int]) -> Tensor: ...
    def rms_norm(self, x: Tensor, weight: str, eps: float) -> Tensor:
        """x * rsqrt(mean(x^2, -1) + eps) * (1 + w), in fp32 (Gemma)."""
    def layer_norm(self, x: Tensor, weight: str, bias: str, eps: float) -> Tensor: ...


# ---------------------------------------------------------------------------- vision
def build_vision(b: Builder, cfg: PaliGemmaConfig, patch_weight: np.ndarray) -> None:
    """pixel_values [N, 3, S, S] -> image_features [N, P, D] (SigLIP + projector, unscaled).

    `patch_weight` is the conv weight [Dv, 3, p, p] reshaped to [Dv, 3*p*p]: a stride-p conv
    with a p x p kernel is a matmul over non-overlapping patches.
    """
    v = cfg.vision
    g, p, c, dv, nh = v.image_size // v.patch_size, v.patch_size, v.num_channels, v.hidden_size, v.num_attention_heads
    hd = v.head_dim
    x = b.input("pixel_values", ["batch", c, v.image_size, v.image_size])
    x = b.reshape(x, [-1, c, g, p, g, p])                       # [N, C, gy, py, gx, px]
    x = b.transpose(x, [0, 2, 4, 1, 3, 5])                      # [N, gy, gx, C, py, px]
    x = b.reshape(x, [-1, g * g, c * p * p])                    # [N, P, C*p*p]
    x = b.linear(x, "vision.embeddings.patch_embedding.weight", "vision.embeddings.patch_embedding.bias",
                 weight_array=patch_weight)                     # [N, P, Dv]
    x = b.add(x, b.weight("vision.embeddings.position_embedding.weight"))
    scale = b.constant(np.array(hd ** -0.5, np.float32))
    for i in range(v.num_hidden_layers):
        pre = f"vision.encoder.layers.{i}."
        h = b.layer_norm(x, pre + "layer_norm1.weight", pre + "layer_norm1.bias", v.layer_norm_eps)
        q, k, vv = (b.transpose(b.reshape(b.linear(h, pre + f"self_attn.{n}_proj.weight", pre + f"self_attn.{n}_proj.bias"),
                                          [0, 0, nh, hd]), [0, 2, 1, 3])                # [N, nh, P, hd]
                    for n in ("q", "k", "v"))
        s = b.mul(b.matmul(q, k, transpose_b=True), scale)      # [N, nh, P, P], bidirectional
        o = b.matmul(b.softmax(s, -1), vv)                      # [N, nh, P, hd]
        o = b.reshape(b.transpose(o, [0, 2, 1, 3]), [0, 0, dv])  # [N, P, Dv]
        x = b.add(x, b.linear(o, pre + "self_attn.out_proj.weight", pre + "self_attn.out_proj.bias"))
        h = b.layer_norm(x, pre + "layer_norm2.weight", pre + "layer_norm2.bias", v.layer_norm_eps)
        h = b.linear(b.gelu_tanh(b.linear(h, pre + "mlp.fc1.weight", pre + "mlp.fc1.bias")),
                     pre + "mlp.fc2.weight", pre + "mlp.fc2.bias")
        x = b.add(x, h)
    x = b.layer_norm(x, "vision.post_layernorm.weight", "vision.post_layernorm.bias", v.layer_norm_eps)
    b.output(b.linear(x, "projector.weight", "projector.bias"), "image_features")


# ---------------------------------------------------------------------------- decoder
def decoder_graph_names(cfg: PaliGemmaConfig) -> list[str]:
    return [f"decoder_{i}" for i in range(cfg.text.num_hidden_layers + 1)]


def build_decoder_boundary(b: Builder, cfg: PaliGemmaConfig, i: int) -> None:
    """Graph decoder_i: the end of layer i-1 (if i > 0) and the start of layer i (if i < L)."""
    t = cfg.text
    n_layers, eps = t.num_hidden_layers, t.rms_norm_eps
    if not 0 <= i <= n_layers:
        raise ValueError(f"decoder boundary {i} is outside 0..{n_layers}")
    x = b.input("hidden", ["tokens", t.hidden_size])            # [T, D]
    if i > 0:
        pre = f"text.layers.{i - 1}."
        attn = b.input("attn", ["tokens", t.num_attention_heads * t.head_dim])   # [T, H*hd]
        o = b.linear(attn, pre + "self_attn.o_proj.weight")
        if t.is_gemma2:
            o = b.rms_norm(o, pre + "post_attention_layernorm.weight", eps)
        x = b.add(x, o)
        h = b.rms_norm(x, pre + ("pre_feedforward_layernorm.weight" if t.is_gemma2
                                 else "post_attention_layernorm.weight"), eps)
        h = b.mul(b.gelu_tanh(b.linear(h, pre + "mlp.gate_proj.weight")), b.linear(h, pre + "mlp.up_proj.weight"))
        h = b.linear(h, pre + "mlp.down_proj.weight")
        if t.is_gemma2:
            h = b.rms_norm(h, pre + "post_feedforward_layernorm.weight", eps)
        x = b.add(x, h)
        b.output(x, "hidden_out")
    if i < n_layers:
        pre = f"text.layers.{i}."
        h = b.rms_norm(x, pre + "input_layernorm.weight", eps)
        b.output(b.reshape(b.linear(h, pre + "self_attn.q_proj.weight"), [0, t.num_attention_heads, t.head_dim]), "q")
        b.output(b.reshape(b.linear(h, pre + "self_attn.k_proj.weight"), [0, t.num_key_value_heads, t.head_dim]), "k")
        b.output(b.reshape(b.linear(h, pre + "self_attn.v_proj.weight"), [0, t.num_key_value_heads, t.head_dim]), "v")


def graph_names(cfg: PaliGemmaConfig) -> list[str]:
    """Every graph of an artifact, in run order."""
    return ["vision", *decoder_graph_names(cfg), "lm_head"]


def build_graph(b: Builder, cfg: PaliGemmaConfig, name: str, weights) -> None:
    """Run the graph definition `name` (vision, decoder_i, lm_head) on builder `b`."""
    if name == "vision":
        patch = weights["vision.embeddings.patch_embedding.weight"]
        build_vision(b, cfg, patch.reshape(patch.shape[0], -1))
    elif name == "lm_head":
        build_lm_head(b, cfg)
    elif name.startswith("decoder_"):
        build_decoder_boundary(b, cfg, int(name.split("_")[1]))
    else:
        raise ValueError(f"unknown graph {name!r}; graphs are {', '.join(graph_names(cfg))}")


def build_lm_head(b: Builder, cfg: PaliGemmaConfig) -> None:
    """hidden [n, D] -> logits [n, V]: final norm, tied (or separate) LM head, PG2 softcap."""
    t = cfg.text
    x = b.input("hidden", ["rows", t.hidden_size])
    x = b.rms_norm(x, "text.norm.weight", t.rms_norm_eps)
    logits = b.linear(x, "text.embed_tokens.weight" if t.tie_word_embeddings else "lm_head.weight")
    cap = t.final_logit_softcapping
    if cap:
        logits = b.mul(b.tanh(b.mul(logits, b.constant(np.array(1.0 / cap, np.float32)))),
                       b.constant(np.array(cap, np.float32)))
    b.output(logits, "logits")


def embedding_scale(cfg: PaliGemmaConfig, checkpoint_dtype: str) -> float:
    """sqrt(D) rounded to the checkpoint dtype, as HF casts it (bf16: 45.25 for D=2048)."""
    s = np.float32(math.sqrt(cfg.text.hidden_size))
    if checkpoint_dtype == "bf16":
        import ml_dtypes
        s = np.float32(np.array(s).astype(ml_dtypes.bfloat16))
    elif checkpoint_dtype == "fp16":
        s = np.float32(np.float16(s))
    return float(s)


# ---------------------------------------------------------------------------- numpy twin
class NumpyBuilder:
    """Runs the graph definitions eagerly in numpy fp32: the test twin of the real builders.

    Usage: `b = NumpyBuilder(weights, {"hidden": h}); build_decoder_boundary(b, cfg, i); b.outputs`.
    """

    def __init__(self, weights, inputs: dict[str, np.ndarray]):
        self.weights = weights
        self.inputs = inputs
        self.outputs: dict[str, np.ndarray] = {}

    def _w(self, name):
        return np.asarray(self.weights[name], dtype=np.float32)

    def input(self, name, shape, dtype="float32"):
        return np.asarray(self.inputs[name], dtype=np.float32 if dtype == "float32" else dtype)

    def output(self, x, name):
        self.outputs[name] = x

    def linear(self, x, weight, bias=None, *, weight_array=None):
        w = self._w(weight) if weight_array is None else np.asarray(weight_array, np.float32)
        y = x @ w.T
        return y + self._w(bias) if bias is not None else y

    def constant(self, array):
        return np.asarray(array)

    def weight(self, name):
        return self._w(name)

    add = staticmethod(np.add)
    mul = staticmethod(np.multiply)
    tanh = staticmethod(np.tanh)

    def matmul(self, a, b, transpose_b=False):
        return a @ (np.swapaxes(b, -1, -2) if transpose_b else b)

    def softmax(self, x, axis=-1):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def gelu_tanh(self, x):
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))

    def reshape(self, x, shape):
        shape = [x.shape[j] if s == 0 else s for j, s in enumerate(shape)]
        return x.reshape(shape)

    def transpose(self, x, perm):
        return np.transpose(x, perm)

    def rms_norm(self, x, weight, eps):
        x = x.astype(np.float32)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + self._w(weight))

    def layer_norm(self, x, weight, bias, eps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * self._w(weight) + self._w(bias)
