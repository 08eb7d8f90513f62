"""Weight formats for export: quantize a weight matrix W [O, K] and the reference dequantizer.

Formats (all symmetric, no zero points):

    fp32, fp16, bf16   the matrix cast to that float type; scales None
    int8               per output channel: data int8 [O, K] in [-127, 127], scales float32 [O],
                       W ~= data * scales[:, None], scale = max|row| / 127
    int4               group-wise along K: data int8 [O, K] holding values in [-8, 7] (unpacked;
                       each backend packs them its own way, see `pack_uint4`), scales float32
                       [O, K // group_size], W ~= data * scale of its group; the scale of each
                       group is searched (see "int4 scales" below) and may be negative
    fp8                float8 e4m3fn (ml_dtypes.float8_e4m3fn) per output channel: max |row|
                       maps to 448 (the largest finite e4m3fn value), scales float32 [O]

int4 scales. Plain round-to-nearest with scale = max|group| / 7 uses only 15 of the 16 codes and
never trades a little clipping of the largest value for a finer step. Per group, `quantize`
instead tries the scales s = -m / d for every d in INT4_DIVISORS, m being the group's
signed largest-magnitude value (so m itself lands on the code -8 for d = 8: the sign
convention of llama.cpp's Q4_0 and of onnxruntime's MLAS blockwise quantizer; d = 7 is plain
max / 7 rounding, d > 8 clips the tail at 8 / d of max|group|). For each candidate the
codes are q = clip(rint(w / s), -8, 7); the candidate kept is the one whose codes leave the
smallest squared error after a least-squares scale, and that least-squares scale
<q, w> / <q, q> is the group's final scale. Since d = 7 reproduces round-to-nearest (codes
negated, same error) and the least-squares scale can only lower the error of given codes, no
group ends with a larger squared error than plain round-to-nearest (tests/test_quantize.py
checks this); on Gaussian weights the squared error is about 30% lower (groups 16 to 128). The search runs on cache-sized blocks of
groups inside every row chunk: about 2x the time of plain rounding (a 16384 x 2304 matrix on one
core: 0.35-0.7 s for groups 128 to 16, against 0.2-0.3 s).

int4 needs K % group_size == 0. A matrix whose K does not divide falls back to int8 (per
channel) for that matrix only: `effective_format` says which format a matrix really gets, and
the exporter records every fallback in the manifest. Example: SigLIP mlp.fc2 has K = 4304, which
no power-of-two group size >= 32 divides (int4 keeps the vision tower at int8 anyway, see below).

int4 is mixed precision. `matrix_format` keeps these matrices at int8 per channel
(INT4_INT8_MATRICES), the way NNCF / optimum-intel's int4 defaults keep the embedding, the LM
head and a VLM's vision encoder at int8, and llama.cpp's k-quant mixes give attn_v more bits:
    - the LM head (the tied embedding matrix, or lm_head.weight); the embedding table the engine
      gathers from is int8 per row for every integer format anyway (export/pipeline.py);
    - the vision tower and the projector (run once per image, never per generated token);
    - decoder layer 0 (all seven matrices): its rounding error is amplified by every later layer;
    - v_proj of every decoder layer: the smallest matrix of a GQA / MQA layer (3% of a PaliGemma 2
      3B decoder layer, 0.5% of a PaliGemma 1 one).
Every other decoder matrix is int4 (the K fallback above aside): 93-94% of the decoder's linear
parameters and 88-89% of their bytes on PaliGemma 1 / 2 3B (group 64 or 128); on the 2- and
3-layer test models 49-63% of the parameters, layer 0 being a third or half of them. The exporter
records the rule and that share in the manifest (weights.mixed_precision, weights.int4_share).
Measured on the tiny test models (logits cosine vs the fp32 reference, onnxruntime and OpenVINO;
tests/test_export_onnx.py, tests/test_export_openvino.py): all-int4 round-to-nearest 0.92-0.99,
searched scales + this mix 0.989-0.999.

An all-zero row (or group) gets scale 1.0, never 0/0: data is then all zeros and dequantizes to
zeros exactly. Non-finite weights are rejected with an error.

Big matrices (the 257216 x 2304 LM head) are processed in chunks of rows, so the temporary
float32 copies stay small whatever the input dtype (bf16 memory-mapped arrays included).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
FLOAT_FORMATS = ("fp32", "fp16", "bf16")

INT4_MAX = 7.0
FP8_MAX = 448.0          # largest finite float8_e4m3fn
ROW_CHUNK_ELEMENTS = 1 << 24   # ~64 MB of float32 per chunk
# int4 scale candidates s = -m / d (m: the group's signed largest-magnitude value): 7 is plain
# round-to-nearest, 8 maps m to the code -8, 8 / r clips the tail at r * max|group|
INT4_DIVISORS = (7.0, 8.0) + tuple(8.0 / r for r in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7))
SEARCH_BLOCK_ELEMENTS = 1 << 18   # int4 scale search: values per block (1 MB of float32: stays in cache)

# int4 mixed precision (see the module docstring): matrices kept at int8 per channel
INT4_INT8_MATRICES = {
    "lm_head": "the LM head (tied embedding or lm_head.weight)",
    "vision": "the vision tower and the projector",
    "text.layers.0": "decoder layer 0",
    "text.v_proj": "v_proj of every decoder layer",
}

_FLOAT_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16),
                 "bf16": np.dtype(ml_dtypes.bfloat16)}


@dataclass
class QuantizedWeight:
    format: str                   # one of WEIGHT_FORMATS
    data: np.ndarray              # [O, K]: float32/float16/bfloat16, int8 (int8 and int4), float8_e4m3fn
    scales: np.ndarray | None     # float32 [O] (int8, fp8), [O, K // group_size] (int4), None (floats)
    group_size: int | None        # int4 only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the weight needs when stored compactly (int4 counted packed: 2 values per byte)."""
        data = self.data.size // 2 if self.format == "int4" else self.data.nbytes
        return int(data + (0 if self.scales is None else self.scales.nbytes))


