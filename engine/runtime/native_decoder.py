"""The native decoder: the decoder_i graphs of a per-row int8 artifact computed by the C++ core.

Why: onnxruntime's MLAS runs the per-row int8 graphs' matrix products well at prefill, but one
decode row streams a decoder graph's 75 MB of weights at ~27 GB/s on the machines measured, where
the core's own kernel (csrc/linear_int8*.cpp) streams them at 38-39 GB/s (measured alone, DRAM-cold); at prefill the core's
6 x 32 VNNI tiles run as fast as MLAS (README Performance). The graphs and the core compute the
same thing: the same per-row uint8 quantization and exact int32 sums (bit-identical linear layers,
tests/test_native_decoder.py); norms and gelu differ in the last float bits.

int4 artifacts (packed_weights.is_int4_nbits): their MatMulNBits matrices are read from the graphs too: the
4-bit groups (zero point 8, a scale per group) packed for the core's int4 kernels (csrc/linear_int4*.cpp:
the rows quantized per row as above, exact int32 sums per group, one fma per group; AVX-512
VNNI, AVX2 and the scalar twin, bit for bit), and int4's per-channel int8 matrices (layer 0,
v_proj; MatMulNBits bits=8) as per-row int8. MatMulNBits' accuracy_level 4 quantizes the
activations per block of the group instead, so the two differ by about the int8 rounding (each
boundary as close to the fp32 artifact as the graphs, tests/test_native_int4.py).

When: it needs the onnxruntime backend and an artifact whose decoder matrices are all per-row
int8 MatMulIntegerToFloat (runtime.ort_backend.per_row_int8_only) or an int4 one. `decoder="native"`
then runs it on any CPU: the core has AVX-512 VNNI, AVX2 and NEON-sdot kernels and the scalar twin
(int4: VNNI, AVX-512BW, AVX2, NEON-udot and the scalar twin; the 8-bit int8 matrices of int4
artifacts exported before export.onnx_graphs.INT8_CODE_MAX covered them take AVX2's wide variant,
which adds a vpsignb).
`decoder="auto"` (the default of engine.load) takes it only where it was measured faster than
the graphs: at the amx SIMD level (the core's AMX-INT8 kernel, csrc/linear_int8_amx.cpp, against
MLAS's own AMX kernels: 3B-224 prefill 0.55-0.6 s against 0.7-0.75 s on 2 Xeon cores) and at the
avx512 level on CPUs without AMX (VNNI, or the 512-bit vpmaddubsw kernel where VNNI is missing:
see below). An AMX CPU forced down to avx512 (ENGINE_SIMD) keeps
the graphs: MLAS still multiplies on AMX tiles there, the core only with VNNI. On CPUs whose best
level is AVX2 (no AVX-512) it takes the core too: both run vpmaddubsw on ymm there, and on an
Intel Xeon capped to AVX2 for every runtime (benchmarks/cpuid_cap.c; no AVX2-only CPU was at
hand) the core matched the graphs' TTFT and decoded 1.26x (int8) to 1.5x (int4) faster (see
auto_declines). ENGINE_SIMD=avx2 on an AVX-512 CPU keeps the graphs (MLAS stays on AVX-512). CPUs
with AVX-512 but no VNNI (Skylake-SP class) take the core too: its 512-bit vpmaddubsw kernel
against MLAS's, capped to that class, TTFT 3.61 against 4.21 s, decode 7.7 against 5.8 tokens/s.
On Arm, our sdot kernel is tested under qemu (bit-identical) but not timed, so auto keeps the graphs.
int4 artifacts follow the same rule. Measured side by side in engine.bench on a 2-core Intel
Xeon with AVX-512 VNNI, no AMX (3B-224, with the native vision tower against all graphs): TTFT
2.49 against 5.23 s, decode 12.0 against 7.2 tokens/s, load 0.21 against 1.64 s. At the amx level
the core's int4 kernel is its VNNI one (no AMX int4 kernel): not timed there, taken because
MatMulNBits has no AMX path either (its int4 prefill measured 282 GFLOP/s on 2 AMX Xeon cores,
where the core's VNNI int8 kernel ran at 0.72-0.98 TOP/s).
PALIGEMMA_EDGE_NATIVE_DECODER=0 turns auto's choice off; `decoder="graphs"` too.

Weights: the exporter's int8 W^T [K, O] and per-channel scales are read from the decoder graphs'
external data and packed once per artifact into the engine's cache,
`<default_cache_dir()>/native-decoder/<key>/` (weights.bin, index.json, stamp.json; the key hashes
the graphs' files by content, so a moved artifact keeps its entry). The layout does not depend on
the CPU. The entry is sealed and checked like the other runtime caches (runtime/stamped_dir.py):
a later load hashes only files whose size, mtime, ctime, inode or device changed. weights.bin is
memory-mapped: the pages are file-backed, shared by every model of the artifact in the process,
and the onnxruntime sessions of the decoder graphs are not created at all (no second copy).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _native
from ..artifact import Manifest
from ..config import PaliGemmaConfig
from . import packed_weights, stamped_dir

log = logging.getLogger("engine")

SUBDIR = "native-decoder"
WEIGHTS, INDEX, FILES = packed_weights.WEIGHTS, packed_weights.INDEX, packed_weights.FILES
LAYOUT_VERSION = 2                # of the packed layout (csrc/linear_int8.h) and index.json (2: max_code)
ENV_SWITCH = "PALIGEMMA_EDGE_NATIVE_DECODER"
DECODER_MODES = ("auto", "graphs", "native")

# The linear layers and norms of a boundary: key -> canonical name suffix (export/graph_def.py)
END_LINEARS = {"o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
               "down": "mlp.down_proj.weight"}
START_LINEARS = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight"}
END_NORMS_GEMMA2 = {"post_attention": "post_attention_layernorm.weight", "pre_feedforward":
                    "pre_feedforward_layernorm.weight", "post_feedforward": "post_feedforward_layernorm.weight"}
END_NORMS_GEMMA1 = {"post_attention": "post_attention_layernorm.weight"}
START_NORMS = {"input": "input_layernorm.weight"}


def cache_root() -> Path:
    from .. import default_cache_dir
    return default_cache_dir() / SUBDIR


def entries(root: Path | None = None) -> list[Path]:
    """The packed-weight entries on this machine (`python -m engine cache list`)."""
    return stamped_dir.entries(root or cache_root())


def clear(older_than: float | None = None, corrupt: bool = False) -> tuple[int, int]:
    """`python -m engine cache clear`: (entries removed, bytes freed); see stamped_dir.clear."""
    return stamped_dir.clear(cache_root(), older_than, corrupt, packed_weights.FILES)


def enabled_by_env() -> bool:
    return stamped_dir.env_enabled(ENV_SWITCH)


def unsupported_reason(backend: str, manifest: Manifest) -> str | None:
    """Why the native decoder cannot run this artifact (None: it can)."""
    return packed_weights.unsupported_reason(backend, manifest, "decoder matrices")


def auto_declines() -> str | None:
    """Why decoder="auto" keeps the graphs on this CPU (None: it takes the native decoder)."""
    features = _native.cpu_features()
    if features["simd"] == "amx":
        return None
    if features["amx"]:
        # ENGINE_SIMD=avx512 on an AMX CPU: MLAS multiplies the graphs' u8 x s8 products on AMX
        # tiles, the core then only with VNNI (prefill 1.4 s against the graphs' 0.75 s, 3B-224)
        return "the SIMD level is below amx, and onnxruntime's MLAS runs the int8 products on AMX tiles"
    if packed_weights.kernels_match_mlas(features):
        # avx512 with VNNI (measured on Zen 4 and an Intel Xeon) and without it (the Intel Xeon
        # capped to AVX-512 without VNNI by benchmarks/cpuid_cap.c: TTFT 3.61 against 4.21 s,
        # decode 7.7 against 5.8 tokens/s, 3B-224 int8); avx2 on CPUs without AVX-512 (capped to
        # AVX2: int8 TTFT 5.28 against 5.58 s, decode 7.5 against 5.9 tokens/s, load 0.24 against
        # 1.2 s; int4 TTFT 8.1 against 10.9 s, decode 9.4 against 6.2; engine.bench, side by side)
        return None
    return (f"the native decoder was measured faster only at the amx and avx512 levels, or at avx2 on a CPU "
            f"without AVX-512 (this CPU: avx512_vnni={features['avx512_vnni']}, amx={features['amx']}, best level "
            f"{features['best']}, SIMD level {features['simd']})")


def boundary_names(cfg: PaliGemmaConfig, i: int) -> tuple[dict[str, str], dict[str, str]]:
    """Graph decoder_i's linear layers and norms: key -> canonical weight name."""
    t = cfg.text
    linears, norms = {}, {}
    if i > 0:
        pre = f"text.layers.{i - 1}."
        linears.update({k: pre + v for k, v in END_LINEARS.items()})
        norms.update({k: pre + v for k, v in (END_NORMS_GEMMA2 if t.is_gemma2 else END_NORMS_GEMMA1).items()})
    if i < t.num_hidden_layers:
        pre = f"text.layers.{i}."
        linears.update({k: pre + v for k, v in START_LINEARS.items()})
        norms.update({k: pre + v for k, v in START_NORMS.items()})
    return linears, norms


