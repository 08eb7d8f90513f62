"""COCO run-length encoding of binary masks (uncompressed form), as pycocotools writes it.

    {"size": [height, width], "counts": [zeros, ones, zeros, ...]}

The mask is flattened in column-major (Fortran) order, top to bottom and then left to right,
and `counts` are the lengths of its alternating runs, starting with a run of zeros (0 when the
first pixel is set). pycocotools reads it with `mask.frPyObjects(rle, h, w)`.
"""
from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> dict:
    """bool [h, w] -> {"size": [h, w], "counts": [...]}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D [height, width], got shape {mask.shape}")
    flat = mask.astype(bool).flatten(order="F")
    if flat.size == 0:
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1          # where a new run starts
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts                                    # runs start with zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode(rle: dict) -> np.ndarray:
    """{"size": [h, w], "counts": [...]} -> bool [h, w]. Raises ValueError on a malformed RLE."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = [int(c) for c in rle["counts"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an uncompressed COCO RLE ({e}); expected {{'size': [h, w], 'counts': [...]}}") from None
    if h < 0 or w < 0 or any(c < 0 for c in counts):
        raise ValueError("RLE size and counts must be non-negative")
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts add up to {sum(counts)}, but size {h}x{w} has {h * w} pixels")
    values = np.arange(len(counts)) % 2 == 1                     # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()                         # column-major back to [h, w]