def check_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    return fmt


def check_group_size(group_size: int) -> int:
    """int4 group sizes: a power of two >= 16 (what onnxruntime's MatMulNBits accepts)."""
    if not isinstance(group_size, (int, np.integer)) or group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group size {group_size!r} is not a power of two >= 16; use e.g. 32, 64 or 128")
    return int(group_size)


def effective_format(fmt: str, K: int, group_size: int) -> str:
    """The format a matrix with K input features really gets: int4 falls back to int8 when
    K is not a multiple of group_size. Every other format is kept as is."""
    check_format(fmt)
    if fmt == "int4" and K % group_size != 0:
        return "int8"
    return fmt


def int4_precision_group(name: str) -> str | None:
    """The INT4_INT8_MATRICES key of a canonical weight name, or None for an int4 matrix."""
    if name in ("text.embed_tokens.weight", "lm_head.weight"):
        return "lm_head"
    if name.startswith(("vision.", "projector.")):
        return "vision"
    if name.startswith("text.layers.0."):
        return "text.layers.0"
    if name.startswith("text.layers.") and name.endswith(".self_attn.v_proj.weight"):
        return "text.v_proj"
    return None


def matrix_format(name: str, fmt: str, K: int, group_size: int) -> str:
    """The format the matrix `name` (canonical name, K input features) gets in an export with
    weights `fmt`: int4's mixed precision (int8 for INT4_INT8_MATRICES), then the int4 -> int8
    fallback of `effective_format`. Both backends and the manifest use this one rule."""
    check_format(fmt)
    if fmt == "int4" and int4_precision_group(name) is not None:
        return "int8"
    return effective_format(fmt, K, group_size)


