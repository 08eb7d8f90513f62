"""Train the small VQ-VAE that turns object masks into PaliGemma's 16 seg tokens, and back.

    python training/train_vqvae.py --out engine/default_model/vae-oid.npz [--steps 800] [--dim 64]

Data: the visible mask of every object of generated training scenes (engine.scenes), cropped
to the object's box and resized to 64x64 (engine.scenes.mask_crop), as PaliGemma does.

Architecture (the decoder is exactly PaliGemma's mask decoder, see PALIGEMMA.md):
    _vq_vae._embedding   [128, D] codebook; token i is grid cell (i // 4, i % 4)
    decoder.0            Conv2d 1x1 D -> 128, ReLU
    decoder.2, .3        residual blocks x + net.4(relu(net.2(relu(net.0(x)))))  (3x3, 3x3, 1x1)
    decoder.4/.6/.8/.10  ConvTranspose2d k4 s2 p1 + ReLU, 128 -> 128 -> 64 -> 32 -> 16, 4 -> 64 px
    decoder.12           Conv2d 1x1 16 -> 1; output ~[-1, 1] (target 2 * mask - 1), mask = out > 0
    encoder.0/2/4/6      Conv2d k4 s2 p1 + ReLU, 1 -> 16 -> 32 -> 64 -> 128, 64 -> 4 px (the mirror)
    encoder.8, .9        residual blocks;  encoder.10  Conv2d 1x1 128 -> D
The npz holds these PyTorch state-dict names (fp32), like vae-oid.npz. The runtime never needs
torch: engine.scenes.MaskTokenizer encodes with numpy, and the engine decodes with numpy.

Training: MSE reconstruction + codebook loss + 0.25 * commitment (straight-through), AdamW;
codes unused for a window are restarted at random encoder outputs. The run ends with the
held-out mean IoU of decode(encode(mask)) vs mask (64x64, and in the image after resizing the
decoded mask into the box); target > 0.9.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import scenes  # noqa: E402

NUM_CODES = 128
CHANNELS = 128


class Residual(nn.Module):
    def __init__(self, ch: int = CHANNELS):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class Codebook(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.randn(NUM_CODES, dim) * 0.1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D, 4, 4] -> code indices [N, 16] (cell i = (i // 4, i % 4))."""
        flat = z.flatten(2).transpose(1, 2)                     # [N, 16, D]
        e = self._embedding
        dist = (flat ** 2).sum(-1, keepdim=True) - 2 * flat @ e.T + (e ** 2).sum(-1)
        return dist.argmin(-1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """indices [N, 16] -> [N, D, 4, 4]."""
        n = idx.shape[0]
        return self._embedding[idx].transpose(1, 2).reshape(n, -1, 4, 4)


class VQVAE(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        c = CHANNELS
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Conv2d(64, c, 4, 2, 1), nn.ReLU(),
            Residual(), Residual(), nn.Conv2d(c, dim, 1))
        self._vq_vae = Codebook(dim)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, c, 1), nn.ReLU(), Residual(), Residual(),
            nn.ConvTranspose2d(c, 128, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 1, 1))

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [N, 64, 64] in {0, 1} -> seg token indices [N, 16]."""
        return self._vq_vae.nearest(self.encoder(2 * masks[:, None] - 1))

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """indices [N, 16] -> decoder output [N, 64, 64] (mask = output > 0)."""
        return self.decoder(self._vq_vae.lookup(idx))[:, 0]

    def forward(self, masks: torch.Tensor):
        z = self.encoder(2 * masks[:, None] - 1)
        idx = self._vq_vae.nearest(z)
        q = self._vq_vae.lookup(idx)
        codebook_loss = F.mse_loss(q, z.detach())
        commit_loss = F.mse_loss(z, q.detach())
        out = self.decoder(z + (q - z).detach())[:, 0]         # straight-through
        return out, idx, codebook_loss, commit_loss


# ---------------------------------------------------------------------------- npz
def save_npz(model: VQVAE, path: str | os.PathLike) -> None:
    """PyTorch-style names as in vae-oid.npz; fp32."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_npz(path: str | os.PathLike) -> VQVAE:
    with np.load(path) as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    model = VQVAE(dim=arrays["_vq_vae._embedding"].shape[1])
    model.load_state_dict(arrays)
    return model.eval()


def mask_to_tokens(model: VQVAE, masks: np.ndarray) -> np.ndarray:
    """masks [N, 64, 64] {0, 1} -> int64 [N, 16] seg token indices (torch twin of
    engine.scenes.MaskTokenizer.encode)."""
    with torch.no_grad():
        return model.encode(torch.as_tensor(masks, dtype=torch.float32)).numpy()


def tokens_to_masks(model: VQVAE, idx: np.ndarray) -> np.ndarray:
    """int [N, 16] -> bool [N, 64, 64]."""
    with torch.no_grad():
        return (model.decode(torch.as_tensor(idx, dtype=torch.long)) > 0).numpy()


