"""ONNX graphs of an exported PaliGemma, built with onnx.helper from export/graph_def.py.

`OnnxBuilder` implements graph_def.Builder; `export_onnx_graphs` builds, saves and frees one
graph at a time (vision, decoder_0..decoder_L, lm_head), each as `onnx/<name>.onnx` plus its
weights in `onnx/<name>.data` (ONNX external data, relative location, so graphs above the 2 GB
protobuf limit work). Weights are quantized row chunk by row chunk straight into a memory map
of the .data file: no full-size copy of a big matrix (the LM head) is ever held in memory.

What `linear` emits for each weight format, and what onnxruntime 1.32 (CPU) does with it
(measured; the numbers are at the end of this docstring):

    fp32   MatMul(x, W^T) with W^T an fp32 initializer [K, O] (+ Add bias).
    int8   per-row int8 (int8_kernel "dq", the default; see _matmul_dynamic_int8): each row
           scaled to max |x| = 1, QuantizeLinear to uint8 (scale 1/127, zero point 128),
           com.microsoft MatMulIntegerToFloat with int8 W^T [K, O] in 7-bit codes and
           per-channel scales, times the row max. MLAS's u8 x s8 GEMM, prepacked at load, stays
           int8. int8_kernel "nbits": MatMulNBits bits=8 as described for the int8 matrices of
           int4 below.
    int4   MatMulNBits bits=4, block_size=group_size, accuracy_level=4; codes packed two per
           byte, low nibble first (quantize.pack_uint4), default zero point 8, searched scales
           (negative ones included, as MLAS's own blockwise quantizer writes). Stays 4-bit.
           The matrices int4 keeps at int8 (quantize.matrix_format) use MatMulNBits bits=8,
           block_size=128: the per-channel scale repeated for every K block, K padded to a
           multiple of 128 with zero codes, the default zero point 128 (symmetric).
           accuracy_level=4 means the activations are quantized to int8 per block inside the
           kernel (as onnxruntime-genai does for CPU): ~6x faster than accuracy_level 0/1 for
           int4, and for 8 bits levels 0-3 have no fast kernel at all in 1.32 (the whole matrix
           is dequantized on every call, ~300x slower). It adds a small activation rounding
           error (about 0.5% of max per layer on random data).
    fp8    FLOAT8E4M3FN initializer W^T [K, O] + DequantizeLinear(axis=1, per-output-channel
           scale) + MatMul. onnxruntime has no fp8 GEMM on CPU. By default it does not constant
           fold DequantizeLinear (QDQ patterns are kept for int8 kernels), so it dequantizes
           the whole matrix on every call (10x slower than fp32) and its arena keeps the fp32
           copy anyway. The runner (engine/runtime/ort_backend.py) sets
           "session.disable_quant_qdq" = "1", which folds it to fp32 once at session creation:
           fp8 is compact on disk only; in memory it costs what fp32 costs.
    fp16   fp16 / bf16 initializer W^T + Cast(to float) + MatMul. onnxruntime folds the Cast at
    bf16   session creation (x86 CPU has no fp16/bf16 MatMul kernel: an fp16 MatMul gets Casts
           inserted and folded the same way), so these are compact on disk and fp32 in memory.

Other ops: rms_norm is explicit (x * 1/sqrt(mean(x^2) + eps) * (1 + w), with 1 + w precomputed
in fp32; onnxruntime fuses it into SimplifiedLayerNormalization), layer_norm is
LayerNormalization (opset 17+), gelu_tanh is Gelu(approximate="tanh") (opset 20+; max abs
error 7e-7 against the float64 formula). Opset 21 (DequantizeLinear with float8 inputs).

Versions written (pinned, whatever onnx package exports): ONNX IR version IR_VERSION (10) and
opset OPSET (21), the pair onnx 1.16 defined, which the oldest supported onnxruntime loads.
`helper.make_model` would stamp the installed onnx's own IR version (onnx 1.23: IR 14), which
an older onnxruntime refuses ("Unsupported model IR version: 14, max supported IR version:
13" on 1.30; 1.23 reads IR <= 11). Measured floors (tests/compat/run_floor_versions.sh): the
com.microsoft ops used exist in onnxruntime 1.23 as used here (MatMulIntegerToFloat;
MatMulNBits bits 4 and 8; 1.20 and 1.21 refuse bits=8 at load, 1.22 runs bits=8 only at
accuracy_level 4, not at the tests' exact accuracy_level 0), and onnx 1.15 builds these graphs.

Measured on a synthetic PaliGemma 3B (paligemma-3b-224, bf16 checkpoint 5.85 GB; 2 shared cores,
OrtRunner with 2 threads; timings are noisy on that machine):
    artifact     files     OrtRunner RSS   decode step (all graphs, T=1)
    int4 g128    2.0 GB    1.8 GB          80-170 ms
    int8         3.3 GB    3.2 GB          150 ms
    bf16         6.5 GB    12.7 GB         2.2 s     (fp32 in memory)
fp16 and fp8 expand to fp32 the same way (measured on an 85M-parameter test graph: RSS = fp32 size).
Export of that checkpoint to int8 ONNX: 42-160 s (warm / cold page cache), peak RSS 6.3-6.5 GB
of which 0.3 GB anonymous: the rest is the memory-mapped checkpoint and output files.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from engine.config import PaliGemmaConfig

from . import graph_def
from .quantize import check_format, check_group_size, matrix_format, pack_uint4, quantize, ROW_CHUNK_ELEMENTS

OPSET = 21
IR_VERSION = 10               # ONNX IR of opset 21 (onnx 1.16); onnxruntime 1.22 reads IR <= 10, 1.23 <= 11
MS_DOMAIN = "com.microsoft"
INT8_BLOCK = 128               # MatMulNBits block size used for per-channel int8
# The matrices of an int8 artifact: per-row int8 MatMulIntegerToFloat ("dq", ~2x faster prefill than
# MatMulNBits on AVX2 and on VNNI) or MatMulNBits bits=8 ("nbits"). The int8 matrices of an int4
# artifact (quantize.matrix_format) always use MatMulNBits.
INT8_KERNELS = ("dq", "nbits")
INT8_KERNEL = "dq"
# 7-bit codes (|code| <= 63) for every int8 matrix, "dq" and MatMulNBits bits=8 alike:
# - "dq": on x86 without VNNI, MLAS multiplies u8 x s8 with vpmaddubsw, whose int16 sum of two
#   products saturates above 32767 (255 * 127 * 2 = 64770; 255 * 63 * 2 = 32130 cannot). Measured on
#   the tiny test models (AVX2 Zen 3), cosine vs the fp32 graph: vision 0.9909 with 8-bit codes,
#   0.9996 with 7-bit; lm_head 0.9972 / 0.9999.
# - MatMulNBits bits=8 (an int4 artifact's vision tower, layer 0, v_proj): the native decoder and
#   tower read them with the same u8 x s8 kernels, whose AVX2 and AVX-512BW variants need
#   |code| <= 64 (8-bit codes take the AVX2 kernel's wide variant, 2/3 of its speed). Measured on
#   3B-224 int4 (Intel Xeon, fresh processes alternating, 3 rounds, TTFT min): capped to AVX2
#   5.50-6.09 -> 4.94-5.57 s, to AVX-512 without VNNI 4.39-4.84 -> 3.64-3.93 s; VNNI unchanged. The
#   int4 matrices' error dominates: default model, first-token logits' cosine vs fp32 on 6 prompts
#   0.99964-0.99998 with 8-bit codes, 0.99978-0.99997 with 7-bit (native decoder); the 3-layer test
#   PG2 (a third of its decoder int8) 0.9903 -> 0.9897 (tests/test_export_onnx.py).
INT8_CODE_MAX = 63
ACT_SCALE = np.float32(1 / 127)     # rows scaled to max |x| = 1 -> uint8 codes 1..255 around 128
ACT_ZERO_POINT = 128
ACCURACY_LEVEL = 4             # MatMulNBits: int8 activations inside the kernel (fast path on CPU)
ALIGN = 4096                   # external data offsets (page aligned, so they can be mapped)

_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN}


class ExternalData:
    """One external-data file: tensors are appended at aligned offsets and filled through a
    memory map, so a big tensor can be written in row chunks without a full copy in memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = 0
        self.path.write_bytes(b"")

    def tensor(self, name: str, dtype, shape) -> tuple[TensorProto, np.ndarray]:
        """(TensorProto pointing into this file, writable array view of its bytes)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = -(-self.size // ALIGN) * ALIGN
        self.size = offset + nbytes
        with open(self.path, "r+b") as f:
            f.truncate(self.size)
        t = TensorProto(name=name, data_type=_ONNX_TYPES[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        if nbytes == 0:
            return t, np.empty(shape, dtype)
        view = np.memmap(self.path, dtype=dtype, mode="r+", offset=offset, shape=tuple(shape))
        return t, view

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        t, view = self.tensor(name, array.dtype, array.shape)
        view[...] = array
        _flush(view)
        return t


def _flush(view):
    if isinstance(view, np.memmap):
        view.flush()


class OnnxBuilder:
    """graph_def.Builder for ONNX. Tensor handles are value names (str).

    weights: canonical name -> array (any float dtype, may be memory-mapped).
    weight_format / group_size: see export/quantize.py; accuracy_level: see export_onnx_graphs.
    `formats_used` records, per linear weight, the format it really got (quantize.matrix_format:
    int4 keeps some matrices at int8, and falls back to int8 where K % group_size != 0).
    on_weight(n): called with the parameter count of each weight written (progress bars).
    """

    def __init__(self, name: str, weights: Mapping[str, np.ndarray], data: ExternalData,
                 weight_format: str = "fp32", group_size: int = 128,
                 on_weight: Callable[[int], None] | None = None, accuracy_level: int = ACCURACY_LEVEL,
                 int8_kernel: str = INT8_KERNEL):
        self.name = name
        self.accuracy_level = accuracy_level
        if int8_kernel not in INT8_KERNELS:
            raise ValueError(f"int8_kernel must be one of {', '.join(INT8_KERNELS)}, got {int8_kernel!r}")
        self.int8_kernel = int8_kernel
        self.weights = weights
        self.data = data
        self.weight_format = check_format(weight_format)
        self.group_size = check_group_size(group_size) if weight_format == "int4" else group_size
        self.on_weight = on_weight or (lambda nbytes: None)
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self.graph_inputs: list = []
        self.graph_outputs: list = []
        self.formats_used: dict[str, str] = {}
        self._rank: dict[str, int] = {}
        self._weights: dict[str, str] = {}
        self._aliases: dict[str, str] = {}   # value name -> graph output name
        self._act_scale: str | None = None   # the per-row int8 kernel's shared constants
        self._act_zero: str | None = None
        self._count = 0

    # ------------------------------------------------------------------ plumbing
    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def _node(self, op: str, inputs: list[str], rank: int, hint: str | None = None, domain: str = "",
              **attrs) -> str:
        out = self._fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain or None, **attrs))
        self._rank[out] = rank
        return out

    def _const(self, array: np.ndarray, hint: str = "const") -> str:
        array = np.asarray(array)
        name = self._fresh(hint)
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        self._rank[name] = array.ndim
        return name

    def _external(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, np.ascontiguousarray(array)))
        self._rank[name] = array.ndim
        return name

    def model(self) -> onnx.ModelProto:
        for node in self.nodes:      # give graph outputs their names (value names are unique)
            for values in (node.input, node.output):
                for j, v in enumerate(values):
                    if v in self._aliases:
                        values[j] = self._aliases[v]
        graph = helper.make_graph(self.nodes, self.name, self.graph_inputs, self.graph_outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="paligemma-edge export")
        model.ir_version = IR_VERSION   # not the installed onnx's own (see the module docstring)
        return model

    # ------------------------------------------------------------------ Builder ops
    def input(self, name, shape, dtype="float32"):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.graph_inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        self._rank[name] = len(shape)
        return name

    def output(self, x, name):
        produced = any(x in n.output for n in self.nodes)
        if produced and x not in self._aliases:
            self._aliases[x] = name          # model() renames the producing node's output
        else:                                # a graph input, an initializer, or already an output
            self.nodes.append(helper.make_node("Identity", [x], [name], name=f"output_{name}"))
        self._rank[name] = self._rank[x]
        self.graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def constant(self, array):
        return self._const(np.asarray(array, np.float32) if np.asarray(array).dtype.kind == "f" else array)

    def weight(self, name):
        if name not in self._weights:
            self._weights[name] = self._external(name, np.asarray(self.weights[name], np.float32))
            self.on_weight(int(np.asarray(self.weights[name]).size))
        return self._weights[name]

    def add(self, a, b):
        return self._node("Add", [a, b], max(self._rank[a], self._rank[b]))

    def mul(self, a, b):
        return self._node("Mul", [a, b], max(self._rank[a], self._rank[b]))

    def matmul(self, a, b, transpose_b=False):
        if transpose_b:
            r = self._rank[b]
            b = self._node("Transpose", [b], r, perm=list(range(r - 2)) + [r - 1, r - 2])
        return self._node("MatMul", [a, b], max(self._rank[a], self._rank[b]))

    def softmax(self, x, axis=-1):
        return self._node("Softmax", [x], self._rank[x], axis=axis)

    def tanh(self, x):
        return self._node("Tanh", [x], self._rank[x])

    def gelu_tanh(self, x):
        return self._node("Gelu", [x], self._rank[x], approximate="tanh")

    def reshape(self, x, shape):
        return self._node("Reshape", [x, self._const(np.array(shape, np.int64), "shape")], len(shape))

    def transpose(self, x, perm):
        return self._node("Transpose", [x], len(perm), perm=list(perm))

    def rms_norm(self, x, weight, eps):
        w1 = self._weights.get(weight + "+1")
        if w1 is None:   # (1 + w) in fp32, as the reference computes it
            w1 = self._weights[weight + "+1"] = self._external(
                weight + "+1", np.float32(1.0) + np.asarray(self.weights[weight], np.float32))
            self.on_weight(int(np.asarray(self.weights[weight]).size))
        r = self._rank[x]   # Pow, ReduceMean, Add, Sqrt, Div, Mul: onnxruntime's fusion pattern
        sq = self._node("Pow", [x, self.constant(np.float32(2.0))], r)
        ms = self._node("ReduceMean", [sq, self._const(np.array([-1], np.int64), "axes")], r, keepdims=1)
        rms = self._node("Sqrt", [self.add(ms, self.constant(np.float32(eps)))], r)
        return self.mul(self._node("Div", [x, rms], r), w1)

    def layer_norm(self, x, weight, bias, eps):
        return self._node("LayerNormalization", [x, self.weight(weight), self.weight(bias)], self._rank[x],
                          axis=-1, epsilon=float(eps))

    # ------------------------------------------------------------------ linear
    def linear(self, x, weight, bias=None, *, weight_array=None):
        w = self.weights[weight] if weight_array is None else weight_array
        O, K = w.shape
        fmt = matrix_format(weight, self.weight_format, K, self.group_size)
        self.formats_used[weight] = fmt
        if fmt == "int8" and self.weight_format == "int8" and self.int8_kernel == "dq":
            y = self._matmul_dynamic_int8(x, weight, w, bias)
        elif fmt in ("int8", "int4"):
            y = self._matmul_nbits(x, weight, w, fmt, bias)
        else:
            y = self._node("MatMul", [x, self._float_weight(weight, w, fmt)], self._rank[x], hint="linear")
            if bias is not None:
                y = self.add(y, self.weight(bias))
        self.on_weight(int(w.size))
        return y

    def _float_weight(self, name: str, w: np.ndarray, fmt: str) -> str:
        """W^T [K, O] for MatMul: fp32 as is; fp16 / bf16 + Cast; fp8 + DequantizeLinear."""
        O, K = w.shape
        store = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16,
                 "fp8": ml_dtypes.float8_e4m3fn}[fmt]
        tensor, view = self.data.tensor(name, store, (K, O))
        scales = np.empty(O, np.float32) if fmt == "fp8" else None
        for rows in _row_chunks(O, K):
            q = quantize(w[rows], fmt)
            view[:, rows] = q.data.T
            if scales is not None:
                scales[rows] = q.scales
        _flush(view)
        del view
        self.initializers.append(tensor)
        self._rank[name] = 2
        if fmt == "fp32":
            return name
        if fmt == "fp8":
            s = self._external(name + ".scales", scales)
            return self._node("DequantizeLinear", [name, s], 2, hint="dequant", axis=1)
        return self._node("Cast", [name], 2, hint="cast", to=TensorProto.FLOAT)

    def _matmul_dynamic_int8(self, x: str, name: str, w: np.ndarray, bias: str | None) -> str:
        """Per-row int8: r = max |x| per row, q = QuantizeLinear(x / r, 1/127, 128) (uint8),
        y = MatMulIntegerToFloat(q, Wq, 1/127, s, 128) * r.

        Every row (a prefill token or a decode sequence) gets its own scale, so a row's result
        does not depend on the other rows of the call: a request gives the same numbers alone or
        batched. (DynamicQuantizeMatMul would quantize with one range for the whole tensor.)
        MatMulIntegerToFloat runs MLAS's u8 x s8 GEMM (VNNI, or vpmaddubsw on AVX2: ~2x fp32
        there). Wq is int8 W^T [K, O] with 7-bit codes (INT8_CODE_MAX), s the per-channel
        scales."""
        O, K = w.shape
        Wt, view = self.data.tensor(name, np.int8, (K, O))
        scales = np.empty(O, np.float32)
        for rows in _row_chunks(O, K):
            q = quantize(w[rows], "int8", int8_max=INT8_CODE_MAX)
            view[:, rows] = q.data.T
            scales[rows] = q.scales
        _flush(view)
        del view
        self.initializers.append(Wt)
        self._rank[name] = 2
        r = self._rank[x]
        row_max = self._node("ReduceMax", [self._node("Abs", [x], r), self._const(np.array([-1], np.int64), "axes")],
                             r, keepdims=1)
        row_max = self._node("Max", [row_max, self.constant(np.float32(1e-30))], r)   # all-zero rows
        if self._act_scale is None:
            self._act_scale = self._const(np.array(ACT_SCALE, np.float32), "act_scale")
            self._act_zero = self._const(np.array(ACT_ZERO_POINT, np.uint8), "act_zero_point")
        q = self._node("QuantizeLinear", [self._node("Div", [x, row_max], r), self._act_scale, self._act_zero], r,
                       hint="quantize")
        y = self._node("MatMulIntegerToFloat", [q, name, self._act_scale, self._external(name + ".scales", scales),
                                                self._act_zero], r, hint="linear", domain=MS_DOMAIN)
        y = self.mul(y, row_max)
        return self.add(y, self.weight(bias)) if bias is not None else y

    def _matmul_nbits(self, x: str, name: str, w: np.ndarray, fmt: str, bias: str | None) -> str:
        """com.microsoft MatMulNBits: B uint8 [O, k_blocks, block * bits / 8], scales [O, k_blocks]."""
        O, K = w.shape
        bits, block = (8, INT8_BLOCK) if fmt == "int8" else (4, self.group_size)
        k_blocks = -(-K // block)
        B, view = self.data.tensor(name, np.uint8, (O, k_blocks, block * bits // 8))
        scales = np.empty((O, k_blocks), np.float32)
        for rows in _row_chunks(O, K):
            q = quantize(w[rows], fmt, self.group_size, int8_max=INT8_CODE_MAX)
            n = q.data.shape[0]
            if bits == 8:   # per-channel int8: codes + 128 (default zero point), pad K with zeros
                codes = np.full((n, k_blocks * block), 128, np.uint8)
                codes[:, :K] = (q.data.astype(np.int16) + 128).astype(np.uint8)
                view[rows] = codes.reshape(n, k_blocks, block)
                scales[rows] = q.scales[:, None]
            else:
                view[rows] = pack_uint4(q.data).reshape(n, k_blocks, block // 2)
                scales[rows] = q.scales
        _flush(view)
        del view
        self.initializers.append(B)
        inputs = [x, name, self._external(name + ".scales", scales)]
        if bias is not None:
            inputs += ["", "", self.weight(bias)]     # zero_points, g_idx: absent
        return self._node("MatMulNBits", inputs, self._rank[x], hint="linear", domain=MS_DOMAIN,
                          K=K, N=O, bits=bits, block_size=block, accuracy_level=self.accuracy_level)


def _row_chunks(n_rows: int, K: int):
    step = max(1, ROW_CHUNK_ELEMENTS // max(K, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


# ---------------------------------------------------------------------------- whole model


def graph_param_counts(cfg: PaliGemmaConfig, weights: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Parameters each graph reads (for progress bars)."""
    out = {}
    for name in graph_def.graph_names(cfg):
        b = _CountingBuilder(weights)
        graph_def.build_graph(b, cfg, name, weights)
        out[name] = b.count
    return out




