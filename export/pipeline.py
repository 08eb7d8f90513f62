"""Export an HF PaliGemma checkpoint to an artifact directory (see engine/artifact.py).

    export_checkpoint("paligemma2-3b-pt-224", "pg2-int8", formats=("onnx",), weights="int8")

Steps, all inside a staging directory that is renamed into place only at the end (an
interrupted or failed export leaves nothing loadable, and an existing artifact is untouched):

  1. open the checkpoint (memory-mapped; nothing is read before it is needed), optionally
     merge a PEFT LoRA adapter (lazily, one weight at a time; export/lora.py);
  2. write the token embedding table (embed_tokens.npy, + embed_scales.npy when quantized);
  3. build every graph for each backend, streaming: one graph is built, its weights quantized
     and written, saved and freed before the next (onnx: export/onnx_graphs.py; openvino:
     export/openvino_graphs.py);
  4. copy tokenizer.model, preprocessor_config.json (if present) and the optional VQ-VAE
     segmentation decoder (seg_decoder.npz);
  5. write manifest.json (engine.artifact.new_manifest + write_manifest: every file with its
     sha256, the model config, the quantization of every tensor group incl. int4's int8 matrices
     and int4 -> int8 fallbacks, the source checkpoint) and move the directory into place.

Embedding table formats: fp32 for "fp32"; fp16 for "fp16" and "bf16" (bf16 -> fp16 is exact in
fp16's normal range; values under 6e-5 keep an absolute error below 3e-8, and a table with
values beyond fp16's range is written in fp32 instead); for int8 / int4 / fp8, an int8 table with
one fp32 scale per row (embed_scales.npy), the same per-channel int8 quantization as an int8 LM
head. The engine memory-maps the table and gathers rows, then multiplies them by
`embedding.scale` (sqrt(hidden) rounded to the checkpoint dtype, graph_def.embedding_scale).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engine import artifact
from engine.checkpoint import Checkpoint
from engine.config import PaliGemmaConfig
from engine.errors import EngineError
from engine.layout import expected_tensors

from . import graph_def, onnx_graphs
from .quantize import (INT4_INT8_MATRICES, WEIGHT_FORMATS, check_group_size, int4_precision_group,
                       matrix_format, quantize, summarize_formats)

EXPORT_FORMATS = ("onnx", "openvino")
TOOL_VERSION = "0.1.0"
SEG_DECODER = "seg_decoder.npz"
PREPROCESSOR = "preprocessor_config.json"


class ExportError(EngineError, ValueError):
    """Bad export arguments or an export that cannot proceed."""


def export_checkpoint(checkpoint_dir, out_dir, *, formats=("onnx",), weights: str = "fp32",
                      group_size: int = 128, lora_dir=None, seg_decoder=None, force: bool = False,
                      progress: bool = True) -> Path:
    """Export `checkpoint_dir` (HF PaliGemma) to the artifact directory `out_dir`; returns its path.

    formats: ("onnx",), ("openvino",) or both. weights: one of quantize.WEIGHT_FORMATS.
    group_size: int4 group size (power of two >= 16). lora_dir: PEFT adapter to merge first.
    seg_decoder: path of the VQ-VAE decoder npz (vae-oid.npz) to ship for segmentation.
    force: replace an existing `out_dir`.
    """
    t0 = time.perf_counter()
    formats = _check_args(out_dir, formats, weights, group_size, seg_decoder, force)
    out_dir = Path(out_dir)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    ckpt = Checkpoint.open(checkpoint_dir)
    try:
        cfg = ckpt.config
        if ckpt.tokenizer_path is None:
            raise ExportError(f"{checkpoint_dir}: no tokenizer.model; copy it from the model's HF "
                              "repository into the checkpoint directory and export again")
        tensors: Mapping[str, np.ndarray] = ckpt.tensors
        lora_info = None
        if lora_dir is not None:
            from .lora import merge_lora
            tensors, lora_info = merge_lora(tensors, cfg, lora_dir)
            log(f"LoRA adapter {lora_dir}: merging {lora_info['merged']} weights "
                f"(r={lora_info['r']}, scale {lora_info['scale']:g})")
        log(f"exporting {ckpt.path} (PaliGemma {cfg.version}, {ckpt.dtype}) -> {out_dir} "
            f"[{'+'.join(formats)}, weights {weights}{f', group {group_size}' if weights == 'int4' else ''}]")

        staging = artifact.staging_dir(out_dir)
        try:
            embedding = write_embedding(staging, cfg, tensors["text.embed_tokens.weight"], weights,
                                        ckpt.dtype, progress, final_norm=tensors["text.norm.weight"])
            graphs, backend_info = {}, {}
            if "onnx" in formats:
                graphs["onnx"], backend_info["onnx"] = _export_onnx(cfg, tensors, ckpt.tensors, staging, weights,
                                                                    group_size, progress)
            if "openvino" in formats:
                graphs["openvino"], backend_info["openvino"] = _export_openvino(cfg, tensors, staging, weights,
                                                                                group_size, progress)
            extras = _copy_extras(staging, ckpt, seg_decoder)
            if lora_info is not None:
                extras["lora"] = lora_info
            source = {"path": str(Path(ckpt.path).resolve()), "dtype": ckpt.dtype,
                      "config_sha256": artifact.sha256_file(Path(ckpt.path) / "config.json")}
            manifest = artifact.new_manifest(
                cfg, source=source, graphs=graphs, embedding=embedding, tool_version=TOOL_VERSION,
                weights=quantization_info(cfg, weights, group_size, backend_info), extras=extras)
            log("checksumming files")
            manifest = artifact.write_manifest(staging, manifest)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)      # mkdtemp made it private (0700)
            artifact.commit_dir(staging, out_dir, overwrite=force)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        ckpt.close()
    if progress:
        print(summary(out_dir, manifest, time.perf_counter() - t0), file=sys.stderr, flush=True)
    return out_dir


def _check_args(out_dir, formats, weights, group_size, seg_decoder, force) -> tuple[str, ...]:
    """Reject bad arguments before any long work starts."""
    if isinstance(formats, str):
        formats = EXPORT_FORMATS if formats == "both" else (formats,)
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format {bad[0] if bad else None!r}; use onnx, openvino or both")
    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"unknown weight format {weights!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if weights == "int4":
        try:
            check_group_size(group_size)
        except ValueError as e:
            raise ExportError(str(e)) from None
    if seg_decoder is not None and not Path(seg_decoder).is_file():
        raise ExportError(f"segmentation decoder {seg_decoder} does not exist; pass the path of vae-oid.npz")
    if Path(out_dir).exists() and not force:
        raise ExportError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    return formats


# ---------------------------------------------------------------------------- embedding
def write_embedding(staging: Path, cfg: PaliGemmaConfig, table: np.ndarray, weights: str,
                    checkpoint_dtype: str, progress: bool = True, final_norm: np.ndarray | None = None) -> dict:
    """Write embed_tokens.npy (+ embed_scales.npy) in row chunks; returns the manifest entry.
    With an int8 table of tied embeddings, also the final norm weight (final_norm.npy, fp32): the
    engine then computes the LM head from the table itself (engine.model, `native_lm_head`)."""
    V, D = table.shape
    if weights == "fp32":
        dtype = "fp32"
    elif weights in ("fp16", "bf16"):
        dtype = "fp16" if _fits_fp16(table) else "fp32"
    else:
        dtype = "int8"
    np_dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[dtype]
    out = np.lib.format.open_memmap(staging / "embed_tokens.npy", mode="w+", dtype=np_dtype, shape=(V, D))
    scales = np.empty(V, np.float32) if dtype == "int8" else None
    step = max(1, (1 << 22) // D)
    for start in _bar(range(0, V, step), progress, "embedding table", total=-(-V // step), unit="chunk"):
        rows = slice(start, min(V, start + step))
        if dtype == "int8":
            q = quantize(table[rows], "int8")
            out[rows], scales[rows] = q.data, q.scales
        else:
            out[rows] = np.asarray(table[rows], np.float32).astype(np_dtype)
    out.flush()
    del out
    entry = {"table": "embed_tokens.npy", "dtype": dtype, "scales": None,
             "scale": graph_def.embedding_scale(cfg, checkpoint_dtype)}
    if scales is not None:
        np.save(staging / "embed_scales.npy", scales)
        entry["scales"] = "embed_scales.npy"
        if final_norm is not None and cfg.text.tie_word_embeddings:
            np.save(staging / "final_norm.npy", np.asarray(final_norm, np.float32))
            entry["final_norm"] = "final_norm.npy"
    return entry


def _fits_fp16(table: np.ndarray) -> bool:
    step = max(1, (1 << 22) // table.shape[1])
    return all(np.abs(np.asarray(table[s:s + step], np.float32)).max(initial=0) < 65504
               for s in range(0, table.shape[0], step))


# ---------------------------------------------------------------------------- backends
def _export_onnx(cfg, tensors, base_tensors, staging: Path, weights: str, group_size: int, progress: bool):
    total = sum(onnx_graphs.graph_param_counts(cfg, base_tensors).values())
    bar = _bar(None, progress, f"onnx graphs ({weights})", total=total, unit=" params", unit_scale=True)
    try:
        files, formats = onnx_graphs.export_onnx_graphs(
            cfg, tensors, staging / "onnx", weights, group_size,
            on_weight=bar.update, on_graph=lambda name: bar.set_postfix_str(name),
            accuracy_level=onnx_graphs.ACCURACY_LEVEL)
    finally:
        bar.close()
    info = {"formats": formats, "int_kernel": "com.microsoft.MatMulNBits",
            "int8_kernel": ("com.microsoft.MatMulIntegerToFloat (per-row int8, 7-bit codes)"
                            if weights == "int8" and onnx_graphs.INT8_KERNEL == "dq" else "com.microsoft.MatMulNBits"),
            "int8_codes": f"7-bit (|code| <= {onnx_graphs.INT8_CODE_MAX})",
            "accuracy_level": onnx_graphs.ACCURACY_LEVEL, "int8_block_size": onnx_graphs.INT8_BLOCK,
            "opset": onnx_graphs.OPSET, "ir_version": onnx_graphs.IR_VERSION, "onnx_version": _onnx_version()}
    return {name: f"onnx/{rel}" for name, rel in files.items()}, info


def _onnx_version() -> str:
    import onnx
    return onnx.__version__


def _export_openvino(cfg, tensors, staging: Path, weights: str, group_size: int, progress: bool):
    try:
        from .openvino_graphs import export_openvino_graphs
    except ImportError as e:
        raise ExportError(f"the OpenVINO exporter is unavailable ({e}); export with --format onnx, "
                          "or install openvino") from None
    out = staging / "openvino"
    files, info = export_openvino_graphs(cfg, tensors, out, weights, group_size, progress)
    graphs = {}
    for name, rel in files.items():   # accept paths relative to the artifact or to openvino/
        rel = Path(rel).as_posix()
        if not (staging / rel).is_file() and (out / rel).is_file():
            rel = f"openvino/{rel}"
        if not (staging / rel).is_file():
            raise ExportError(f"the OpenVINO exporter reported graph {name} at {rel}, which it did not write")
        graphs[name] = rel
    return graphs, dict(info or {})


def _copy_extras(staging: Path, ckpt: Checkpoint, seg_decoder) -> dict:
    shutil.copyfile(ckpt.tokenizer_path, staging / "tokenizer.model")
    extras = {"preprocessor_config": None, "seg_decoder": None}
    pre = Path(ckpt.path) / PREPROCESSOR
    if pre.is_file():
        artifact.read_preprocessing(pre, ckpt.config)     # fail now rather than at every load
        shutil.copyfile(pre, staging / PREPROCESSOR)
        extras["preprocessor_config"] = PREPROCESSOR
    if seg_decoder is not None:
        try:
            with np.load(seg_decoder) as z:
                if not any(k.endswith("_vq_vae._embedding") for k in z.files):
                    raise ExportError(f"{seg_decoder} has no _vq_vae._embedding array; is it vae-oid.npz?")
        except (OSError, ValueError) as e:
            raise ExportError(f"{seg_decoder} is not a readable npz file ({e}); pass vae-oid.npz") from None
        shutil.copyfile(seg_decoder, staging / SEG_DECODER)
        extras["seg_decoder"] = SEG_DECODER
    return extras


# ---------------------------------------------------------------------------- manifest pieces
def linear_weight_formats(cfg: PaliGemmaConfig, weights: str, group_size: int) -> dict[str, str]:
    """Format every matrix gets (the same rule in every backend: quantize.matrix_format)."""
    return {name: matrix_format(name, weights, K, group_size) for name, (_, K) in _linear_shapes(cfg).items()}


def _linear_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, int]]:
    """Every matrix the graphs multiply by: canonical name -> (O, K)."""
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if name.endswith(".weight") and (len(shape) == 2 and not name.endswith("position_embedding.weight")
                                         or name == "vision.embeddings.patch_embedding.weight"):
            if name == "text.embed_tokens.weight" and not cfg.text.tie_word_embeddings:
                continue   # only a lookup table then; lm_head.weight is the matrix
            out[name] = (int(shape[0]), int(np.prod(shape[1:])))
    return out


def _compact_bytes(fmt: str, O: int, K: int, group_size: int) -> int:
    """Bytes of an [O, K] matrix stored compactly (quantize.QuantizedWeight.nbytes)."""
    if fmt == "int4":
        return O * K // 2 + 4 * O * (K // group_size)
    if fmt in ("int8", "fp8"):
        return O * K + 4 * O
    return O * K * (4 if fmt == "fp32" else 2)


def int4_share(cfg: PaliGemmaConfig, formats: dict[str, str], group_size: int) -> dict:
    """Share of the decoder layers' linear weights that are int4: of their parameters and of
    their compact bytes (int4 packed + scales, int8 + one scale per row)."""
    shapes = {n: s for n, s in _linear_shapes(cfg).items() if n.startswith("text.layers.")}
    params = {n: O * K for n, (O, K) in shapes.items()}
    nbytes = {n: _compact_bytes(formats[n], O, K, group_size) for n, (O, K) in shapes.items()}
    int4 = [n for n in shapes if formats[n] == "int4"]
    return {"decoder_params": round(sum(params[n] for n in int4) / sum(params.values()), 4),
            "decoder_bytes": round(sum(nbytes[n] for n in int4) / sum(nbytes.values()), 4)}


def quantization_info(cfg: PaliGemmaConfig, weights: str, group_size: int, backends: dict) -> dict:
    formats = linear_weight_formats(cfg, weights, group_size)
    for backend, info in backends.items():
        got = info.pop("formats", None)
        if got is not None and got != formats:
            diff = sorted(n for n in formats if got.get(n) != formats[n])
            raise ExportError(f"internal error: the {backend} graphs quantized {diff[:3]} differently "
                              "from the declared rule; please report this")
    mixed = None
    if weights == "int4":   # the int8 part of int4 (quantize.INT4_INT8_MATRICES), by group
        used = {int4_precision_group(n) for n in formats} - {None}
        mixed = {"int8": [INT4_INT8_MATRICES[k] for k in INT4_INT8_MATRICES if k in used],
                 "int8_matrices": sum(1 for n in formats if int4_precision_group(n) is not None),
                 "int4_search": "per-group scale search (quantize.INT4_DIVISORS) + least-squares scale"}
    return {"format": weights, "group_size": group_size if weights == "int4" else None,
            **summarize_formats(formats, weights),       # "groups", "fallbacks"
            "mixed_precision": mixed,
            "int4_share": int4_share(cfg, formats, group_size) if weights == "int4" else None,
            "other_tensors": "fp32 (norms, biases, position embedding)",
            "embedding": "int8 per row" if weights in ("int8", "int4", "fp8") else None,
            "backends": backends}


def summary(out_dir: Path, manifest: dict, seconds: float) -> str:
    parts: dict[str, int] = {}
    for rel, meta in manifest["files"].items():
        part = rel.split("/")[0] if "/" in rel else ("embedding" if rel.startswith("embed_") else "other")
        parts[part] = parts.get(part, 0) + meta["size"]
    lines = [f"exported {out_dir} in {seconds:.1f} s ({manifest['weights']['format']} weights)"]
    lines += [f"  {part:10s} {_size(n):>10s}" for part, n in sorted(parts.items())]
    lines.append(f"  {'total':10s} {_size(sum(parts.values())):>10s}")
    w = manifest["weights"]
    if w.get("int4_share"):
        lines.append(f"  int4 mixed precision: int8 for {', '.join(w['mixed_precision']['int8'])}; "
                     f"{w['int4_share']['decoder_params']:.0%} of the decoder weights are int4")
    fb = w["fallbacks"]
    if fb:
        lines.append(f"  {len(fb)} matrices fell back to {sorted(set(fb.values()))} (K not a multiple of "
                     f"the group size), e.g. {next(iter(fb))}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _bar(iterable, progress: bool, desc: str, **kw):
    from tqdm import tqdm
    show = progress and sys.stderr.isatty()          # a bar on a terminal, never \r lines in a log
    return tqdm(iterable, desc=desc, disable=not show, file=sys.stderr, dynamic_ncols=True, **kw)
