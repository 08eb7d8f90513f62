"""Exported artifact directories: manifest.json writing, loading and validation.

An artifact is a directory made by `python -m export`:

    manifest.json        what is here (see `new_manifest`), with a sha256 for every file
    tokenizer.model
    embed_tokens.npy     token embedding table (float16/float32, or int8 with embed_scales.npy)
    onnx/*.onnx (+ .data external weights)     when exported for onnxruntime
    openvino/*.xml + *.bin                     when exported for OpenVINO
    seg_decoder.npz      optional VQ-VAE mask decoder

Export writes into a temporary sibling directory and renames it into place at the end
(`staging_dir` / `commit_dir`), so an interrupted export never leaves a loadable half-artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import PaliGemmaConfig
from .errors import EngineError

FORMAT_NAME = "paligemma-edge-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(EngineError, ValueError):
    """An artifact directory is incomplete, corrupted, or from an incompatible exporter."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def new_manifest(cfg: PaliGemmaConfig, *, source: dict, weights: dict, graphs: dict, embedding: dict,
                 tool_version: str, extras: dict | None = None) -> dict:
    """The manifest's content before file checksums are added by `write_manifest`."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "paligemma-edge export", "version": tool_version},
        "source": source,            # {"path": ..., "dtype": ..., "config_sha256": ...}
        "config": cfg.to_hf(),
        "weights": weights,          # {"format": "int8", "group_size": ..., "groups": {...}}
        "graphs": graphs,            # {"onnx": {"vision": "onnx/vision.onnx", ...}, "openvino": {...}}
        "embedding": embedding,      # {"table": "embed_tokens.npy", "scales": ..., "scale": 48.0}
        "tokenizer": "tokenizer.model",
        **(extras or {}),
    }


def write_manifest(directory: str | os.PathLike, manifest: dict) -> dict:
    """Checksum every file under `directory` into manifest["files"] and write manifest.json."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = dict(manifest, files=files)
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
    return manifest


def load_manifest(directory: str | os.PathLike, *, verify_checksums: bool = True) -> dict:
    """Read and validate manifest.json: format and version, every listed file present with its
    size (and sha256 unless verify_checksums=False), every graph file listed, and ONNX external
    data that stays inside the directory."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; this is not an exported artifact. "
                            "Export a checkpoint with `python -m export CHECKPOINT --out DIR` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e}); re-export the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version!r}, this engine reads version "
                            f"{FORMAT_VERSION}; re-export the checkpoint with this version")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: manifest has no file list; re-export the artifact")
    for rel, meta in files.items():
        f = _inside(directory, rel, path)
        if not f.is_file():
            raise ArtifactError(f"{directory}: file {rel} listed in the manifest is missing; re-export the artifact")
        if f.stat().st_size != meta.get("size"):
            raise ArtifactError(f"{directory}: file {rel} has {f.stat().st_size} bytes, the manifest says "
                                f"{meta.get('size')}; the artifact is corrupted, re-export it")
        if verify_checksums and sha256_file(f) != meta.get("sha256"):
            raise ArtifactError(f"{directory}: checksum mismatch for {rel}; the artifact is corrupted, "
                                "re-export it (or load with verify=False to skip checksums)")
    for backend, graphs in (manifest.get("graphs") or {}).items():
        for name, rel in graphs.items():
            if rel not in files:
                raise ArtifactError(f"{path}: graph {backend}/{name} file {rel} is not in the file list")
            if rel.endswith(".onnx"):
                check_onnx_external_data(directory, directory / rel)
    try:
        manifest["_config"] = PaliGemmaConfig.from_hf(manifest["config"])
    except Exception as e:  # ConfigError, KeyError
        raise ArtifactError(f"{path}: invalid model config in manifest ({e})") from None
    return manifest


def check_onnx_external_data(directory: Path, onnx_path: Path) -> None:
    """Reject ONNX external-data locations that point outside the artifact directory."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        _inside(directory, os.path.join(os.path.dirname(os.path.relpath(onnx_path, directory)), location),
                onnx_path, what=f"external data of tensor {tensor.name!r}")


def _inside(directory: Path, rel: str, source, what: str = "file") -> Path:
    if os.path.isabs(rel):
        raise ArtifactError(f"{source}: {what} path {rel!r} is absolute; artifacts hold relative paths only")
    root = directory.resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise ArtifactError(f"{source}: {what} path {rel!r} points outside the artifact directory {root}")
    return target


# ---------------------------------------------------------------------------- atomic output
def staging_dir(final: str | os.PathLike) -> Path:
    """A fresh temporary directory next to `final` (same filesystem, so rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))


def commit_dir(staging: Path, final: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Move a finished staging directory into place."""
    final = Path(final)
    if final.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise ArtifactError(f"{final} already exists; pass --force to replace it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final