def export_onnx_graphs(cfg: PaliGemmaConfig, weights: Mapping[str, np.ndarray], out_dir: str | os.PathLike,
                       weight_format: str = "fp32", group_size: int = 128,
                       on_weight: Callable[[int], None] | None = None,
                       on_graph: Callable[[str], None] | None = None,
                       accuracy_level: int = ACCURACY_LEVEL, int8_kernel: str = INT8_KERNEL) -> tuple[dict[str, str], dict[str, str]]:
    """Build and save every graph into out_dir (one graph at a time: build, save, free).

    accuracy_level: MatMulNBits' compute type for int8 / int4 (4: int8 activations, the fast
    CPU path; 0: fp32 activations, exact but slow, used by tests to check the weight encoding).

    Returns ({graph name: file name relative to out_dir}, {linear weight: format it got})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, formats = {}, {}
    for name in graph_def.graph_names(cfg):
        if on_graph:
            on_graph(name)
        data = ExternalData(out_dir / f"{name}.data")
        b = OnnxBuilder(name, weights, data, weight_format, group_size, on_weight, accuracy_level, int8_kernel)
        graph_def.build_graph(b, cfg, name, weights)
        onnx.save_model(b.model(), out_dir / f"{name}.onnx")
        files[name] = f"{name}.onnx"
        formats.update(b.formats_used)
        del b
    return files, formats


class _CountingBuilder:
    """Counts the parameters a graph reads, computing nothing (every other op is a no-op)."""

    def __init__(self, weights):
        self.weights, self.count, self._seen = weights, 0, set()

    def _count(self, name, array=None):
        if name not in self._seen:
            self._seen.add(name)
            self.count += int((self.weights[name] if array is None else array).size)

    def linear(self, x, weight, bias=None, *, weight_array=None):
        self._count(weight, weight_array)
        if bias is not None:
            self._count(bias)

    def weight(self, name):
        self._count(name)

    def rms_norm(self, x, weight, eps):
        self._count(weight)

    def layer_norm(self, x, weight, bias, eps):
        self._count(weight)
        self._count(bias)

    def __getattr__(self, op):
        return lambda *args, **kwargs: None
