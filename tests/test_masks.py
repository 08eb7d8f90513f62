"""engine.masks: the numpy VQ-VAE mask decoder against an independent torch.nn build of it,
and mask_in_box on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from engine.masks import SegDecoder, SegDecoderError, mask_in_box

torch = pytest.importorskip("torch")
nn = torch.nn

D = 512                     # vae-oid.npz: _vq_vae._embedding is [128, 512]


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


def torch_decoder(dim=D):
    """The decoder as big_vision's PyTorch original lays it out (module indices = npz names)."""
    return nn.Sequential(
        nn.Conv2d(dim, 128, 1), nn.ReLU(), ResBlock(128), ResBlock(128),                   # 0, 1, 2, 3
        nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.ReLU(),                  # 4, 5
        nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ReLU(),                   # 6, 7
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),                    # 8, 9
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),                    # 10, 11
        nn.Conv2d(16, 1, 1))                                                              # 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch module, codebook, npz path) with random weights of the real vae-oid shapes."""
    torch.manual_seed(0)
    dec = torch_decoder().eval()
    with torch.no_grad():
        for p in dec.parameters():        # larger than the default init so ReLUs cut both ways
            p.copy_(torch.randn_like(p) * (1.5 / max(1, p[0].numel()) ** 0.5))
    codebook = torch.randn(128, D)
    arrays = {f"decoder.{k}": v.numpy() for k, v in dec.state_dict().items()}
    arrays["_vq_vae._embedding"] = codebook.numpy()
    arrays["encoder.0.weight"] = np.zeros((128, 1, 4, 4), np.float32)   # the real file has an encoder
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **arrays)
    return dec, codebook, path


def torch_decode(dec, codebook, indices):
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    x = codebook[idx.reshape(-1)].reshape(idx.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        return dec(x)[:, 0].numpy()


def test_npz_names_are_the_real_ones(reference):
    with np.load(reference[2]) as z:
        names = set(z.files)
    assert {"_vq_vae._embedding", "decoder.0.weight", "decoder.0.bias", "decoder.2.net.0.weight",
            "decoder.3.net.4.bias", "decoder.4.weight", "decoder.10.bias", "decoder.12.weight"} <= names
    with np.load(reference[2]) as z:
        assert z["decoder.4.weight"].shape == (128, 128, 4, 4)           # ConvTranspose2d [in, out, k, k]
        assert z["decoder.10.weight"].shape == (32, 16, 4, 4)


def test_decode_matches_torch(reference):
    dec, codebook, path = reference
    sd = SegDecoder.from_npz(path)
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 128, size=(6, 16))
    indices[0] = np.arange(16)              # distinct tokens: a misplaced grid cell shows up
    ours = sd.decode(indices)
    theirs = torch_decode(dec, codebook, indices)
    assert ours.shape == (6, 64, 64) and ours.dtype == np.float32
    scale = np.abs(theirs).max()
    assert scale > 0.1                      # the test weights produce a non-trivial output
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, scale)
    single = sd.decode(indices[3])
    assert single.shape == (64, 64)
    np.testing.assert_allclose(single, ours[3], rtol=0, atol=1e-6)


def test_token_grid_is_row_major(reference, tmp_path):
    """Token i sits at grid cell (i // 4, i % 4). With the residual blocks switched off (zero
    3x3 weights: they reach the whole 4x4 grid), only the transposed convs spread a cell: input
    i reaches outputs 2i-1..2i+2, so cell (0, 1) reaches rows 0..30 and columns 1..46 of 64."""
    with np.load(reference[2]) as z:
        arrays = {k: z[k] for k in z.files}
    for k in arrays:
        if k.startswith(("decoder.2.net.", "decoder.3.net.")):
            arrays[k] = np.zeros_like(arrays[k])
    np.savez(tmp_path / "local.npz", **arrays)
    sd = SegDecoder.from_npz(tmp_path / "local.npz")
    a = np.zeros(16, np.int64)
    b = a.copy()
    b[1] = 77
    diff = np.abs(sd.decode(a) - sd.decode(b))
    assert diff[:31, 1:47].max() > 0
    assert diff[31:, :].max() == 0 and diff[:, 47:].max() == 0 and diff[:, 0].max() == 0


def test_shapes_are_read_from_the_arrays(tmp_path):
    """A decoder with another embedding width (D=8) loads and matches torch as well."""
    torch.manual_seed(3)
    dec = torch_decoder(dim=8).eval()
    codebook = torch.randn(128, 8)
    arrays = {f"decoder.{k}": v.numpy() for k, v in dec.state_dict().items()}
    np.savez(tmp_path / "d8.npz", _vq_vae__embedding=codebook.numpy(), **arrays)
    # np.savez keyword names cannot hold "."; rewrite with the dotted name
    with np.load(tmp_path / "d8.npz") as z:
        fixed = {k.replace("_vq_vae__embedding", "_vq_vae._embedding"): z[k] for k in z.files}
    np.savez(tmp_path / "d8.npz", **fixed)
    sd = SegDecoder.from_npz(tmp_path / "d8.npz")
    idx = np.random.default_rng(0).integers(0, 128, size=(2, 16))
    assert np.abs(sd.decode(idx) - torch_decode(dec, codebook, idx)).max() <= 1e-5


