"""The compiled core is built, importable, and reports CPU features consistently."""
import os
import subprocess
import sys

import pytest

import engine
from engine import _native


def test_native_module_is_compiled_extension():
    # A compiled extension, not a Python stand-in.
    assert _native.__file__.endswith((".so", ".pyd")), _native.__file__


def test_cpu_features_keys_and_consistency():
    f = engine.cpu_features()
    assert set(f) >= {"arch", "avx2", "avx512", "avx512_vnni", "amx", "neon", "best", "simd"}
    assert f["best"] in ("scalar", "avx2", "avx512", "amx", "neon")
    if f["best"] in ("avx512", "amx"):
        assert f["avx512"] and f["avx2"]
    if f["best"] == "amx":
        assert f["amx"] and f["avx512_vnni"]
    if f["best"] == "avx2":
        assert f["avx2"]
    if f["arch"] == "x86_64":
        assert not f["neon"]
        # Cross-check AVX2/AVX-512F with the kernel's view of the CPU where available.
        if os.path.exists("/proc/cpuinfo"):
            flags = open("/proc/cpuinfo").read().split()
            assert f["avx2"] == ("avx2" in flags and "fma" in flags)
            assert f["avx512"] == all(x in flags for x in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))
            if f["amx"]:   # usable AMX needs both CPU flags (and the OS's permission, which the flags don't show)
                assert "amx_tile" in flags and "amx_int8" in flags


def _simd_in_subprocess(env_value):
    env = dict(os.environ, ENGINE_SIMD=env_value)
    out = subprocess.run([sys.executable, "-c", "import engine; print(engine.cpu_features()['simd'])"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_env_forces_scalar_path():
    assert _simd_in_subprocess("scalar") == "scalar"


def test_set_simd_level_round_trip_and_errors():
    best = engine.cpu_features()["best"]
    try:
        _native.set_simd_level("scalar")
        assert _native.simd_level() == "scalar"
        _native.set_simd_level(best)
        assert _native.simd_level() == best
        with pytest.raises(ValueError, match="unknown SIMD level"):
            _native.set_simd_level("sse9")
        unavailable = "neon" if engine.cpu_features()["arch"] == "x86_64" else "avx512"
        with pytest.raises(ValueError, match="not available"):
            _native.set_simd_level(unavailable)
    finally:
        _native.set_simd_level(best)
