"""Exported artifact directories: manifest.json writing, loading and validation.

An artifact is a directory made by `python -m export`:

    manifest.json        what is here (see `new_manifest`), with a sha256 for every file
    tokenizer.model
    embed_tokens.npy     token embedding table (float16/float32, or int8 with embed_scales.npy)
    preprocessor_config.json   the checkpoint's image preprocessing (mean, std, rescale), if it had one
    onnx/*.onnx (+ .data external weights)     when exported for onnxruntime
    openvino/*.xml + *.bin                     when exported for OpenVINO
    seg_decoder.npz      optional VQ-VAE mask decoder
    .verified.json       verification stamp written by loads (not part of the artifact; see below)

`load_manifest` reads manifest.json into a frozen `Manifest` (typed fields, every type checked
once, the model config parsed, the image preprocessing read from preprocessor_config.json) and
checks that every listed file is present with its size and sha256.

Verification stamp. Hashing every file takes seconds for a multi-GB artifact, so after a full
verification succeeds, `load_manifest` records each file's (size, mtime_ns, ctime_ns, inode,
device) and the sha256 of manifest.json in a stamp; a later load hashes only the files whose
five values differ from the stamp (any write, copy, replace or touch changes them) and hashes
everything again when manifest.json changed. Files changed less than `RACY_SECONDS` before the
verification started are not recorded (file timestamps are coarse, so a write in the same clock
tick could go unseen; the next load hashes them). The stamp lives in the artifact directory
(`.verified.json`, never listed in the manifest) or, when that directory is not writable, in
`<cache>/verified/<hash of the artifact's resolved path>.json` (engine.default_cache_dir); when
neither is writable every load hashes every file. It is written atomically (temporary file +
os.replace). `verify_checksums=False` checks sizes only and neither reads nor writes the stamp.

Export writes into a temporary sibling directory and renames it into place at the end
(`staging_dir` / `commit_dir`), so an interrupted export never leaves a loadable half-artifact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import PaliGemmaConfig
from .errors import EngineError

FORMAT_NAME = "paligemma-edge-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAMP = ".verified.json"
STAMP_VERSION = 1
RACY_SECONDS = 2.0       # files changed this recently before a verification are not stamped
REEXPORT = "re-export the artifact (python -m export CHECKPOINT --out DIR --force)"


class ArtifactError(EngineError, ValueError):
    """An artifact directory is incomplete, corrupted, or from an incompatible exporter."""


# ---------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class FileEntry:
    size: int                 # bytes
    sha256: str               # hex digest


@dataclass(frozen=True)
class Embedding:
    """The token embedding table: rows of `table` (times `scales`[row] when int8) times `scale`."""
    table: str                # relative path of the [V, D] .npy table
    scale: float              # sqrt(hidden) in the checkpoint dtype
    scales: str | None = None  # relative path of the [V] per-row scales (int8 tables)
    dtype: str | None = None   # "fp32", "fp16" or "int8"
    # relative path of the final RMSNorm weight [D] (fp32), written with int8 tables of tied
    # embeddings: the engine then computes the LM head natively from the table (model.logits)
    final_norm: str | None = None


@dataclass(frozen=True)
class Preprocessing:
    """Image preprocessing: engine.processor.Processor's keyword arguments. The SigLIP
    defaults unless the artifact has a preprocessor_config.json."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3         # PIL.Image.Resampling.BICUBIC

    def processor_kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.json (see `load_manifest`). Paths are relative to the artifact
    directory; the dict fields are informational and must be treated as read-only."""
    config: PaliGemmaConfig
    graphs: dict[str, dict[str, str]]     # backend ("onnx", "openvino") -> graph name -> path
    embedding: Embedding
    tokenizer: str                        # path of tokenizer.model
    files: dict[str, FileEntry]           # every file of the artifact but manifest.json
    weights: dict                         # quantization info (export/pipeline.quantization_info)
    source: dict                          # {"path", "dtype", "config_sha256"} of the checkpoint
    tool: dict                            # {"name", "version"} of the exporter
    preprocessor_config: str | None = None    # path of preprocessor_config.json, if any
    preprocessing: Preprocessing = field(default_factory=Preprocessing)   # read from it
    seg_decoder: str | None = None        # path of the VQ-VAE mask decoder, if any
    lora: dict | None = None              # the merged LoRA adapter, if any
    format_version: int = FORMAT_VERSION


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def new_manifest(cfg: PaliGemmaConfig, *, source: dict, weights: dict, graphs: dict, embedding: dict,
                 tool_version: str, extras: dict | None = None) -> dict:
    """The manifest's JSON content before file checksums are added by `write_manifest`.
    extras: "preprocessor_config", "seg_decoder" (relative paths or None), "lora" (dict)."""
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
    """Checksum every file under `directory` (but manifest.json and verification stamps) into
    manifest["files"] and write manifest.json; returns the JSON content."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not _is_unlisted(p.name)):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = dict(manifest, files=files)
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
    return manifest