def weight_group(name: str) -> str:
    """Tensor group of a matrix in the manifest: vision, projector, lm_head, text.layers.0
    (decoder layer 0), text.v_proj (v_proj of layers 1..L-1) - the two decoder parts int4 keeps
    at int8 - or text (every other decoder matrix)."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("projector."):
        return "projector"
    return int4_precision_group(name) or "text"


def summarize_formats(formats: Mapping[str, str], fmt: str) -> dict:
    """{"groups": {group: formats used, "+"-joined}, "fallbacks": {matrix: format}} for the
    formats every matrix got (matrix_format) in an export with weights `fmt`. Fallbacks are the
    int4 -> int8 fallbacks of `effective_format` only, not int4's int8 matrices by design."""
    groups: dict[str, set] = {}
    for name, f in formats.items():
        groups.setdefault(weight_group(name), set()).add(f)
    fallbacks = {n: f for n, f in formats.items()
                 if f != fmt and not (fmt == "int4" and int4_precision_group(n) is not None)}
    return {"groups": {g: "+".join(sorted(f)) for g, f in groups.items()}, "fallbacks": fallbacks}


def _row_chunks(n_rows: int, K: int):
    step = max(1, ROW_CHUNK_ELEMENTS // max(K, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _chunk_f32(w: np.ndarray, rows: slice) -> np.ndarray:
    c = np.array(w[rows], dtype=np.float32)   # always a copy: callers scale it in place
    if not np.isfinite(c).all():
        bad = rows.start + int(np.argwhere(~np.isfinite(c))[0][0])
        raise ValueError(f"weight has a non-finite value (NaN or inf) in row {bad}; the checkpoint is corrupted")
    return c


def _safe_scale(amax: np.ndarray, qmax: float) -> np.ndarray:
    scale = (amax / np.float32(qmax)).astype(np.float32)
    # all-zero rows/groups (and amax so small that amax/qmax underflows) get scale 1.0
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def _int4_groups(groups: np.ndarray, data: np.ndarray, scales: np.ndarray) -> None:
    """Quantize float32 groups [n, g] to int4 codes data [n, g] (int8) and scales [n] with the
    scale search of the module docstring, SEARCH_BLOCK_ELEMENTS values at a time."""
    n, g = groups.shape
    step = max(1, SEARCH_BLOCK_ELEMENTS // g)
    buf = np.empty((min(step, n), g), np.float32)
    one = np.float32(1.0)
    for start in range(0, n, step):
        c = groups[start:start + step]
        k = c.shape[0]
        y = buf[:k]
        m = c[np.arange(k), np.abs(c).argmax(axis=1)]       # signed largest-magnitude value
        neg_m = np.where(m == 0, -one, -m)                   # all-zero group: u = 0, codes 0
        u = c / neg_m[:, None]                               # in [-1, 1]; m itself at -1
        uu = np.einsum("ij,ij->i", u, u)
        best = np.full(k, np.inf, np.float32)
        best_d = np.full(k, INT4_DIVISORS[0], np.float32)
        for d in INT4_DIVISORS:                              # scale -m / d: codes rint(u * d)
            np.multiply(u, np.float32(d), out=y)
            np.clip(np.rint(y, out=y), -8, 7, out=y)
            uq = np.einsum("ij,ij->i", u, y)
            qq = np.einsum("ij,ij->i", y, y)
            err = uu - uq * uq / np.where(qq > 0, qq, one)   # error left by the least-squares scale / m^2
            better = err < best
            best[better] = err[better]
            best_d[better] = d
        np.multiply(u, best_d[:, None], out=y)
        np.clip(np.rint(y, out=y), -8, 7, out=y)
        uq = np.einsum("ij,ij->i", u, y)
        qq = np.einsum("ij,ij->i", y, y)
        s = neg_m * uq / np.where(qq > 0, qq, one)           # least-squares scale of the codes
        zero = (qq == 0) | (s == 0)          # all-zero group, or |m| so tiny that the scale underflows
        y[zero] = 0
        data[start:start + k] = y
        scales[start:start + k] = np.where(zero, one, s)


def quantize(w: np.ndarray, fmt: str, group_size: int = 128, *, int8_max: int = 127) -> QuantizedWeight:
    """Quantize a weight matrix W [O, K] (any float dtype, may be memory-mapped) to `fmt`.

    For int4 the caller must pass a K that group_size divides (see `effective_format`).
    int8_max: the largest int8 code (127; 63 gives the 7-bit codes of onnx_graphs' dynamic
    int8 kernel, whose u8 x s8 products must not saturate vpmaddubsw's int16 pair sums)."""
    check_format(fmt)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight [O, K], got shape {w.shape}")
    O, K = w.shape
    if fmt in FLOAT_FORMATS:
        data = np.empty((O, K), _FLOAT_DTYPES[fmt])
        for rows in _row_chunks(O, K):
            data[rows] = _chunk_f32(w, rows).astype(data.dtype)
        return QuantizedWeight(fmt, data, None, None)

    if fmt == "int4":
        check_group_size(group_size)
        if K % group_size:
            raise ValueError(f"int4 needs K divisible by the group size: K={K}, group size {group_size}; "
                             "call effective_format() to get the int8 fallback for this matrix")
        G = K // group_size
        data = np.empty((O, K), np.int8)
        scales = np.empty((O, G), np.float32)
        data_groups, scale_groups = data.reshape(O * G, group_size), scales.reshape(O * G)   # views
        for rows in _row_chunks(O, K):
            c = _chunk_f32(w, rows)
            groups = slice(rows.start * G, rows.stop * G)
            _int4_groups(c.reshape(-1, group_size), data_groups[groups], scale_groups[groups])
        return QuantizedWeight("int4", data, scales, group_size)

    # int8 and fp8: one scale per output channel
    if not 1 <= int8_max <= 127:
        raise ValueError(f"int8_max must be in 1..127, got {int8_max}")
    qmax = float(int8_max) if fmt == "int8" else FP8_MAX
    data = np.empty((O, K), np.int8 if fmt == "int8" else ml_dtypes.float8_e4m3fn)
    scales = np.empty((O,), np.float32)
    for rows in _row_chunks(O, K):
        c = _chunk_f32(w, rows)
        s = _safe_scale(np.abs(c).max(axis=-1) if K else np.zeros(c.shape[0], np.float32), qmax)
        c /= s[:, None]
        if fmt == "int8":
            data[rows] = np.clip(np.rint(c), -int8_max, int8_max).astype(np.int8)
        else:
            data[rows] = np.clip(c, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        scales[rows] = s
    return QuantizedWeight(fmt, data, scales, None)


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """The reference dequantizer: float32 [O, K] (tests compare every backend against this)."""
    check_format(q.format)
    if q.format in FLOAT_FORMATS:
        return q.data.astype(np.float32)
    if q.format == "int4":
        O, K = q.data.shape
        g = q.group_size
        return (q.data.astype(np.float32).reshape(O, K // g, g) * q.scales[:, :, None]).reshape(O, K)
    return q.data.astype(np.float32) * q.scales[:, None]


def pack_uint4(data: np.ndarray) -> np.ndarray:
    """int4 values [O, K] (int8 holding -8..7, K even) -> uint8 [O, K // 2]: each value + 8,
    element 2j in the low nibble and element 2j+1 in the high nibble of byte j."""
    if data.ndim != 2 or data.shape[1] % 2:
        raise ValueError(f"pack_uint4 needs a 2-D array with an even number of columns, got {data.shape}")
    u = (data.astype(np.int16) + 8).astype(np.uint8)
    if u.max(initial=0) > 15:
        raise ValueError("pack_uint4: values outside [-8, 7]")
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_uint4`: uint8 [O, K // 2] -> int8 [O, K] in [-8, 7]."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return out
