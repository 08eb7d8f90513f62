"""The export cache (engine/cache.py): a corrupted cached export heals itself, an artifact the
user passed keeps its error, racing loads export once, an interrupted export leaves nothing
loadable, and `python -m engine cache list|verify|clear`.

Every test has its own cache directory. The model is the synthetic tiny-pg2 checkpoint; the
oracle for a healed load is the same greedy generation on the first, untouched export.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine import cache
from engine.__main__ import main
from engine.artifact import ArtifactError, load_manifest

REPO = Path(__file__).resolve().parents[1]
BACKEND, FMT, WEIGHTS = "onnxruntime", "onnx", "fp32"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from engine.synth import write_synthetic_checkpoint
    return write_synthetic_checkpoint("tiny-pg2", tmp_path_factory.mktemp("ckpt") / "tiny", seed=5, dtype="fp32",
                                      progress=False)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(root))
    return root


IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))


def greedy(model) -> list[int]:
    return model.generate(IMAGE, "caption en", max_new_tokens=6).tokens


def load(checkpoint, **kw):
    return engine.load(checkpoint, backend=BACKEND, weights=WEIGHTS, threads=1, progress=False, **kw)


def the_artifact(cache_root: Path) -> Path:
    (out,) = [p for p in (cache_root / "artifacts").iterdir() if not p.name.startswith(".")]
    return out


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def largest_file(artifact: Path) -> Path:
    return max((p for p in artifact.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --------------------------------------------------------------------------- healing
def test_corrupted_cached_export_is_exported_again(checkpoint, cache_root, caplog):
    m = load(checkpoint)
    expected = greedy(m)
    m.close()
    out = the_artifact(cache_root)
    victim = largest_file(out)
    flip_byte(victim)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_manifest(out)                                  # the corruption is real

    with caplog.at_level(logging.WARNING, logger="engine"):
        m = load(checkpoint)
    try:
        assert greedy(m) == expected
    finally:
        m.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "engine"]
    assert len(lines) == 1, lines
    assert "failed verification" in lines[0] and str(out) in lines[0] and "checksum mismatch" in lines[0]
    assert "\n" not in lines[0]
    assert the_artifact(cache_root) == out                  # same place, whole again
    load_manifest(out)
    # Nothing is left behind: no staging or replaced copies.
    assert [p.name for p in (cache_root / "artifacts").iterdir() if p.is_dir()] == [out.name]


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_other_damage_heals_too(checkpoint, cache_root, damage, caplog):
    load(checkpoint).close()
    out = the_artifact(cache_root)
    if damage == "truncate":
        victim = largest_file(out)
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "delete":
        (out / "tokenizer.model").unlink()
    else:
        (out / "manifest.json").write_text('{"format": "paligemma-edge-artifact", "format_version": 1}')
    with caplog.at_level(logging.WARNING, logger="engine"):
        load(checkpoint).close()
    assert len([r for r in caplog.records if "failed verification" in r.getMessage()]) == 1
    load_manifest(out)


def test_half_written_cache_entry_is_replaced(checkpoint, cache_root):
    """A directory without manifest.json under the artifact's name (a copy cut short, an old
    engine's interrupted export) is not loadable; the load exports over it."""
    load(checkpoint).close()
    out = the_artifact(cache_root)
    (out / "manifest.json").unlink()
    m = load(checkpoint)
    m.close()
    load_manifest(out)


def test_users_own_artifact_keeps_its_error(checkpoint, cache_root, tmp_path):
    from export.pipeline import export_checkpoint
    art = export_checkpoint(checkpoint, tmp_path / "mine", formats=(FMT,), weights=WEIGHTS, progress=False)
    flip_byte(largest_file(art))
    before = sorted(p.name for p in art.rglob("*"))
    with pytest.raises(ArtifactError, match="checksum mismatch.*re-export"):
        engine.load(art, backend=BACKEND, progress=False)
    assert sorted(p.name for p in art.rglob("*")) == before
    assert not (cache_root / "artifacts").exists()          # nothing exported on its behalf


def test_interrupted_export_leaves_nothing_loadable(checkpoint, cache_root, monkeypatch):
    import export.pipeline as pipeline

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")
    with monkeypatch.context() as mp, pytest.raises(RuntimeError, match="interrupted"):
        mp.setattr(pipeline.artifact, "write_manifest", fail)      # the export's last step
        load(checkpoint)
    left = [p.name for p in (cache_root / "artifacts").iterdir() if p.is_dir()]
    assert left == []                                       # no staging dir, no half artifact
    load(checkpoint).close()
    load_manifest(the_artifact(cache_root))


def test_racing_processes_export_once(checkpoint, cache_root):
    """Two processes load the same uncached checkpoint at once: one exports, the other waits
    for it and loads the same artifact; both generate the same tokens."""
    code = ("import sys, engine; from PIL import Image; import numpy as np\n"
            f"m = engine.load(sys.argv[1], backend={BACKEND!r}, weights={WEIGHTS!r}, threads=1)\n"
            "img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))\n"
            "print(m.generate(img, 'caption en', max_new_tokens=6).tokens)\n")
    env = dict(os.environ, PALIGEMMA_EDGE_CACHE=str(cache_root))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(checkpoint)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-2000:] for _, e in outs]
    assert outs[0][0] == outs[1][0]
    stderr = b"".join(e for _, e in outs).decode()
    assert stderr.count("once into") == 1, stderr          # one export announced, one made
    out = the_artifact(cache_root)
    load_manifest(out)
    m = load(checkpoint)
    try:
        assert str(greedy(m)).encode() == outs[0][0].strip()
    finally:
        m.close()


