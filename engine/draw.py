"""Overlays for detect / segment results: labelled boxes and translucent masks (PIL only).

    draw_detections(image, model.detect(image, "cat ; dog"), "boxes.png")
    draw_segments(image, model.segment(image, "cat"), "masks.png")

The image is loaded like the model loads it (EXIF orientation applied), so boxes and masks,
which are in pixels of that image, line up. Each label gets its own colour, in order of first
appearance; labels are drawn on a filled background so they stay readable.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .processor import load_image

# Distinct, saturated colours (Tableau 10 without the greys); cycled for more labels.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))
MASK_ALPHA = 0.45          # opacity of mask overlays


def draw_detections(image, detections: Sequence, out_path: str | os.PathLike | None = None) -> Image.Image:
    """The image with a labelled box per detection (anything with .label and .box); saved to
    out_path when given (format from the extension, e.g. .png / .jpg)."""
    return _draw(image, detections, out_path, with_masks=False)


def draw_segments(image, segments: Sequence, out_path: str | os.PathLike | None = None) -> Image.Image:
    """The image with each segment's mask as a translucent overlay, plus its labelled box.
    Segments without a mask (mask None) get the box only."""
    return _draw(image, segments, out_path, with_masks=True)


def label_colors(items: Sequence) -> dict[str, tuple[int, int, int]]:
    """Colour per label, in order of first appearance."""
    colors: dict[str, tuple[int, int, int]] = {}
    for item in items:
        if item.label not in colors:
            colors[item.label] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def _draw(image, items: Sequence, out_path, with_masks: bool) -> Image.Image:
    base = load_image(image)                                    # RGB, EXIF-oriented copy
    items = list(items)
    colors = label_colors(items)
    if with_masks:
        base = _blend_masks(base, items, colors)
    draw = ImageDraw.Draw(base)
    font = _font(base.size)
    width = max(1, round(min(base.size) / 200))                 # 1 px up to 400 px, thicker beyond
    for item in items:
        color = colors[item.label]
        x0, y0, x1, y1 = (float(v) for v in item.box)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=color, width=width)
        if item.label:
            _draw_label(draw, font, item.label, x0, y0, color, base.size)
    if out_path is not None:
        base.save(out_path)
    return base


def _blend_masks(image: Image.Image, items: Sequence, colors: dict) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32).copy()
    h, w = pixels.shape[:2]
    for item in items:
        mask = getattr(item, "mask", None)
        if mask is None:
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask of {item.label!r} has shape {mask.shape}, the image is {h}x{w}; "
                             "draw the segments on the image they were computed for")
        color = np.asarray(colors[item.label], dtype=np.float32)
        pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * color
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def _font(size: tuple[int, int]):
    """PIL's default font, scaled with the image (11 px up to ~450 px, larger beyond) when
    Pillow has FreeType; the fixed-size bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=max(11, round(min(size) / 40)))
    except (TypeError, ImportError, OSError):       # old Pillow, or no FreeType
        return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, font, text: str, x0: float, y0: float, color, size) -> None:
    """Label text on a filled box just above the box's top-left corner (inside if no room)."""
    try:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    except UnicodeEncodeError:                       # bitmap font: latin-1 only
        text = text.encode("latin-1", "replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(0.0, x0), max(0.0, size[0] - tw))
    y = y0 - th if y0 - th >= 0 else y0
    y = min(y, max(0.0, size[1] - th))
    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 150 else (255, 255, 255),
              font=font)