def _is_unlisted(name: str) -> bool:
    return name == MANIFEST or name.startswith(STAMP)   # the stamp and its temporary files


def load_manifest(directory: str | os.PathLike, *, verify_checksums: bool = True) -> Manifest:
    """Read and validate manifest.json: format and version, the type of every field, the model
    config, every listed file present with its size (and sha256 unless verify_checksums=False;
    files unchanged since a recorded verification are not hashed again, see the module
    docstring), every referenced file listed, ONNX external data inside the directory, and the
    image preprocessing in preprocessor_config.json."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; this is not an exported artifact. "
                            "Export a checkpoint with `python -m export CHECKPOINT --out DIR` first")
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: absurdly nested JSON
        raise ArtifactError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); {REEXPORT}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a {FORMAT_NAME} manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version!r}, this engine reads version "
                            f"{FORMAT_VERSION}; re-export the checkpoint with this version")
    fields = _parse_fields(data, path)
    onnx_graphs = {rel for graphs in fields["graphs"].values() for rel in graphs.values() if rel.endswith(".onnx")}

    def check_graph(rel: str) -> None:
        if rel in onnx_graphs:
            check_onnx_external_data(directory, directory / rel)

    # A graph unchanged since a recorded verification passed the external-data check then (it
    # costs `import onnx` and a parse, 2 s for 3B): only graphs hashed now, or not covered by a
    # stamp when checksums are off, are parsed.
    check_files(directory, path, fields["files"], verify_checksums, hashlib.sha256(raw).hexdigest(), check_graph)
    if fields["preprocessor_config"] is not None:
        fields["preprocessing"] = read_preprocessing(directory / fields["preprocessor_config"], fields["config"])
    return Manifest(**fields)


def read_preprocessing(path: str | os.PathLike, cfg: PaliGemmaConfig) -> Preprocessing:
    """The image preprocessing in an HF preprocessor_config.json (engine.processor's rules)."""
    from .errors import ConfigError
    from .processor import _read_preprocessor_config
    try:
        kw = _read_preprocessor_config(os.fspath(path), cfg)
        pre = Preprocessing(**kw)
        mean, std = tuple(float(v) for v in pre.image_mean), tuple(float(v) for v in pre.image_std)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError("image_mean and image_std need 3 values (R, G, B)")
        return Preprocessing(mean, std, float(pre.rescale_factor), int(pre.resample))
    except (ConfigError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: invalid image preprocessing ({e}); fix the checkpoint's "
                            f"preprocessor_config.json and {REEXPORT}") from None


# ---------------------------------------------------------------------------- field types
def _parse_fields(d: dict, path: Path) -> dict:
    """Manifest keyword arguments from the JSON object `d`, every type checked."""
    files = {}
    for rel, meta in _get(d, "files", dict, path).items():
        meta = _typed(meta, dict, f"files[{rel!r}]", path)
        files[rel] = FileEntry(size=_get(meta, "size", int, path, f"files[{rel!r}]."),
                               sha256=_get(meta, "sha256", str, path, f"files[{rel!r}]."))
    graphs = {}
    for backend, names in (_get(d, "graphs", dict, path, optional=True) or {}).items():
        names = _typed(names, dict, f"graphs.{backend}", path)
        graphs[backend] = {n: _typed(rel, str, f"graphs.{backend}.{n}", path) for n, rel in names.items()}
    e = _get(d, "embedding", dict, path)
    embedding = Embedding(table=_get(e, "table", str, path, "embedding."),
                          scale=float(_get(e, "scale", (int, float), path, "embedding.")),
                          scales=_get(e, "scales", str, path, "embedding.", optional=True),
                          dtype=_get(e, "dtype", str, path, "embedding.", optional=True),
                          final_norm=_get(e, "final_norm", str, path, "embedding.", optional=True))
    try:
        config = PaliGemmaConfig.from_hf(_get(d, "config", dict, path))
    except ArtifactError:
        raise
    except Exception as ex:  # ConfigError, KeyError, TypeError
        raise ArtifactError(f"{path}: invalid model config in manifest ({ex}); {REEXPORT}") from None
    fields = dict(
        config=config, graphs=graphs, embedding=embedding, files=files,
        tokenizer=_get(d, "tokenizer", str, path),
        weights=_get(d, "weights", dict, path, optional=True) or {},
        source=_get(d, "source", dict, path, optional=True) or {},
        tool=_get(d, "tool", dict, path, optional=True) or {},
        preprocessor_config=_get(d, "preprocessor_config", str, path, optional=True),
        seg_decoder=_get(d, "seg_decoder", str, path, optional=True),
        lora=_get(d, "lora", dict, path, optional=True),
        format_version=d["format_version"])
    referenced = [("tokenizer", fields["tokenizer"]), ("embedding.table", embedding.table),
                  ("embedding.scales", embedding.scales), ("embedding.final_norm", embedding.final_norm),
                  ("preprocessor_config", fields["preprocessor_config"]),
                  ("seg_decoder", fields["seg_decoder"])]
    referenced += [(f"graph {b}/{n}", rel) for b, names in graphs.items() for n, rel in names.items()]
    for what, rel in referenced:
        if rel is not None and rel not in files:
            raise ArtifactError(f"{path}: {what} file {rel} is not in the file list; {REEXPORT}")
    return fields


_TYPE_NAMES = {dict: "an object", str: "a string", int: "an integer", (int, float): "a number"}


def _get(d: dict, key: str, kind, path: Path, prefix: str = "", *, optional: bool = False):
    value = d.get(key)
    if value is None:
        if optional:
            return None
        raise ArtifactError(f"{path}: manifest field {prefix}{key} is missing; {REEXPORT}")
    return _typed(value, kind, prefix + key, path)


def _typed(value, kind, name: str, path: Path):
    if not isinstance(value, kind) or isinstance(value, bool):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ArtifactError(f"{path}: manifest field {name} must be {_TYPE_NAMES[kind]}, got "
                            f"{type(value).__name__} {shown}; the manifest is corrupted or was edited: {REEXPORT}")
    return value


# ---------------------------------------------------------------------------- file checks
def check_files(directory: Path, path: Path, files: dict[str, FileEntry], verify_checksums: bool,
                 manifest_sha256: str, check_hashed=None) -> set[str] | None:
    """Every listed file present with its size; with verify_checksums, its sha256 too, hashing
    only the files that changed since a recorded verification (then recording this one).
    check_hashed(rel) runs on every file hashed now, before the stamp records it (without
    verify_checksums: on every file a stamp does not cover, since it may have changed).
    Returns those files."""
    started_ns = time.time_ns()     # before any stat: see RACY_SECONDS
    stats = {}
    for rel, entry in files.items():
        f = _inside(directory, rel, path)
        try:
            st = f.stat()
        except OSError:
            st = None
        if st is None or not f.is_file():
            raise ArtifactError(f"{directory}: file {rel} listed in the manifest is missing; {REEXPORT}")
        if st.st_size != entry.size:
            raise ArtifactError(f"{directory}: file {rel} has {st.st_size} bytes, the manifest says "
                                f"{entry.size}; the artifact is corrupted, {REEXPORT}")
        stats[rel] = (f, st)
    stamps = [s for s in (_read_stamp(p, manifest_sha256) for p in _stamp_paths(directory)) if s]
    if not verify_checksums:      # sizes only; files not under a stamp still get check_hashed
        unstamped = {rel for rel, (_, st) in stats.items() if not any(s.get(rel) == _file_key(st) for s in stamps)}
        for rel in sorted(unstamped):
            if check_hashed is not None:
                check_hashed(rel)
        return unstamped
    hashed = set()
    for rel, (f, st) in stats.items():
        if any(s.get(rel) == _file_key(st) for s in stamps):
            continue
        hashed.add(rel)
        if sha256_file(f) != files[rel].sha256:
            raise ArtifactError(f"{directory}: checksum mismatch for {rel}; the artifact is corrupted, "
                                f"{REEXPORT} (or load with verify=False to skip checksums)")
        if check_hashed is not None:
            check_hashed(rel)
    if hashed:
        settled = started_ns - int(RACY_SECONDS * 1e9)
        keys = {rel: _file_key(st) for rel, (_, st) in stats.items()
                if max(st.st_mtime_ns, st.st_ctime_ns) < settled}
        if keys:
            stamp = {"stamp_version": STAMP_VERSION, "artifact": str(directory.resolve()),
                     "manifest_sha256": manifest_sha256, "files": keys}
            write_stamp(directory, json.dumps(stamp, indent=0))
    return hashed


def _file_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _stamp_paths(directory: Path) -> list[Path]:
    """Where the verification stamp may live: in the artifact, else in the user's cache."""
    from . import default_cache_dir
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:32]
    return [directory / STAMP, default_cache_dir() / "verified" / f"{key}.json"]