@pytest.mark.parametrize("drop, message", [
    ("decoder.6.weight", "'decoder.6.weight' is missing"),
    ("_vq_vae._embedding", "'_vq_vae._embedding' is missing"),
    ("decoder.3.net.2.bias", "'decoder.3.net.2.bias' is missing"),
])
def test_missing_array_is_a_clear_error(reference, tmp_path, drop, message):
    with np.load(reference[2]) as z:
        arrays = {k: z[k] for k in z.files if k != drop}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SegDecoderError, match=message) as e:
        SegDecoder.from_npz(tmp_path / "bad.npz")
    assert "vae-oid.npz" in str(e.value)


@pytest.mark.parametrize("name, shape, message", [
    ("decoder.0.weight", (128, 256, 1, 1), r"expected \(128, 512, 1, 1\)"),      # D mismatch
    ("decoder.2.net.0.weight", (128, 128, 1, 1), r"expected \(128, 128, 3, 3\)"),  # wrong kernel
    ("decoder.8.weight", (32, 64, 4, 4), r"expected \(64, out, 4, 4\)"),          # [out, in] order
    ("decoder.12.bias", (2,), r"expected \(1,\)"),
    ("_vq_vae._embedding", (128, 512, 1), "expected 2 non-empty dimensions"),
])
def test_misshapen_array_is_a_clear_error(reference, tmp_path, name, shape, message):
    with np.load(reference[2]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[name] = np.zeros(shape, np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SegDecoderError, match=message):
        SegDecoder.from_npz(tmp_path / "bad.npz")


def test_unreadable_or_absent_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae-oid.npz"):
        SegDecoder.from_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SegDecoderError, match="not a readable npz"):
        SegDecoder.from_npz(tmp_path / "junk.npz")
    (tmp_path / "notes.txt").write_text("these are notes, not a mask decoder\n")
    with pytest.raises(SegDecoderError, match="not a zip archive|not a readable npz") as err:
        SegDecoder.from_npz(tmp_path / "notes.txt")
    assert "pickle" not in str(err.value) and "vae-oid.npz" in str(err.value)


def test_decode_rejects_bad_indices(reference):
    sd = SegDecoder.from_npz(reference[2])
    with pytest.raises(ValueError, match="0..127"):
        sd.decode(np.full(16, 128))
    with pytest.raises(ValueError, match=r"\[16\]"):
        sd.decode(np.zeros(15, np.int64))


# --------------------------------------------------------------------------- mask_in_box
def test_all_positive_mask_fills_exactly_the_box():
    m = mask_in_box(np.ones((64, 64), np.float32), (100.0, 50.0, 300.0, 170.0), 640, 480)
    assert m.shape == (480, 640) and m.dtype == bool
    expected = np.zeros((480, 640), bool)
    expected[50:170, 100:300] = True
    np.testing.assert_array_equal(m, expected)
    assert m.sum() == 200 * 120


def test_box_corners_are_truncated_like_big_vision():
    # (10.9, 20.2, 30.99, 40.5) -> rows 20..39, columns 10..29 (int() of each corner)
    m = mask_in_box(np.ones((64, 64), np.float32), (10.9, 20.2, 30.99, 40.5), 50, 60)
    assert m.sum() == 20 * 20
    assert m[20, 10] and m[39, 29] and not m[40, 29] and not m[39, 30] and not m[19, 10]


def test_all_negative_and_empty_boxes():
    assert not mask_in_box(-np.ones((64, 64), np.float32), (0, 0, 64, 64), 64, 64).any()
    assert not mask_in_box(np.ones((64, 64), np.float32), (30.0, 10.0, 30.7, 50.0), 64, 64).any()  # < 1 px
    assert not mask_in_box(np.ones((64, 64), np.float32), (70, 70, 90, 90), 64, 64).any()    # off-image


def test_box_is_clamped_to_the_image():
    m = mask_in_box(np.ones((64, 64), np.float32), (-5, 10, 700, 20), 640, 480)
    assert m[10:20].all() and m.sum() == 640 * 10


@pytest.mark.parametrize("box_width, inside", [(64, 32), (128, 64), (32, 16)])
def test_half_mask_resizes_to_half_the_box(box_width, inside):
    """Left half +1, right half -1. Bilinear (PIL, half-pixel centres): upsampled 2x, the
    value crosses 0 exactly between output columns 63 and 64; downsampled 2x (PIL filters
    over 4 input columns with weights 1/8, 3/8, 3/8, 1/8), column 15 sees +1,+1,+1,-1 -> 0.75,
    column 16 sees +1,-1,-1,-1 -> -0.75. So the left `inside` columns of the box are set."""
    logits = np.where(np.arange(64) < 32, 1.0, -1.0).astype(np.float32)[None, :].repeat(64, 0)
    m = mask_in_box(logits, (0, 0, box_width, 10), box_width + 5, 10)
    assert m[:, :inside].all() and not m[:, inside:].any()


def test_upsampling_matches_torch_bilinear():
    """For upsampling, PIL bilinear equals torch's interpolate(bilinear, align_corners=False)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 64)).astype(np.float32)
    m = mask_in_box(logits, (7, 3, 7 + 150, 3 + 100), 200, 120)
    ref = torch.nn.functional.interpolate(torch.from_numpy(logits)[None, None], size=(100, 150),
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    clear = np.abs(ref) > 1e-4                                   # ignore values right at 0
    np.testing.assert_array_equal(m[3:103, 7:157][clear], (ref > 0)[clear])
    assert m.sum() == m[3:103, 7:157].sum()
