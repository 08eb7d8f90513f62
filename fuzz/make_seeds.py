"""Write the seed corpus of every target into fuzz/corpus/<target>/ (committed; rerun only to
change it). Seeds are small valid inputs plus a few near misses; the fuzzer mutates them.

    python -m fuzz.make_seeds
"""
from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from engine.safetensors import write_safetensors
from fuzz.harness import scratch, tiny_artifact, tiny_checkpoint, tiny_decoder_arrays

CORPUS = Path(__file__).parent / "corpus"


def _put(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def safetensors_seeds() -> None:
    cases = {
        "f32": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "mixed": {"w": np.ones((2, 2), np.float16), "i": np.arange(3, dtype=np.int64),
                  "e": np.zeros((0, 4), np.float32), "b": np.array([True, False])},
        "scalar": {"s": np.array(1.5, dtype=np.float64)},
    }
    for name, tensors in cases.items():
        p = scratch(f"{name}.safetensors")
        write_safetensors(p, tensors, metadata={"format": "pt"} if name == "f32" else None)
        _put("safetensors", name, p.read_bytes())
    header = b'{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    _put("safetensors", "bf16_unpadded", struct.pack("<Q", len(header)) + header + b"\x80\x3f\x00\x40")


def checkpoint_seeds() -> None:
    single, sharded = tiny_checkpoint(), tiny_checkpoint(sharded=True)
    _put("checkpoint", "0_config", b"\x00" + (single / "config.json").read_bytes())
    raw = (single / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    _put("checkpoint", "1_header", b"\x01" + raw[8:8 + n])
    _put("checkpoint", "2_index", b"\x02" + (sharded / "model.safetensors.index.json").read_bytes())
    _put("checkpoint", "3_preprocessor", b"\x03" + (single / "preprocessor_config.json").read_bytes())


def manifest_seeds() -> None:
    art = tiny_artifact()
    manifest = (art / "manifest.json").read_bytes()
    _put("manifest", "0_manifest", b"\x00" + manifest)
    _put("manifest", "2_manifest_verified", b"\x02" + manifest)
    _put("manifest", "1_preprocessor", b"\x01" + (art / "preprocessor_config.json").read_bytes())
    m = json.loads(manifest)       # the same artifact without graphs: the fast path to the other checks
    m["graphs"] = {}
    _put("manifest", "0_no_graphs", b"\x00" + json.dumps(m).encode())


def parser_seeds() -> None:
    det = "<loc0100><loc0200><loc0300><loc0400> cat ; <loc0000><loc0000><loc1023><loc1023> blue square"
    segs = "".join(f"<seg{i * 7 % 128:03d}>" for i in range(16))
    seg = f"<loc0100><loc0200><loc0300><loc0400>{segs} cat ; <loc0010><loc0020><loc0900><loc0800>{segs} dog"
    for name, text in (("det", det), ("seg", seg), ("det_eos", det + "<eos>"), ("junk", "<loc12> ; <seg1>")):
        for mode in (1, 3):                       # raw text, with and without the decoder
            _put("parsers", f"{name}_{mode}", bytes([mode, 200, 0, 150, 0]) + text.encode())


def tokenizer_seeds() -> None:
    _put("tokenizer", "short", bytes(range(0, 64)))
    _put("tokenizer", "array", b"\x01" + bytes(range(255, 0, -3)))
    _put("tokenizer", "empty", b"")


def _image_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def image_seeds() -> None:
    rgb = Image.fromarray((np.arange(4 * 5 * 3) * 7 % 256).astype(np.uint8).reshape(4, 5, 3))
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                              # orientation: rotate 90
    seeds = {
        "png": _image_bytes(rgb, "PNG"),
        "png_rgba": _image_bytes(rgba, "PNG"),
        "png_16bit": _image_bytes(Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000), "PNG"),
        "png_palette_transparency": _image_bytes(rgb.convert("P"), "PNG", transparency=0),
        "jpeg": _image_bytes(rgb, "JPEG", quality=50),
        "jpeg_exif": _image_bytes(rgb, "JPEG", exif=exif.tobytes()),
        "gif": _image_bytes(rgb.convert("P"), "GIF"),
        "bmp": _image_bytes(rgb, "BMP"),
        "tiff": _image_bytes(rgb, "TIFF"),
        "tiff_float": _image_bytes(Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)), "TIFF"),
        "webp": _image_bytes(rgb, "WEBP", lossless=True),
        "ppm": _image_bytes(rgb, "PPM"),
        "ico": _image_bytes(rgb, "ICO", sizes=[(4, 4)]),
    }
    for name, data in seeds.items():
        _put("image", name, data)


def _npz(arrays: dict, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def masks_seeds() -> None:
    arrays = tiny_decoder_arrays(codes=8, dim=2, ch=2)
    _put("masks", "valid", _npz(arrays, False))
    _put("masks", "valid_compressed", _npz(arrays, True))
    _put("masks", "missing_array", _npz({k: v for k, v in arrays.items() if k != "decoder.12.bias"}, False))
    _put("masks", "wrong_shape", _npz(dict(arrays, **{"decoder.0.weight": np.zeros((2, 3, 1, 1), np.float32)}), False))
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, np.float32))
    _put("masks", "plain_npy", buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "not an array")
    _put("masks", "zip_no_npy", buf.getvalue())


def main() -> None:
    shutil.rmtree(CORPUS, ignore_errors=True)
    for make in (safetensors_seeds, checkpoint_seeds, manifest_seeds, parser_seeds, tokenizer_seeds,
                 image_seeds, masks_seeds):
        make()
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name:12s} {len(files):3d} seeds, {sum(f.stat().st_size for f in files):8d} bytes")


if __name__ == "__main__":
    main()
