"""PaliGemma CPU / edge inference engine.

Public API (more arrives with the pipeline): `cpu_features()`.
"""
from __future__ import annotations

try:
    from . import _native
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "engine._native (the compiled core) is missing: install the package with "
        "`pip install .` or `pip install -e .` so that CMake builds it") from e

__version__ = "0.1.0"


def cpu_features() -> dict:
    """The CPU's SIMD features as the native core sees them.

    Keys: arch, avx2, avx512, avx512_vnni, amx, neon, `best` (best level this CPU and build
    support) and `simd` (the level kernels use now; ENGINE_SIMD=scalar forces the generic path).
    """
    return dict(_native.cpu_features())
