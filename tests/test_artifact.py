"""engine.artifact: the typed Manifest (field types, the checkpoint's image preprocessing used
end to end) and the verification stamp that lets later loads skip re-hashing unchanged files."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import engine
from engine import artifact
from engine.artifact import STAMP, ArtifactError, FileEntry, Manifest, load_manifest
from engine.config import PaliGemmaConfig
from engine.synth import write_synthetic_checkpoint
from export.pipeline import export_checkpoint

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
GRAPH = "onnx/decoder_0.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint dir, fp32 onnx artifact) of tiny-pg2 with CLIP's image mean / std."""
    root = tmp_path_factory.mktemp("art")
    ckpt = write_synthetic_checkpoint("tiny-pg2", root / "ckpt", seed=0, dtype="fp32", progress=False)
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    pre.update(image_mean=CLIP_MEAN, image_std=CLIP_STD)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    return ckpt, export_checkpoint(ckpt, root / "art", formats=("onnx",), weights="fp32", progress=False)


@pytest.fixture
def art(exported, tmp_path, monkeypatch):
    """A fresh copy of the artifact; the user cache in tmp_path; files stamped however new."""
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(artifact, "RACY_SECONDS", 0.0)
    dst = tmp_path / "art"
    shutil.copytree(exported[1], dst, ignore=shutil.ignore_patterns(f"{STAMP}*"))
    return dst


@pytest.fixture
def hashed(monkeypatch):
    """The relative paths `sha256_file` hashes (manifest.json itself is hashed from memory)."""
    seen = []
    real = artifact.sha256_file

    def counting(path, *a, **k):
        seen.append(os.path.basename(path))
        return real(path, *a, **k)
    monkeypatch.setattr(artifact, "sha256_file", counting)
    return seen


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------------------- typed manifest
def test_manifest_is_typed(art):
    m = load_manifest(art)
    assert isinstance(m, Manifest) and isinstance(m.config, PaliGemmaConfig)
    assert m.tokenizer == "tokenizer.model" and m.preprocessor_config == "preprocessor_config.json"
    assert m.embedding.table == "embed_tokens.npy" and m.embedding.scales is None and m.embedding.dtype == "fp32"
    assert set(m.graphs) == {"onnx"} and m.graphs["onnx"]["decoder_0"] == GRAPH
    assert all(isinstance(e, FileEntry) for e in m.files.values()) and STAMP not in m.files
    assert m.preprocessing.image_mean == tuple(CLIP_MEAN) and m.preprocessing.image_std == tuple(CLIP_STD)
    assert m.seg_decoder is None and m.lora is None and m.weights["format"] == "fp32"
    with pytest.raises(AttributeError):
        m.tokenizer = "other"     # frozen


def test_pixel_values_use_the_checkpoint_preprocessing(exported):
    """The checkpoint's image_mean / image_std reach the engine's processor (they used to be
    copied into the artifact and ignored), matching transformers' processor for the checkpoint."""
    from PIL import Image
    from transformers import AutoProcessor
    ckpt, art = exported
    img = Image.fromarray((np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8))
    model = engine.load(art, backend="onnxruntime", threads=1, progress=False)
    try:
        ours = model.processor([img], "caption en")["pixel_values"]
    finally:
        model.close()
    hf = AutoProcessor.from_pretrained(str(ckpt))(images=img, text="<image>caption en", return_tensors="np")
    np.testing.assert_allclose(ours, hf["pixel_values"], atol=1e-6, rtol=0)
    default = (np.asarray(img.resize(ours.shape[-2:][::-1], Image.BICUBIC), np.float32) / 255 - 0.5) / 0.5
    assert np.abs(ours[0].transpose(1, 2, 0) - default).max() > 0.1    # not SigLIP's 0.5 / 0.5


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["embedding"].update(scale="big"), "field embedding.scale must be a number, got str 'big'"),
    (lambda m: m["files"]["tokenizer.model"].update(size="12"), r"files\['tokenizer.model'\].size must be an integer"),
    (lambda m: m.update(graphs={"onnx": ["onnx/vision.onnx"]}), "field graphs.onnx must be an object, got list"),
    (lambda m: m.update(tokenizer=5), "field tokenizer must be a string, got int 5"),
    (lambda m: m.update(weights=True), "field weights must be an object, got bool"),
    (lambda m: m.pop("embedding"), "field embedding is missing"),
    (lambda m: m["config"]["text_config"].update(hidden_size="wide"), "invalid model config"),
    (lambda m: m.update(seg_decoder="seg_decoder.npz"), "seg_decoder file seg_decoder.npz is not in the file list"),
])
def test_bad_field_raises_clear_error(art, edit, message):
    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=message) as e:
        load_manifest(art)
    assert "re-export" in str(e.value)