def test_cli_heals_with_one_line(checkpoint, cache_root, tmp_path):
    """A default command on a corrupted cached export: it succeeds, and stderr (not a terminal)
    gets one line about it, not the exporter's progress."""
    image = tmp_path / "image.png"
    IMAGE.save(image)
    args = ["caption", "--image", str(image), "--model", str(checkpoint), "--backend", BACKEND,
            "--weights", WEIGHTS, "--max-new-tokens", "6", "--json"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    flip_byte(largest_file(the_artifact(cache_root)))
    healed = run_cli(*args)
    assert healed.returncode == 0, healed.stderr
    assert json.loads(healed.stdout)["tokens"] == json.loads(first.stdout)["tokens"]
    lines = healed.stderr.splitlines()
    assert len([ln for ln in lines if "failed verification" in ln]) == 1, healed.stderr
    assert not any("export" in ln for ln in lines if "failed verification" not in ln), healed.stderr
    load_manifest(the_artifact(cache_root))


# --------------------------------------------------------------------------- the cache command
def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=300)


def test_cache_command_list_verify_clear(checkpoint, cache_root, capsys):
    assert main(["cache", "list"]) == 0
    assert "holds no artifacts" in capsys.readouterr().out

    load(checkpoint).close()
    engine.load(checkpoint, backend="openvino", weights=WEIGHTS, threads=1, progress=False).close()
    onnx_dir, ov_dir = sorted((cache_root / "artifacts").glob("tiny-*"), key=lambda p: "openvino" in p.name)

    # list: one row per artifact, from the manifests (no hashing), in JSON and as a table
    assert main(["cache", "list", "--json"]) == 0
    listed = {a["name"]: a for a in json.loads(capsys.readouterr().out)["artifacts"]}
    assert set(listed) == {onnx_dir.name, ov_dir.name}
    for d, fmt in ((onnx_dir, "onnx"), (ov_dir, "openvino")):
        a = listed[d.name]
        assert a["format"] == fmt and a["weights"] == WEIGHTS
        assert a["checkpoint"] == str(checkpoint.resolve())
        assert a["size"] == sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        assert a["state"] in ("verified", "unverified")
    assert main(["cache", "list"]) == 0
    table = capsys.readouterr().out
    assert onnx_dir.name in table and ov_dir.name in table and "2 artifacts" in table

    # verify: all good, then one byte changed in one of them
    assert main(["cache", "verify"]) == 0
    assert "2 of 2 artifacts verified" in capsys.readouterr().out
    flip_byte(largest_file(onnx_dir))
    assert main(["cache", "verify", "--json"]) == 1
    states = {a["name"]: a["state"] for a in json.loads(capsys.readouterr().out)["artifacts"]}
    assert states[ov_dir.name] == "verified"
    assert states[onnx_dir.name].startswith("corrupt: checksum mismatch")
    assert main(["cache", "verify", ov_dir.name]) == 0
    assert "1 of 1 artifacts verified" in capsys.readouterr().out

    # clear: by age (nothing that old), the corrupt one, then all; it says what it removed
    assert main(["cache", "clear", "--older-than", "1d"]) == 0
    assert "nothing removed" in capsys.readouterr().out
    assert main(["cache", "clear", "--corrupt"]) == 0
    out = capsys.readouterr().out
    assert f"removed {onnx_dir.name}" in out and ov_dir.name not in out
    assert not onnx_dir.exists() and ov_dir.exists()
    old = time.time() - 3 * 86400
    os.utime(ov_dir, (old, old))
    assert main(["cache", "clear", "--older-than", "2d"]) == 0
    assert f"removed {ov_dir.name}" in capsys.readouterr().out
    assert not ov_dir.exists()
    assert main(["cache", "clear", "no-such-artifact"]) == 2
    assert "no cached artifact matches no-such-artifact" in capsys.readouterr().err


def test_cache_command_in_a_subprocess(checkpoint, cache_root):
    """The real command line, with no stdin: a corrupted artifact is reported by verify
    (status 1), then `clear` with a name pattern removes it without asking."""
    load(checkpoint).close()
    out = the_artifact(cache_root)
    flip_byte(largest_file(out))
    p = run_cli("cache", "verify")
    assert p.returncode == 1, p.stderr
    assert "corrupt: checksum mismatch" in p.stdout and "0 of 1 artifacts verified" in p.stdout
    p = subprocess.run([sys.executable, "-m", "engine", "cache", "clear", "tiny-*"], capture_output=True, text=True,
                       cwd=REPO, stdin=subprocess.DEVNULL, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"removed {out.name}" in p.stdout and "removed 1 artifacts" in p.stdout
    assert not out.exists()
    p = run_cli("cache", "list")
    assert p.returncode == 0 and "holds no artifacts" in p.stdout


def test_cache_clear_rejects_a_bad_age(cache_root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "clear", "--older-than", "soon"])
    assert e.value.code == 2
    assert "not an age" in capsys.readouterr().err


def test_default_cache_is_the_sessions_not_the_users():
    """The suite's autouse fixture (conftest.session_cache) points every test at a temporary cache."""
    root = engine.default_cache_dir().resolve()
    assert root != Path(os.path.expanduser("~/.cache/paligemma-edge")).resolve()
    assert cache.artifacts_dir().parent == engine.default_cache_dir()
