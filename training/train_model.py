"""Train the project's small PaliGemma on generated scenes (CPU, torch + transformers).

    python training/train_model.py --out engine/default_model --vae /tmp/vae-oid.npz

The defaults are the recipe of the shipped model (54 training minutes on 2 threads, ~55 in all).

The model is a real HF `PaliGemmaForConditionalGeneration` (PaliGemma 2 layout: Gemma 2
decoder with the real softcaps, SigLIP vision tower with the real 14 px patches), small:
    vision  112 px -> 8x8 = 64 image tokens, width 160, 3 layers, 4 heads, MLP 640
    text    Gemma 2, width 192, 3 layers, 4 heads / 2 kv heads, head_dim 48, MLP 768
    vocab   the compact tokenizer (engine.tokenizer.build_tokenizer, real_layout=False) trained
            with the task texts: 384 base pieces + 1024 <loc> + 128 <seg> = 1536 pieces,
            <image> = 1536, vocab 1600 (rounded to 64)
All sizes are flags. Training data is generated on the fly (engine.scenes, 224 px scenes,
resized to the model's resolution by engine.processor exactly as at inference time); each
sample is one (image, prefix, suffix) of a task drawn with TASK_WEIGHTS. PaliGemma's prefix-LM
recipe: input = <image>*N <bos> prefix "\\n" suffix <eos>, token_type_ids 0 on the prefix
block and 1 on the suffix, loss only on the suffix (and its <eos>).

Loc token embeddings start as a smooth (sinusoidal, randomly rotated) function of the bin
index instead of independent noise, so neighbouring bins start out similar and the tied LM
head learns coordinates from far fewer examples; the SigLIP embeddings start with colour
channels and a 2D sin-cos position table (init_vision_embeddings). A curriculum
(`--curriculum`) starts on 1-shape scenes, then at most 2 shapes: without it the model stays
at the language prior for 800+ steps (see training/README.md).

Speed (measured on the idle 2-core machine, batch 32, ~130 tokens): 0.57 s per step on 2 threads
with bf16 autocast (a quarter of it making the data), 0.37 s per vision-stage step of 64 images;
another job on the machine makes both up to 2x slower, and a time budget then buys fewer steps.

Schedule: AdamW, linear warmup, cosine decay to 10% over the wall-clock budget (`--minutes`,
training time only; the clock stops during the periodic evals), or over `--steps` when given
(then the run is the same whatever the machine's speed). Every `--eval-minutes`, greedy
decoding on held-out scenes (engine.scenes.eval_set) reports caption exact match, count
accuracy, detect box IoU, no-match accuracy, segment mask IoU and OCR exact match.

Output (`--out`): config.json, model.safetensors (`--save-dtype`, bf16 by default),
tokenizer.model, tokenizer_config.json, special_tokens_map.json, preprocessor_config.json,
generation_config.json, vae-oid.npz (the VQ-VAE of training/train_vqvae.py, trained first when
`--vae` is not given) and training_info.json (arguments, step count, final eval). The
directory loads with transformers and with engine.checkpoint.Checkpoint.open (checked at the end).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import scenes  # noqa: E402
from engine.eval import box_iou  # noqa: E402
from engine.processor import Processor  # noqa: E402
from engine.tokenizer import Tokenizer, build_tokenizer  # noqa: E402
import train_vqvae  # noqa: E402

TASK_WEIGHTS = {"caption": 0.25, "answer": 0.20, "detect": 0.30, "segment": 0.20, "ocr": 0.05}
EXAMPLE_SEED = scenes.eval_seeds(7, seed=7)[6]     # engine/default_model/example.png
MAX_NEW_TOKENS = 80                     # 3 segment instances are ~75 tokens


# ================================================================================ model
def hf_config(args, sp_vocab: int):
    from transformers import PaliGemmaConfig
    vocab = -(-(sp_vocab + 1) // 64) * 64          # + <image>, rounded up to 64 (engine.synth.padded_vocab)
    text = dict(model_type="gemma2", vocab_size=vocab, hidden_size=args.text_width,
                intermediate_size=4 * args.text_width, num_hidden_layers=args.text_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=args.text_width // 4,
                query_pre_attn_scalar=args.text_width // 4, sliding_window=4096,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                max_position_embeddings=1024, hidden_activation="gelu_pytorch_tanh")
    vision = dict(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                  num_hidden_layers=args.vision_layers, num_attention_heads=4,
                  image_size=args.image_size, patch_size=14, vision_use_head=False)
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=sp_vocab,
                           vocab_size=vocab, projection_dim=args.text_width, hidden_size=args.text_width,
                           pad_token_id=0, bos_token_id=2, eos_token_id=1)


def init_loc_embeddings(model, tok: Tokenizer, seed: int) -> None:
    """Loc rows of the (tied) embedding: sin/cos of the bin index at geometric periods 8..4096,
    randomly rotated, scaled to the norm of the other rows."""
    emb = model.get_input_embeddings().weight
    d = emb.shape[1]
    g = torch.Generator().manual_seed(seed)
    periods = 8.0 * (512.0 ** (torch.arange(d // 2) / max(d // 2 - 1, 1)))
    angle = 2 * math.pi * torch.arange(scenes.NUM_LOC)[:, None] / periods[None, :]
    feats = torch.cat([angle.sin(), angle.cos()], dim=1)                # [1024, d]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    feats = feats @ q
    with torch.no_grad():
        target = emb.norm(dim=1).mean()
        ids = torch.tensor([tok.loc_id(i) for i in range(scenes.NUM_LOC)])
        emb[ids] = feats / feats.norm(dim=1, keepdim=True) * target


def init_vision_embeddings(model) -> None:
    """SigLIP embeddings that see colour and position from step 0: the first 12 patch-conv
    channels average R, G, B over the 4 quadrants of the patch (the others stay random), and
    the position embedding is the 2D sin-cos table of MAE / SigLIP-style ViTs (scaled 0.5)."""
    vt = model.model.vision_tower
    emb = getattr(vt, "vision_model", vt).embeddings
    w = emb.patch_embedding.weight                                     # [D, 3, P, P]
    d, _, p, _ = w.shape
    h = p // 2
    with torch.no_grad():
        for q in range(4):
            for ch in range(3):
                w[3 * q + ch].zero_()
                w[3 * q + ch, ch, (q // 2) * h:(q // 2 + 1) * h, (q % 2) * h:(q % 2 + 1) * h] = 1.0 / (h * h)
        emb.patch_embedding.bias[:12].zero_()
        g = int(round(emb.position_embedding.weight.shape[0] ** 0.5))
        quarter = d // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        ay, ax = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
        table = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)   # [g*g, 4 * quarter]
        pos = emb.position_embedding.weight
        pos.zero_()
        pos[:, :table.shape[1]] = 0.5 * table


# ================================================================================ patch supervision
AUX_OUT = 1 + len(scenes.COLOUR_NAMES) + 1 + len(scenes.KINDS) + 1 + 1 + 4   # colour, kind, centre, digits, box
N_PAIRS = len(scenes.COLOUR_NAMES) * len(scenes.KINDS)
MAX_COUNT = scenes.MAX_SHAPES


class AuxHeads(torch.nn.Module):
    """Training-only heads on the vision tower's output (not part of the checkpoint):
    `patch` reads each patch, `scene` reads the mean of all patches."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = torch.nn.Linear(width, AUX_OUT)
        self.scene = torch.nn.Linear(width, N_PAIRS * (MAX_COUNT + 1))