def _read_stamp(path: Path, manifest_sha256: str) -> dict[str, list[int]]:
    """rel path -> file key of a stamp that belongs to this manifest; {} when there is none."""
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if (not isinstance(stamp, dict) or stamp.get("stamp_version") != STAMP_VERSION
            or stamp.get("manifest_sha256") != manifest_sha256 or not isinstance(stamp.get("files"), dict)):
        return {}
    return stamp["files"]


def write_stamp(directory: Path, text: str) -> Path | None:
    """Write the stamp `text` to the first writable stamp path; None when none is writable."""
    for target in _stamp_paths(directory):
        try:
            write_atomic(target, text)
            return target
        except OSError:
            continue
    return None


def stamp_covers(directory: str | os.PathLike, manifest: Manifest) -> bool:
    """Whether a verification stamp records every listed file as it is now (a load hashes nothing)."""
    directory = Path(directory)
    try:
        manifest_sha256 = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
        keys = {rel: _file_key((directory / rel).stat()) for rel in manifest.files}
    except OSError:
        return False
    stamps = [s for s in (_read_stamp(p, manifest_sha256) for p in _stamp_paths(directory)) if s]
    return all(any(s.get(rel) == key for s in stamps) for rel, key in keys.items())


def remove_stamps(directory: str | os.PathLike) -> None:
    """Forget recorded verifications of `directory` (the next load hashes every file)."""
    for p in _stamp_paths(Path(directory)):
        try:
            p.unlink()
        except OSError:
            pass


