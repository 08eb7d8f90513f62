"""PaliGemma CPU / edge inference engine.

Public API:
    load(path=None, backend="onnxruntime", threads=None, ...) -> PaliGemma session
        .generate(image, prompt, ...), .caption, .answer, .ocr, .detect, .segment
    parse_detections(text, width, height), parse_segments(text, width, height, decoder=None)
    Detection, Segment, cpu_features()
"""
from __future__ import annotations

try:
    from . import _native
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "engine._native (the compiled core) is missing: install the package with "
        "`pip install .` or `pip install -e .` so that CMake builds it") from e

from .runtime import DEFAULT_BACKEND  # noqa: E402
from .tasks import Detection, Segment, parse_detections, parse_segments  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "default_model_path", "default_cache_dir", "cpu_features", "parse_detections",
           "parse_segments", "Detection", "Segment", "__version__"]


# Weight formats of an export: export.quantize.WEIGHT_FORMATS, repeated so that load() and the CLI
# check them without importing the exporter (tests/test_cli.py checks that the two agree).
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")


def cpu_features() -> dict:
    """The CPU's SIMD features as the native core sees them.

    Keys: arch, avx2, avx512, avx512_vnni, amx (AMX-INT8 / AMX-BF16 tiles that the OS lets this process
    use), neon, neon_dot (sdot), `best` (best level this CPU and build support: scalar, neon, avx2,
    avx512 or amx) and `simd` (the level kernels use now; ENGINE_SIMD=scalar forces the generic
    path, ENGINE_SIMD=avx512 keeps AVX-512 without the AMX tiles).
    """
    return dict(_native.cpu_features())


