"""Packed-weight cache entries of the native core: a graph's per-row int8 matrices (and an int4
artifact's MatMulNBits ones) repacked for the C++ kernels (csrc/linear_int8.h) into one file,
weights.bin, with index.json naming each array.

The native decoder (native_decoder.py) and the native vision tower (native_vision.py) each keep
one entry per artifact under the engine's cache. An entry is sealed and checked like the other
runtime caches (stamped_dir.py); `open_entry` writes it when absent or bad, drops entries of other
layouts, and memory-maps weights.bin: file-backed pages shared by every model of the artifact in
the process, and no second copy in a runtime session.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from .. import _native
from ..artifact import Manifest
from . import stamped_dir

log = logging.getLogger("engine")

WEIGHTS, INDEX = "weights.bin", "index.json"
FILES = {WEIGHTS, INDEX}
ALIGN = 64
INT8_STEP = np.float32(1.0 / 127.0)   # the graphs' activation scale (export/onnx_graphs.ACT_SCALE)


def unsupported_reason(backend: str, manifest: Manifest, what: str) -> str | None:
    """Why the core cannot take over an artifact's graphs (None: it can): it reads the matrices of
    the onnxruntime graphs of per-row int8 artifacts and of int4 ones (`what`: which matrices, for
    the message)."""
    from .ort_backend import per_row_int8_only
    if backend != "onnxruntime":
        return f"the {backend} backend runs its own graphs"
    if not (per_row_int8_only(manifest) or is_int4_nbits(manifest)):
        return f"the artifact's {what} are not all per-row int8 or int4 (export --weights int8 or int4)"
    return None


def kernels_match_mlas(features: dict) -> bool:
    """Whether, at this SIMD level on this CPU (engine.cpu_features()), the core's linear kernels run
    on the same instructions as onnxruntime's MLAS for the graphs, so that the core was measured
    at least as fast as the graphs end to end (README Performance): the avx512 level without AMX
    (VNNI or, without it, 512-bit vpmaddubsw on both sides), and avx2 on CPUs without AVX-512.
    Forced below the CPU's best (ENGINE_SIMD), MLAS keeps the better instructions: not a match."""
    if features["amx"]:
        return False
    return features["simd"] == "avx512" or features["best"] == features["simd"] == "avx2"


def is_int4_nbits(manifest: Manifest) -> bool:
    """An int4 artifact whose quantized ONNX matrices are all MatMulNBits (every int4 export): 4-bit
    groups, and int4's per-channel int8 matrices (layer 0, v_proj, the vision tower) in bits=8."""
    from . import exporter_info
    info = exporter_info(manifest, "onnx")
    return (manifest.weights.get("format") == "int4" and info.get("int_kernel") == "com.microsoft.MatMulNBits"
            and info.get("int8_kernel", "com.microsoft.MatMulNBits") == "com.microsoft.MatMulNBits")


def entry_dir(root: Path, prefix: str, layout: int, manifest: Manifest, graphs: list[str]) -> Path:
    """The entry of an artifact's packed `graphs`: keyed by the layout and the graphs' files by
    content (a moved artifact keeps its entry)."""
    from .ort_prepacked import graph_files
    onnx = manifest.graphs["onnx"]
    parts = [f"layout{layout}", f"stamp{stamped_dir.VERSION}"]
    for name in sorted(graphs):
        parts += [f"{rel}={manifest.files[rel].sha256}" for rel in graph_files(manifest, onnx[name])]
    return root / f"{prefix}-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:24]}"


def source_bytes(manifest: Manifest, graphs: list[str]) -> int:
    """Bytes of the graphs' files: about what their packed entry holds (checked against free space)."""
    from .ort_prepacked import graph_files
    onnx = manifest.graphs["onnx"]
    return sum(manifest.files[rel].size for name in graphs for rel in graph_files(manifest, onnx[name]))


@dataclass
class GraphWeights:
    """A graph's initializers by name (memory maps of its external data; inline ones, the small
    constants, as arrays) and its MatMulNBits nodes: B name -> (bits, block_size, K, N)."""
    arrays: dict[str, np.ndarray]
    nbits: dict[str, tuple[int, int, int, int]]