def test_bad_preprocessor_config_is_reported(art):
    path = art / "preprocessor_config.json"
    pre = json.loads(path.read_text())
    pre["image_mean"] = [0.5, 0.5]
    path.write_text(json.dumps(pre))
    _edit_manifest(art, lambda m: m["files"].update({"preprocessor_config.json": {
        "size": path.stat().st_size, "sha256": artifact.sha256_file(path)}}))
    with pytest.raises(ArtifactError, match="invalid image preprocessing.*3 values"):
        load_manifest(art)


# ---------------------------------------------------------------------------- verification stamp
def test_second_load_hashes_nothing(art, hashed):
    n = len(load_manifest(art).files)
    assert len(hashed) == n and (art / STAMP).is_file()
    hashed.clear()
    load_manifest(art)
    assert hashed == []


def test_touched_file_is_rehashed(art, hashed):
    load_manifest(art)
    st = os.stat(art / GRAPH)
    os.utime(art / GRAPH, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))   # into the past: stampable
    hashed.clear()
    load_manifest(art)
    assert hashed == ["decoder_0.onnx"]
    hashed.clear()
    load_manifest(art)            # the new stamp covers it again
    assert hashed == []


def test_rewritten_byte_is_caught(art, hashed):
    load_manifest(art)
    path = art / GRAPH
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # even with mtime put back (ctime moves)
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {GRAPH}"):
        load_manifest(art)
    with pytest.raises(ArtifactError, match="checksum mismatch"):   # and every time after
        load_manifest(art)


def test_changed_manifest_rehashes_everything(art, hashed):
    n = len(load_manifest(art).files)
    _edit_manifest(art, lambda m: m["source"].update(path="/elsewhere"))
    hashed.clear()
    load_manifest(art)
    assert len(hashed) == n


def test_stamp_ignored_when_unreadable_or_from_another_version(art, hashed):
    n = len(load_manifest(art).files)
    stamp = json.loads((art / STAMP).read_text())
    for text in ("{not json", json.dumps(dict(stamp, stamp_version=99))):
        (art / STAMP).write_text(text)
        hashed.clear()
        load_manifest(art)
        assert len(hashed) == n


def test_recently_changed_files_are_not_stamped(art, hashed, monkeypatch):
    """Timestamps are coarse: files changed just before a verification are hashed again."""
    monkeypatch.setattr(artifact, "RACY_SECONDS", 3600.0)
    n = len(load_manifest(art).files)
    hashed.clear()
    load_manifest(art)
    assert len(hashed) == n


def test_read_only_artifact_uses_the_user_cache(art, hashed, tmp_path, monkeypatch):
    real = artifact.write_atomic

    def no_write_in_artifact(target, text):
        if art.resolve() in target.resolve().parents:
            raise PermissionError(13, "Permission denied", str(target))
        return real(target, text)
    monkeypatch.setattr(artifact, "write_atomic", no_write_in_artifact)
    n = len(load_manifest(art).files)
    assert len(hashed) == n and not (art / STAMP).exists()
    stamps = list((tmp_path / "cache" / "verified").iterdir())
    assert len(stamps) == 1 and json.loads(stamps[0].read_text())["artifact"] == str(art.resolve())
    hashed.clear()
    load_manifest(art)
    assert hashed == []


def test_nothing_writable_verifies_every_time(art, hashed, monkeypatch):
    def no_write(target, text):
        raise PermissionError(13, "Permission denied", str(target))
    monkeypatch.setattr(artifact, "write_atomic", no_write)
    n = len(load_manifest(art).files)
    load_manifest(art)
    assert len(hashed) == 2 * n and not (art / STAMP).exists()


def test_verify_false_checks_sizes_only(art, hashed):
    load_manifest(art, verify_checksums=False)
    assert hashed == [] and not (art / STAMP).exists()
    with open(art / GRAPH, "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match=f"{GRAPH} has .* bytes, the manifest says"):
        load_manifest(art, verify_checksums=False)


def test_write_manifest_skips_the_stamp(art):
    before = load_manifest(art)
    (art / f"{STAMP}.123.tmp").write_text("left by a crash")
    m = json.loads((art / "manifest.json").read_text())
    written = artifact.write_manifest(art, {k: v for k, v in m.items() if k != "files"})
    assert (art / STAMP).is_file() and written["files"].keys() == before.files.keys()
    load_manifest(art)
