"""The PaliGemma segmentation mask decoder (VQ-VAE decoder of big_vision's `vae-oid.npz`) in numpy.

A `segment` answer carries, per instance, 16 `<segNNN>` tokens: indices into the 128-entry
codebook of a VQ-VAE. The decoder turns them into 64x64 mask logits, which are then resized
into the instance's box (`mask_in_box`):

    indices [16] ─► codebook rows, token i at grid cell (i // 4, i % 4) ─► x [D, 4, 4]
    decoder.0           conv 1x1 D -> 128, ReLU
    decoder.2, .3       residual blocks: x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))
                        (convs named decoder.{2,3}.net.{0,2,4}; 3x3 with padding 1)
    decoder.4/.6/.8/.10 ConvTranspose2d kernel 4, stride 2, padding 1, each + ReLU
                        (128 -> 128 -> 64 -> 32 -> 16 channels, 4 -> 64 pixels)
    decoder.12          conv 1x1 16 -> 1  ─► logits [64, 64], roughly in [-1, 1]; > 0 is "inside"

The npz holds PyTorch-style arrays: `_vq_vae._embedding` [128, D], `<module>.weight` (Conv2d
[out, in, k, k]; ConvTranspose2d [in, out, k, k]) and `<module>.bias` [out]. Every shape is
read from the arrays and checked; the encoder arrays (`encoder.*`) are not used.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
from PIL import Image

from .errors import EngineError

GRID = 4                                  # 16 tokens = a 4 x 4 grid
NUM_TOKENS = GRID * GRID
EMBEDDING = "_vq_vae._embedding"
_RESBLOCKS = ("decoder.2.net", "decoder.3.net")
_UPSAMPLERS = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")


class SegDecoderError(EngineError, ValueError):
    """A mask decoder file is missing arrays or has arrays of the wrong shape."""


class SegDecoder:
    """VQ-VAE mask decoder. Build it with `SegDecoder.from_npz(path)` (vae-oid.npz)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str = "mask decoder"):
        self.source = source
        get = _Getter(arrays, source)
        self.codebook = get(EMBEDDING, ndim=2)                               # [K, D]
        k, d = self.codebook.shape
        self.num_codes = k
        # (weight, bias) per layer, every in-channel count checked against the previous layer.
        self.conv_in = get.conv("decoder.0", in_ch=d, kernel=1)
        ch = self.conv_in[0].shape[0]
        self.resblocks = []
        for name in _RESBLOCKS:
            a = get.conv(f"{name}.0", in_ch=ch, kernel=3)
            b = get.conv(f"{name}.2", in_ch=a[0].shape[0], kernel=3)
            c = get.conv(f"{name}.4", in_ch=b[0].shape[0], kernel=1, out_ch=ch)
            self.resblocks.append((a, b, c))
        self.upsamplers = []
        for name in _UPSAMPLERS:
            w, bias = get.conv_transpose(name, in_ch=ch, kernel=4)
            self.upsamplers.append((w, bias))
            ch = w.shape[1]
        self.conv_out = get.conv("decoder.12", in_ch=ch, kernel=1, out_ch=1)
        self.output_size = GRID * 2 ** len(_UPSAMPLERS)                      # 64

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "SegDecoder":
        """Load a decoder from an npz file such as big_vision's vae-oid.npz."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such mask decoder file; pass the path of vae-oid.npz "
                                    "(gs://big_vision/paligemma/vae-oid.npz)")
        if not zipfile.is_zipfile(path):        # np.load would speak of pickled data for a text file
            raise SegDecoderError(f"{path}: not a readable npz file (an npz is a zip archive of arrays, this "
                                  "file is not one); pass the mask decoder vae-oid.npz "
                                  "(gs://big_vision/paligemma/vae-oid.npz)")
        return cls(_read_npz(path), source=path)

    # ---------------------------------------------------------------- decoding
    def decode(self, seg_indices) -> np.ndarray:
        """Codebook indices [16] -> mask logits float32 [64, 64]; [B, 16] -> [B, 64, 64]."""
        idx = np.asarray(seg_indices)
        single = idx.ndim == 1
        idx = idx[None] if single else idx
        if idx.ndim != 2 or idx.shape[1] != NUM_TOKENS:
            raise ValueError(f"seg indices must have shape [16] or [B, 16], got {idx.shape}")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"seg indices must be integers, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_codes):
            raise ValueError(f"seg indices must lie in 0..{self.num_codes - 1}, got {idx.min()}..{idx.max()}")
        b = idx.shape[0]
        x = self.codebook[idx.reshape(-1)].reshape(b, GRID, GRID, -1).transpose(0, 3, 1, 2)  # [B, D, 4, 4]
        x = _relu(_conv(x, *self.conv_in))
        for (w0, b0), (w1, b1), (w2, b2) in self.resblocks:
            h = _relu(_conv(x, w0, b0))
            h = _relu(_conv(h, w1, b1))
            x = x + _conv(h, w2, b2)
        for w, bias in self.upsamplers:
            x = _relu(_conv_transpose_s2(x, w, bias))
        x = _conv(x, *self.conv_out)[:, 0]                                   # [B, 64, 64]
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x[0] if single else x

    def __repr__(self) -> str:
        return f"SegDecoder({self.source!r}, codes={self.num_codes}, dim={self.codebook.shape[1]})"


def mask_in_box(mask64: np.ndarray, box, width: int, height: int) -> np.ndarray:
    """Paste mask logits into their box: bool [height, width], True inside the object.

    box is (x0, y0, x1, y1) in pixels of the image. Like big_vision's segmentation evaluator,
    the box corners are truncated to integers (int()), the logits are resized to the box size
    with PIL's bilinear filter and thresholded at > 0, and everything outside the box is False.
    An empty box (after truncation and clamping to the image) gives an all-False mask.
    """
    logits = np.asarray(mask64, dtype=np.float32)
    if logits.ndim != 2:
        raise ValueError(f"mask logits must be 2-D (e.g. [64, 64]), got shape {logits.shape}")
    width, height = int(width), int(height)
    out = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        return out
    resized = Image.fromarray(np.ascontiguousarray(logits))          # mode "F"
    resized = resized.resize((x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR)
    out[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return out


# --------------------------------------------------------------------------- numpy layers
def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, dtype=np.float32)


def _conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv2d, stride 1, 'same' padding (k // 2), odd k: x [B, C, H, W], w [O, C, k, k] -> [B, O, H, W]."""
    bsz, c, h, wd = x.shape
    o, _, k, _ = w.shape
    if k == 1:
        y = np.matmul(w.reshape(o, c), x.reshape(bsz, c, h * wd))
    else:   # im2col: cols[b, c, i, j, pixel] = padded input shifted by (i, j)
        p = k // 2
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        cols = np.stack([xp[:, :, i:i + h, j:j + wd] for i in range(k) for j in range(k)], axis=2)
        y = np.matmul(w.reshape(o, c * k * k), cols.reshape(bsz, c * k * k, h * wd))
    return (y + bias[:, None]).reshape(bsz, o, h, wd)


