"""engine.runtime.release_freed_heap: memory freed inside the heap goes back to the OS (RSS
drops, read from /proc), live memory is untouched, and every load calls it once its runner
exists."""
from __future__ import annotations

import ctypes
import sys

import pytest

import engine
import engine.runtime as runtime
from proc_status import status_bytes

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "malloc_trim"),
                           reason="malloc_trim is glibc's (Linux)")


@glibc
def test_freed_heap_memory_leaves_the_rss_and_live_memory_stays():
    # 100 KB blocks stay under glibc's mmap threshold (128 KB), so they live in the heap; the
    # last one, kept, pins the heap's top, so free() alone cannot return the others' pages.
    blocks = [bytearray(b"x" * 100_000) for _ in range(2000)]      # ~200 MB touched
    kept = blocks[-1]
    witness = blocks[1000]
    del blocks[:-1]
    before = status_bytes("RssAnon")
    assert runtime.release_freed_heap() in (True, False)
    after = status_bytes("RssAnon")
    assert before - after > 100 * 2**20, (before, after)
    assert kept == bytearray(b"x" * 100_000) and witness == bytearray(b"x" * 100_000)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_every_load_releases_the_heap_after_its_runner(backend, monkeypatch):
    calls = []
    real_open = runtime.open_runner

    def spy_release():
        calls.append("release")
        return True

    monkeypatch.setattr(runtime, "release_freed_heap", spy_release)
    model = engine.load(backend=backend, threads=1, progress=False)
    try:
        assert calls == ["release"]
        assert model.runner is not None and real_open is runtime.open_runner
    finally:
        model.close()
