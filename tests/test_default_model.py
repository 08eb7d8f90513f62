"""The bundled default model (engine/default_model, trained by training/train_model.py):
it loads with transformers and with the engine, the engine's greedy outputs equal transformers'
on held-out scenes, it meets the issue's accuracy floors on a fixed held-out subset through the
full pipeline (export -> runtime -> native loop -> parsers -> mask decoder), and the demo runs.

Oracles: transformers' PaliGemmaForConditionalGeneration.generate on the same checkpoint, and
the scene generator's ground truth (captions, answers, boxes, visible masks).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine import eval as ev
from engine import scenes

REPO = Path(__file__).resolve().parents[1]
DEFAULT = engine.default_model_path()
# Held-out scenes for the floors: the first 200 of set 5 (the full eval uses 300 of set 0).
# 200, not fewer: at 87% caption accuracy 40 scenes have a standard error of 5 points, and the
# first 40 of set 5 gave 75% where 200 give 84.5% (300 of set 0: 87.0%).
SUBSET = 200
# Issue 7's acceptance floors, asserted for fp32 (onnxruntime) and int8 (OpenVINO).
FLOORS = {"caption": 0.80, "vqa": 0.80, "detect_hit50": 0.80, "segment_iou": 0.50}
# What the bundled model reaches on the subset (measured with fp32 onnxruntime; int8 OpenVINO
# is within 0.5 points), minus a margin of 5 points: a regression guard for the engine path
# (export, runtimes, native loop, parsers, mask decoder) with a trained model.
MEASURED_ON_SUBSET = {"caption": 0.845, "vqa": 0.942, "detect_iou": 0.812, "detect_hit50": 0.963,
                      "detect_absent": 0.96, "segment_iou": 0.770}
MARGIN = 0.05


@pytest.fixture(scope="module")
def cache(module_cache):
    return module_cache


def test_bundle_is_a_complete_hf_checkpoint():
    from engine.checkpoint import Checkpoint
    for name in ("config.json", "model.safetensors", "tokenizer.model", "vae-oid.npz", "example.png",
                 "training_info.json"):
        assert (DEFAULT / name).is_file(), name
    with Checkpoint.open(DEFAULT) as ck:
        assert ck.config.text.model_type == "gemma2" and ck.config.vision.patch_size == 14
    total = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert total < 12e6, f"the bundle should stay a few MB, is {total / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def models(cache):
    out = {(w, b): engine.load(None, backend=b, weights=w, threads=2, progress=False)
           for w, b in (("fp32", "onnxruntime"), ("int8", "openvino"), ("int8", "onnxruntime"))}
    yield out
    for m in out.values():
        m.close()


def test_load_without_path_uses_the_bundled_model(models):
    m = models[("int8", "openvino")]
    manifest = (Path(m.artifact_dir) / "manifest.json").read_text()
    assert "default_model" in manifest
    assert m.seg_decoder is not None, "the export of the default model must carry its mask decoder"


def test_greedy_equals_transformers(models):
    """fp32 engine vs transformers (fp32) on held-out scenes, every task's prompt."""
    torch = pytest.importorskip("torch")
    from transformers import PaliGemmaForConditionalGeneration
    hf = PaliGemmaForConditionalGeneration.from_pretrained(DEFAULT, torch_dtype=torch.float32).eval()
    m = models[("fp32", "onnxruntime")]
    proc = m.processor
    checked = 0
    for s in scenes.eval_seeds(3, seed=6):
        sc = scenes.make_scene(s)
        for prompt in ("caption en", "answer en how many shapes are there",
                       f"detect {sc.objects[0].label}", f"segment {sc.objects[0].label}"):
            ours = m.generate(sc.image, prompt, max_new_tokens=30).tokens
            enc = proc(sc.image, prompt)
            ids = torch.from_numpy(enc["input_ids"])[None]
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  token_type_ids=torch.from_numpy(enc["token_type_ids"])[None],
                                  pixel_values=torch.from_numpy(enc["pixel_values"]), max_new_tokens=30,
                                  do_sample=False, eos_token_id=1, pad_token_id=0)
            theirs = out[0, ids.shape[1]:].tolist()
            if 1 in theirs:
                theirs = theirs[:theirs.index(1) + 1]
            assert list(ours)[:len(theirs)] == theirs, (s, prompt)
            checked += 1
    assert checked == 12


@pytest.fixture(scope="module")
def subset_scores(models):
    return {k: ev.evaluate(models[k], SUBSET, seed=5, progress=False)
            for k in (("fp32", "onnxruntime"), ("int8", "openvino"))}


@pytest.mark.parametrize("key", [("fp32", "onnxruntime"), ("int8", "openvino")], ids=["fp32-ort", "int8-ov"])
def test_accuracy_no_worse_than_measured(subset_scores, key):
    got = subset_scores[key]
    for metric, measured in MEASURED_ON_SUBSET.items():
        assert got[metric]["n"] > 0, metric
        assert got[metric]["mean"] >= measured - MARGIN, f"{key} {metric} {got[metric]['mean']:.3f} < {measured} - {MARGIN}"


@pytest.mark.parametrize("key", [("fp32", "onnxruntime"), ("int8", "openvino")], ids=["fp32-ort", "int8-ov"])
def test_issue_floors(subset_scores, key):
    got = subset_scores[key]
    for metric, floor in FLOORS.items():
        assert got[metric]["mean"] >= floor, f"{metric} {got[metric]['mean']:.3f} < {floor}"


def test_int8_within_two_points_of_fp32(subset_scores):
    """Issue 7: int8 within 2 points of fp32 on every task; the bound is 2 points or one sample,
    whichever is larger (OCR has the fewest samples; on 300 scenes: README table)."""
    a, b = subset_scores[("fp32", "onnxruntime")], subset_scores[("int8", "openvino")]
    for metric in ev.TASK_METRICS:
        if a[metric]["n"]:
            bound = max(0.02, 1.0 / a[metric]["n"]) + 1e-9
            assert abs(a[metric]["mean"] - b[metric]["mean"]) <= bound, metric


def test_demo_captions_detects_and_draws(cache, tmp_path):
    out = tmp_path / "overlay.png"
    env = dict(os.environ, PALIGEMMA_EDGE_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-m", "engine", "demo", "--out", str(out), "--backend", "onnxruntime"],
                          capture_output=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    truth = scenes.make_scene(scenes.eval_seeds(7, seed=7)[6])       # the scene example.png shows
    assert np.array_equal(np.asarray(truth.image), np.asarray(Image.open(DEFAULT / "example.png").convert("RGB")))
    assert "caption  :" in text and "segments :" in text
    with Image.open(out) as im:
        assert im.size == truth.image.size
        assert np.asarray(im.convert("RGB")).tolist() != np.asarray(truth.image).tolist()


def test_caption_objects_hand_cases():
    from engine.__main__ import caption_objects
    assert caption_objects("a red circle, two blue squares and an orange triangle") == \
        ["red circle", "blue square", "orange triangle"]
    assert caption_objects("three yellow circles") == ["yellow circle"]
    assert caption_objects("") == []


def test_missing_bundle_gives_a_clear_error(monkeypatch, tmp_path):
    import engine as eng
    monkeypatch.setattr(eng, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(FileNotFoundError, match="default model is missing"):
        eng.default_model_path()
