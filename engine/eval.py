"""Accuracy of the full engine on held-out generated scenes: `python -m engine.eval shapes`.

Every sample goes through the real pipeline: export (cached) -> runtime graphs -> native loop
-> parsers / mask decoder. Per scene (engine.scenes.eval_set, seeds never used in training):

    caption     exact match of the generated caption with the canonical one
    vqa         exact match of the answer, over every question engine.scenes asks of the scene
    detect      for each (colour, kind) present: predicted boxes matched one-to-one to the true
                boxes by IoU (greedy, best first); mean IoU over true boxes (a missed box counts 0)
                and the share of true boxes with IoU > 0.5; detect_absent: the share of queries
                for an absent (colour, kind) that find nothing
    segment     for each (colour, kind) present: mean mask IoU over true instances, matched as
                for detect, each predicted mask against the object's true visible mask
    ocr         exact match on scenes with digits

Usage: python -m engine.eval shapes [--model CKPT] [--weights fp32,int8,int4,fp8]
           [--backend openvino,onnxruntime] [--scenes 300] [--threads N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import scenes
from .tasks import parse_detections, parse_segments

TASK_METRICS = ("caption", "vqa", "detect_iou", "detect_hit50", "detect_absent", "segment_iou", "ocr")


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def match(truth: list, pred: list, iou) -> list[tuple[int, int | None, float]]:
    """Greedy one-to-one matching, best pairs first: [(truth index, pred index or None, iou)]."""
    pairs = sorted(((iou(t, p), i, j) for i, t in enumerate(truth) for j, p in enumerate(pred)), reverse=True)
    used_t, used_p, out = set(), set(), {}
    for v, i, j in pairs:
        if i not in used_t and j not in used_p and v > 0:
            used_t.add(i), used_p.add(j)
            out[i] = (j, v)
    return [(i, *out.get(i, (None, 0.0))) for i in range(len(truth))]


@dataclass
class Scores:
    """Running sums per metric; `summary()` gives the means and the sample counts."""
    sums: dict = field(default_factory=lambda: {m: 0.0 for m in TASK_METRICS})
    counts: dict = field(default_factory=lambda: {m: 0 for m in TASK_METRICS})

    def add(self, metric: str, value: float) -> None:
        self.sums[metric] += float(value)
        self.counts[metric] += 1

    def summary(self) -> dict:
        return {m: {"mean": self.sums[m] / self.counts[m] if self.counts[m] else None, "n": self.counts[m]}
                for m in TASK_METRICS}


def evaluate_scene(model, scene: scenes.Scene, rng: np.random.Generator, scores: Scores) -> None:
    """Run every task of one scene through `model` and add the results to `scores`."""
    size = scene.image.size[0]
    for prefix, target in scenes.task_examples(scene, rng):
        task = scenes.task_of(prefix)
        if task == "caption":
            scores.add("caption", model.generate(scene.image, prefix, max_new_tokens=32).text.strip() == target)
        elif task == "answer":
            scores.add("vqa", model.generate(scene.image, prefix, max_new_tokens=8).text.strip() == target)
        elif task == "ocr":
            if scene.digits:
                scores.add("ocr", model.generate(scene.image, prefix, max_new_tokens=8).text.strip() == target)
        elif task == "detect":
            colour, kind = prefix.split(" ", 1)[1].split(" ")
            truth = [o.box for o in scenes.instances(scene, colour, kind)]
            text = model.generate(scene.image, prefix, max_new_tokens=48).text
            pred = [d.box for d in parse_detections(text, size, size)]
            if not truth:                       # the absent pair: right when nothing is found
                scores.add("detect_absent", not pred)
                continue
            for _, _, v in match(truth, pred, box_iou):
                scores.add("detect_iou", v)
                scores.add("detect_hit50", v > 0.5)
            if model.seg_decoder is not None:
                _evaluate_segment(model, scene, colour, kind, scores)


def _evaluate_segment(model, scene, colour: str, kind: str, scores: Scores) -> None:
    size = scene.image.size[0]
    objs = scenes.instances(scene, colour, kind)
    text = model.generate(scene.image, f"segment {colour} {kind}", max_new_tokens=96).text
    segs = [s for s in parse_segments(text, size, size, decoder=model.seg_decoder) if s.mask is not None]
    for i, j, _ in match([o.box for o in objs], [s.box for s in segs], box_iou):
        scores.add("segment_iou", mask_iou(objs[i].mask, segs[j].mask) if j is not None else 0.0)


def evaluate(model, n_scenes: int, seed: int = 0, size: int | None = None, progress: bool = True) -> dict:
    """Scores of `model` on `n_scenes` held-out scenes, drawn at `size` (default: the training scenes' 224 px)."""
    from tqdm import tqdm

    size = size or scenes.SIZE
    scores = Scores()
    seeds = scenes.eval_seeds(n_scenes, seed)
    show = progress and sys.stderr.isatty()          # a bar on a terminal, never \r lines in a log
    for s in tqdm(seeds, desc="eval scenes", disable=not show, file=sys.stderr, dynamic_ncols=True):
        evaluate_scene(model, scenes.make_scene(s, size), np.random.default_rng(s), scores)
    return scores.summary()


def _format_table(rows: list[dict]) -> str:
    head = "| weights | backend | " + " | ".join(TASK_METRICS) + " | seconds |"
    lines = [head, "|" + "---|" * (len(TASK_METRICS) + 3)]
    for r in rows:
        cells = [f"{r['scores'][m]['mean'] * 100:.1f}" if r["scores"][m]["mean"] is not None else "-"
                 for m in TASK_METRICS]
        lines.append(f"| {r['weights']} | {r['backend']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from . import default_model_path, load

    p = argparse.ArgumentParser(prog="python -m engine.eval", description=__doc__.split("\n")[0])
    p.add_argument("suite", choices=["shapes"], help="the evaluation suite")
    p.add_argument("--model", help="HF checkpoint directory (default: the default model)")
    p.add_argument("--weights", default="fp32,int8,int4,fp8")
    p.add_argument("--backend", default="openvino,onnxruntime")
    p.add_argument("--scenes", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="which held-out set")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.scenes < 1:
        p.error("--scenes must be >= 1")
    ckpt = Path(args.model) if args.model else default_model_path()
    seg = next((ckpt / n for n in ("vae-oid.npz", "seg_decoder.npz") if (ckpt / n).is_file()), None)
    rows = []
    for weights in args.weights.split(","):
        for backend in args.backend.split(","):
            t0 = time.perf_counter()
            model = load(ckpt, backend=backend, threads=args.threads, weights=weights, seg_decoder=seg)
            result = evaluate(model, args.scenes, args.seed)
            rows.append({"weights": weights, "backend": backend, "scores": result,
                         "seconds": time.perf_counter() - t0})
            print(_format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    print(f"{args.scenes} held-out scenes (set {args.seed}), model {ckpt}; scores in %")
    print(_format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(ckpt), "scenes": args.scenes, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
