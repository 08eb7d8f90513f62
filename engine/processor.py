"""Image loading, SigLIP preprocessing and PaliGemma prompt building (matches HF PaliGemmaProcessor).

Images: any input becomes an RGB PIL image (EXIF orientation applied, transparency composited
onto white exactly like transformers' `convert_to_rgb`), is resized to size x size with PIL
bicubic (aspect ratio not kept), scaled by 1/255 and normalized to [-1, 1]. The arithmetic
follows HF's PIL backend step by step (uint8 resize, float64 rescale, float32 normalize), so
pixel_values are bit-identical to SiglipImageProcessor's.

Where HF is not sane we differ, on purpose:
- 16-bit images (PIL modes I;16*, I; uint16 arrays) are scaled to 8 bits (v / 257, rounded);
  HF clips them at 255, so most of the range turns white.
- Float data (arrays, PIL mode F) must lie in [0, 1] and becomes round(v * 255); HF
  rescales such arrays twice.
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from .config import PaliGemmaConfig
from .errors import ConfigError, ImageError, TokenizerError
from .tokenizer import Tokenizer

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # "I": 16-bit PNGs in older Pillow


# --------------------------------------------------------------------------- loading
def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes, a PIL image or a numpy array.

    Arrays are channels-last: HxW (grey), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); uint8, uint16
    (scaled to 8 bits), other integers in 0..255, or floats in [0, 1].
    max_pixels: the largest encoded image (path, bytes) decoded, width x height, a guard against
    decompression bombs; None: PIL.Image.MAX_IMAGE_PIXELS as it is now (Pillow's default
    89,478,485). Pillow itself refuses images over twice its own limit whatever this says.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(_exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _to_rgb(_from_array(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(image)), "image bytes", max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise ImageError(f"{path}: URLs are not fetched; download the image and pass its path or bytes")
        if os.path.isdir(path):
            raise ImageError(f"{path} is a directory, not an image file; pass the path of one image file")
        if not os.path.isfile(path):
            raise ImageError(f"{path}: no such image file")
        return _open(path, path, max_pixels)
    raise ImageError(f"unsupported image type {type(image).__name__}; pass a file path, bytes, "
                     "a PIL.Image.Image or a numpy array (H, W[, C])")


def _open(src, name: str, max_pixels: int | None = None) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():        # our own limit below says it better than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)               # reads the header only
        with im:
            _check_pixels(im.size, limit, name)
            im.load()      # decode now: Image.open is lazy, and errors belong here
            return _to_rgb(_exif_transpose(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused to decode a possible decompression bomb ({e}); Pillow refuses "
                         "any image over twice PIL.Image.MAX_IMAGE_PIXELS, so downscale it first (e.g. with "
                         "an image editor or `convert -resize`)") from None
    except MemoryError:
        raise ImageError(f"{name}: the image is too large to decode in memory; downscale it first") from None
    except Exception as e:   # a corrupt file makes PIL raise anything (TypeError, struct.error, ...)
        raise ImageError(f"{name}: cannot decode the image ({type(e).__name__}: {e}); "
                         "pass a valid image file such as PNG, JPEG, WebP, GIF, BMP or TIFF") from None


def _check_pixels(size: tuple[int, int], limit: int | None, name: str) -> None:
    """Refuse an image over `limit` pixels before decoding it (None: no limit)."""
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise ImageError(f"{name}: the image is {size[0]}x{size[1]} = {pixels:,} pixels, more than the limit of "
                         f"{limit:,} that guards against decompression bombs; if you trust it, raise the limit "
                         f"(CLI: --max-image-pixels {pixels}; Python: load_image(..., max_pixels={pixels})) "
                         "or downscale the image")


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - PIL raises anything on a corrupt EXIF block
        return im      # unreadable EXIF: use the pixels as stored rather than fail


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or a.size == 0:
        raise ImageError(f"image array has shape {a.shape}; expected channels-last (H, W), (H, W, 1), "
                         "(H, W, 3) or (H, W, 4) (for a CHW array pass a.transpose(1, 2, 0))")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = _scale_16bit(a)
    elif np.issubdtype(a.dtype, np.floating):
        a = _float_to_uint8(a)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ImageError(f"{a.dtype} image array has values in [{a.min()}, {a.max()}]; integer "
                             "arrays must be 0..255 (or use uint16 for 16-bit data)")
        a = a.astype(np.uint8)
    else:
        raise ImageError(f"image array dtype {a.dtype} is not supported; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    # 65535 -> 255; a / 257 never lands on .5, so rounding is unambiguous
    return np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(a)):
        raise ImageError("float image data has NaN or infinite values; it must lie in [0, 1]")
    if a.min() < 0.0 or a.max() > 1.0:
        raise ImageError(f"float image data must lie in [0, 1], got [{a.min()}, {a.max()}]; "
                         "divide by the maximum value or pass uint8 data")
    return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB like transformers' convert_to_rgb: transparency is composited onto white."""
    if im.mode in _16BIT_MODES:
        im = Image.fromarray(_scale_16bit(np.asarray(im)))
    elif im.mode == "F":
        im = Image.fromarray(_float_to_uint8(np.asarray(im)))
    try:
        if "A" in im.getbands() or im.info.get("transparency") is not None:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert a mode {im.mode} image to RGB ({e}); convert it to RGB first") from None