class QueryHead(torch.nn.Linear):
    """Training-only: decoder hidden state of an image position -> "holds the queried object"."""


def patch_targets(scene: scenes.Scene, grid: int) -> dict[str, np.ndarray]:
    """Dense per-patch targets of a scene on the model's grid x grid patches: the object that
    covers most of each patch (>= 1/4 of it; else background), its colour and kind (0 =
    background), its box (y0, x0, y1, x1) / size, whether the patch holds the box centre, and
    whether it holds digit ink (the digit box). Coverage = area average of the visible masks."""
    size = scene.size
    def cover(mask: np.ndarray) -> np.ndarray:
        im = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((grid, grid), Image.Resampling.BOX)
        return np.asarray(im, dtype=np.float32) / 255.0
    objs = scene.objects
    cov = np.stack([cover(o.mask) for o in objs])                       # [n, g, g]
    best, best_v = cov.argmax(0), cov.max(0)
    on = best_v >= 0.25
    colour = np.where(on, np.array([scenes.COLOUR_NAMES.index(o.colour) + 1 for o in objs])[best], 0)
    kind = np.where(on, np.array([scenes.KINDS.index(o.kind) + 1 for o in objs])[best], 0)
    boxes = np.array([(o.box[1], o.box[0], o.box[3], o.box[2]) for o in objs], dtype=np.float32) / size
    centre = np.zeros((grid, grid), dtype=np.float32)
    for o in objs:
        cy, cx = (o.box[1] + o.box[3]) / 2 / size, (o.box[0] + o.box[2]) / 2 / size
        centre[min(int(cy * grid), grid - 1), min(int(cx * grid), grid - 1)] = 1.0
    digits = np.zeros((size, size), dtype=bool)
    if scene.digits_box is not None:
        x0, y0, x1, y1 = scene.digits_box
        digits[y0:y1, x0:x1] = True
    pairs = np.zeros(N_PAIRS, dtype=np.int64)
    for o in objs:
        pairs[scenes.COLOUR_NAMES.index(o.colour) * len(scenes.KINDS) + scenes.KINDS.index(o.kind)] += 1
    return dict(pairs=np.minimum(pairs, MAX_COUNT), colour=colour.reshape(-1), kind=kind.reshape(-1), on=on.reshape(-1).astype(np.float32),
                box=boxes[best].reshape(-1, 4), centre=centre.reshape(-1),
                digits=(cover(digits) >= 0.25).reshape(-1).astype(np.float32))


