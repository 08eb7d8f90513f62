"""Overlays for detect / segment results: labelled boxes and translucent masks (PIL only).

    draw_detections(image, model.detect(image, "cat ; dog"), "boxes.png")
    draw_segments(image, model.segment(image, "cat"), "masks.png")

The image is loaded like the model loads it (EXIF orientation applied), so boxes and masks,
which are in pixels of that image, line up.

Colours: a label that names a colour ("blue square") is drawn in that colour, so the overlay
never contradicts the label (a palette by index drew "blue square" in orange). The others get
the palette's colours in order of first appearance, skipping every colour that some label of
the image names, so that no box looks like a named colour it is not. Since a box drawn in its
object's own colour would vanish on it, every box and mask outline has a thin halo (black
around light colours, white around dark ones); label text sits on a filled band in the label's
colour. The font grows with the image (about 1/24 of its shorter side, at least 12 px).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .processor import load_image

# Distinct, saturated colours (Tableau 10 without the greys) and the colour word each one reads
# as; cycled for more labels.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))
PALETTE_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan")
# Colours a label may name, drawn as such (the saturated shades of engine.scenes where it has them).
NAMED_COLOURS = {
    "red": (220, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 225), "yellow": (240, 215, 25),
    "purple": (145, 55, 195), "orange": (250, 135, 20), "pink": (240, 110, 180), "brown": (140, 86, 50),
    "cyan": (0, 200, 220), "magenta": (220, 0, 200), "violet": (145, 55, 195), "olive": (128, 128, 0),
    "black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128), "gray": (128, 128, 128),
}
MASK_ALPHA = 0.45          # opacity of mask overlays


def draw_detections(image, detections: Sequence, out_path: str | os.PathLike | None = None) -> Image.Image:
    """The image with a labelled box per detection (anything with .label and .box); saved to
    out_path when given (format from the extension, e.g. .png / .jpg)."""
    return _draw(image, detections, out_path, with_masks=False)


def draw_segments(image, segments: Sequence, out_path: str | os.PathLike | None = None) -> Image.Image:
    """The image with each segment's mask as a translucent overlay, plus its labelled box.
    Segments without a mask (mask None) get the box only."""
    return _draw(image, segments, out_path, with_masks=True)


def named_colour(label: str) -> str | None:
    """The colour word a label names ("dark blue square" -> "blue"), or None."""
    for word in label.lower().replace("-", " ").split():
        if word in NAMED_COLOURS:
            return word
    return None


def label_colors(items: Sequence) -> dict[str, tuple[int, int, int]]:
    """Colour per label (see the module docstring): the colour it names, else the next palette
    colour, in order of first appearance, that no label of `items` names."""
    labels = list(dict.fromkeys(item.label for item in items))
    named = {named_colour(label) for label in labels} - {None}
    free = [c for c, name in zip(PALETTE, PALETTE_NAMES) if name not in named] or list(PALETTE)
    colors: dict[str, tuple[int, int, int]] = {}
    n_free = 0
    for label in labels:
        word = named_colour(label)
        if word is not None:
            colors[label] = NAMED_COLOURS[word]
        else:
            colors[label] = free[n_free % len(free)]
            n_free += 1
    return colors


def halo_color(color) -> tuple[int, int, int]:
    """Black around light colours, white around dark ones."""
    return (0, 0, 0) if _luminance(color) > 100 else (255, 255, 255)


def _luminance(color) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


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
        x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
        halo = halo_color(color)
        draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=halo, width=1)       # outside the line
        if x1 - x0 > 2 * width and y1 - y0 > 2 * width:
            draw.rectangle((x0 + width, y0 + width, x1 - width, y1 - width), outline=halo, width=1)   # inside
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
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
        # the mask's edge in the halo colour: a mask tinted like its own object stays visible
        pixels[_edge(mask)] = halo_color(colors[item.label])
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def _edge(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image border counts as outside)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def font_size(size: tuple[int, int]) -> int:
    """Label font size in pixels: 1/24 of the image's shorter side, at least 12 (20 px on 640 x 480)."""
    return max(12, round(min(size) / 24))


def _font(size: tuple[int, int]):
    """PIL's default font at font_size() when Pillow has FreeType (Pillow >= 10.1); the
    fixed-size bitmap font otherwise."""
    try:
        return ImageFont.load_default(size=font_size(size))
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
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if _luminance(color) > 150 else (255, 255, 255),
              font=font)
