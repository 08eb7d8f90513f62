"""A bounded run of every fuzz target (fuzz/, atheris): each runs from its committed seed
corpus for FUZZ_RUNS inputs (at most FUZZ_SECONDS), and must finish without a finding (an
exception other than EngineError, a crash, a hang or a memory blow-up). The long runs (1M
inputs per target) are `python -m fuzz.run`, see README "Fuzzing"."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fuzz.run import TARGETS  # noqa: E402

FUZZ_RUNS = int(os.environ.get("FUZZ_RUNS", "1500"))
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "8"))


@pytest.fixture(scope="module")
def atheris_installed():
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install -e '.[fuzz]'): the fuzz targets cannot run")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target, atheris_installed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", "--runs", str(FUZZ_RUNS), "--max-seconds",
                           str(FUZZ_SECONDS), "--keep-corpus", str(tmp_path), "--log", str(tmp_path / "log"),
                           target], cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log[-4000:]}"
    assert f"{target} " in proc.stdout and " ok" in proc.stdout, proc.stdout


def test_every_target_has_seeds():
    for target in TARGETS:
        seeds = list((ROOT / "fuzz" / "corpus" / target).iterdir())
        assert seeds, f"fuzz/corpus/{target} is empty; run python -m fuzz.make_seeds"
