"""benchmarks/cpuid_cap.c: a whole process (numpy, onnxruntime, the engine) sees an x86 CPU
without AVX-512, so that an AVX-512 machine gives a first AVX2-only estimate. Needs gcc, an x86
CPU with AVX-512 and the kernel's CPUID faulting (`cpuid_fault` in /proc/cpuinfo)."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import cpu_features

SOURCE = Path(__file__).resolve().parent.parent / "benchmarks" / "cpuid_cap.c"


def cpuinfo_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("gcc") is None or "cpuid_fault" not in cpuinfo_flags()
    or not cpu_features()["avx512"], reason="needs gcc, an AVX-512 x86 CPU and CPUID faulting")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpuid_cap") / "cpuid_cap.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE)], check=True)
    return out


def run_capped(shim, code: str, cap: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CPUID_CAP", "ENGINE_SIMD")}
    env["LD_PRELOAD"] = str(shim)
    if cap is not None:
        env["CPUID_CAP"] = cap
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


PROBE = """
import json, numpy as np, engine
from numpy._core._multiarray_umath import __cpu_features__ as np_features
f = engine.cpu_features()
print(json.dumps([f["avx2"], f["avx512"], f["avx512_vnni"], f["amx"], f["best"],
                  bool(np_features.get("AVX512F")), bool(np_features.get("AVX2"))]))
"""


def test_avx2_cap_hides_avx512_from_the_engine_and_numpy(shim):
    res = run_capped(shim, PROBE, "avx2")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[-2] == '[true, false, false, false, "avx2", false, true]'


def test_avx2_is_the_default_cap(shim):
    res = run_capped(shim, PROBE, None)
    assert res.returncode == 0, res.stderr
    assert '"avx2"' in res.stdout


def test_avx512_cap_keeps_avx512_without_vnni(shim):
    res = run_capped(shim, PROBE, "avx512")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[-2] == '[true, true, false, false, "avx512", true, true]'


def test_a_real_segfault_still_kills_the_process(shim):
    res = run_capped(shim, "import ctypes; ctypes.string_at(0)", "avx2")
    assert res.returncode == -11


def test_unknown_cap_is_refused_with_the_choices(shim):
    res = run_capped(shim, "print('ran')", "avx10")
    assert res.returncode == 2 and "ran" not in res.stdout
    assert "CPUID_CAP=avx10 is not one of avx2, avx512" in res.stderr
