"""engine.safetensors against the `safetensors` library (the oracle) and hand-built bad files."""
from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

from engine.errors import CheckpointError
from engine.safetensors import (SafetensorsFile, SafetensorsWriter, TensorInfo, TensorNotFoundError,
                                write_safetensors)

RNG = np.random.default_rng(0)

# Plain numpy dtypes, which safetensors.numpy can save and load.
NUMPY_TENSORS = {
    "f32": RNG.standard_normal((3, 5)).astype(np.float32),
    "f16": RNG.standard_normal((7,)).astype(np.float16),
    "f64": RNG.standard_normal((2, 2, 2)),
    "i8": np.array([-128, 0, 127], np.int8),
    "u8": np.arange(11, dtype=np.uint8),
    "i16": np.array([[-5, 6]], np.int16),
    "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
    "i64": np.array([2**40, -3], np.int64),
    "bool": np.array([True, False, True]),
    "scalar": np.array(3.5, np.float32),
    "empty": np.zeros((0, 4), np.float32),
    "empty2": np.zeros((2, 0), np.int64),
}


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bytes of an array, to compare bf16 / fp8 exactly without relying on their equality."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def torch_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def raw_file(tmp_path, header, data: bytes = b"", name: str = "bad.safetensors", length=None) -> str:
    """A hand-built file: header may be a dict (JSON-encoded here) or raw bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return str(p)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ------------------------------------------------------------------------ round trips
def test_writer_output_loads_in_safetensors_library(tmp_path):
    p = tmp_path / "ours.safetensors"
    write_safetensors(p, NUMPY_TENSORS, metadata={"format": "np", "note": "héllo"})
    loaded = safetensors.numpy.load_file(str(p))
    assert set(loaded) == set(NUMPY_TENSORS)
    for name, a in NUMPY_TENSORS.items():
        assert loaded[name].dtype == a.dtype and loaded[name].shape == a.shape, name
        np.testing.assert_array_equal(loaded[name], a)
    with safetensors.safe_open(str(p), "np") as f:
        assert f.metadata() == {"format": "np", "note": "héllo"}


def test_writer_bf16_fp8_load_in_safetensors_torch(tmp_path):
    tensors = {
        "bf16": RNG.standard_normal((4, 3)).astype(ml_dtypes.bfloat16),
        "fp8": RNG.standard_normal((5,)).astype(ml_dtypes.float8_e4m3fn),
        "bf16_scalar": np.array(-2.25, ml_dtypes.bfloat16),
        "bf16_empty": np.zeros((0,), ml_dtypes.bfloat16),
    }
    p = tmp_path / "ours.safetensors"
    write_safetensors(p, tensors)
    loaded = safetensors.torch.load_file(str(p))
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["fp8"].dtype == torch.float8_e4m3fn
    for name, a in tensors.items():
        assert tuple(loaded[name].shape) == a.shape, name
        np.testing.assert_array_equal(torch_bits(loaded[name]), bits(a))


def test_reader_reads_safetensors_library_output(tmp_path):
    p = str(tmp_path / "ref.safetensors")
    safetensors.numpy.save_file(NUMPY_TENSORS, p, metadata={"format": "np"})
    with SafetensorsFile(p) as f:
        assert set(f.keys()) == set(NUMPY_TENSORS)
        assert f.metadata == {"format": "np"}
        for name, a in NUMPY_TENSORS.items():
            got = f.get(name)
            assert got.dtype == a.dtype and got.shape == a.shape, name
            np.testing.assert_array_equal(got, a)


def test_reader_reads_bf16_fp8_from_safetensors_torch(tmp_path):
    tensors = {"bf16": torch.randn(6, 2).to(torch.bfloat16), "fp8": torch.randn(9).to(torch.float8_e4m3fn),
               "f16": torch.randn(3).to(torch.float16)}
    p = str(tmp_path / "ref.safetensors")
    safetensors.torch.save_file(tensors, p)
    with SafetensorsFile(p) as f:
        assert f.info("bf16").dtype == "BF16" and f.info("fp8").dtype == "F8_E4M3"
        assert f.get("bf16").dtype == ml_dtypes.bfloat16
        assert f.get("fp8").dtype == ml_dtypes.float8_e4m3fn
        for name, t in tensors.items():
            assert f.get(name).shape == tuple(t.shape)
            np.testing.assert_array_equal(bits(f.get(name)), torch_bits(t))
        # values, not just bits: bf16 -> f32 is exact
        np.testing.assert_array_equal(f.get("bf16").astype(np.float32), tensors["bf16"].float().numpy())


def test_header_is_space_padded_to_8_bytes_and_offsets_contiguous(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": np.zeros(3, np.float16), "b": np.ones((2, 2), np.float32)}, {"k": "v"})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = raw[8:8 + n]
    assert header.rstrip(b" ").endswith(b"}") and set(header[len(header.rstrip(b" ")):]) <= {0x20}
    h = json.loads(header)
    assert h["a"]["data_offsets"] == [0, 6] and h["b"]["data_offsets"] == [6, 22]
    assert len(raw) == 8 + n + 22


def test_info_keys_and_zero_copy_views(tmp_path):
    p = tmp_path / "x.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(p, {"first": a, "second": np.zeros(2, np.int8)})
    with SafetensorsFile(p) as f:
        assert f.path == str(p)
        assert f.keys() == ["first", "second"]
        assert f.info("first") == TensorInfo("first", "F32", (3, 4), 0, 48)
        assert f.info("second") == TensorInfo("second", "I8", (2,), 48, 50)
        v = f.get("first")
        assert not v.flags.writeable and not v.flags.owndata
        base = v
        while isinstance(base, (np.ndarray, memoryview)):
            base = base.obj if isinstance(base, memoryview) else base.base
        assert isinstance(base, mmap.mmap)            # the data never left the mapping
        assert np.shares_memory(v, f.get("first"))
        with pytest.raises(ValueError):
            v[0, 0] = 1.0
    np.testing.assert_array_equal(v, a)               # still valid after close: the view keeps the map


def test_unknown_name_is_keyerror_naming_file(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": np.zeros(1, np.float32)})
    with SafetensorsFile(p) as f:
        for call in (f.get, f.info):
            with pytest.raises(TensorNotFoundError, match="x.safetensors.*'nope'"):
                call("nope")
        with pytest.raises(KeyError):
            f.get("nope")
        with pytest.raises(CheckpointError):
            f.get("nope")


def test_get_after_close_raises(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": np.zeros(1, np.float32)})
    f = SafetensorsFile(p)
    f.close()
    with pytest.raises(CheckpointError, match="closed"):
        f.get("a")


def test_empty_file_set_and_missing_file(tmp_path):
    p = tmp_path / "none.safetensors"
    write_safetensors(p, {})
    with SafetensorsFile(p) as f:
        assert f.keys() == [] and f.metadata == {}
    assert safetensors.numpy.load_file(str(p)) == {}
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        SafetensorsFile(tmp_path / "missing.safetensors")


def test_noncontiguous_and_big_endian_inputs(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T          # strided
    b = np.arange(5, dtype=">i4")                                  # big-endian
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": a, "b": b})
    loaded = safetensors.numpy.load_file(str(p))
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)


# ------------------------------------------------------------------------ malformed files
MALFORMED = {
    # name: (header, data, length override, message fragment, tensor named in message)
    "bad_dtype": ({"w": entry(dtype="Q7")}, bytes(8), None, "unknown dtype", "w"),
    "negative_dim": ({"w": entry(shape=(-2,))}, bytes(8), None, "shape", "w"),
    "float_dim": ({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8), None, "shape", "w"),
    "bool_dim": ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), None, "shape", "w"),
    "shape_not_list": ({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, bytes(8), None, "shape", "w"),
    "offsets_three": ({"w": entry(offsets=(0, 4, 8))}, bytes(8), None, "data_offsets", "w"),
    "offsets_reversed": ({"w": entry(offsets=(8, 0))}, bytes(8), None, "data_offsets", "w"),
    "offsets_negative": ({"w": entry(offsets=(-8, 0))}, bytes(8), None, "data_offsets", "w"),
    "offsets_str": ({"w": entry(offsets=("0", "8"))}, bytes(8), None, "data_offsets", "w"),
    "end_past_data": ({"w": entry()}, bytes(5), None, "truncated", "w"),
    "size_mismatch": ({"w": entry(shape=(3,))}, bytes(8), None, "needs 12", "w"),
    "overlap": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, bytes(12), None, "overlap", "b"),
    "entry_not_object": ({"w": [1, 2]}, b"", None, "not a JSON object", "w"),
    "no_dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "dtype", "w"),
    "no_shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8), None, "shape", "w"),
    "no_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "data_offsets", "w"),
    "metadata_not_str": ({"__metadata__": {"k": 1}}, b"", None, "__metadata__", None),
    "metadata_not_dict": ({"__metadata__": ["k"]}, b"", None, "__metadata__", None),
    "not_object": (b"[1, 2]", b"", None, "not an object", None),
    "not_json": (b"{'w': 1}", b"", None, "not valid JSON", None),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", None, "UTF-8", None),
    "duplicate_key": (b'{"w": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, '
                      b'"w": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]}}', bytes(8), None, "twice", "w"),
    "header_past_end": ({"w": entry()}, bytes(8), 10_000, "past the end", None),
    "header_absurd": ({}, b"", 2**40, "absurd", None),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_raises_naming_file(tmp_path, case):
    header, data, length, fragment, tensor = MALFORMED[case]
    p = raw_file(tmp_path, header, data, name=f"{case}.safetensors", length=length)
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(p)
    msg = str(ei.value)
    assert p in msg and fragment in msg, msg
    if tensor is not None:
        assert repr(tensor) in msg, msg
    # The oracle agrees that the file is bad (it reports its own kinds of error).
    with pytest.raises(Exception):
        safetensors.numpy.load_file(p)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_8_bytes(tmp_path, size):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01" * size)
    with pytest.raises(CheckpointError, match=f"short.safetensors.*{size} bytes"):
        SafetensorsFile(p)


def test_truncated_real_file(tmp_path):
    p = tmp_path / "t.safetensors"
    write_safetensors(p, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    raw = p.read_bytes()
    p.write_bytes(raw[:-3])
    with pytest.raises(CheckpointError, match="t.safetensors: tensor 'b'.*truncated"):
        SafetensorsFile(p)


def test_empty_tensors_may_share_an_offset(tmp_path):
    # Zero-size tensors own no bytes: they never overlap anything.
    p = raw_file(tmp_path, {"a": entry(shape=(0,), offsets=(0, 0)), "b": entry(shape=(0, 3), offsets=(0, 0)),
                            "c": entry(offsets=(0, 8))}, bytes(8))
    with SafetensorsFile(p) as f:
        assert f.get("a").shape == (0,) and f.get("b").shape == (0, 3) and f.get("c").shape == (2,)


# ------------------------------------------------------------------------ writer misuse
SPECS = [("a", "F32", (2, 3)), ("b", ml_dtypes.bfloat16, (4,)), ("c", np.int64, ())]


def leftovers(tmp_path):
    return sorted(os.listdir(tmp_path))


def test_streaming_writer_writes_in_spec_order_atomically(tmp_path):
    p = tmp_path / "s.safetensors"
    w = SafetensorsWriter(p, SPECS, metadata={"m": "1"})
    w.write("a", np.ones((2, 3), np.float32))
    assert not p.exists()                             # nothing at the target before close()
    assert len(leftovers(tmp_path)) == 1 and leftovers(tmp_path)[0].startswith(".s.safetensors.")
    w.write("b", np.arange(4).astype(ml_dtypes.bfloat16))
    w.write("c", np.array(7, np.int64))
    w.close()
    w.close()                                         # idempotent
    assert leftovers(tmp_path) == ["s.safetensors"]
    loaded = safetensors.torch.load_file(str(p))
    assert loaded["c"].item() == 7 and loaded["b"].tolist() == [0, 1, 2, 3]
    with SafetensorsFile(p) as f:
        assert f.metadata == {"m": "1"} and f.keys() == ["a", "b", "c"]


@pytest.mark.parametrize("misuse, fragment", [
    (lambda w: w.write("b", np.zeros(4, ml_dtypes.bfloat16)), "expected tensor 'a' next"),
    (lambda w: w.write("a", np.zeros((3, 2), np.float32)), "shape"),
    (lambda w: w.write("a", np.zeros((2, 3), np.float64)), "dtype F64"),
    (lambda w: w.write("a", np.zeros((2, 3), np.complex64)), "dtype"),
])
def test_writer_rejects_wrong_name_shape_dtype(tmp_path, misuse, fragment):
    p = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=fragment):
        with SafetensorsWriter(p, SPECS) as w:
            misuse(w)
    assert leftovers(tmp_path) == []                  # the exception discarded the temp file


def test_writer_close_before_all_written(tmp_path):
    p = tmp_path / "s.safetensors"
    w = SafetensorsWriter(p, SPECS)
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"1 of 3.*'b', 'c'"):
        w.close()
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        w.write("b", np.zeros(4, ml_dtypes.bfloat16))


def test_writer_extra_write(tmp_path):
    p = tmp_path / "s.safetensors"
    with SafetensorsWriter(p, [("a", "F32", (1,))]) as w:
        w.write("a", np.zeros(1, np.float32))
        with pytest.raises(ValueError, match="extra"):
            w.write("a", np.zeros(1, np.float32))
    assert leftovers(tmp_path) == ["s.safetensors"]


def test_interrupted_write_keeps_old_file(tmp_path):
    p = tmp_path / "s.safetensors"
    write_safetensors(p, {"old": np.zeros(1, np.float32)})
    before = p.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(p, SPECS) as w:
            w.write("a", np.zeros((2, 3), np.float32))
            raise KeyboardInterrupt
    assert p.read_bytes() == before and leftovers(tmp_path) == ["s.safetensors"]


def test_dropped_writer_removes_temp_file(tmp_path):
    w = SafetensorsWriter(tmp_path / "s.safetensors", SPECS)
    w.write("a", np.zeros((2, 3), np.float32))
    del w
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("specs, metadata, fragment", [
    ([("a", "F32", (1,)), ("a", "F32", (1,))], None, "twice"),
    ([("a", "Q7", (1,))], None, "dtype"),
    ([("a", "F32", (-1,))], None, "non-negative"),
    ([("__metadata__", "F32", (1,))], None, "invalid tensor name"),
    ([("a", "F32", (1,))], {"k": 1}, "metadata"),
])
def test_writer_rejects_bad_specs(tmp_path, specs, metadata, fragment):
    with pytest.raises(ValueError, match=fragment):
        SafetensorsWriter(tmp_path / "s.safetensors", specs, metadata)
    assert leftovers(tmp_path) == []
