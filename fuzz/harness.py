"""What every fuzz target shares: the atheris entry point, the one exception family that may
escape, and the tiny fixtures (checkpoint, artifact, mask decoder) built once per process.

A target module defines `test_one_input(data: bytes)` and calls `main(test_one_input)`. It
imports the engine inside `atheris.instrument_imports(include=["engine"])` so that the
coverage feedback sees engine code. Nothing here imports the engine at module level, so that
the targets import it first, instrumented.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import atheris
import numpy as np

# The engine reads these from a file; the targets write each input to one scratch file, in
# memory (/dev/shm) where there is one: a write to disk costs 2 ms, 50x the rest of an input.
_SCRATCH = Path(tempfile.mkdtemp(prefix="pg-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def scratch(name: str) -> Path:
    """A path in this process's scratch directory (removed at exit)."""
    return _SCRATCH / name


def write(path: Path, data: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(data)
    return path


def main(test_one_input) -> None:
    """Run libFuzzer on `test_one_input` with sys.argv (corpus dirs, -runs=N, ...)."""
    warnings.simplefilter("ignore")    # warnings are not findings; exceptions are
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


# ---------------------------------------------------------------------------- fixtures
def tiny_checkpoint(sharded: bool = False) -> Path:
    """A tiny synthetic PaliGemma 1 checkpoint (fp32), single file or 3+ shards."""
    from engine.synth import write_synthetic_checkpoint
    out = scratch("ckpt-sharded" if sharded else "ckpt")
    if not out.exists():
        write_synthetic_checkpoint("tiny-pg1", out, seed=0, dtype="fp32", progress=False,
                                   **({"max_shard_bytes": 300_000} if sharded else {}))
    return out


def tiny_artifact() -> Path:
    """A tiny fp32 ONNX artifact of tiny_checkpoint() (no mask decoder)."""
    from export.pipeline import export_checkpoint
    out = scratch("art")
    if not out.exists():
        export_checkpoint(tiny_checkpoint(), out, formats=("onnx",), weights="fp32", progress=False)
    return out


def tiny_decoder_arrays(codes: int = 128, dim: int = 4, ch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a miniature VQ-VAE mask decoder (the layout of vae-oid.npz, few channels)."""
    rng = np.random.default_rng(seed)

    def conv(o, i, k):
        return rng.standard_normal((o, i, k, k)).astype(np.float32) * 0.3, rng.standard_normal(o).astype(np.float32) * 0.1

    arrays = {"_vq_vae._embedding": rng.standard_normal((codes, dim)).astype(np.float32)}
    layers = {"decoder.0": conv(ch, dim, 1)}
    for block in ("decoder.2.net", "decoder.3.net"):
        layers[f"{block}.0"] = conv(ch, ch, 3)
        layers[f"{block}.2"] = conv(ch, ch, 3)
        layers[f"{block}.4"] = conv(ch, ch, 1)
    c = ch
    for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        w, b = conv(c, c, 4)          # ConvTranspose2d [in, out, k, k]
        layers[name] = (w, b)
    layers["decoder.12"] = conv(1, c, 1)
    for name, (w, b) in layers.items():
        arrays[f"{name}.weight"], arrays[f"{name}.bias"] = w, b
    return arrays