def graph_weights(graph_path: Path) -> GraphWeights:
    """The graph's weights without reading them (one load of the graph without its data). Raises
    ValueError for a MatMulNBits node with zero points (the exporter writes none: 8 / 128)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(graph_path), load_external_data=False)
    arrays = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            arrays[t.name] = np.memmap(graph_path.parent / info["location"], dtype=dtype, mode="r",
                                       offset=int(info.get("offset", 0)), shape=tuple(t.dims))
        else:
            arrays[t.name] = numpy_helper.to_array(t)
    nbits = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        if len(node.input) > 3 and node.input[3]:
            raise ValueError(f"{graph_path.name}: MatMulNBits {node.input[1]} has zero points; the core reads "
                             f"the exporter's symmetric codes only")
        a = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        nbits[node.input[1]] = (int(a["bits"]), int(a["block_size"]), int(a["K"]), int(a["N"]))
    return GraphWeights(arrays, nbits)


class ArrayWriter:
    """Appends arrays to weights.bin, each 64-byte aligned; `put` returns its index record
    [offset, dtype, shape]."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def put(self, array: np.ndarray) -> list:
        pad = (-self.f.tell()) % ALIGN
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(np.ascontiguousarray(array).tobytes())
        return [offset, str(array.dtype), list(array.shape)]

    def linear(self, weights: GraphWeights, wname: str, where: str, k_multiple: int = 1) -> dict:
        """Matrix `wname` of a graph, packed for the kernels: the exporter's per-row int8 W^T [K, O]
        and its `.scales` -> {"K", "codes", "colsum", "colscale", "max_code"}; a MatMulNBits matrix
        (int4 artifacts): see _nbits. k_multiple: K padded with zero rows up to a multiple of it (its
        inputs must then carry as many zero columns)."""
        if wname in weights.nbits:
            return self._nbits(weights, wname, where, k_multiple)
        wt, scales = weights.arrays[wname], weights.arrays[wname + ".scales"]
        if wt.dtype != np.int8 or wt.ndim != 2:
            raise ValueError(f"{where}: {wname} is {wt.dtype} {wt.shape}, not per-row int8 W^T [K, O]")
        return self._int8(wt, np.asarray(scales, np.float32), k_multiple)

    def _int8(self, wt: np.ndarray, scales: np.ndarray, k_multiple: int) -> dict:
        pad = -wt.shape[0] % k_multiple
        if pad:
            wt = np.concatenate([wt, np.zeros((pad, wt.shape[1]), np.int8)])
        codes, colsum, max_code = _native.pack_linear_int8(np.ascontiguousarray(wt))
        colscale = INT8_STEP * scales   # as MatMulIntegerToFloat's a_scale * b_scale
        return {"K": int(wt.shape[0]), "codes": self.put(codes), "colsum": self.put(colsum),
                "colscale": self.put(colscale), "max_code": int(max_code)}

    def _nbits(self, weights: GraphWeights, wname: str, where: str, k_multiple: int) -> dict:
        """A MatMulNBits matrix of an int4 artifact (export/onnx_graphs.py, _matmul_nbits), packed for
        the kernels. bits=4: the 4-bit codes and group scales (csrc/linear_int8.h, "int4 matrices"):
        {"K", "O", "bits": 4, "group", "codes4", "gcorr", "gscale"}. bits=8 (int4's per-channel
        int8 matrices: codes + 128, the scale repeated per block, K padded with code 128): the
        per-row int8 record of `linear` (k_multiple as there; 4-bit matrices take none)."""
        bits, block, K, O = weights.nbits[wname]
        if bits == 4 and k_multiple != 1:
            raise ValueError(f"{where}: {wname} is a 4-bit matrix; its K cannot be padded")
        B, scales = weights.arrays[wname], np.asarray(weights.arrays[wname + ".scales"], np.float32).reshape(O, -1)
        if B.dtype != np.uint8 or B.shape[0] != O or B.size != O * scales.shape[1] * block * bits // 8:
            raise ValueError(f"{where}: {wname} is {B.dtype} {B.shape}, not MatMulNBits B for bits={bits} block={block}")
        if bits == 4:
            _, codes4, gcorr, gscale, group, _ = _native.pack_linear_int4(np.asarray(B).reshape(O, K // 2),
                                                                          INT8_STEP * scales, K, block)
            return {"K": K, "O": O, "bits": 4, "group": group, "codes4": self.put(codes4), "gcorr": self.put(gcorr),
                    "gscale": self.put(gscale)}
        if bits != 8 or not np.all(scales == scales[:, :1]):
            raise ValueError(f"{where}: {wname} is MatMulNBits bits={bits} with scales per block; the native decoder "
                             f"reads 4-bit groups and per-channel 8-bit matrices")
        wt = (np.asarray(B).reshape(O, -1)[:, :K].astype(np.int16) - 128).astype(np.int8).T
        return self._int8(wt, np.ascontiguousarray(scales[:, 0]), k_multiple)


def packed_array(data: np.ndarray, rec: list) -> np.ndarray:
    """The array an index.json record [offset, dtype, shape] names in weights.bin (`data`, uint8)."""
    offset, dtype, shape = rec
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) * dtype.itemsize
    return data[offset:offset + count].view(dtype).reshape(shape)