def graph_names(manifest: Manifest) -> list[str]:
    return [g for g in manifest.graphs.get("onnx", {}) if g.startswith("decoder_")]


def entry_dir(root: Path, manifest: Manifest) -> Path:
    return packed_weights.entry_dir(root, "decoder", LAYOUT_VERSION, manifest, graph_names(manifest))


def write_entry(artifact_dir: Path, manifest: Manifest, cfg: PaliGemmaConfig, entry: Path,
                progress: bool | None = None) -> None:
    """Pack every decoder graph's weights into `entry` (packed_weights.write_entry)."""
    graphs = manifest.graphs["onnx"]

    def pack(writer: packed_weights.ArrayWriter, name: str) -> tuple[str, dict]:
        weights = packed_weights.graph_weights(artifact_dir / graphs[name])
        linears, norms = boundary_names(cfg, int(name.split("_")[1]))
        return name, {"linears": {key: writer.linear(weights, wname, name) for key, wname in linears.items()},
                      "norms": {key: writer.put(np.asarray(weights.arrays[wname + "+1"], np.float32))
                                for key, wname in norms.items()}}
    names = [f"decoder_{i}" for i in range(cfg.text.num_hidden_layers + 1)]
    packed_weights.write_entry(entry, LAYOUT_VERSION, "packing native decoder weights", names, pack, progress)


