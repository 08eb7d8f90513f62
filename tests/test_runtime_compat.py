"""Runtime-version compatibility (issue 16 item 4).

The exporter pins the ONNX IR version and opset (export/onnx_graphs.IR_VERSION / OPSET) instead of
stamping the installed onnx package's own IR version, and records them (with the onnx and
OpenVINO versions) in the manifest. An artifact whose graphs are too new for the installed
onnxruntime fails to load with an error naming both versions and the fix. The floors themselves
are checked by tests/compat/run_floor_versions.sh (a venv with the floor versions, run by CI).
"""
from __future__ import annotations

import json
import shutil

import onnx
import onnxruntime as ort
import pytest

import engine
from engine import artifact
from engine.artifact import ArtifactError, load_manifest
from engine.runtime.ort_backend import load_error
from engine.synth import write_synthetic_checkpoint
from export import onnx_graphs
from export.pipeline import export_checkpoint


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    ckpt = write_synthetic_checkpoint("tiny-pg2", root / "ckpt", seed=0, dtype="fp32", progress=False)
    return export_checkpoint(ckpt, root / "art", formats=("onnx",), weights="int8", progress=False)


def _rewrite_manifest(art_dir, edit=None):
    """Re-checksum the artifact's files (after an edit) and apply `edit` to the manifest JSON."""
    data = json.loads((art_dir / artifact.MANIFEST).read_text())
    data.pop("files")
    if edit:
        edit(data)
    for stamp in art_dir.glob(artifact.STAMP + "*"):
        stamp.unlink()
    artifact.write_manifest(art_dir, data)


def test_graphs_carry_the_pinned_ir_version_and_opset(art):
    for path in sorted((art / "onnx").glob("*.onnx")):
        m = onnx.load(str(path), load_external_data=False)
        assert m.ir_version == onnx_graphs.IR_VERSION, path
        assert {o.domain: o.version for o in m.opset_import} == {"": onnx_graphs.OPSET, "com.microsoft": 1}
    info = load_manifest(art).weights["backends"]["onnx"]
    assert (info["ir_version"], info["opset"], info["onnx_version"]) == (
        onnx_graphs.IR_VERSION, onnx_graphs.OPSET, onnx.__version__)


def test_too_new_ir_version_names_both_versions_and_the_fix(art, tmp_path):
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    graph = bad / "onnx" / "decoder_0.onnx"
    m = onnx.load(str(graph), load_external_data=False)
    m.ir_version = 99                     # newer than any onnxruntime reads
    graph.write_bytes(m.SerializeToString())
    _rewrite_manifest(bad)
    with pytest.raises(ArtifactError) as e:   # graphs: the native decoder would not load decoder_0.onnx
        engine.load(bad, backend="onnxruntime", threads=1, progress=False, decoder="graphs")
    msg = str(e.value)
    assert "decoder_0.onnx" in msg and "ONNX IR version 99" in msg
    assert f"written with onnx {onnx.__version__}" in msg
    assert f"installed onnxruntime {ort.__version__} reads IR versions up to " in msg
    assert "pip install -U onnxruntime" in msg and "re-export the artifact" in msg


def test_message_for_the_reported_case():
    """onnxruntime 1.30's refusal of an onnx 1.23 export (the case found on another machine)."""
    class _M:
        weights = {"backends": {"onnx": {"onnx_version": "1.23.0", "ir_version": 14}}}
    e = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model from x failed:/onnxruntime_src/onnxruntime/core/"
                     "graph/model.cc:181 onnxruntime::Model::Model(...) Unsupported model IR version: 14, "
                     "max supported IR version: 13")
    msg = str(load_error("art/onnx/vision.onnx", "vision", e, "1.30.0", _M()))
    assert ("art/onnx/vision.onnx: graph vision has ONNX IR version 14, written with onnx 1.23.0, but the "
            "installed onnxruntime 1.30.0 reads IR versions up to 13. Upgrade onnxruntime") in msg
    assert "re-export the artifact" in msg


def test_other_load_failures_keep_the_runtime_message():
    class _M:
        weights = {}
    msg = str(load_error("a/x.onnx", "x", RuntimeError("protobuf parsing failed"), "1.32.0", _M()))
    assert "onnxruntime 1.32.0 cannot load graph x (protobuf parsing failed)" in msg and "re-export" in msg


def test_manifest_without_recorded_versions_still_loads(art, tmp_path):
    """Manifests written before the versions were recorded (no ir_version / onnx_version)."""
    old = tmp_path / "art"
    shutil.copytree(art, old)

    def drop(data):
        for key in ("ir_version", "onnx_version"):
            data["weights"]["backends"]["onnx"].pop(key)
    _rewrite_manifest(old, drop)
    m = engine.load(old, backend="onnxruntime", threads=1, progress=False)
    a = m.generate(engine.default_model_path() / "example.png", "caption en", max_new_tokens=4).tokens
    b = engine.load(art, backend="onnxruntime", threads=1, progress=False).generate(
        engine.default_model_path() / "example.png", "caption en", max_new_tokens=4).tokens
    assert list(a) == list(b) and len(a) > 0
