"""`python -m export` as a user runs it: a subprocess on a tiny synthetic checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.artifact import load_manifest
from test_export_onnx import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(2, tmp_path_factory.mktemp("ckpt") / "pg2")


def test_export_prints_summary_and_writes_a_loadable_artifact(checkpoint, tmp_path):
    out = tmp_path / "art"
    r = run_cli(checkpoint, "--out", out, "--weights", "int4", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    assert f"exported {out}" in r.stderr and "total" in r.stderr and "onnx" in r.stderr
    assert "int4 mixed precision: int8 for" in r.stderr and "of the decoder weights are int4" in r.stderr
    m = load_manifest(out)
    assert m.weights["format"] == "int4" and set(m.graphs) == {"onnx"}


def test_existing_output_needs_force(checkpoint, tmp_path):
    out = tmp_path / "art"
    assert run_cli(checkpoint, "--out", out, "--quiet").returncode == 0
    r = run_cli(checkpoint, "--out", out, "--quiet")
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(checkpoint, "--out", out, "--quiet", "--force", "--weights", "fp16")
    assert r.returncode == 0, r.stderr
    assert load_manifest(out).weights["format"] == "fp16"


def test_missing_checkpoint_dir(tmp_path):
    r = run_cli(tmp_path / "nope", "--out", tmp_path / "art")
    assert r.returncode == 2
    assert "not a checkpoint directory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--weights", "int3"], "invalid choice: 'int3'"),
    (["--weights", "int4", "--group-size", "48"], "power of two"),
    (["--seg-decoder", "/nonexistent.npz"], "does not exist"),
    (["--lora", "/nonexistent-adapter"], "not a directory"),
])
def test_bad_arguments(checkpoint, tmp_path, args, message):
    r = run_cli(checkpoint, "--out", tmp_path / "art", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "art").exists()


def test_out_is_required(checkpoint):
    r = run_cli(checkpoint)
    assert r.returncode == 2 and "--out" in r.stderr


def test_help_lists_every_option():
    r = run_cli("--help")
    assert r.returncode == 0
    for opt in ("--out", "--format", "--weights", "--group-size", "--lora", "--seg-decoder", "--force"):
        assert opt in r.stdout