@dataclass
class NativeDecoder:
    """The DecoderBoundary objects of an artifact's decoder graphs, over one memory map."""
    boundaries: dict[str, object]           # graph name -> _native.DecoderBoundary
    entry: Path

    def run(self, graph: str, inputs: dict[str, np.ndarray], pool, scratch=None) -> dict[str, np.ndarray]:
        """Graph `graph` on `inputs`; scratch: a _native.DecoderScratch shared by the boundaries of
        one forward pass (one caller at a time), None for temporaries of this call alone."""
        hidden = np.ascontiguousarray(inputs["hidden"], np.float32)
        attn = inputs.get("attn")
        attn = None if attn is None else np.ascontiguousarray(attn, np.float32)
        return self.boundaries[graph].run(hidden, attn, pool, scratch)


def open_native_decoder(artifact_dir: Path, manifest: Manifest, cfg: PaliGemmaConfig) -> NativeDecoder:
    """Map (writing it first when absent or bad) the artifact's packed decoder weights. Raises
    OSError / ValueError when the cache cannot be written or read."""
    entry = entry_dir(cache_root(), manifest)
    size = packed_weights.source_bytes(manifest, graph_names(manifest))
    index, data = packed_weights.open_entry(entry, LAYOUT_VERSION, size,
                                            lambda e: write_entry(artifact_dir, manifest, cfg, e))

    def view(rec: list) -> np.ndarray:
        return packed_weights.packed_array(data, rec)

    t = cfg.text
    boundaries = {}
    for name, rec in index["graphs"].items():
        i = int(name.split("_")[1])
        linears = {k: packed_weights.linear_arrays(data, v) for k, v in rec["linears"].items()}
        norms = {k: view(v) for k, v in rec["norms"].items()}
        boundaries[name] = _native.DecoderBoundary(
            linears, norms, hidden_size=t.hidden_size, mlp_width=t.intermediate_size, heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads, head_dim=t.head_dim, eps=float(t.rms_norm_eps), gemma2=t.is_gemma2,
            has_end=i > 0, has_start=i < t.num_hidden_layers)
    return NativeDecoder(boundaries, entry)
