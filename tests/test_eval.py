"""engine.eval: metric helpers on hand-computed cases, and the scoring loop with stand-in models
whose answers are known (perfect, always wrong, boxes shifted by a known amount)."""
from types import SimpleNamespace

import numpy as np
import pytest

from engine import eval as ev
from engine import scenes


def test_box_iou_hand_computed():
    assert ev.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert ev.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert ev.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert ev.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_mask_iou_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True          # 8 pixels
    b[1:3] = True         # 8 pixels, 4 shared
    assert ev.mask_iou(a, b) == pytest.approx(4 / 12)
    assert ev.mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_match_is_one_to_one_best_first():
    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    pred = [(21, 0, 31, 10), (0, 0, 10, 10), (0, 0, 9, 10)]
    got = ev.match(truth, pred, ev.box_iou)
    assert got[0][:2] == (0, 1) and got[0][2] == 1.0
    assert got[1][:2] == (1, 0) and got[1][2] == pytest.approx(90 / 110)
    assert ev.match(truth, [], ev.box_iou) == [(0, None, 0.0), (1, None, 0.0)]


class Oracle:
    """Answers every prompt with the scene's own target; `shift` moves detected boxes right."""

    def __init__(self, size, shift=0, wrong=False):
        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=size))
        self.seg_decoder = None
        self.shift, self.wrong, self.by_image = shift, wrong, {}

    def add(self, scene, seed):
        self.by_image[id(scene.image)] = (scene, seed)

    def generate(self, image, prompt, max_new_tokens):
        scene, seed = self.by_image[id(image)]
        targets = dict(scenes.task_examples(scene, np.random.default_rng(seed)))   # the eval's questions
        text = targets[prompt]
        if self.wrong:
            text = "nonsense"
        elif prompt.startswith("detect") and self.shift:
            size = scene.image.size[0]
            text = " ; ".join(scenes.box_tokens((o.box[0] + self.shift, o.box[1], o.box[2] + self.shift, o.box[3]), size)
                              + " x" for o in scenes.instances(scene, *prompt.split(" ")[1:]))
        return SimpleNamespace(text=text)


def _score(model, n=12, size=112):
    scores = ev.Scores()
    for s in scenes.eval_seeds(n):
        scene = scenes.make_scene(s, size)
        model.add(scene, s)
        ev.evaluate_scene(model, scene, np.random.default_rng(s), scores)
    return scores.summary()


def test_perfect_answers_score_100_percent():
    res = _score(Oracle(112))
    for m in ("caption", "vqa", "detect_hit50", "detect_absent", "ocr"):
        assert res[m]["mean"] == 1.0 and res[m]["n"] > 0, m
    assert res["detect_iou"]["mean"] > 0.95       # loc tokens round boxes to 1/1024 of the image
    assert res["segment_iou"]["n"] == 0            # no mask decoder: segmentation not scored


def test_wrong_answers_score_zero():
    res = _score(Oracle(112, wrong=True))
    for m in ("caption", "vqa", "detect_iou", "detect_hit50", "ocr"):
        assert res[m]["mean"] == 0.0, m


def test_shifted_boxes_lower_iou_as_computed():
    # A box of width w shifted by d pixels has IoU (w - d) / (w + d) with the original.
    res = _score(Oracle(112, shift=6))
    assert 0.3 < res["detect_iou"]["mean"] < 0.9
