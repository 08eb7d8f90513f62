"""engine.draw: overlays are images of the original size that change pixels on boxes, labels
and masks, and leave the rest of the image alone."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.draw import PALETTE, draw_detections, draw_segments, label_colors
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
    # inside the boxes (away from the edges) and far outside: untouched
    assert not diff[170:250, 120:280].any() and not diff[320:440, 420:580].any()
    assert not diff[:100].any() and not diff[:, 610:].any() and not diff[:, :100].any()
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
    # tint = 55% grey + 45% colour
    expect = np.round(0.55 * GREY + 0.45 * np.array(PALETTE[0])).astype(int)
    assert np.abs(a[240, 320] - expect).max() <= 1
    outside = ~mask
    outside[170:310, 250:390] = False                                    # box outline
    outside[130:175, 250:330] = False                                    # label above the box
    outside[300:400, 20:120] = False                                     # second box
    outside[260:305, 20:120] = False                                     # its label
    assert not diff[outside].any()
    assert not diff[320:380, 40:100].any()                               # no mask: box interior untouched
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