def default_cache_dir():
    """Where exports of HF checkpoints and synthetic checkpoints are cached:
    $PALIGEMMA_EDGE_CACHE, else $XDG_CACHE_HOME/paligemma-edge, else ~/.cache/paligemma-edge."""
    import os
    from pathlib import Path
    root = os.environ.get("PALIGEMMA_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "paligemma-edge")
    return Path(root)


def load(path=None, backend: str = DEFAULT_BACKEND, threads: int | None = None, *, weights: str = "int8",
         group_size: int = 128, verify: bool = True, kv_dtype: str = "auto", progress: bool = True,
         seg_decoder=None, serving=None, lm_head: str = "auto", prepacked_cache: bool = True,
         warm_up: bool | str = True, decoder: str = "auto", vision: str = "auto"):
    """Load a model for inference. The model serves any number of threads at once (see
    engine/model.py and engine/serving).

    path: an exported artifact directory (made by `python -m export`), or an HF PaliGemma
      checkpoint directory, which is exported once (with `weights` / `group_size`, for `backend`)
      into the cache directory and reused on later calls; a cached export that fails
      verification is exported again, with a warning (engine/cache.py).
    backend: "onnxruntime" (the default, DEFAULT_BACKEND: the faster on x86, README Performance) or
      "openvino". threads: threads for graphs and native kernels.
    verify: check the artifact's file checksums; files unchanged since a recorded verification
      are not hashed again (engine/artifact.py). False checks file sizes only.
    kv_dtype: KV cache storage, "f32", "f16", "int8" or "auto" (the default: f16 for int8 / int4 / fp8
      weights, f32 for float ones; engine.model.resolve_kv_dtype). seg_decoder: a `vae-oid.npz`-style mask
    decoder for segment() (an artifact exported with --seg-decoder carries its own).
    serving: an engine.serving.SchedulerConfig (max_queue, max_active, prefill_chunk_layers,
      image_cache_bytes); None: its defaults.
    lm_head: "auto" (the native int8 LM head where the artifact has one, see engine.model),
      "graph" or "native".
    prepacked_cache: keep what a load prepares in the engine's per-machine cache, written by the
      first load on this machine: onnxruntime maps the weights it repacks from it (about 2x the
      artifact's onnx/ on disk; engine/runtime/ort_prepacked.py), OpenVINO imports its compiled
      graphs (about 1x the openvino/ on disk; engine/runtime/ov_compiled.py). False: every load
      does the work again.
    warm_up: OpenVINO only: run each graph once at load (the vision tower on a zero image, the
      others on one row block), so that the first generate does not pay for the plugin's lazy weight
      repacking; "full": the others also at a prompt's size (engine/runtime/ov_backend.py).
    decoder: "auto" (the C++ core computes the decoder graphs of an int8 or int4 artifact on the
      onnxruntime backend where it was measured faster: AVX-512 without AMX, the amx SIMD
      level, and CPUs whose best level is AVX2; its packed
      weights are kept in the engine's cache, engine/runtime/native_decoder.py), "graphs", or
      "native" (the core on any CPU: AVX-512 VNNI, AVX2 and NEON-sdot kernels, else scalar).
    vision: the same for the vision graph (SigLIP + projector; engine/runtime/native_vision.py):
      "auto" (the core where it was measured no slower: AVX-512 without AMX, CPUs whose best
      level is AVX2), "graph" or
      "native".
    """
    from pathlib import Path

    from .artifact import MANIFEST, ArtifactError
    from .cache import ExportRequest, cached_export, manifest_identity, reexport
    from .model import PaliGemma
    from .runtime import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if weights not in WEIGHT_FORMATS:           # before any "exporting ... once" line
        raise ValueError(f"unknown weight format {weights!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    path = Path(path) if path is not None else default_model_path()
    export = None        # what the cached artifact is made from, when `path` is a checkpoint
    if not (path / MANIFEST).is_file():
        if (path / "config.json").is_file():
            export = ExportRequest(path, "onnx" if backend == "onnxruntime" else "openvino", weights, group_size)
            path = cached_export(export, progress)
        elif path.exists():
            raise ValueError(f"{path} is neither an exported artifact (no manifest.json) nor an HF "
                             "checkpoint (no config.json)")
        else:
            raise FileNotFoundError(f"{path} does not exist")
    seen = manifest_identity(path)
    try:
        model = PaliGemma(path, backend, threads, verify=verify, kv_dtype=kv_dtype, serving=serving, lm_head=lm_head,
                          prepacked_cache=prepacked_cache, warm_up=warm_up, decoder=decoder,
                          vision=vision)
    except ArtifactError as e:
        if export is None:        # the user's own artifact: theirs to fix, the error says how
            raise
        path = reexport(export, path, e, seen, progress)     # a cached export heals itself
        model = PaliGemma(path, backend, threads, verify=verify, kv_dtype=kv_dtype, serving=serving, lm_head=lm_head,
                          prepacked_cache=prepacked_cache, warm_up=warm_up, decoder=decoder,
                          vision=vision)
    if seg_decoder is not None:
        model.load_seg_decoder(seg_decoder)
    return model


# Part of the export cache key: bump it whenever the exporter writes different graphs or weights
# for the same options, so that cached artifacts of an older exporter are not reused.
# 6: 7-bit codes for MatMulNBits bits=8 (int4 artifacts' int8 matrices); 5: final_norm.npy for
# the native int8 LM head; 4: ONNX IR version pinned to 10 (was the
# installed onnx's, 14 with onnx 1.23); 3: per-row int8.
EXPORT_REVISION = 6


def _export_cached(checkpoint, backend: str, weights: str, group_size: int, progress: bool):
    """The cached export of the HF checkpoint `checkpoint`, made now if missing (engine/cache.py)."""
    from pathlib import Path

    from .cache import ExportRequest, cached_export
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    return cached_export(ExportRequest(Path(checkpoint), fmt, weights, group_size), progress)


def default_model_path():
    """The model used when no path is given: the project's small PaliGemma 2 trained on generated
    shape scenes (training/train_model.py), bundled as an HF checkpoint in engine/default_model
    (with its VQ-VAE mask decoder, vae-oid.npz). `load()` exports it once into the cache."""
    from pathlib import Path

    path = Path(__file__).resolve().parent / "default_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled default model is missing from {path}: the installation is "
                                "incomplete; reinstall the package, or pass a model path")
    return path