# --------------------------------------------------------------------------- pixels
def preprocess_image(image, size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5), rescale: float = 1 / 255,
                     resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """float32 [3, size, size] pixel values, exactly like HF SiglipImageProcessor (PIL backend)."""
    rgb = load_image(image)
    resized = rgb.resize((size, size), resample=resample)          # PIL on uint8, as HF does
    x = (np.asarray(resized, dtype=np.uint8).astype(np.float64) * rescale).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- processor
class Processor:
    """Turns (images, prompt[, suffix]) into model inputs, like HF PaliGemmaProcessor.

    Token layout for N images (one prompt may carry several images; HF takes them as a nested
    list [[img1, img2]]):

        <image> * (N * num_image_tokens)   image blocks one after another, in image order
        <bos> prompt "\\n"                  the prefix; token_type_ids 0 up to here
        suffix <eos>                       only when suffix is given; token_type_ids 1
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int,
                 image_token_id: int | None = None, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), rescale_factor: float = 1 / 255,
                 resample: int = Image.Resampling.BICUBIC):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token_id = tokenizer.image_token_id if image_token_id is None else int(image_token_id)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.rescale_factor = float(rescale_factor)
        self.resample = int(resample)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std need 3 values (R, G, B)")

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike, *,
                        tokenizer_path: str | os.PathLike | None = None) -> "Processor":
        """Read config.json, tokenizer.model and (if present) preprocessor_config.json."""
        d = os.fspath(checkpoint_dir)
        cfg = PaliGemmaConfig.from_file(os.path.join(d, "config.json"))
        tok_path = os.fspath(tokenizer_path) if tokenizer_path is not None else os.path.join(d, "tokenizer.model")
        if not os.path.isfile(tok_path):
            raise TokenizerError(f"{tok_path}: no tokenizer.model; copy the checkpoint's tokenizer.model "
                                 "there or pass tokenizer_path=")
        tok = Tokenizer(tok_path, cfg.image_token_index)
        for name, ours, theirs in (("bos", tok.bos_id, cfg.bos_token_id), ("eos", tok.eos_id, cfg.eos_token_id),
                                   ("pad", tok.pad_id, cfg.pad_token_id)):
            if ours != theirs:
                raise TokenizerError(f"{tok_path}: <{name}> is id {ours} but config.json says {theirs}; "
                                     "the tokenizer does not belong to this checkpoint")
        kw = _read_preprocessor_config(os.path.join(d, "preprocessor_config.json"), cfg)
        return cls(tok, image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens, **kw)

    def preprocess(self, image) -> np.ndarray:
        return preprocess_image(image, self.image_size, self.image_mean, self.image_std,
                                self.rescale_factor, self.resample)

    def __call__(self, images, prompt: str | None = "", suffix: str | None = None) -> dict[str, np.ndarray]:
        """input_ids int64 [T], token_type_ids int64 [T], pixel_values float32 [N, 3, S, S]."""
        imgs = list(images) if isinstance(images, (list, tuple)) else [images]
        if not imgs:
            raise ImageError("no image given; PaliGemma needs at least one image per prompt")
        prompt = "" if prompt is None else prompt
        for name, text in (("prompt", prompt), ("suffix", suffix)):
            if text is not None and not isinstance(text, str):
                raise TokenizerError(f"{name} must be a str, got {type(text).__name__}")
            if text is not None and "<image>" in text:
                raise TokenizerError(f"{name} contains '<image>'; pass the images instead, the "
                                     "processor puts the image tokens in front of the prompt")
        pixel_values = np.stack([self.preprocess(im) for im in imgs])
        tok = self.tokenizer
        ids = [self.image_token_id] * (len(imgs) * self.num_image_tokens) + [tok.bos_id] + tok.encode(prompt + "\n")
        types = [0] * len(ids)
        if suffix is not None:
            tail = tok.encode(suffix) + [tok.eos_id]
            ids += tail
            types += [1] * len(tail)
        return dict(input_ids=np.asarray(ids, dtype=np.int64),
                    token_type_ids=np.asarray(types, dtype=np.int64),
                    pixel_values=pixel_values)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def _read_preprocessor_config(path: str, cfg: PaliGemmaConfig) -> dict:
    """Processor kwargs from HF's preprocessor_config.json; {} when the file is absent."""
    fix = "fix preprocessor_config.json or restore it from the checkpoint's repository"
    try:
        with open(path, encoding="utf-8") as f:
            pp = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: absurdly nested JSON
        raise ConfigError(f"{path}: cannot read preprocessor_config.json ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(pp, dict):
        raise ConfigError(f"{path}: must hold a JSON object, not a {type(pp).__name__}; {fix}")
    size = pp.get("size") or {}
    if not isinstance(size, dict):
        raise ConfigError(f"{path}: size must be an object such as {{\"height\": 224, \"width\": 224}}, "
                          f"got {size!r}; {fix}")
    h, w = size.get("height", cfg.vision.image_size), size.get("width", cfg.vision.image_size)
    if (h, w) != (cfg.vision.image_size, cfg.vision.image_size) or "shortest_edge" in size:
        raise ConfigError(f"{path}: size {size} differs from the model's {cfg.vision.image_size}x"
                          f"{cfg.vision.image_size} input; fix preprocessor_config.json")
    seq = pp.get("image_seq_length")
    if seq is not None and seq != cfg.num_image_tokens:
        raise ConfigError(f"{path}: image_seq_length {seq} differs from the model's "
                          f"{cfg.num_image_tokens} image tokens; fix preprocessor_config.json")
    if pp.get("do_resize") is False:
        raise ConfigError(f"{path}: do_resize=false is not supported; the model needs "
                          f"{cfg.vision.image_size}x{cfg.vision.image_size} inputs")
    kw = dict(image_mean=pp.get("image_mean") or (0.5, 0.5, 0.5),
              image_std=pp.get("image_std") or (0.5, 0.5, 0.5),
              rescale_factor=pp.get("rescale_factor", 1 / 255),
              resample=pp.get("resample", Image.Resampling.BICUBIC))
    if pp.get("do_rescale") is False:
        kw["rescale_factor"] = 1.0
    if pp.get("do_normalize") is False:
        kw["image_mean"], kw["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for k in ("image_mean", "image_std"):
        if isinstance(kw[k], (int, float)):
            kw[k] = (float(kw[k]),) * 3
    return _checked_preprocessing(kw, path, fix)


_RESAMPLE_FILTERS = {int(f) for f in Image.Resampling}


def _checked_preprocessing(kw: dict, path: str, fix: str) -> dict:
    """kw with 3 finite means, 3 finite non-zero stds, a finite positive rescale factor and a PIL
    resampling filter; ConfigError naming the file otherwise."""
    def numbers(key: str) -> tuple[float, ...]:
        v = kw[key]
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            raise ConfigError(f"{path}: {key} needs 3 values (R, G, B), finite numbers, got {v!r}; {fix}")
        return tuple(float(x) for x in v)

    mean, std = numbers("image_mean"), numbers("image_std")
    if 0.0 in std:
        raise ConfigError(f"{path}: image_std {list(std)} has a zero, which divides by zero; {fix}")
    rescale = kw["rescale_factor"]
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or not math.isfinite(rescale) or rescale <= 0:
        raise ConfigError(f"{path}: rescale_factor must be a positive number, got {rescale!r}; {fix}")
    resample = kw["resample"]
    if isinstance(resample, bool) or resample not in _RESAMPLE_FILTERS:
        raise ConfigError(f"{path}: resample {resample!r} is not a PIL resampling filter "
                          f"({sorted(_RESAMPLE_FILTERS)}; 3 is bicubic); {fix}")
    return dict(image_mean=mean, image_std=std, rescale_factor=float(rescale), resample=int(resample))