def prompt_objects(scene: scenes.Scene, prefix: str) -> list[scenes.SceneObject] | None:
    """The objects a prompt is about: the queried (colour, kind) of detect / segment, the
    objects a question counts or names (all of them, one kind, one colour, one pair), every
    object for a caption; None when the prompt is not about objects (ocr)."""
    words = prefix.split(" ")
    objs = scene.objects
    if words[0] in ("detect", "segment") and len(words) == 3:
        return scenes.instances(scene, words[1], words[2])
    if words[0] == "caption":
        return list(objs)
    if words[0] != "answer":
        return None
    q = " ".join(words[2:])
    if q == "how many shapes are there":
        return list(objs)
    for pattern, field in ((r"how many (\w+)s are there", "kind"), (r"what colour is the (\w+)", "kind"),
                           (r"how many (\w+) shapes are there", "colour"), (r"which shape is (\w+)", "colour")):
        m = re.fullmatch(pattern, q)
        if m:
            return [o for o in objs if getattr(o, field) == m.group(1)]
    m = re.fullmatch(r"is there an? (\w+) (\w+)", q)
    if m:
        return scenes.instances(scene, m.group(1), m.group(2))
    raise ValueError(f"prompt_objects: unknown prompt {prefix!r}")


def query_patches(scene: scenes.Scene, prefix: str, grid: int) -> tuple[np.ndarray, np.float32]:
    """float [grid * grid], 1 on the patches >= 1/4 covered by an object the prompt is about
    (prompt_objects), and 1.0 as "has a query"; zeros and 0.0 for prompts about no object."""
    objs = prompt_objects(scene, prefix)
    if objs is None:
        return np.zeros(grid * grid, dtype=np.float32), np.float32(0.0)
    if not objs:
        return np.zeros(grid * grid, dtype=np.float32), np.float32(1.0)
    union = np.any([o.mask for o in objs], axis=0).astype(np.uint8) * 255
    cov = np.asarray(Image.fromarray(union, "L").resize((grid, grid), Image.Resampling.BOX), dtype=np.float32) / 255
    return (cov >= 0.25).reshape(-1).astype(np.float32), np.float32(1.0)