def linear_arrays(data: np.ndarray, rec: dict) -> tuple:
    """(codes, colsum, colscale, max_code) of an ArrayWriter.linear record, or ("int4", codes4,
    gcorr, gscale, group, O) of an int4 one, as the core takes them."""
    if rec.get("bits") == 4:
        return ("int4", packed_array(data, rec["codes4"]), packed_array(data, rec["gcorr"]),
                packed_array(data, rec["gscale"]), int(rec["group"]), int(rec["O"]))
    return (packed_array(data, rec["codes"]), packed_array(data, rec["colsum"]),
            packed_array(data, rec["colscale"]), int(rec["max_code"]))


def map_populated(path: Path) -> np.ndarray:
    """The file as a read-only uint8 array, its page-table entries filled at load (MAP_POPULATE,
    Linux) rather than by the first generate's page faults: 3B-224 int8 on Zen 4, load +0.1-0.2 s,
    the first prefill's decoder part 1.53-1.56 -> 1.42-1.47 s (warm: 1.37-1.45). Elsewhere a
    plain memory map."""
    if not hasattr(mmap, "MAP_POPULATE"):
        return np.memmap(path, dtype=np.uint8, mode="r")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    return np.frombuffer(mm, dtype=np.uint8)


def write_entry(entry: Path, layout: int, desc: str, items: list, pack: Callable[[ArrayWriter, object], tuple[str, dict]],
                progress: bool | None = None) -> None:
    """Write weights.bin and index.json {"layout", "graphs": {name: record}} into a temporary
    directory, seal it, rename it to `entry`. pack(writer, item) -> (name, record) for each item,
    under a progress bar (`desc`) on a terminal."""
    from tqdm import tqdm
    tmp = stamped_dir.new_tmp(entry)
    index: dict = {"layout": layout, "graphs": {}}
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with open(tmp / WEIGHTS, "wb") as f, tqdm(items, desc=desc, disable=not show, file=sys.stderr,
                                                   dynamic_ncols=True) as bar:
            writer = ArrayWriter(f)
            for item in bar:
                name, record = pack(writer, item)
                index["graphs"][name] = record
        (tmp / INDEX).write_text(json.dumps(index), encoding="utf-8")
        stamped_dir.seal(tmp)
        stamped_dir.install(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drop_other_layouts(root: Path, layout: int) -> None:
    """Remove entries packed in another layout (an older engine's): this engine never reads them,
    and each holds a model's packed weights (2 GB for a 3B decoder)."""
    for other in stamped_dir.entries(root):
        try:
            found = json.loads((other / INDEX).read_text(encoding="utf-8")).get("layout")
        except (OSError, ValueError):
            continue                 # being written, or damaged: its own load repacks it
        if found != layout:
            log.info("engine: removing %s (packed layout %s, this engine reads %s)", other, found, layout)
            shutil.rmtree(other, ignore_errors=True)


def open_entry(entry: Path, layout: int, source_bytes: int, write: Callable[[Path], None]) -> tuple[dict, np.ndarray]:
    """(index.json, weights.bin mapped) of `entry`, written first by write(entry) when absent or bad
    (source_bytes: about what it will hold, checked against the free space). Raises OSError /
    ValueError when the cache cannot be written or read."""
    problem = stamped_dir.check(entry, FILES) if entry.is_dir() else "absent"
    if problem is not None:
        if entry.is_dir():
            log.warning("engine: the packed weights %s are bad (%s); packing them again", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
        drop_other_layouts(entry.parent, layout)
        if not stamped_dir.has_room(entry.parent, source_bytes):
            raise OSError(f"less than {stamped_dir.MIN_FREE_BYTES >> 30} GiB would stay free in {entry.parent}")
        write(entry)
    stamped_dir.touch(entry)
    index = json.loads((entry / INDEX).read_text(encoding="utf-8"))
    if index.get("layout") != layout:
        raise ValueError(f"{entry}: packed layout {index.get('layout')}, this engine reads {layout}")
    return index, map_populated(entry / WEIGHTS)
