"""Safetensors reading and writing with numpy, mmap and ml_dtypes only (no torch).

File format (https://github.com/huggingface/safetensors):

    [8 bytes]  N, little-endian u64: size of the JSON header
    [N bytes]  UTF-8 JSON object: name -> {"dtype", "shape", "data_offsets": [begin, end]},
               plus an optional "__metadata__": {str: str}
    [rest]     data area; offsets are relative to its start (byte 8 + N)

`SafetensorsFile` memory-maps a file read-only, validates the whole header when it opens,
and hands out zero-copy read-only numpy views. Nothing is read into RAM until used.

`SafetensorsWriter` streams a file tensor by tensor: the specs (name, dtype, shape) are known
up front, so the header goes first and only one tensor is ever held in memory. It writes to
a hidden temp file and renames it into place on `close()`, so an interrupted write never
leaves a valid-looking file behind.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import CheckpointError

# Safetensors dtype name -> numpy dtype (always little-endian, as the format requires).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAME_OF_DTYPE = {dt: name for name, dt in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024   # the reference implementation's limit
_METADATA_KEY = "__metadata__"


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name that the file (or checkpoint) does not hold. Also a KeyError."""

    def __str__(self) -> str:   # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str               # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int               # byte offsets relative to the start of the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_name(dtype) -> str:
    """Safetensors name ("BF16", "F32", ...) of a numpy dtype / ml_dtypes type / name string."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{dtype!r} is not a dtype; use a numpy dtype or one of {sorted(DTYPES)}") from None
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    if dt not in _NAME_OF_DTYPE:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors; supported: {sorted(DTYPES)}")
    return _NAME_OF_DTYPE[dt]


# ---------------------------------------------------------------------------------- reading
def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


class _DuplicateKey(Exception):
    pass


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file. The whole header is validated at open."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise self._error(f"file is {size} bytes, shorter than the 8-byte header size; "
                                      "the file is truncated or not a safetensors file; download it again")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER_BYTES:
                    raise self._error(f"header size {n} is absurd (limit {MAX_HEADER_BYTES}); "
                                      "this is not a safetensors file or it is corrupt; download it again")
                if 8 + n > size:
                    raise self._error(f"header size {n} runs past the end of the {size}-byte file; "
                                      "the file is truncated; download it again")
                header = f.read(n)
                self._data_start = 8 + n
                self._data_size = size - 8 - n
                self.metadata, self._infos = self._parse_header(header)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, not a safetensors file") from None
        except OSError as e:   # permissions, I/O errors, ...
            raise CheckpointError(f"{self.path}: cannot read the file ({e})") from None

    def _error(self, msg: str, tensor: str | None = None) -> CheckpointError:
        where = f"{self.path}: tensor {tensor!r}: " if tensor is not None else f"{self.path}: "
        return CheckpointError(where + msg)

    def _parse_header(self, raw: bytes) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._error(f"header is not valid UTF-8 ({e}); the file is corrupt; download it again") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as e:
            raise self._error(f"header lists {e.args[0]!r} twice; the file is corrupt; download it again") from None
        except (ValueError, RecursionError) as e:   # RecursionError: absurdly nested JSON
            raise self._error(f"header is not valid JSON ({type(e).__name__}: {e}); the file is corrupt or "
                              "truncated; download it again") from None
        if not isinstance(header, dict):
            raise self._error(f"header is a JSON {type(header).__name__}, not an object; the file is corrupt; download it again")

        metadata = header.pop(_METADATA_KEY, {})
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise self._error("__metadata__ must map strings to strings; the file is corrupt; download it again")

        infos = {name: self._parse_entry(name, entry) for name, entry in header.items()}
        # Data order: lets callers stream the file front to back. Ties keep header order.
        ordered = sorted(infos.values(), key=lambda i: (i.begin, i.end))
        prev: TensorInfo | None = None
        for info in ordered:
            if info.begin == info.end:   # empty tensors own no bytes and cannot overlap
                continue
            if prev is not None and info.begin < prev.end:
                raise self._error(f"data bytes [{info.begin}, {info.end}) overlap tensor {prev.name!r} "
                                  f"[{prev.begin}, {prev.end}); the file is corrupt; download it again", info.name)
            prev = info
        return metadata, {i.name: i for i in ordered}

    def _parse_entry(self, name: str, entry) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._error("header entry is not a JSON object; the file is corrupt; download it again", name)
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                raise self._error(f"header entry lacks {field!r}; the file is corrupt; download it again", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._error(f"unknown dtype {dtype!r} (this reader knows {sorted(DTYPES)})", name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._error(f"shape {shape!r} is not a list of non-negative integers", name)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise self._error(f"data_offsets {offsets!r} must be two integers with 0 <= begin <= end", name)
        begin, end = offsets
        if end > self._data_size:
            raise self._error(f"data ends at byte {end} but the data area holds only {self._data_size} "
                              "bytes; the file is truncated; download it again", name)
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._error(f"holds {end - begin} bytes but shape {shape} of {dtype} needs {expected}; "
                              "the file is corrupt; download it again", name)
        return TensorInfo(name, dtype, tuple(shape), begin, end)

    # ---------------------------------------------------------------------- public API
    def keys(self) -> list[str]:
        """Tensor names in the order their data sits in the file."""
        return list(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorNotFoundError(f"{self.path}: no tensor named {name!r} "
                                      f"(the file holds {len(self._infos)} tensors)") from None

    def get(self, name: str) -> np.ndarray:
        """Zero-copy, read-only view of a tensor onto the memory map."""
        info = self.info(name)
        if self._mm is None:
            raise CheckpointError(f"{self.path}: the file is closed; open it again to read {name!r}")
        dt = DTYPES[info.dtype]
        count = info.nbytes // dt.itemsize
        arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=self._data_start + info.begin)
        return arr.reshape(info.shape)

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Views are still alive: they keep the mapping valid; it unmaps when they go.
                pass

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self._infos)} tensors)"


# ---------------------------------------------------------------------------------- writing
class SafetensorsWriter:
    """Streaming safetensors writer.

        with SafetensorsWriter(path, [(name, "BF16", shape), ...], metadata) as w:
            for name, ... in specs:
                w.write(name, array)      # in spec order, exact dtype and shape

    The header is written first; each `write` appends one tensor's bytes. `close()` checks every
    tensor was written and atomically renames the temp file to `path`. On an exception inside the
    `with` block (or `abort()`), the temp file is deleted and `path` is left untouched.
    """

    def __init__(self, path: str | os.PathLike, specs, metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        self._specs: list[tuple[str, str, tuple[int, ...]]] = []
        header: dict = {}
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError("metadata must be a dict of str -> str")
            header[_METADATA_KEY] = dict(metadata)
        offset = 0
        for spec in specs:
            name, dtype, shape = spec
            if not isinstance(name, str) or not name or name == _METADATA_KEY:
                raise ValueError(f"invalid tensor name {name!r}")
            if name in header:
                raise ValueError(f"tensor {name!r} appears twice in the specs")
            dtype = dtype_name(dtype)
            shape = tuple(shape)
            if not all(_is_int(d) or isinstance(d, np.integer) for d in shape) or any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r}: shape {shape} must be non-negative integers")
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._specs.append((name, dtype, shape))
            offset += nbytes
        self._total = offset

        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)   # pad to 8 bytes like the reference, so data starts aligned
        self._expected_size = 8 + len(raw) + self._total

        # Hidden temp file next to the target (same filesystem, so the rename is atomic).
        # os.open with 0o666 honours the umask, unlike mkstemp's 0o600.
        directory, base = os.path.split(os.path.abspath(self.path))
        self._tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._f = os.fdopen(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        self._next = 0
        self._done = False
        try:
            self._f.write(struct.pack("<Q", len(raw)))
            self._f.write(raw)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array) -> None:
        """Append the next tensor. It must be `specs[i]` by name, dtype and shape."""
        if self._done:
            raise ValueError(f"{self.path}: writer is closed; cannot write {name!r}")
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: all {len(self._specs)} tensors are written; {name!r} is extra")
        exp_name, exp_dtype, exp_shape = self._specs[self._next]
        if name != exp_name:
            raise ValueError(f"{self.path}: expected tensor {exp_name!r} next (spec order), got {name!r}")
        array = np.asarray(array)
        try:
            got_dtype = dtype_name(array.dtype)
        except ValueError:
            got_dtype = str(array.dtype)
        if got_dtype != exp_dtype:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {got_dtype}, the spec says {exp_dtype}")
        if array.shape != exp_shape:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {array.shape}, the spec says {exp_shape}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        array = np.ascontiguousarray(array)   # copies only when the input is strided
        self._f.write(array.reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        """Finish: check every tensor was written, then move the file into place atomically."""
        if self._done:
            return
        if self._next != len(self._specs):
            missing = [s[0] for s in self._specs[self._next:]]
            self.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._specs)} tensors; "
                             f"not written: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                             "Nothing was saved")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            size = self._f.tell()
            self._f.close()
            if size != self._expected_size:   # would mean a bug here, never a user error
                raise OSError(f"wrote {size} bytes, expected {self._expected_size}")
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Drop the partial file; `path` is left as it was."""
        self._done = True
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self):
        # A writer dropped without close() must not leave its temp file behind.
        if not getattr(self, "_done", True) and hasattr(self, "_tmp"):
            self.abort()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a dict of arrays (in dict order) to `path`, atomically."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    specs = [(name, a.dtype, a.shape) for name, a in arrays.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for name, a in arrays.items():
            w.write(name, a)
