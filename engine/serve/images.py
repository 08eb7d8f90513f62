"""Image sources of a request -> RGB PIL images, with the server's limits.

Accepted: `data:image/...;base64,...` URLs, raw base64 (a JSON string), bytes of a multipart
upload, and `file://` URLs of files inside --media-dir (none without it). Remote URLs
(http, https, ftp, ...) are refused: the server is offline by design and never fetches.
Every failure raises ApiError 400 with a message that says what to send instead.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import ImageError
from ..processor import load_image
from .errors import ApiError


def decode_source(source: str, media_dir: Path | None, max_pixels: int, param: str = "image") -> Image.Image:
    """One image from a string: data URL, raw base64, or file:// URL inside media_dir."""
    if not isinstance(source, str) or not source:
        raise ApiError(400, f"{param}: give the image as a data:image/...;base64 URL, raw base64, or a file:// URL "
                            "inside the server's --media-dir", param=param)
    head = source[:16].lower()
    if head.startswith("data:"):
        return decode_bytes(_data_url_bytes(source, param), max_pixels, param)
    if head.startswith("file:"):
        return decode_bytes(_media_file_bytes(source, media_dir, param), max_pixels, param)
    scheme = urlparse(source[:64]).scheme.lower()
    if scheme in ("http", "https", "ftp", "ftps", "s3", "gs") or "://" in source[:16]:
        raise ApiError(400, f"{param}: remote image URLs are not fetched (the server is offline by design); send the "
                            "image itself as a data:image/...;base64 URL or raw base64", param=param,
                       code="remote_url_refused")
    return decode_bytes(_b64(source, param), max_pixels, param)


def decode_bytes(data: bytes, max_pixels: int, param: str = "image") -> Image.Image:
    """Encoded image bytes -> RGB PIL image (EXIF orientation applied), refusing bombs."""
    if not data:
        raise ApiError(400, f"{param}: the image is empty; send the bytes of a PNG, JPEG, WebP, GIF or BMP file",
                       param=param, code="invalid_image")
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as e:
        code = "image_too_large" if "decompression bomb" in str(e) else "invalid_image"
        raise ApiError(400, f"{param}: {e}", param=param, code=code) from None


def _data_url_bytes(url: str, param: str) -> bytes:
    meta, sep, payload = url.partition(",")
    if not sep or ";base64" not in meta.lower():
        raise ApiError(400, f"{param}: a data URL must be base64-encoded: data:image/png;base64,<data>",
                       param=param, code="invalid_image")
    mime = meta[5:].split(";")[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise ApiError(400, f"{param}: the data URL's type is {mime!r}; send an image (image/png, image/jpeg, ...)",
                       param=param, code="invalid_image")
    return _b64(payload, param)


def _b64(text: str, param: str) -> bytes:
    text = "".join(text.split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: not valid base64 (nor a data: or file:// URL); encode the image file with "
                            "base64", param=param, code="invalid_image") from None


def _media_file_bytes(url: str, media_dir: Path | None, param: str) -> bytes:
    if media_dir is None:
        raise ApiError(400, f"{param}: file:// URLs are off; start the server with --media-dir DIR to serve images "
                            "from DIR, or send the image as base64", param=param, code="file_url_refused")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(400, f"{param}: file:// URLs must name a local path (file:///path), got host "
                            f"{parsed.netloc!r}", param=param, code="file_url_refused")
    root = media_dir.resolve()
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        path = root / path
    path = path.resolve()
    if path != root and root not in path.parents:
        raise ApiError(400, f"{param}: {path} is outside the media directory {root}; only files under --media-dir "
                            "are served", param=param, code="file_url_refused")
    if not path.is_file():
        raise ApiError(400, f"{param}: {path}: no such file in the media directory", param=param,
                       code="file_url_refused")
    with open(path, "rb") as f:
        return f.read()