def query_loss(head: torch.nn.Linear, hidden: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Routing supervision: the decoder's image positions after layer `--query-layer` [B, N, D]
    say whether their patch holds the object the prompt asks for. In the prefix-LM mask image
    tokens see the prompt, so they can compute this; the loc tokens then only need to find
    the flagged patches instead of matching words to patches themselves."""
    n = t["query"].shape[1]
    logit = head(hidden[:, :n].float()).squeeze(-1)                      # [B, N]
    bce = F.binary_cross_entropy_with_logits(logit, t["query"], reduction="none").mean(1)
    return (bce * t["has_query"]).sum() / t["has_query"].sum().clamp(min=1)


def count_loss(head: torch.nn.Linear, hidden: torch.Tensor, token_type_ids: torch.Tensor,
               pairs: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """Scene summary in the decoder: its state at the last prefix token (the "\\n" from which the
    answer starts), after layer `--count-layer`, predicts the count of every (colour, kind)
    pair [B, N_PAIRS]. Captions and answers are functions of these counts; without this the
    decoder read them less reliably than a linear probe of the vision features does.
    `use` [B] (0 / 1) picks the samples it applies to."""
    last = (token_type_ids == 0).sum(1) - 1                             # [B]; image + prefix are type 0
    h = hidden[torch.arange(hidden.shape[0]), last].float()              # [B, D]
    logits = head(h).view(-1, N_PAIRS, MAX_COUNT + 1)
    ce = F.cross_entropy(logits.reshape(-1, MAX_COUNT + 1), pairs.reshape(-1), reduction="none")
    return (ce.view(-1, N_PAIRS).mean(1) * use).sum() / use.sum().clamp(min=1)


def patch_loss(heads: AuxHeads, feats: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Auxiliary loss of the vision tower's output [B, N, D] against patch_targets: it teaches
    the patches what and where their object is long before the language loss can, and makes
    the mean over patches (what a still-uniform attention of the decoder reads) hold the count
    of every (colour, kind) pair."""
    feats = feats.float()
    out = heads.patch(feats)                                            # [B, N, AUX_OUT]
    counts = heads.scene(feats.mean(1)).view(-1, N_PAIRS, MAX_COUNT + 1)  # [B, pairs, 0..MAX_COUNT]
    scene_loss = F.cross_entropy(counts.reshape(-1, MAX_COUNT + 1), t["pairs"].reshape(-1))
    nc, nk = 1 + len(scenes.COLOUR_NAMES), 1 + len(scenes.KINDS)
    colour, kind = out[..., :nc], out[..., nc:nc + nk]
    centre, digits, box = out[..., nc + nk], out[..., nc + nk + 1], out[..., nc + nk + 2:]
    loss = F.cross_entropy(colour.reshape(-1, nc), t["colour"].reshape(-1))
    loss = loss + F.cross_entropy(kind.reshape(-1, nk), t["kind"].reshape(-1))
    loss = loss + F.binary_cross_entropy_with_logits(centre, t["centre"])
    loss = loss + F.binary_cross_entropy_with_logits(digits, t["digits"])
    l1 = ((box.sigmoid() - t["box"]).abs().sum(-1) * t["on"]).sum() / t["on"].sum().clamp(min=1)
    return loss + 10.0 * l1 + 3.0 * scene_loss


def pretrain_vision(model, head: torch.nn.Linear, proc: Processor, args, log=print) -> int:
    """Stage 1: the vision tower alone on the patch targets (PaliGemma starts from a pretrained
    SigLIP; this is ours). Vision-only steps are ~5x cheaper than full steps, and the decoder
    then learns to read features that already say what and where each object is."""
    vt = model.model.vision_tower
    params = list(vt.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    grid = int(round(proc.num_image_tokens ** 0.5))
    budget, spent, step, acc = args.vision_minutes * 60.0, 0.0, 0, 0.0
    while spent < budget:
        t0 = time.time()
        progress = spent / budget
        rng_base = 10**9 - 1 - step * args.vision_batch        # seeds disjoint from stage 2's stream
        scs = [scenes.make_scene(scenes.train_seed(rng_base - i), max_shapes=scenes.MAX_SHAPES)
               for i in range(args.vision_batch)]
        pix = torch.from_numpy(np.stack([proc.preprocess(sc.image) for sc in scs]))
        tg = [patch_targets(sc, grid) for sc in scs]
        t = {k: torch.from_numpy(np.stack([x[k] for x in tg])) for k in tg[0]}
        lr = args.vision_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            feats = vt(pixel_values=pix).last_hidden_state
        loss = patch_loss(head, feats, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc += loss.item()
        spent += time.time() - t0
        if step % args.log_every == 0:
            with torch.no_grad():
                out = head.patch(feats.float())
                nc = 1 + len(scenes.COLOUR_NAMES)
                col_acc = (out[..., :nc].argmax(-1) == t["colour"]).float().mean().item()
            log(f"vision step {step} t {spent / 60:.1f}min patch loss {acc / args.log_every:.3f} "
                f"colour acc {col_acc:.3f} {spent / step:.2f}s/step")
            acc = 0.0
    return step


# ================================================================================ data
class TorchMaskEncoder:
    """engine.scenes.MaskTokenizer's `encode` with the torch VQ-VAE: the same tokens (checked by
    train_vqvae.py), ~10x faster than numpy, which matters in the data loop."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, masks: np.ndarray) -> np.ndarray:
        return train_vqvae.mask_to_tokens(self.vae, masks)


class Batches:
    """Deterministic stream of training batches: sample k of the run uses scene
    train_seed(seed * 10**8 + k) and an rng seeded by (seed, k)."""

    def __init__(self, proc: Processor, encoder, seed: int, tasks=tuple(TASK_WEIGHTS), absent_rate: float = 0.1,
                 query_tasks=("detect", "segment")):
        self.proc, self.encoder, self.seed, self.absent_rate = proc, encoder, seed, absent_rate
        self.query_tasks = tuple(query_tasks)
        self.grid = int(round(proc.num_image_tokens ** 0.5))
        self.k = 0
        self.tasks = list(tasks)
        w = np.array([TASK_WEIGHTS[t] for t in self.tasks])
        self.p = w / w.sum()

    def sample(self, max_shapes: int = scenes.MAX_SHAPES) -> dict:
        k, self.k = self.k, self.k + 1
        rng = np.random.Generator(np.random.PCG64([self.seed, k]))
        scene = scenes.make_scene(scenes.train_seed(self.seed * 10**8 + k), max_shapes=max_shapes)
        task = self.tasks[rng.choice(len(self.tasks), p=self.p)]
        examples = scenes.task_examples(scene, rng, self.encoder if task == "segment" else None)
        pool = [e for e in examples if scenes.task_of(e[0]) == task]
        if task in ("detect", "segment"):     # the last one is the absent pair (empty target)
            use_absent = rng.random() < self.absent_rate
            pool = pool[-1:] if use_absent else pool[:-1]
        prefix, suffix = pool[rng.integers(len(pool))]
        enc = self.proc(scene.image, prefix, suffix)
        enc["task"] = task
        enc["patch"] = patch_targets(scene, self.grid)
        if task in self.query_tasks:
            enc["patch"]["query"], enc["patch"]["has_query"] = query_patches(scene, prefix, self.grid)
        else:
            enc["patch"]["query"], enc["patch"]["has_query"] = np.zeros(self.grid ** 2, np.float32), np.float32(0.0)
        return enc

    def batch(self, n: int, max_shapes: int = scenes.MAX_SHAPES) -> dict:
        return collate([self.sample(max_shapes) for _ in range(n)])


def curriculum(progress: float, args) -> int:
    """Most shapes per scene at this point of the run: 1 for the first `--curriculum` fraction,
    2 for the next one, then all. Single-shape scenes make the image->text grounding easy to
    find; without them the model sits at the language prior for 1000+ steps."""
    if progress < args.curriculum:
        return 1
    if progress < 2 * args.curriculum:
        return 2
    return scenes.MAX_SHAPES


def collate(samples: list[dict]) -> dict:
    """Right-pad to the longest sample: pad id 0, attention_mask 0, labels -100."""
    t = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), t, dtype=torch.long)
    types = torch.ones(len(samples), t, dtype=torch.long)
    attn = torch.zeros(len(samples), t, dtype=torch.long)
    labels = torch.full((len(samples), t), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.from_numpy(s["input_ids"])
        types[i, :n] = torch.from_numpy(s["token_type_ids"])
        attn[i, :n] = 1
        suffix = torch.from_numpy(s["token_type_ids"]) == 1
        labels[i, :n] = torch.where(suffix, ids[i, :n], torch.tensor(-100))
    return dict(input_ids=ids, token_type_ids=types, attention_mask=attn, labels=labels,
                pixel_values=torch.from_numpy(np.concatenate([s["pixel_values"] for s in samples])),
                tasks=[s["task"] for s in samples],
                patch={k: torch.from_numpy(np.stack([s["patch"][k] for s in samples])) for k in samples[0]["patch"]})


def loss_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: (sum over each sample's suffix tokens [B], token counts [B])."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=-100, reduction="none").view(target.shape)
    return ce.sum(1), (target != -100).sum(1)


# ================================================================================ eval
_INSTANCE = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)\s*([^;<]*)")


def parse_instances(text: str, size: int) -> list[tuple[tuple[float, float, float, float], list[int], str]]:
    """[(box (x0, y0, x1, y1) pixels, seg indices, label)] of a detect / segment output."""
    out = []
    for m in _INSTANCE.finditer(text):
        y0, x0, y1, x1 = (int(v) / 1024 * size for v in re.findall(r"<loc(\d{4})>", m.group(1)))
        out.append(((x0, y0, x1, y1), [int(v) for v in re.findall(r"<seg(\d{3})>", m.group(2))], m.group(3).strip()))
    return out


@torch.no_grad()
def greedy(model, proc: Processor, image, prefix: str, max_new: int = MAX_NEW_TOKENS) -> str:
    enc = proc(image, prefix)
    ids = torch.from_numpy(enc["input_ids"])[None]
    out = model.generate(input_ids=ids, token_type_ids=torch.from_numpy(enc["token_type_ids"])[None],
                         attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(enc["pixel_values"]),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=1, pad_token_id=0)
    return proc.decode(out[0, ids.shape[1]:].tolist())


def quick_eval(model, proc: Processor, vae, eval_scenes: list[scenes.Scene], seed: int = 0) -> dict:
    """Greedy decoding on held-out scenes; one of each task per scene."""
    was_training = model.training
    model.eval()
    rng = np.random.Generator(np.random.PCG64([seed, 12345]))
    m = {k: [] for k in ("caption", "count", "detect_iou", "no_match", "segment_iou", "ocr")}
    examples = []
    for sc in eval_scenes:
        size = sc.size
        m["caption"].append(greedy(model, proc, sc.image, "caption en") == scenes.caption(sc))
        m["count"].append(greedy(model, proc, sc.image, "answer en how many shapes are there") == str(len(sc.objects)))
        o = sc.objects[rng.integers(len(sc.objects))]
        gt = scenes.instances(sc, o.colour, o.kind)
        pred = greedy(model, proc, sc.image, f"detect {o.label}")
        boxes = [b for b, _, _ in parse_instances(pred, size)]
        m["detect_iou"].append(np.mean([max([box_iou(g.box, b) for b in boxes], default=0.0) for g in gt]))
        c, k = scenes.absent_pair(sc, rng)
        m["no_match"].append(greedy(model, proc, sc.image, f"detect {c} {k}") == "")
        if vae is not None:
            pred_seg = greedy(model, proc, sc.image, f"segment {o.label}")
            mask = np.zeros((size, size), dtype=bool)
            for (x0, y0, x1, y1), seg, _ in parse_instances(pred_seg, size):
                bx = tuple(int(round(v)) for v in (x0, y0, x1, y1))
                if len(seg) == 16 and bx[2] > bx[0] and bx[3] > bx[1]:
                    mask |= train_vqvae.paste_mask(train_vqvae.tokens_to_masks(vae, np.array([seg]))[0], bx, size)
            m["segment_iou"].append(train_vqvae.iou(mask, np.any([g.mask for g in gt], axis=0)))
        if sc.digits:
            m["ocr"].append(greedy(model, proc, sc.image, "ocr") == sc.digits)
        if len(examples) < 3:
            examples.append(f"    [{sc.seed}] caption: {greedy(model, proc, sc.image, 'caption en')!r} "
                            f"(truth {scenes.caption(sc)!r}); detect {o.label}: {pred!r} (truth "
                            f"{scenes.detect_target(sc, o.colour, o.kind)!r})")
    model.train(was_training)
    res = {k: float(np.mean(v)) for k, v in m.items() if v}
    res["examples"] = examples
    return res


def format_eval(res: dict) -> str:
    keys = ("caption", "count", "detect_iou", "no_match", "segment_iou", "ocr")
    return " ".join(f"{k} {res[k]:.3f}" for k in keys if k in res) + "\n" + "\n".join(res["examples"])


# ================================================================================ save
def save_checkpoint(model, out: Path, tok_path: Path, vae_path: Path, dtype: str, info: dict) -> None:
    from engine.config import PaliGemmaConfig as EngineConfig
    from engine.synth import preprocessor_config, tokenizer_configs
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    to_save = copy.deepcopy(model).to(torch_dtype)
    to_save.generation_config.eos_token_id, to_save.generation_config.pad_token_id = 1, 0
    to_save.save_pretrained(out, safe_serialization=True)
    os.chmod(out / "model.safetensors", 0o644)       # save_pretrained leaves it 0600
    cfg = EngineConfig.from_file(out / "config.json")
    tok_cfg, special_map = tokenizer_configs(cfg)
    for name, obj in (("tokenizer_config.json", tok_cfg), ("special_tokens_map.json", special_map),
                      ("preprocessor_config.json", preprocessor_config(cfg)), ("training_info.json", info)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    if tok_path.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok_path, out / "tokenizer.model")
    if vae_path.resolve() != (out / "vae-oid.npz").resolve():
        with np.load(vae_path) as z:        # fp16 halves it (3.7 MB); the engine reads it as float32
            arrays = {k: z[k].astype(np.float16) if z[k].dtype == np.float32 else z[k] for k in z.files}
        np.savez(out / "vae-oid.npz", **arrays)
    # The demo's example: a held-out scene (3 shapes and digits) that training never sees.
    scenes.make_scene(EXAMPLE_SEED).image.save(out / "example.png")


def verify_checkpoint(out: Path) -> None:
    """The directory must open with the engine and with transformers."""
    from transformers import PaliGemmaForConditionalGeneration
    from engine.checkpoint import Checkpoint
    with Checkpoint.open(out) as ck:
        n = sum(int(np.prod(ck.tensors[k].shape)) for k in ck.names)
        print(f"engine Checkpoint.open: ok ({n / 1e6:.2f}M parameters, {ck.dtype})", flush=True)
    PaliGemmaForConditionalGeneration.from_pretrained(out)
    print("transformers from_pretrained: ok", flush=True)


# ================================================================================ main
def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write (e.g. engine/default_model)")
    p.add_argument("--minutes", type=float, default=54.0, help="training time budget (evals excluded)")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of --minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--image-size", type=int, default=112, help="model resolution (multiple of 14)")
    p.add_argument("--vision-width", type=int, default=160)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-width", type=int, default=192)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="fp32 forward pass (default: bf16 autocast, 1.6x faster on AVX512-BF16 CPUs)")
    p.add_argument("--curriculum", type=float, default=0.15,
                   help="fraction of the run on 1-shape scenes, then the same on <= 2 shapes (0: off)")
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the per-patch vision loss (patch_targets; 0: off)")
    p.add_argument("--vision-minutes", type=float, default=8.0,
                   help="stage 1: vision tower alone on the patch targets for this long (counted in --minutes)")
    p.add_argument("--vision-batch", type=int, default=64)
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--query-weight", type=float, default=1.0,
                   help="weight of the routing loss (query_loss) on prompts about objects (0: off)")
    p.add_argument("--query-tasks", default="caption,answer,detect,segment",
                   help="tasks whose samples get the routing loss (session-2 model: detect,segment)")
    p.add_argument("--count-weight", type=float, default=1.0,
                   help="weight of the decoder's scene-count loss at the last prefix token (count_loss; 0: off)")
    p.add_argument("--count-layer", type=int, default=2, help="decoder layer whose output count_loss reads")
    p.add_argument("--count-tasks", default="caption,answer", help="tasks whose samples get count_loss")
    p.add_argument("--query-layer", type=int, default=1,
                   help="decoder layer whose output at the image positions flags the queried object")
    p.add_argument("--absent-rate", type=float, default=0.01,
                   help="share of detect / segment samples asking for an absent object (empty target)")
    p.add_argument("--tasks", default=",".join(TASK_WEIGHTS), help="train on these tasks only (experiments)")
    p.add_argument("--plain-init", action="store_true",
                   help="transformers' random init only (no loc / colour / position embedding init)")
    p.add_argument("--vae", default=None, help="VQ-VAE npz (train_vqvae.py); trained first when absent")
    p.add_argument("--eval-minutes", type=float, default=10.0)
    p.add_argument("--eval-scenes", type=int, default=24)
    p.add_argument("--final-eval-scenes", type=int, default=64)
    p.add_argument("--save-dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)

    from transformers import PaliGemmaForConditionalGeneration
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="pg_train_"))
    t_start = time.time()

    # VQ-VAE (seg tokens) and tokenizer
    vae_path = Path(args.vae) if args.vae else work / "vae-oid.npz"
    if not args.vae:
        print("training the VQ-VAE first (training/train_vqvae.py defaults)", flush=True)
        train_vqvae.train(str(vae_path), steps=800, dim=64, batch=32, lr=2e-3, n_train_scenes=3000,
                          seed=args.seed, threads=args.threads)
    vae = train_vqvae.load_npz(vae_path)
    encoder = TorchMaskEncoder(vae)
    tok_path = work / "tokenizer.model"
    sp_vocab = build_tokenizer(tok_path, real_layout=False, corpus=scenes.corpus(400) * 3)
    tok = Tokenizer(tok_path)
    proc = Processor(tok, image_size=args.image_size, num_image_tokens=(args.image_size // 14) ** 2)
    print(f"tokenizer: {sp_vocab} pieces; 'caption en' -> {len(tok.encode('caption en'))} tokens, "
          f"'a red circle and two blue squares' -> {len(tok.encode('a red circle and two blue squares'))}", flush=True)

    # model
    model = PaliGemmaForConditionalGeneration(hf_config(args, sp_vocab))
    model.set_attn_implementation("eager")        # Gemma 2 (softcaps) has no SDPA path in transformers
    if not args.plain_init:
        init_loc_embeddings(model, tok, args.seed)
        init_vision_embeddings(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {(args.image_size // 14) ** 2} image tokens, "
          f"vocab {model.config.text_config.vocab_size}", flush=True)
    # Patch supervision: a linear head on the vision tower's output, used in training only
    # (not part of the checkpoint); a forward hook hands it the features of the main forward.
    aux_head = AuxHeads(args.vision_width)
    query_head = QueryHead(args.text_width, 1)
    count_head = torch.nn.Linear(args.text_width, N_PAIRS * (MAX_COUNT + 1))
    captured = {}
    model.model.vision_tower.register_forward_hook(lambda mod, inp, out: captured.__setitem__("feats", out.last_hidden_state))
    if args.vision_minutes > 0:
        n = pretrain_vision(model, aux_head, proc, args, log=lambda m: print(m, flush=True))
        print(f"vision pretraining: {n} steps in {args.vision_minutes:.1f} min", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n] + \
        [aux_head.patch.weight, aux_head.scene.weight, query_head.weight, count_head.weight]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)] + \
        [aux_head.patch.bias, aux_head.scene.bias, query_head.bias, count_head.bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    count_tasks = set(args.count_tasks.split(","))
    count_use = lambda b: torch.tensor([float(t in count_tasks) for t in b["tasks"]])
    batches = Batches(proc, encoder, args.seed, args.tasks.split(","), args.absent_rate, args.query_tasks.split(","))
    eval_scenes = scenes.eval_set(args.eval_scenes, seed=0)

    budget = (args.minutes - args.vision_minutes) * 60.0        # stage 2
    train_time, data_time, last_eval = 0.0, 0.0, 0.0
    sums = {t: [0.0, 0] for t in TASK_WEIGHTS}
    log_loss, log_n, aux_sum = 0.0, 0, 0.0
    step = 0
    model.train()
    while True:
        progress = step / args.steps if args.steps else train_time / budget
        if progress >= 1.0:
            break
        t0 = time.time()
        b = batches.batch(args.batch, curriculum(progress, args))
        t1 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                        attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                        output_hidden_states=args.query_weight > 0 or args.count_weight > 0)
        sample_loss, counts = loss_per_sample(out.logits, b["labels"])
        text_loss = sample_loss.sum() / counts.sum()
        aux = patch_loss(aux_head, captured.pop("feats"), b["patch"]) if args.aux_weight > 0 else torch.zeros(())
        if args.query_weight > 0:      # hidden_states[0] is the embedding output, [i] after layer i
            aux = aux + args.query_weight * query_loss(query_head, out.hidden_states[args.query_layer], b["patch"])
        if args.count_weight > 0:
            aux = aux + args.count_weight * count_loss(count_head, out.hidden_states[args.count_layer],
                                                       b["token_type_ids"], b["patch"]["pairs"], count_use(b))
        aux_sum += aux.item()
        loss = text_loss + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        dt = time.time() - t0
        train_time += dt
        data_time += t1 - t0
        log_loss, log_n = log_loss + text_loss.item(), log_n + 1
        for task, sl, c in zip(b["tasks"], sample_loss.tolist(), counts.tolist()):
            sums[task][0] += sl
            sums[task][1] += c
        if step % args.log_every == 0:
            per_task = " ".join(f"{t} {s / max(c, 1):.3f}" for t, (s, c) in sums.items())
            print(f"step {step} t {train_time / 60:.1f}min loss {log_loss / log_n:.4f} patch {aux_sum / log_n:.3f} lr {lr_at(step, progress, args):.2e} "
                  f"{train_time / step:.2f}s/step ({data_time / train_time:.0%} data) | {per_task}", flush=True)
            sums = {t: [0.0, 0] for t in TASK_WEIGHTS}
            log_loss, log_n, aux_sum = 0.0, 0, 0.0
        if train_time - last_eval >= args.eval_minutes * 60:
            last_eval = train_time
            te = time.time()
            res = quick_eval(model, proc, vae, eval_scenes)
            print(f"eval @ step {step}: {format_eval(res)} ({time.time() - te:.0f}s)", flush=True)

    print(f"trained {step} steps ({step * args.batch} samples) in {train_time / 60:.1f} min "
          f"({step / train_time:.2f} steps/s)", flush=True)
    final = quick_eval(model, proc, vae, scenes.eval_set(args.final_eval_scenes, seed=1))
    print(f"final eval ({args.final_eval_scenes} held-out scenes): {format_eval(final)}", flush=True)
    info = dict(args=vars(args), steps=step, samples=step * args.batch, train_minutes=train_time / 60,
                wall_minutes=(time.time() - t_start) / 60, parameters=n_params, task_weights=TASK_WEIGHTS,
                final_eval={k: v for k, v in final.items() if k != "examples"})
    save_checkpoint(model, out_dir, tok_path, vae_path, args.save_dtype, info)
    verify_checkpoint(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out_dir} in {(time.time() - t_start) / 60:.1f} min total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
