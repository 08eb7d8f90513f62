"""OpenVINO graphs of an exported PaliGemma, built with the opset Python API from export/graph_def.py.

`OvBuilder` implements graph_def.Builder; `export_openvino_graphs` builds, saves and frees one
graph at a time (vision, decoder_0..decoder_L, lm_head), each as `openvino/<name>.xml` + `.bin`.

What `linear` emits for each weight format (W [O, K], y = x @ W^T), and what the OpenVINO 2026.4
CPU plugin does with it (measured, INFERENCE_PRECISION_HINT f32 unless said otherwise):

    fp32   Constant f32 [O, K] -> MatMul(transpose_b). FullyConnected f32; the plugin repacks
           the weights into its own layout (anonymous memory) and the .bin pages it read stay
           mapped (file-backed RSS) until released (see engine/runtime/ov_backend.py).
    int8   Constant i8 [O, K] -> Convert f32 -> Multiply(scale [O, 1]) -> MatMul(transpose_b).
           The plugin fuses the pattern into a FullyConnected with i8 weights (runtime
           precision "i8"): weights stay int8 in memory, decompressed inside the kernel.
    int4   Constant i4 [O, K/g, g] (two values per byte, element 2j in the low nibble) ->
           Convert f32 -> Multiply(scale [O, K/g, 1]) -> Reshape [O, K] -> MatMul. Symmetric, no
           zero point, searched scales (some negative). Fused into FullyConnected with i4 weights:
           stays 4-bit in memory. The matrices int4 keeps at int8, and those whose K is not a
           multiple of g, use the int8 pattern (quantize.matrix_format).
    fp8    Constant f8e4m3 [O, K] -> Convert f32 (marked "decompression") -> Multiply(scale
           [O, 1]) -> MatMul. The CPU plugin has no fp8 FullyConnected: it constant-folds the
           pattern to f32 when the model is compiled (slowly without avx512_fp16: ~6 s per GB
           of fp32). fp8 is compact on disk only; in memory it costs what fp32 costs. Unmarked,
           the plugin would instead keep a runtime Convert per matrix and re-expand every
           weight on every call (slower still, same memory).
    fp16   Constant f16 / bf16 [O, K] -> Convert f32 (marked "decompression") -> MatMul. With
    bf16   the f32 precision hint the plugin expands them to f32 at the first inference (2x
           the file size in memory); with the bf16 hint the FullyConnected runs in bf16 and the
           weights stay 16-bit. Without the mark the plugin folds the Convert at compile time
           and, in bf16 mode, keeps the f32 copy as well (measured 3x more memory).

The "decompression" mark is the rt_info attribute OpenVINO's own compress_to_fp16 puts on its
Convert nodes. The Python API cannot create it, so `mark_decompression` adds it to the saved
.xml (only to Convert nodes whose input is an f16 / bf16 / f8e4m3 Constant).

Other ops: rms_norm is x * Power(Sqrt(ReduceMean(Power(x, 2), -1) + eps), -1) * (1 + w), with
1 + w precomputed in fp32 and the gamma constant first, exactly the pattern of OpenVINO's
RMSFusion (fused into one RMS node); layer_norm is MVN(eps inside sqrt) * w + b; gelu_tanh is
Gelu(approximation_mode="tanh"). Everything except the linear weights is fp32.
"""
from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops      # OpenVINO >= 2025.0 (2024.x has neither this path nor ov.Node)

from engine.config import PaliGemmaConfig

from . import graph_def
from .quantize import check_format, check_group_size, matrix_format, quantize, summarize_formats

# Convert nodes fed by constants of these types get the "decompression" mark.
MARKED_CONSTANT_TYPES = ("f16", "bf16", "f8e4m3")

PATTERNS = {
    "fp32": "Constant f32 -> MatMul",
    "fp16": "Constant f16 -> Convert f32 (decompression) -> MatMul",
    "bf16": "Constant bf16 -> Convert f32 (decompression) -> MatMul",
    "int8": "Constant i8 [O,K] -> Convert f32 -> Multiply scale [O,1] -> MatMul",
    "int4": "Constant i4 [O,K/g,g] -> Convert f32 -> Multiply scale [O,K/g,1] -> Reshape [O,K] -> MatMul",
    "fp8": "Constant f8e4m3 [O,K] -> Convert f32 (decompression) -> Multiply scale [O,1] -> MatMul",
}


def _raw_constant(ov_type: ov.Type, shape: list[int], raw: np.ndarray) -> ov.Node:
    """A Constant of `ov_type` (bf16, i4, f8e4m3: types numpy lacks) from its raw bytes."""
    t = ov.Tensor(ov_type, shape)
    dst = t.data.view(np.uint8).reshape(-1)
    src = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if dst.size != src.size:
        raise ValueError(f"internal error: {src.size} bytes for a {ov_type} constant of shape {shape}")
    dst[:] = src
    return ops.constant(t)


