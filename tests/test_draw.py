"""engine.draw: overlays are images of the original size that change pixels on boxes, labels
and masks, and leave the rest of the image alone."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.draw import (NAMED_COLOURS, PALETTE, PALETTE_NAMES, draw_detections, draw_segments, font_size,
                         halo_color, label_colors)
from engine.tasks import Detection, Segment

W, H = 640, 480
GREY = 128


def grey_image():
    return np.full((H, W, 3), GREY, np.uint8)


def changed(out: Image.Image) -> np.ndarray:
    return np.any(np.asarray(out.convert("RGB")) != GREY, axis=-1)


def test_detections_png(tmp_path):
    dets = [Detection("cat", (100.0, 150.0, 300.0, 270.0)), Detection("dog", (400.0, 300.0, 600.0, 460.0))]
    out = draw_detections(grey_image(), dets, tmp_path / "boxes.png")
    png = Image.open(tmp_path / "boxes.png")
    assert png.format == "PNG" and png.size == (W, H) and out.size == (W, H)
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(out))
    diff = changed(png)
    a = np.asarray(png.convert("RGB"))
    # the outline is drawn in the label's colour, on the box edges
    assert tuple(a[200, 100]) == PALETTE[0] and tuple(a[150, 200]) == PALETTE[0]
    assert tuple(a[269, 200]) == PALETTE[0] and tuple(a[200, 299]) == PALETTE[0]
    assert tuple(a[380, 400]) == PALETTE[1]
    # a 1 px halo just outside the line (black around light colours, white around dark ones)
    assert tuple(a[200, 99]) == halo_color(PALETTE[0]) == (255, 255, 255)
    # inside the boxes (away from the edges) and far outside: untouched
    assert not diff[170:250, 120:280].any() and not diff[320:440, 420:580].any()
    assert not diff[:100].any() and not diff[:, 610:].any() and not diff[:, :99].any()
    # the labels sit above their boxes, in a filled band of at most ~40 px
    assert diff[110:150, 100:160].any() and not diff[:105, 100:300].any()


def test_label_inside_box_at_the_top_edge():
    out = draw_detections(grey_image(), [Detection("top", (10.0, 0.0, 200.0, 100.0))])
    diff = changed(out)
    assert diff[2:12, 12:25].any()                        # the label band is inside the box
    assert not diff[101:].any() and not diff[:, 201:].any()


def test_colours_per_label():
    dets = [Detection("a", (0, 0, 1, 1)), Detection("b", (0, 0, 1, 1)), Detection("a", (0, 0, 1, 1))]
    colors = label_colors(dets)
    assert colors == {"a": PALETTE[0], "b": PALETTE[1]}
    assert len(set(PALETTE)) == len(PALETTE)
    many = [Detection(str(i), (0, 0, 1, 1)) for i in range(len(PALETTE) + 2)]
    assert label_colors(many)[str(len(PALETTE))] == PALETTE[0]       # cycles after the palette


def test_a_label_that_names_a_colour_is_drawn_in_it():
    """The defect: "blue square" was drawn orange (palette by index). Named colours are used as
    such, and the others skip every palette colour that a label names."""
    dets = [Detection("purple circle", (0, 0, 1, 1)), Detection("blue square", (0, 0, 1, 1)),
            Detection("cat", (0, 0, 1, 1)), Detection("dog", (0, 0, 1, 1))]
    colors = label_colors(dets)
    assert colors["purple circle"] == NAMED_COLOURS["purple"] and colors["blue square"] == NAMED_COLOURS["blue"]
    named = {"purple", "blue"}
    allowed = [c for c, n in zip(PALETTE, PALETTE_NAMES) if n not in named]
    assert [colors["cat"], colors["dog"]] == allowed[:2]               # orange, green: no blue, no purple
    out = np.asarray(draw_detections(grey_image(), [Detection("blue square", (100.0, 100.0, 300.0, 300.0))]))
    assert tuple(out[200, 100]) == NAMED_COLOURS["blue"]
    assert tuple(out[200, 99]) == halo_color(NAMED_COLOURS["blue"])     # the halo keeps it visible on blue
    assert tuple(out[200, 100 + 2]) == halo_color(NAMED_COLOURS["blue"])   # inside halo (line width 2)


def test_font_grows_with_the_image():
    assert font_size((640, 480)) == 20 and font_size((224, 224)) == 12 and font_size((1920, 1080)) == 45

    def band_height(w, h):
        img = np.full((h, w, 3), GREY, np.uint8)
        diff = changed(draw_detections(img, [Detection("Hg", (10.0, h / 2, w / 2, h - 10))]))
        rows = np.flatnonzero(diff[: int(h / 2) - 2, 12:14].any(axis=1))    # the filled band above the box
        return rows.max() - rows.min() + 1

    small, large = band_height(640, 480), band_height(1920, 1440)
    assert small >= 20 and large >= 2.5 * small                          # ~10 px before on 640 x 480


def test_segments_png(tmp_path):
    mask = np.zeros((H, W), bool)
    yy, xx = np.mgrid[:H, :W]
    mask[(yy - 240) ** 2 + (xx - 320) ** 2 <= 60 ** 2] = True           # a disc inside its box
    segs = [Segment("ball", (250.0, 170.0, 390.0, 310.0), mask), Segment("box only", (20.0, 300.0, 120.0, 400.0))]
    out = draw_segments(grey_image(), segs, tmp_path / "masks.png")
    png = Image.open(tmp_path / "masks.png")
    assert png.format == "PNG" and png.size == (W, H)
    a = np.asarray(png.convert("RGB")).astype(int)
    diff = changed(png)
    assert diff[mask].all()                                              # every mask pixel tinted
    assert tuple(a[180, 320]) == halo_color(PALETTE[0])                  # the mask's edge: halo colour
    # tint = 55% grey + 45% colour
    expect = np.round(0.55 * GREY + 0.45 * np.array(PALETTE[0])).astype(int)
    assert np.abs(a[240, 320] - expect).max() <= 1
    outside = ~mask
    outside[169:311, 249:391] = False                                    # box outline and its halo
    outside[120:175, 249:330] = False                                    # label above the box
    outside[299:401, 19:121] = False                                     # second box
    outside[250:305, 19:140] = False                                     # its label
    assert not diff[outside].any()
    assert not diff[322:378, 40:100].any()                               # no mask: box interior untouched
    assert out.size == (W, H)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 20), (GREY, GREY, GREY))
    exif = Image.Exif()
    exif[0x0112] = 6                                                      # rotate 90: upright 20 x 60
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    out = draw_detections(buf.getvalue(), [Detection("x", (2.0, 30.0, 18.0, 58.0))])
    assert out.size == (20, 60)


def test_unicode_and_empty_labels():
    out = draw_detections(grey_image(), [Detection("猫 café", (50, 50, 200, 200)), Detection("", (300, 300, 400, 400))])
    diff = changed(out)
    assert diff[30:50, 50:100].any()
    assert not diff[280:299, 300:400].any()                              # no label band for ""
    assert diff[300, 300:400].all()


def test_mask_of_the_wrong_size_is_an_error():
    with pytest.raises(ValueError, match="480x640"):
        draw_segments(grey_image(), [Segment("a", (0, 0, 10, 10), np.ones((10, 10), bool))])


def test_input_image_is_not_modified():
    src = Image.fromarray(grey_image())
    draw_segments(src, [Segment("a", (0, 0, 100, 100), np.ones((H, W), bool))])
    assert np.all(np.asarray(src) == GREY)
