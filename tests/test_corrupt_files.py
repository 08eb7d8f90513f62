"""A catalogue of corrupt files, in the spirit of llama.cpp's test-gguf: each case corrupts one
file of a copy of a real tiny checkpoint or exported artifact, loads it the way a user would,
and checks the exact error class and that the message names the corrupt file and says what to
do. Artifact cases that go deeper than the checksums rewrite the manifest's checksums after
the corruption (an exporter bug, or a hand edit that updated them): the loaders behind the
checksum check must still give a clear error, never a crash or a wrong model.
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from engine import artifact
from engine.artifact import STAMP, ArtifactError
from engine.checkpoint import Checkpoint
from engine.errors import CheckpointError, ConfigError, EngineError, TokenizerError
from engine.masks import SegDecoder, SegDecoderError
from engine.model import PaliGemma
from engine.synth import write_synthetic_checkpoint
from export.pipeline import export_checkpoint

DECODER = Path(__file__).resolve().parents[1] / "engine" / "default_model" / "vae-oid.npz"
REEXPORT = "re-export"
RESTORE = "restore config.json from the checkpoint's repository"
AGAIN = "download it again"


@pytest.fixture(scope="module")
def originals(tmp_path_factory, module_cache):
    """(single-file checkpoint, sharded checkpoint, int8 artifact for both backends + decoder)."""
    root = tmp_path_factory.mktemp("corrupt")
    ckpt = write_synthetic_checkpoint("tiny-pg1", root / "ckpt", seed=0, dtype="fp32", progress=False)
    sharded = write_synthetic_checkpoint("tiny-pg1", root / "sharded", seed=0, dtype="fp32", progress=False,
                                         max_shard_bytes=300_000)
    art = export_checkpoint(ckpt, root / "art", formats=("onnx", "openvino"), weights="int8",
                            seg_decoder=DECODER, progress=False)
    return {"ckpt": ckpt, "sharded": sharded, "art": art}


# ---------------------------------------------------------------------------- corruptions
def truncate(n_keep: int | float):
    """Keep the first n_keep bytes (an int) or that fraction of the file (a float)."""
    def corrupt(p: Path):
        data = p.read_bytes()
        p.write_bytes(data[:n_keep if isinstance(n_keep, int) else int(len(data) * n_keep)])
    return corrupt


def replace_bytes(data: bytes):
    return lambda p: p.write_bytes(data)


def edit_json(fn):
    def corrupt(p: Path):
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return corrupt


def flip_byte(offset: int):
    def corrupt(p: Path):
        data = bytearray(p.read_bytes())
        data[offset] ^= 0xFF
        p.write_bytes(bytes(data))
    return corrupt


def set_(path: str, value):
    """edit_json helper: d[a][b]... = value for path 'a.b...'."""
    def fn(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d[k]
        d[last] = value
    return fn


def safetensors_header(fn):
    """Rewrite the JSON header of a safetensors file (the data area is kept)."""
    def corrupt(p: Path):
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        fn(header)
        new = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return corrupt


def first_weight(header: dict) -> str:
    return next(k for k in header if k.endswith("q_proj.weight"))


def save_npy(array_fn):
    """Replace an .npy file by array_fn(its array)."""
    def corrupt(p: Path):
        a = np.load(p)
        with open(p, "wb") as f:
            np.save(f, array_fn(a))
    return corrupt


def npz_without(name: str):
    def corrupt(p: Path):
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files if k != name}
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    return corrupt


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---------------------------------------------------------------------------- loaders
def open_checkpoint(d: Path):
    Checkpoint.open(d).close()


def load_model(backend: str):
    def load(d: Path):
        PaliGemma(d, backend).close()
    return load


def load_onnx(d: Path):
    load_model("onnxruntime")(d)


def load_openvino(d: Path):
    load_model("openvino")(d)


def load_seg_decoder(d: Path):
    m = PaliGemma(d, "onnxruntime")
    try:
        assert m.seg_decoder is not None
    finally:
        m.close()


@dataclass
class Case:
    name: str
    source: str                     # "ckpt", "sharded" or "art"
    file: str                       # relative path of the file corrupted
    corrupt: Callable[[Path], None]
    load: Callable[[Path], None]
    error: type                     # the exact class expected
    todo: tuple[str, ...]           # fragments of "what to do" (any one suffices)
    rechecksum: bool = False        # artifact cases: rewrite the manifest's checksums afterwards
    names: str | None = None        # the file the message must name, when not `file`


CASES = [
    # config.json
    Case("config_truncated", "ckpt", "config.json", truncate(0.5), open_checkpoint, ConfigError,
         (RESTORE,)),
    Case("config_not_an_object", "ckpt", "config.json", replace_bytes(b"[1, 2]"), open_checkpoint, ConfigError,
         (RESTORE,)),
    Case("config_deeply_nested", "ckpt", "config.json", replace_bytes(nested(100_000)), open_checkpoint,
         ConfigError, (RESTORE,)),
    Case("config_zero_heads", "ckpt", "config.json", edit_json(set_("text_config.num_attention_heads", 0)),
         open_checkpoint, ConfigError, ("fix config.json",)),
    Case("config_negative_size", "ckpt", "config.json", edit_json(set_("vision_config.image_size", -28)),
         open_checkpoint, ConfigError, ("fix config.json",)),
    Case("config_text_config_is_a_list", "ckpt", "config.json", edit_json(set_("text_config", [1])),
         open_checkpoint, ConfigError, (RESTORE,)),
    Case("config_hidden_size_disagrees", "ckpt", "config.json",
         edit_json(lambda d: (set_("text_config.hidden_size", 32)(d), set_("projection_dim", 32)(d))),
         open_checkpoint, CheckpointError, ("use the config.json that came with them",)),
    # model.safetensors
    Case("safetensors_truncated_data", "ckpt", "model.safetensors", truncate(0.7), open_checkpoint,
         CheckpointError, (AGAIN,)),
    Case("safetensors_shorter_than_header_size", "ckpt", "model.safetensors", truncate(5), open_checkpoint,
         CheckpointError, (AGAIN,)),
    Case("safetensors_absurd_header_size", "ckpt", "model.safetensors", flip_byte(7), open_checkpoint,
         CheckpointError, (AGAIN,)),
    Case("safetensors_header_not_json", "ckpt", "model.safetensors", flip_byte(9), open_checkpoint,
         CheckpointError, (AGAIN,)),
    Case("safetensors_deeply_nested_header", "ckpt", "model.safetensors",
         replace_bytes(struct.pack("<Q", 200_000) + nested(100_000)), open_checkpoint, CheckpointError,
         (AGAIN,)),
    Case("safetensors_int_weight", "ckpt", "model.safetensors",
         safetensors_header(lambda h: h[first_weight(h)].update(dtype="I32")), open_checkpoint,
         CheckpointError, ("must be F32, F16 or BF16",)),
    Case("safetensors_offsets_past_end", "ckpt", "model.safetensors",
         safetensors_header(lambda h: h[first_weight(h)].update(data_offsets=[0, 1 << 40])), open_checkpoint,
         CheckpointError, (AGAIN,)),
    # model.safetensors.index.json and shards
    Case("index_not_json", "sharded", "model.safetensors.index.json", truncate(0.5), open_checkpoint,
         CheckpointError, ("restore model.safetensors.index.json from the checkpoint's repository",)),
    Case("index_weight_map_is_a_list", "sharded", "model.safetensors.index.json",
         edit_json(set_("weight_map", [])), open_checkpoint, CheckpointError, ("must map tensor names",)),
    Case("index_names_missing_shard", "sharded", "model.safetensors.index.json",
         edit_json(lambda d: d["weight_map"].update({next(iter(d["weight_map"])): "model-00009-of-00009.safetensors"})),
         open_checkpoint, CheckpointError, ("download is incomplete",)),
    Case("shard_truncated", "sharded", "model-00001-of-00003.safetensors", truncate(0.5), open_checkpoint,
         CheckpointError, (AGAIN,)),
    # tokenizer.model (through the artifact; checksums rewritten so that the tokenizer sees it)
    Case("tokenizer_garbage", "art", "tokenizer.model", replace_bytes(b"\x0a\xff\xff\xff\xff garbage"),
         load_onnx, TokenizerError, ("tokenizer.model",), rechecksum=True),
    Case("tokenizer_truncated", "art", "tokenizer.model", truncate(0.3), load_onnx, TokenizerError,
         ("tokenizer.model",), rechecksum=True),
    Case("tokenizer_flipped_byte_checksum", "art", "tokenizer.model", flip_byte(100), load_onnx, ArtifactError,
         (REEXPORT,)),
    # manifest.json
    Case("manifest_truncated", "art", "manifest.json", truncate(0.5), load_onnx, ArtifactError, (REEXPORT,)),
    Case("manifest_deeply_nested", "art", "manifest.json", replace_bytes(nested(100_000)), load_onnx,
         ArtifactError, (REEXPORT,)),
    Case("manifest_scale_is_a_string", "art", "manifest.json", edit_json(set_("embedding.scale", "8")),
         load_onnx, ArtifactError, (REEXPORT,)),
    Case("manifest_newer_format", "art", "manifest.json", edit_json(set_("format_version", 99)), load_onnx,
         ArtifactError, ("re-export the checkpoint",)),
    Case("manifest_lists_missing_file", "art", "manifest.json",
         edit_json(lambda d: d["files"].update({"onnx/extra.onnx": {"size": 1, "sha256": "0" * 64}})),
         load_onnx, ArtifactError, (REEXPORT,), names="onnx/extra.onnx"),
    Case("manifest_bad_config", "art", "manifest.json", edit_json(set_("config.text_config.num_key_value_heads", 3)),
         load_onnx, ArtifactError, (REEXPORT,)),
    # ONNX graphs and their external data
    Case("onnx_graph_flipped_byte", "art", "onnx/decoder_0.onnx", flip_byte(40), load_onnx, ArtifactError,
         (REEXPORT,)),
    Case("onnx_graph_garbage_rechecksummed", "art", "onnx/decoder_0.onnx", replace_bytes(b"\xff" * 64), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("onnx_graph_truncated_rechecksummed", "art", "onnx/vision.onnx", truncate(0.5), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("onnx_external_data_truncated", "art", "onnx/decoder_1.data", truncate(0.5), load_onnx, ArtifactError,
         (REEXPORT,), rechecksum=True),
    Case("onnx_external_data_size", "art", "onnx/lm_head.data", truncate(0.9), load_onnx, ArtifactError,
         (REEXPORT,)),
    # OpenVINO .xml / .bin
    Case("openvino_xml_truncated", "art", "openvino/decoder_0.xml", truncate(0.5), load_openvino, ArtifactError,
         (REEXPORT,), rechecksum=True),
    Case("openvino_xml_not_xml", "art", "openvino/vision.xml", replace_bytes(b"\x00\x01 not xml"), load_openvino,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("openvino_bin_truncated", "art", "openvino/decoder_1.bin", truncate(0.5), load_openvino, ArtifactError,
         (REEXPORT,), rechecksum=True),
    Case("openvino_bin_flipped_byte", "art", "openvino/lm_head.bin", flip_byte(10), load_openvino, ArtifactError,
         (REEXPORT,)),
    # the embedding table
    Case("embedding_not_npy", "art", "embed_tokens.npy", replace_bytes(b"not an npy file at all"), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("embedding_wrong_width", "art", "embed_tokens.npy", save_npy(lambda a: a[:, :-1]), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("embedding_too_few_rows", "art", "embed_tokens.npy", save_npy(lambda a: a[:10]), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("embedding_truncated_npy", "art", "embed_tokens.npy", truncate(0.5), load_onnx, ArtifactError,
         (REEXPORT,), rechecksum=True),
    Case("embedding_scales_wrong_length", "art", "embed_scales.npy", save_npy(lambda a: a[:-3]), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("embedding_wrong_dtype", "art", "embed_tokens.npy", save_npy(lambda a: a.astype(np.float64)), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    # the final norm of the native int8 LM head (engine.model)
    Case("final_norm_wrong_shape", "art", "final_norm.npy", save_npy(lambda a: a[:-1]), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    Case("final_norm_not_finite", "art", "final_norm.npy", save_npy(lambda a: a * np.float32("nan")), load_onnx,
         ArtifactError, (REEXPORT,), rechecksum=True),
    # the mask decoder
    Case("seg_decoder_truncated", "art", "seg_decoder.npz", truncate(0.5), load_seg_decoder, SegDecoderError,
         ("vae-oid.npz",), rechecksum=True),
    Case("seg_decoder_missing_array", "art", "seg_decoder.npz", npz_without("decoder.12.bias"), load_seg_decoder,
         SegDecoderError, ("vae-oid.npz",), rechecksum=True),
    Case("seg_decoder_text_file", "art", "seg_decoder.npz", replace_bytes(b"this is text\n"), load_seg_decoder,
         SegDecoderError, ("vae-oid.npz",), rechecksum=True),
    Case("seg_decoder_single_npy", "art", "seg_decoder.npz", save_npy(lambda a: np.zeros(3)), load_seg_decoder,
         SegDecoderError, ("vae-oid.npz",), rechecksum=True),
]


def test_the_catalogue_covers_every_kind_of_file():
    kinds = {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.model",
             "manifest.json", ".onnx", ".data", ".xml", ".bin", "embed_tokens.npy", "final_norm.npy",
             "seg_decoder.npz"}
    covered = {k for k in kinds for c in CASES if c.file.endswith(k)}
    assert covered == kinds and len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corrupt_file(case: Case, originals, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "RACY_SECONDS", 0.0)
    d = tmp_path / case.source
    shutil.copytree(originals[case.source], d, ignore=shutil.ignore_patterns(f"{STAMP}*"))
    target = d / case.file
    case.corrupt(target)
    if case.rechecksum:
        manifest = json.loads((d / "manifest.json").read_text())
        artifact.write_manifest(d, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(EngineError) as info:
        case.load(d)
    err = info.value
    msg = str(err)
    assert type(err) is case.error, f"{type(err).__name__}: {msg}"
    assert names_file(msg, d, case.names or case.file), msg
    assert any(t in msg for t in case.todo), msg


def names_file(msg: str, d: Path, rel: str) -> bool:
    """The message names the file: its full path, or the artifact directory and the relative
    path. OpenVINO reports weights (.bin) problems against the graph's .xml, which is named."""
    names = [str(d / rel)]
    if rel.endswith(".bin"):
        names.append(str(d / rel[:-4]) + ".xml")
    return any(n in msg for n in names) or (str(d) in msg and rel in msg)