def pack_int4(data: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] (even element count) -> bytes, two's-complement nibbles, element 2j
    in the low nibble of byte j (OpenVINO's i4 layout)."""
    u = (np.ascontiguousarray(data).reshape(-1, 2).astype(np.uint8) & 0x0F)
    return (u[:, 0] | (u[:, 1] << 4)).astype(np.uint8)


class OvBuilder:
    """graph_def.Builder for OpenVINO. Weights are quantized as `linear` meets them."""

    def __init__(self, weights: Mapping[str, np.ndarray], weight_format: str = "fp32", group_size: int = 128,
                 on_weight=None):
        self.weights = weights
        self.weight_format = check_format(weight_format)
        self.group_size = check_group_size(group_size) if weight_format == "int4" else group_size
        self.on_weight = on_weight           # called with the parameter count of each weight read
        self.params: list = []
        self.results: list = []
        self.formats_used: dict[str, str] = {}
        self._linear_outputs: set[int] = set()   # ids of bias-free linear MatMul nodes

    def model(self, name: str) -> ov.Model:
        return ov.Model(self.results, self.params, name)

    # ------------------------------------------------------------------ graph I/O
    def input(self, name, shape, dtype="float32"):
        if dtype != "float32":
            raise ValueError(f"graph input {name}: only float32 inputs are supported, got {dtype}")
        p = ops.parameter(ov.PartialShape([d if isinstance(d, int) else -1 for d in shape]), ov.Type.f32, name=name)
        p.output(0).get_tensor().set_names({name})
        self.params.append(p)
        return p

    def output(self, x, name):
        out = x.output(0) if isinstance(x, ov.Node) else x
        out.get_tensor().set_names({name})
        r = ops.result(out)
        r.set_friendly_name(name)
        self.results.append(r)

    # ------------------------------------------------------------------ weights
    def _array(self, name: str) -> np.ndarray:
        arr = self.weights[name]
        if self.on_weight:
            self.on_weight(int(arr.size))
        return arr

    def constant(self, array):
        return ops.constant(np.asarray(array))

    def weight(self, name):
        return ops.constant(np.asarray(self._array(name), np.float32))

    def linear(self, x, weight, bias=None, *, weight_array=None):
        if weight_array is None:
            w = self._array(weight)
        else:
            w = weight_array
            if self.on_weight:
                self.on_weight(int(w.size))
        O, K = w.shape
        fmt = matrix_format(weight, self.weight_format, K, self.group_size)
        self.formats_used[weight] = fmt
        q = quantize(w, fmt, self.group_size)
        if fmt == "fp32":
            W = ops.constant(q.data)
        elif fmt == "fp16":
            W = ops.convert(ops.constant(q.data), ov.Type.f32)
        elif fmt == "bf16":
            W = ops.convert(_raw_constant(ov.Type.bf16, [O, K], q.data), ov.Type.f32)
        elif fmt == "int8":
            W = ops.multiply(ops.convert(ops.constant(q.data), ov.Type.f32), ops.constant(q.scales.reshape(O, 1)))
        elif fmt == "fp8":
            W = ops.multiply(ops.convert(_raw_constant(ov.Type.f8e4m3, [O, K], q.data), ov.Type.f32),
                             ops.constant(q.scales.reshape(O, 1)))
        elif fmt == "int4":
            g = q.group_size
            c = ops.convert(_raw_constant(ov.Type.i4, [O, K // g, g], pack_int4(q.data)), ov.Type.f32)
            W = ops.reshape(ops.multiply(c, ops.constant(q.scales.reshape(O, K // g, 1))),
                            ops.constant(np.array([O, K], np.int64)), special_zero=False)
        else:  # check_format rejected anything else
            raise AssertionError(fmt)
        del q
        y = ops.matmul(x, W, transpose_a=False, transpose_b=True)
        if bias is not None:
            return ops.add(y, self.weight(bias))
        self._linear_outputs.add(id(y))
        return y

    # ------------------------------------------------------------------ elementwise and shape ops
    def add(self, a, b):
        return ops.add(a, b)

    def mul(self, a, b):
        if id(a) in self._linear_outputs and b.get_type_name() == "Constant" and len(b.get_output_shape(0)) == 0:
            # OpenVINO's MatMulMultiplyFusion rewrites "MatMul(x, W) * scalar constant" (the PG2 LM
            # head's softcap) into MatMul(x, W * scalar), which breaks the compressed-weight
            # pattern: the CPU plugin then expands the int8 / int4 matrix to f32 on every call.
            # A size-1 axis around the multiply hides the MatMul from that rewrite; the plugin
            # still fuses the multiply (and the tanh after it) into the FullyConnected.
            return ops.squeeze(ops.multiply(ops.unsqueeze(a, ops.constant(np.int64(-2))), b),
                               ops.constant(np.int64(-2)))
        return ops.multiply(a, b)

    def matmul(self, a, b, transpose_b=False):
        return ops.matmul(a, b, transpose_a=False, transpose_b=transpose_b)

    def softmax(self, x, axis=-1):
        return ops.softmax(x, axis)

    def tanh(self, x):
        return ops.tanh(x)

    def gelu_tanh(self, x):
        return ops.gelu(x, approximation_mode="tanh")

    def reshape(self, x, shape):
        return ops.reshape(x, ops.constant(np.array(shape, np.int64)), special_zero=True)

    def transpose(self, x, perm):
        return ops.transpose(x, ops.constant(np.array(perm, np.int64)))

    def rms_norm(self, x, weight, eps):
        # RMSFusion's pattern: gamma * (x * (sqrt(mean(x^2) + eps))^-1), gamma = 1 + w in fp32
        gamma = ops.constant(np.float32(1.0) + np.asarray(self._array(weight), np.float32))
        ms = ops.reduce_mean(ops.power(x, ops.constant(np.float32(2.0))), ops.constant(np.array([-1], np.int64)),
                             keep_dims=True)
        inv = ops.power(ops.sqrt(ops.add(ms, ops.constant(np.float32(eps)))), ops.constant(np.float32(-1.0)))
        return ops.multiply(gamma, ops.multiply(x, inv))

    def layer_norm(self, x, weight, bias, eps):
        y = ops.mvn(x, ops.constant(np.array([-1], np.int64)), normalize_variance=True, eps=float(eps),
                    eps_mode="inside_sqrt")
        return ops.add(ops.multiply(y, self.weight(weight)), self.weight(bias))


# ---------------------------------------------------------------------------- saving
def mark_decompression(xml_path: str | os.PathLike) -> int:
    """Add the "decompression" rt_info attribute to every Convert fed by an f16 / bf16 / f8e4m3
    Constant in a saved IR (what ov.save_model(compress_to_fp16=True) writes for its own f16
    weights). Returns the number of Convert nodes marked."""
    tree = ET.parse(xml_path)
    root = tree.getroot()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    marked_consts = {lid for lid, layer in layers.items() if layer.get("type") == "Const"
                     and layer.find("data") is not None
                     and layer.find("data").get("element_type") in MARKED_CONSTANT_TYPES}
    n = 0
    for edge in root.iter("edge"):
        if edge.get("from-layer") not in marked_consts:
            continue
        layer = layers[edge.get("to-layer")]
        if layer.get("type") != "Convert" or layer.find("rt_info") is not None:
            continue
        rt = ET.Element("rt_info")
        ET.SubElement(rt, "attribute", name="decompression", version="0")
        layer.insert(1, rt)   # after <data>, as OpenVINO writes it
        n += 1
    if n:
        tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return n


# ---------------------------------------------------------------------------- whole model




def _param_counts(cfg: PaliGemmaConfig, weights: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Parameters each graph reads (for the progress bar), from the tensor shapes alone."""
    counts = dict.fromkeys(graph_def.graph_names(cfg), 0)
    t = cfg.text
    for name, arr in weights.items():
        if name.startswith(("vision.", "projector.")):
            counts["vision"] += int(arr.size)
        elif name.startswith("text.layers."):
            i, rest = name.split(".")[2], name.split(".", 3)[3]
            start = rest.startswith(("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
            counts[f"decoder_{int(i) + (0 if start else 1)}"] += int(arr.size)
        elif name == "text.norm.weight" or name == ("text.embed_tokens.weight" if t.tie_word_embeddings
                                                   else "lm_head.weight"):
            counts["lm_head"] += int(arr.size)
    return counts


def export_openvino_graphs(cfg: PaliGemmaConfig, weights: Mapping[str, np.ndarray], out_dir: str | os.PathLike,
                           weight_format: str = "fp32", group_size: int = 128,
                           progress: bool = True) -> tuple[dict[str, str], dict]:
    """Build and save every graph as out_dir/<name>.xml + .bin, one at a time (build, save, free).

    out_dir is the artifact's openvino/ directory. Returns ({graph name: path relative to the
    artifact directory, "openvino/<name>.xml"}, quantization info: "formats" (every linear
    weight -> the format it got), "fallbacks" (int4 -> int8 where the group size does not divide
    K), "groups" (quantize.summarize_formats), the OpenVINO pattern of each format used and the opset)."""
    from tqdm import tqdm

    check_format(weight_format)
    if weight_format == "int4":
        check_group_size(group_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = _param_counts(cfg, weights)
    bar = tqdm(total=sum(counts.values()), desc=f"openvino graphs ({weight_format})", unit=" params",
               unit_scale=True, disable=not (progress and sys.stderr.isatty()), file=sys.stderr, dynamic_ncols=True)
    files, formats = {}, {}
    try:
        for name in graph_def.graph_names(cfg):
            bar.set_postfix_str(name)
            b = OvBuilder(weights, weight_format, group_size, on_weight=bar.update)
            graph_def.build_graph(b, cfg, name, weights)
            xml = out_dir / f"{name}.xml"
            ov.save_model(b.model(name), xml, compress_to_fp16=False)
            mark_decompression(xml)
            files[name] = f"{out_dir.name}/{name}.xml"
            formats.update(b.formats_used)
            del b          # frees this graph's constants before the next graph is built
    finally:
        bar.close()
    info = {"formats": formats,
            **summarize_formats(formats, weight_format),      # "groups", "fallbacks"
            "patterns": {f: PATTERNS[f] for f in sorted(set(formats.values()))},
            "int4_group_size": group_size if weight_format == "int4" else None,
            "opset": "opset13", "openvino_version": ov.get_version()}
    return files, info
