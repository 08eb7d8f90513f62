"""The artifact's token embedding table (embed_tokens.npy, + embed_scales.npy when int8),
memory-mapped and checked against the manifest and the model config before first use.

A table of the wrong shape or dtype would otherwise surface much later, as an IndexError in
the middle of a prompt or as silently wrong embeddings; here it is an ArtifactError naming
the file, when the model loads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifact import REEXPORT, ArtifactError, Embedding
from .config import PaliGemmaConfig

_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def load_embedding(directory: Path, emb: Embedding, cfg: PaliGemmaConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(table [V, D] memory-mapped, per-row scales [V] float32 or None) of an artifact."""
    table_path = directory / emb.table
    table = _load_npy(table_path, mmap=True)
    rows, width = cfg.text.vocab_size, cfg.text.hidden_size
    if table.ndim != 2 or table.shape[1] != width or table.shape[0] < rows:
        raise ArtifactError(f"{table_path}: embedding table has shape {table.shape}, but the model needs "
                            f"[{rows}, {width}] (vocab_size x hidden_size); {REEXPORT}")
    expected = _DTYPES.get(emb.dtype) if emb.dtype is not None else None
    if table.dtype not in _DTYPES.values() or (expected is not None and table.dtype != expected):
        raise ArtifactError(f"{table_path}: embedding table has dtype {table.dtype}, the manifest says "
                            f"{emb.dtype or 'fp32, fp16 or int8'}; {REEXPORT}")
    if (table.dtype == np.int8) != (emb.scales is not None):
        raise ArtifactError(f"{table_path}: an int8 embedding table needs per-row scales (and only it has "
                            f"them); the manifest's embedding entry is inconsistent, {REEXPORT}")
    if emb.scales is None:
        return table, None
    scales_path = directory / emb.scales
    scales = _load_npy(scales_path, mmap=False)
    if scales.shape != (table.shape[0],) or not np.issubdtype(scales.dtype, np.floating):
        raise ArtifactError(f"{scales_path}: embedding scales have shape {scales.shape} and dtype {scales.dtype}, "
                            f"expected float [{table.shape[0]}] (one per table row); {REEXPORT}")
    return table, scales


def load_final_norm(directory: Path, emb: Embedding, cfg: PaliGemmaConfig) -> np.ndarray | None:
    """The final RMSNorm weight w [D] float32 (Gemma's offset from 1), or None when the artifact
    has no final_norm.npy (then the LM head runs as the lm_head graph)."""
    if emb.final_norm is None:
        return None
    path = directory / emb.final_norm
    w = _load_npy(path, mmap=False)
    if w.shape != (cfg.text.hidden_size,) or not np.issubdtype(w.dtype, np.floating) or not np.isfinite(w).all():
        raise ArtifactError(f"{path}: the final norm weight has shape {w.shape} and dtype {w.dtype}, expected "
                            f"finite float [{cfg.text.hidden_size}] (hidden_size); {REEXPORT}")
    return w.astype(np.float32)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: the embedding file is missing; {REEXPORT}") from None
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, ... on a bad .npy
        raise ArtifactError(f"{path}: not a readable .npy array ({type(e).__name__}: {e}); the artifact is "
                            f"corrupted, {REEXPORT}") from None
