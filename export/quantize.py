"""Weight formats for export: quantize a weight matrix W [O, K] and the reference dequantizer.

Formats (all symmetric, no zero points):

    fp32, fp16, bf16   the matrix cast to that float type; scales None
    int8               per output channel: data int8 [O, K] in [-127, 127], scales float32 [O],
                       W ~= data * scales[:, None], scale = max|row| / 127
    int4               group-wise along K: data int8 [O, K] holding values in [-8, 7] (unpacked;
                       each backend packs them its own way, see `pack_uint4`), scales float32
                       [O, K // group_size], scale = max|group| / 7 (so values use [-7, 7])
    fp8                float8 e4m3fn (ml_dtypes.float8_e4m3fn) per output channel: max |row|
                       maps to 448 (the largest finite e4m3fn value), scales float32 [O]

int4 needs K % group_size == 0. A matrix whose K does not divide falls back to int8 (per
channel) for that matrix only: `effective_format` says which format a matrix really gets, and
the exporter records every fallback in the manifest. Example: SigLIP mlp.fc2 has K = 4304, which
no power-of-two group size >= 32 divides.

An all-zero row (or group) gets scale 1.0, never 0/0: data is then all zeros and dequantizes to
zeros exactly. Non-finite weights are rejected with an error.

Big matrices (the 257216 x 2304 LM head) are processed in chunks of rows, so the temporary
float32 copies stay small whatever the input dtype (bf16 memory-mapped arrays included).
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
FLOAT_FORMATS = ("fp32", "fp16", "bf16")

INT8_MAX = 127.0
INT4_MAX = 7.0
FP8_MAX = 448.0          # largest finite float8_e4m3fn
ROW_CHUNK_ELEMENTS = 1 << 24   # ~64 MB of float32 per chunk

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


def quantize(w: np.ndarray, fmt: str, group_size: int = 128) -> QuantizedWeight:
    """Quantize a weight matrix W [O, K] (any float dtype, may be memory-mapped) to `fmt`.

    For int4 the caller must pass a K that group_size divides (see `effective_format`)."""
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
        data = np.empty((O, K), np.int8)
        scales = np.empty((O, K // group_size), np.float32)
        for rows in _row_chunks(O, K):
            c = _chunk_f32(w, rows).reshape(-1, K // group_size, group_size)
            s = _safe_scale(np.abs(c).max(axis=-1), INT4_MAX)
            q = np.clip(np.rint(c / s[..., None]), -8, 7)
            data[rows] = q.reshape(-1, K).astype(np.int8)
            scales[rows] = s
        return QuantizedWeight("int4", data, scales, group_size)

    # int8 and fp8: one scale per output channel
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    data = np.empty((O, K), np.int8 if fmt == "int8" else ml_dtypes.float8_e4m3fn)
    scales = np.empty((O,), np.float32)
    for rows in _row_chunks(O, K):
        c = _chunk_f32(w, rows)
        s = _safe_scale(np.abs(c).max(axis=-1) if K else np.zeros(c.shape[0], np.float32), qmax)
        c /= s[:, None]
        if fmt == "int8":
            data[rows] = np.clip(np.rint(c), -127, 127).astype(np.int8)
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