def write_atomic(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary file in the same directory and os.replace."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)          # mkstemp's 0600 would hide it from other users
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_onnx_external_data(directory: Path, onnx_path: Path) -> None:
    """Check an ONNX graph's external data: the graph parses, every location lies inside the
    artifact directory, and every tensor's bytes (offset + length) lie inside its data file."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, onnx's own errors, ...
        raise ArtifactError(f"{onnx_path}: not a readable ONNX graph ({type(e).__name__}: {e}); the artifact "
                            f"is corrupted, {REEXPORT}") from None
    sizes: dict[Path, int] = {}
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        data = _inside(directory, os.path.join(os.path.dirname(os.path.relpath(onnx_path, directory)), location),
                       onnx_path, what=f"external data of tensor {tensor.name!r}")
        if data not in sizes:
            try:
                sizes[data] = data.stat().st_size
            except OSError:
                raise ArtifactError(f"{data}: external data file of {onnx_path} is missing; {REEXPORT}") from None
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise ArtifactError(f"{onnx_path}: tensor {tensor.name!r} has a malformed external data offset or "
                                f"length; {REEXPORT}") from None
        if offset < 0 or length < 0 or offset + length > sizes[data]:
            raise ArtifactError(f"{data}: tensor {tensor.name!r} of {onnx_path.name} needs bytes "
                                f"[{offset}, {offset + length}) but the file holds {sizes[data]}; the artifact "
                                f"is truncated or corrupted, {REEXPORT}")


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
