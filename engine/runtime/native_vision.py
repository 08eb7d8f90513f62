"""The native vision tower: the vision graph (SigLIP + projector) of a per-row int8 artifact
computed by the C++ core (csrc/vision_tower.h).

Why: at 224 px the vision graph is a fifth to a third of the time to first token (README
Performance), and on AMX CPUs the core's AMX-INT8 kernel runs prefill-sized matrices 2.5-3x
faster than VNNI, where onnxruntime's MLAS ran this graph at 580-800 GOP/s. Its linear layers are
the graph's per-row int8 MatMulIntegerToFloat bit for bit (then + bias); layer norms, gelu and
the softmax differ in the last float bits; the attention is the core's (AMX-BF16 tiles at the amx
level, fp32 elsewhere).

When: the onnxruntime backend and a per-row int8 artifact, like the native decoder, or an int4
one, whose tower stays int8 per channel (MatMulNBits bits=8, read as per-row int8: the same codes
and scales, the activations quantized per row where MatMulNBits' accuracy_level 4 does it per block).
`vision="native"` runs it on any CPU. `vision="auto"` (the default of engine.load) takes it
only where it was measured no slower than the graph (AVX-512 without AMX; CPUs whose best is
AVX2); see `auto_declines`.
PALIGEMMA_EDGE_NATIVE_VISION=0 turns auto's choice off; `vision="graph"` too.

Weights: packed once per artifact into `<default_cache_dir()>/native-vision/<key>/` (weights.bin,
index.json, stamp.json; packed_weights.py), memory-mapped; the onnxruntime session of the vision
graph is then not created.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _native
from ..artifact import Manifest
from ..config import PaliGemmaConfig
from . import packed_weights, stamped_dir

SUBDIR = "native-vision"
LAYOUT_VERSION = 2                # of index.json (2: fc2 padded to K % 64 == 0)
FC2_K_MULTIPLE = 64               # the AMX kernel's K step (csrc/vision_tower.h, mlp_stride)
ENV_SWITCH = "PALIGEMMA_EDGE_NATIVE_VISION"
VISION_MODES = ("auto", "graph", "native")
GRAPH = "vision"

# key -> canonical name prefix of a linear layer (its .weight, .weight.scales and .bias), per layer
LAYER_LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                 "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
LAYER_NORMS = {"ln1_w": "layer_norm1.weight", "ln1_b": "layer_norm1.bias",
               "ln2_w": "layer_norm2.weight", "ln2_b": "layer_norm2.bias"}
PATCH, PROJECTOR = "vision.embeddings.patch_embedding", "projector"
POSITION = "vision.embeddings.position_embedding.weight"
POST = ("vision.post_layernorm.weight", "vision.post_layernorm.bias")


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
    """Why the native vision tower cannot run this artifact (None: it can)."""
    reason = packed_weights.unsupported_reason(backend, manifest, "matrices")
    if reason is None and GRAPH not in manifest.graphs.get("onnx", {}):
        return "the artifact has no vision graph"
    return reason


def auto_declines() -> str | None:
    """Why vision="auto" keeps the graph on this CPU (None: it takes the native tower).

    Measured side by side with `engine.bench` (3B, onnxruntime int8, 2 threads, a 2-core Intel Xeon
    with AVX-512 VNNI and no AMX): the tower 0.45 s against the graph's 0.44 s at 224 px (3
    repeats), 2.41 s against 2.94 s at 448 px (its attention runs in tiles, without the graph's
    16 x 1,024 x 1,024 score matrix), load 0.26 against 0.62 s (no vision session to create). So
    auto takes it at the avx512 level without AMX (without VNNI too: 0.72 against 0.83 s capped to
    AVX-512 without VNNI, its 512-bit vpmaddubsw kernel against MLAS's). At
    the amx level (AMX-INT8 linear layers, AMX-BF16 attention) it has not been measured, and
    MLAS runs the graph on AMX tiles too, so auto keeps the graph there. int4 artifacts keep the
    tower at int8 per channel in MatMulNBits bits=8, which the core reads as per-row int8: 0.50
    against the graph's 0.96 s at 224 px on the same Xeon (engine.bench, 2 repeats).

    CPUs without AVX-512 (the same Xeon capped to AVX2 by benchmarks/cpuid_cap.c, so that MLAS
    runs its AVX2 kernels too; engine.bench, 2 repeats, 224 px): int8 1.02 against 0.99 s, int4
    1.68 against 2.84 s, and no session to create at load. So auto takes it at the avx2 level
    where the CPU has nothing above it; ENGINE_SIMD=avx2 on an AVX-512 CPU leaves MLAS on AVX-512,
    3x faster than the core's AVX2 kernels (1.4 against 0.34-0.46 s), and keeps the graph."""
    features = _native.cpu_features()
    if packed_weights.kernels_match_mlas(features):
        return None
    if features["amx"]:
        return "the native vision tower has not been measured against onnxruntime's AMX kernels yet"
    return (f"the native vision tower was measured no slower only at the avx512 level without AMX, or at avx2 "
            f"on a CPU without AVX-512 (this CPU: avx512_vnni={features['avx512_vnni']}, best level {features['best']}, "
            f"SIMD level {features['simd']})")


def entry_dir(root: Path, manifest: Manifest) -> Path:
    return packed_weights.entry_dir(root, "vision", LAYOUT_VERSION, manifest, [GRAPH])


def write_entry(artifact_dir: Path, manifest: Manifest, cfg: PaliGemmaConfig, entry: Path,
                progress: bool | None = None) -> None:
    """Pack the vision graph's weights into `entry`: one index record per encoder layer, plus
    "embeddings" (patch, position) and "head" (post layer norm, projector)."""
    weights = packed_weights.graph_weights(artifact_dir / manifest.graphs["onnx"][GRAPH])

    def vec(writer: packed_weights.ArrayWriter, name: str) -> list:
        return writer.put(np.asarray(weights.arrays[name], np.float32))

    def linear(writer: packed_weights.ArrayWriter, prefix: str, k_multiple: int = 1) -> dict:
        return dict(writer.linear(weights, prefix + ".weight", GRAPH, k_multiple), bias=vec(writer, prefix + ".bias"))

    def pack(writer: packed_weights.ArrayWriter, item) -> tuple[str, dict]:
        if item == "embeddings":
            return item, {"patch": linear(writer, PATCH), "position": vec(writer, POSITION)}
        if item == "head":
            return item, {"post_w": vec(writer, POST[0]), "post_b": vec(writer, POST[1]),
                          "projector": linear(writer, PROJECTOR)}
        pre = f"vision.encoder.layers.{item}."
        return f"layer_{item}", {**{k: linear(writer, pre + v, FC2_K_MULTIPLE if k == "fc2" else 1)
                                    for k, v in LAYER_LINEARS.items()},
                                 **{k: vec(writer, pre + v) for k, v in LAYER_NORMS.items()}}
    items = ["embeddings", *range(cfg.vision.num_hidden_layers), "head"]
    packed_weights.write_entry(entry, LAYOUT_VERSION, "packing native vision weights", items, pack, progress)


@dataclass
class NativeVision:
    """The artifact's vision graph as one _native.VisionTower over a memory map."""
    tower: object
    entry: Path

    def run(self, pixel_values: np.ndarray, pool) -> np.ndarray:
        """pixel_values [N, 3, S, S] -> image features [N, P, D], as the vision graph."""
        return self.tower.run(np.ascontiguousarray(pixel_values, np.float32), pool)


def open_native_vision(artifact_dir: Path, manifest: Manifest, cfg: PaliGemmaConfig,
                       attn_dtype: str = "auto") -> NativeVision:
    """Map (writing it first when absent or bad) the artifact's packed vision weights. Raises
    OSError / ValueError when the cache cannot be written or read."""
    entry = entry_dir(cache_root(), manifest)
    size = packed_weights.source_bytes(manifest, [GRAPH])
    index, data = packed_weights.open_entry(entry, LAYOUT_VERSION, size,
                                            lambda e: write_entry(artifact_dir, manifest, cfg, e))
    graphs = index["graphs"]

    def view(rec: list) -> np.ndarray:
        return packed_weights.packed_array(data, rec)

    def linear(rec: dict) -> tuple:
        return (*packed_weights.linear_arrays(data, rec), view(rec["bias"]))

    v = cfg.vision
    layers = [{**{k: linear(rec[k]) for k in LAYER_LINEARS}, **{k: view(rec[k]) for k in LAYER_NORMS}}
              for rec in (graphs[f"layer_{i}"] for i in range(v.num_hidden_layers))]
    emb, head = graphs["embeddings"], graphs["head"]
    tower = _native.VisionTower(
        linear(emb["patch"]), view(emb["position"]), layers, (view(head["post_w"]), view(head["post_b"])),
        linear(head["projector"]), image_size=v.image_size, patch_size=v.patch_size, channels=v.num_channels,
        hidden_size=v.hidden_size, mlp_width=v.intermediate_size, heads=v.num_attention_heads,
        out_dim=cfg.text.hidden_size, eps=float(v.layer_norm_eps), attn_dtype=attn_dtype)
    return NativeVision(tower, entry)