# ---------------------------------------------------------------------------- data
def collect_masks(seeds, size: int = scenes.SIZE) -> tuple[np.ndarray, list]:
    """64x64 crops of every object of the scenes of `seeds`, plus (scene-size mask, box)."""
    crops, full = [], []
    for s in seeds:
        for o in scenes.make_scene(s, size).objects:
            crops.append(scenes.mask_crop(o.mask, o.box))
            full.append((o.mask, o.box))
    return np.stack(crops), full


def paste_mask(mask64: np.ndarray, box, size: int) -> np.ndarray:
    """A decoded 64x64 mask resized into `box` of a size x size image (bilinear, > 0.5)."""
    from PIL import Image
    x0, y0, x1, y1 = box
    im = Image.fromarray((mask64 * 255).astype(np.uint8), "L").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    out = np.zeros((size, size), dtype=bool)
    out[y0:y1, x0:x1] = np.asarray(im) > 127
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def evaluate(model: VQVAE, crops: np.ndarray, full: list) -> tuple[float, float, int]:
    """(mean IoU at 64x64, mean IoU in the image, codes used) of decode(encode(mask))."""
    model.eval()
    idx = mask_to_tokens(model, crops)
    dec = tokens_to_masks(model, idx)
    iou64 = np.mean([iou(d, c > 0.5) for d, c in zip(dec, crops)])
    size = full[0][0].shape[0]
    iou_img = np.mean([iou(paste_mask(d, box, size), m) for d, (m, box) in zip(dec, full)])
    model.train()
    return float(iou64), float(iou_img), len(np.unique(idx))


# ---------------------------------------------------------------------------- training
def train(out: str, steps: int, dim: int, batch: int, lr: float, n_train_scenes: int, seed: int,
          threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    train_crops, _ = collect_masks(scenes.train_seed(i) for i in range(n_train_scenes))
    eval_crops, eval_full = collect_masks(scenes.eval_seeds(400, seed=7))
    print(f"data: {len(train_crops)} train masks, {len(eval_crops)} held-out masks "
          f"({time.time() - t0:.0f}s)", flush=True)

    model = VQVAE(dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    data = torch.from_numpy(train_crops)
    g = torch.Generator().manual_seed(seed)
    usage = torch.zeros(NUM_CODES)
    t1 = time.time()
    for step in range(1, steps + 1):
        x = data[torch.randint(len(data), (batch,), generator=g)]
        if torch.rand((), generator=g) < 0.5:               # the shapes are symmetric: flips are free data
            x = x.flip(-1)
        recon, idx, cb, commit = model(x)
        rec = F.mse_loss(recon, 2 * x - 1)
        loss = rec + cb + 0.25 * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(idx.flatten(), minlength=NUM_CODES)
        if step % 100 == 0 and step < 0.8 * steps:          # restart dead codes at encoder outputs
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = model.encoder(2 * x[:, None] - 1).flatten(2).transpose(1, 2).reshape(-1, dim)
                    pick = z[torch.randint(len(z), (len(dead),), generator=g)]
                    model._vq_vae._embedding[dead] = pick + 0.01 * torch.randn(pick.shape, generator=g)
            usage.zero_()
        if step % 250 == 0 or step == steps:
            msg = f"step {step}/{steps} loss {loss.item():.4f} rec {rec.item():.4f} ({(time.time() - t1) / step * 1000:.0f} ms/step)"
            if step % 1000 == 0 or step == steps:
                i64, iimg, used = evaluate(model, eval_crops, eval_full)
                msg += f" | held-out IoU {i64:.4f} (64x64) {iimg:.4f} (image), {used} codes used"
            print(msg, flush=True)

    save_npz(model, out)
    i64, iimg, used = evaluate(model, eval_crops, eval_full)
    # The numpy encoder of the runtime must give the same tokens as torch.
    np_idx = scenes.MaskTokenizer.from_npz(out).encode(eval_crops[:64])
    agree = float((np_idx == mask_to_tokens(model, eval_crops[:64])).mean())
    result = dict(iou64=i64, iou_image=iimg, codes_used=used, numpy_torch_agreement=agree,
                  seconds=time.time() - t0, bytes=os.path.getsize(out))
    print(f"saved {out} ({result['bytes'] / 1e6:.1f} MB): held-out mean IoU {i64:.4f} at 64x64, "
          f"{iimg:.4f} in the image; {used} codes used; numpy/torch token agreement {agree:.4f}; "
          f"{result['seconds']:.0f}s", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output npz (e.g. engine/default_model/vae-oid.npz)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--dim", type=int, default=64, help="codebook entry size D (PaliGemma: 512)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--scenes", type=int, default=3000, help="training scenes to take masks from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    train(args.out, args.steps, args.dim, args.batch, args.lr, args.scenes, args.seed, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
