"""Pieces of training/train_model.py that shape what the default model learns: the objects a
prompt is about (routing targets), the per-patch targets and the decoder's scene-count loss.

Oracles: the scene generator's own targets (the VQA answers and detect targets are computed
there independently of prompt_objects), its visible masks, and hand-built tensors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import train_model as tm  # noqa: E402

from engine import scenes  # noqa: E402


@pytest.mark.parametrize("seed", range(0, 300, 3))
def test_prompt_objects_agree_with_the_generators_answers(seed):
    sc = scenes.make_scene(seed)
    for prefix, target in scenes.task_examples(sc, np.random.default_rng(seed)):
        objs = tm.prompt_objects(sc, prefix)
        task = scenes.task_of(prefix)
        if task == "ocr":
            assert objs is None
        elif task == "caption":
            assert objs == sc.objects
        elif task == "detect":
            assert len(objs) == target.count("<loc") // 4
            assert all(o.label in target for o in objs)
        elif prefix.startswith("answer en how many"):
            assert str(len(objs)) == target, prefix
        elif prefix.startswith("answer en is there"):
            assert (len(objs) > 0) == (target == "yes"), prefix
        elif prefix.startswith("answer en what colour is the"):
            assert [o.colour for o in objs] == [target], prefix
        elif prefix.startswith("answer en which shape is"):
            assert [o.kind for o in objs] == [target], prefix
        else:
            pytest.fail(f"prompt not covered by this test: {prefix!r}")


def test_prompt_objects_rejects_an_unknown_question():
    with pytest.raises(ValueError, match="unknown prompt"):
        tm.prompt_objects(scenes.make_scene(1), "answer en how big is the circle")


def test_query_patches_flag_the_asked_objects_patches():
    sc = next(s for s in (scenes.make_scene(i) for i in range(100)) if len(s.objects) >= 2)
    o = sc.objects[0]
    flags, has = tm.query_patches(sc, f"detect {o.colour} {o.kind}", 8)
    assert has == 1.0 and flags.shape == (64,)
    # Every flagged patch is at least a quarter covered by a matching object (hand check on the grid).
    union = np.any([x.mask for x in scenes.instances(sc, o.colour, o.kind)], axis=0)
    cell = sc.size // 8
    for i in np.flatnonzero(flags):
        y, x = divmod(int(i), 8)
        assert union[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell].mean() >= 0.2
    # The largest matching object's centre patch is flagged.
    big = max(scenes.instances(sc, o.colour, o.kind), key=lambda x: x.mask.sum())
    ys, xs = np.nonzero(big.mask)
    assert flags[int(ys.mean()) // cell * 8 + int(xs.mean()) // cell] == 1.0
    assert tm.query_patches(sc, "ocr", 8)[1] == 0.0
    absent = " ".join(scenes.absent_pair(sc, np.random.default_rng(0)))
    none, has = tm.query_patches(sc, f"detect {absent}", 8)
    assert has == 1.0 and none.sum() == 0          # a query about nothing: no patch flagged


def test_count_loss_reads_the_last_prefix_token_of_the_chosen_samples():
    d = 4
    head = torch.nn.Linear(d, tm.N_PAIRS * (tm.MAX_COUNT + 1))
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])      # last prefix index 2 and 4
    hidden = torch.randn(2, 6, d)
    pairs = torch.randint(0, tm.MAX_COUNT + 1, (2, tm.N_PAIRS))
    use = torch.tensor([1.0, 1.0])

    def ce(h, p):
        logits = head(h).view(tm.N_PAIRS, tm.MAX_COUNT + 1)
        return torch.nn.functional.cross_entropy(logits, p)

    expected = (ce(hidden[0, 2], pairs[0]) + ce(hidden[1, 4], pairs[1])) / 2
    assert torch.allclose(tm.count_loss(head, hidden, types, pairs, use), expected, atol=1e-6)
    # Other positions do not matter; unused samples do not count.
    hidden2 = hidden.clone()
    hidden2[0, 3:] += 5.0
    hidden2[1, :4] -= 5.0
    assert torch.allclose(tm.count_loss(head, hidden2, types, pairs, use), expected, atol=1e-6)
    only_first = tm.count_loss(head, hidden, types, pairs, torch.tensor([1.0, 0.0]))
    assert torch.allclose(only_first, ce(hidden[0, 2], pairs[0]), atol=1e-6)


def test_patch_targets_count_every_colour_kind_pair():
    for seed in range(40):
        sc = scenes.make_scene(seed)
        t = tm.patch_targets(sc, 8)
        pairs = t["pairs"].reshape(len(scenes.COLOUR_NAMES), len(scenes.KINDS))
        for o in sc.objects:
            assert pairs[scenes.COLOUR_NAMES.index(o.colour), scenes.KINDS.index(o.kind)] >= 1
        assert pairs.sum() == len(sc.objects)
