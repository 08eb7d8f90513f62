"""COCO run-length encoding of binary masks (uncompressed RLE, as pycocotools reads it).

A mask [h, w] is flattened in column-major (Fortran) order and written as the lengths of its
alternating runs, starting with a run of zeros (of length 0 when the first pixel is set):

    [[0, 1],          column-major: 0 0 1 1  ->  counts [2, 2]
     [0, 1]]

pycocotools turns it into its compressed form with `mask.frPyObjects(rle, h, w)`.
Numpy only; shared by every writer of masks (engine.batch, the CLI's --json).
"""
from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> dict:
    """{"size": [h, w], "counts": [run lengths]} of a 2-D mask (nonzero = inside)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D [height, width], got shape {m.shape}")
    flat = (m != 0).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def decode(rle: dict) -> np.ndarray:
    """The bool [h, w] mask of an uncompressed RLE (the inverse of `encode`)."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, not {h} * {w} = {h * w} pixels (or are negative)")
    values = np.arange(len(counts)) % 2 == 1           # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((h, w), order="F")