def _conv_transpose_s2(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """ConvTranspose2d kernel 4, stride 2, padding 1: x [B, C, H, W], w [C, O, 4, 4] -> [B, O, 2H, 2W].

    Input pixel (i, j) adds x[:, i, j] @ w[:, :, ki, kj] at output (2i + ki, 2j + kj) of the
    unpadded (2H + 2)^2 output; padding 1 then crops one row / column on every side.
    """
    bsz, c, h, wd = x.shape
    _, o, k, _ = w.shape
    t = np.matmul(w.reshape(c, o * k * k).T, x.reshape(bsz, c, h * wd))     # [B, O*k*k, H*W]
    t = t.reshape(bsz, o, k, k, h, wd)
    full = np.zeros((bsz, o, 2 * (h - 1) + k, 2 * (wd - 1) + k), dtype=np.float32)
    for ki in range(k):
        for kj in range(k):
            full[:, :, ki:ki + 2 * h:2, kj:kj + 2 * wd:2] += t[:, :, ki, kj]
    return full[:, :, 1:1 + 2 * h, 1:1 + 2 * wd] + bias[:, None, None]


# --------------------------------------------------------------------------- loading / checks
def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The decoder's arrays (all but `encoder.*`) of the npz archive at `path`.

    Every array's .npy header is checked against the bytes its archive member holds before the
    array is read, so a corrupt header cannot make numpy allocate terabytes. A corrupt archive
    makes zipfile / zlib / numpy raise many exception types (BadZipFile, zlib.error, EOFError,
    struct.error, NotImplementedError, ...): all become SegDecoderError naming the file."""
    def fail(why: str) -> SegDecoderError:
        return SegDecoderError(f"{path}: {why}; pass big_vision's mask decoder vae-oid.npz "
                               "(gs://big_vision/paligemma/vae-oid.npz)")

    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise fail("not an npz archive (numpy reads it as pickled data)") from None
        raise fail(f"not a readable npz archive ({e})") from None
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise fail(f"not a readable npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise fail("holds a single .npy array, not an npz archive of the decoder's arrays")
    with z:
        try:
            names = [k for k in z.files if not k.startswith("encoder.")]
            for name in names:
                _check_npy_member(z.zip, name, fail)
            return {name: z[name] for name in names}
        except SegDecoderError:
            raise
        except MemoryError:
            raise fail("an array is too large to load") from None
        except Exception as e:  # noqa: BLE001 - see the docstring
            raise fail(f"the archive is corrupt ({type(e).__name__}: {e})") from None


def _check_npy_member(zf, name: str, fail) -> None:
    """The .npy header of archive member `name` describes at most the bytes the member holds."""
    from numpy.lib import format as npy
    member = name if name in zf.namelist() else f"{name}.npy"
    info = zf.getinfo(member)
    with zf.open(member) as f:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise fail(f"array {name!r} holds Python objects, not numbers")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > info.file_size:
        raise fail(f"array {name!r} claims shape {shape} of {dtype} ({need} bytes) but its archive "
                   f"member holds {info.file_size} bytes; the file is truncated or corrupt")


class _Getter:
    """Fetches arrays by name as float32 and checks their shapes, with errors naming the file."""

    def __init__(self, arrays: dict, source: str):
        self.arrays, self.source = arrays, source

    def _fail(self, what: str) -> SegDecoderError:
        return SegDecoderError(f"{self.source}: {what}; this is not a valid PaliGemma mask decoder. "
                               "Use big_vision's vae-oid.npz (gs://big_vision/paligemma/vae-oid.npz)")

    def __call__(self, name: str, ndim: int) -> np.ndarray:
        if name not in self.arrays:
            raise self._fail(f"array {name!r} is missing")
        a = np.asarray(self.arrays[name])
        if a.ndim != ndim or 0 in a.shape:
            raise self._fail(f"array {name!r} has shape {a.shape}, expected {ndim} non-empty dimensions")
        if not (np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a))):
            raise self._fail(f"array {name!r} must hold finite floats (dtype {a.dtype})")
        return np.ascontiguousarray(a, dtype=np.float32)

    def _bias(self, name: str, n: int) -> np.ndarray:
        b = self(f"{name}.bias", ndim=1)
        if b.shape != (n,):
            raise self._fail(f"array '{name}.bias' has shape {b.shape}, expected ({n},)")
        return b

    def conv(self, name: str, in_ch: int, kernel: int, out_ch: int | None = None):
        """Conv2d weight [out, in, k, k] and bias [out]."""
        w = self(f"{name}.weight", ndim=4)
        o = w.shape[0] if out_ch is None else out_ch
        if w.shape != (o, in_ch, kernel, kernel):
            raise self._fail(f"array '{name}.weight' has shape {w.shape}, expected "
                             f"({o}, {in_ch}, {kernel}, {kernel}) (Conv2d [out, in, k, k])")
        return w, self._bias(name, o)

    def conv_transpose(self, name: str, in_ch: int, kernel: int):
        """ConvTranspose2d weight [in, out, k, k] and bias [out]."""
        w = self(f"{name}.weight", ndim=4)
        if w.shape[0] != in_ch or w.shape[2:] != (kernel, kernel):
            raise self._fail(f"array '{name}.weight' has shape {w.shape}, expected ({in_ch}, out, {kernel}, "
                             f"{kernel}) (ConvTranspose2d [in, out, k, k])")
        return w, self._bias(name, w.shape[1])
