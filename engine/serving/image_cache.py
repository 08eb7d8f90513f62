"""Image features computed once per image: an LRU cache bounded in bytes.

The key of an image is the sha256 of its pixel values (bytes, shape and dtype) and of the
model's identity (PaliGemma.identity: a hash of the artifact's manifest, the backend and its
settings),
so one cache may even be shared by several models. The same image asked several prompts (a
kiosk's follow-up questions, caption-then-segment) runs the vision graph once.

Features are stored read-only; a hit returns the very array that the vision graph produced for
that image, so results never depend on whether the cache hit. Thread-safe.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def image_key(pixel_values: np.ndarray, model_key: str) -> str:
    """Cache key of one image's pixels [3, S, S] for the model `model_key`."""
    px = np.ascontiguousarray(pixel_values)
    h = hashlib.sha256()
    h.update(model_key.encode())
    h.update(f"{px.dtype.str}{px.shape}".encode())
    h.update(memoryview(px).cast("B"))
    return h.hexdigest()


class FeatureCache:
    """LRU map key -> features (float32 [P, D]), at most `max_bytes` of arrays in all.
    max_bytes 0 disables it (get always misses, put stores nothing)."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"image_cache_bytes must be an integer >= 0 (0 = off), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            feats = self._items.get(key)
            if feats is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return feats

    def put(self, key: str, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes:
            return                                  # bigger than the whole cache (or cache off)
        features = np.array(features, dtype=np.float32, copy=True)   # our own, read-only copy
        features.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = features
            self._bytes += features.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
