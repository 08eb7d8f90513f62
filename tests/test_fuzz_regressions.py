"""Regression tests for what fuzzing (fuzz/) and the corrupt-file catalogue found: inputs that
made a reader raise something other than an EngineError. The saved fuzz inputs live in
tests/data/fuzz_regressions/<target>/."""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.config import PaliGemmaConfig
from engine.errors import CheckpointError, ConfigError, ImageError
from engine.masks import SegDecoder, SegDecoderError
from engine.processor import load_image
from engine.safetensors import SafetensorsFile

DATA = Path(__file__).parent / "data" / "fuzz_regressions"


def saved(target: str) -> list[Path]:
    return sorted((DATA / target).iterdir())


@pytest.mark.parametrize("path", saved("image"), ids=lambda p: p.name)
def test_saved_image_inputs_give_image_error(path):
    # tiff_seek_str: a TIFF whose strip offset PIL reads as a string -> TypeError from PIL's seek
    with pytest.raises(ImageError, match="cannot decode the image .*pass a valid image file"):
        load_image(path.read_bytes())


@pytest.mark.parametrize("path", saved("masks"), ids=lambda p: p.name)
def test_saved_npz_inputs_give_seg_decoder_error(path):
    # bad_central_directory: a zip whose central directory is corrupt -> zipfile.BadZipFile
    with pytest.raises(SegDecoderError, match=f"{path}: .*vae-oid.npz"):
        SegDecoder.from_npz(path)


def _npz_with_member(tmp_path, member: str, payload: bytes) -> Path:
    p = tmp_path / "decoder.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(member, payload)
    return p


def test_npz_array_header_claiming_terabytes_is_refused_before_allocating(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    p = _npz_with_member(tmp_path, "_vq_vae._embedding.npy", buf.getvalue() + b"\0" * 16)
    with pytest.raises(SegDecoderError, match=r"claims shape \(1099511627776,\).*truncated or corrupt"):
        SegDecoder.from_npz(p)


def test_npz_member_with_bad_deflate_stream(tmp_path):
    p = tmp_path / "decoder.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros(64, np.float32))
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("_vq_vae._embedding.npy", buf.getvalue())
    raw = bytearray(p.read_bytes())
    start = raw.index(b"_vq_vae._embedding.npy") + len("_vq_vae._embedding.npy")
    for i in range(start + 2, start + 30):     # garble the compressed stream (zlib.error / CRC error)
        raw[i] ^= 0x5A
    p.write_bytes(bytes(raw))
    with pytest.raises(SegDecoderError, match="vae-oid.npz"):
        SegDecoder.from_npz(p)


def test_single_npy_is_not_a_decoder(tmp_path):
    p = tmp_path / "decoder.npz"
    with open(p, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(SegDecoderError, match="vae-oid.npz"):
        SegDecoder.from_npz(p)


def test_deeply_nested_safetensors_header(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="RecursionError.*download it again"):
        SafetensorsFile(p)


def test_deeply_nested_config_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="RecursionError.*restore config.json"):
        PaliGemmaConfig.from_file(p)


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "head_dim", "num_key_value_heads"])
def test_zero_sizes_in_config(tmp_path, field):
    d = PaliGemmaConfig().to_hf()
    d["text_config"][field] = 0
    with pytest.raises(ConfigError, match=f"{field} is 0; it must be a positive integer"):
        PaliGemmaConfig.from_hf(d)


@pytest.mark.parametrize("content, fragment", [
    ("[]", "must hold a JSON object"),                           # was AttributeError
    ('{"size": 5}', "size must be an object"),                   # was AttributeError
    ("[" * 100_000, "RecursionError"),                           # was RecursionError
    ('{"image_seq_length": 1e999}', "image_seq_length inf differs"),   # was OverflowError
    ('{"resample": 1e999}', "not a PIL resampling filter"),      # was OverflowError
    ('{"resample": 99}', "not a PIL resampling filter"),         # was accepted; PIL failed at resize
    ('{"image_std": [0, 0, 0]}', "divides by zero"),             # was accepted: inf pixel values
    ('{"image_mean": [1e999, 0, 0]}', "finite numbers"),         # was accepted: inf pixel values
])
def test_bad_preprocessor_config(tmp_path, content, fragment):
    from engine.artifact import ArtifactError, read_preprocessing
    p = tmp_path / "preprocessor_config.json"
    p.write_text(content)
    with pytest.raises(ArtifactError, match=f"{p}: invalid image preprocessing .*{fragment}.*re-export"):
        read_preprocessing(p, PaliGemmaConfig())


@pytest.mark.parametrize("part", ["text_config", "vision_config"])
def test_absurd_layer_count_is_refused_before_building_per_layer_lists(part):
    d = PaliGemmaConfig().to_hf()
    d[part]["num_hidden_layers"] = 10**9
    d[part].pop("layer_types", None)
    with pytest.raises(ConfigError, match="num_hidden_layers is 1000000000.*10000"):
        PaliGemmaConfig.from_hf(d)
