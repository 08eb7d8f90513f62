"""`python -m engine` end to end: every subcommand in a subprocess on a tiny exported artifact.

The artifact is the synthetic tiny-pg2 checkpoint (random weights, engine.synth; no torch
needed) exported in fp32 for both backends. The CLI's tokens are compared with the same call
made in process through the Python API. One test runs main() in process with a fixed model
answer, to check the JSON of detections and segments (boxes, RLE masks) and the drawings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.model import GenerationResult

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (50, 40)          # width, height of the test image


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A dict: artifact (fp32, onnx + openvino), image (PNG path), cache (an empty cache dir)."""
    from engine.synth import write_synthetic_checkpoint
    from export.pipeline import export_checkpoint
    root = tmp_path_factory.mktemp("cli")
    ckpt = write_synthetic_checkpoint("tiny-pg2", root / "ckpt", dtype="fp32", progress=False)
    artifact = export_checkpoint(ckpt, root / "artifact", formats=("onnx", "openvino"), weights="fp32",
                                 progress=False)
    rng = np.random.default_rng(0)
    image = root / "image.png"
    Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)).save(image)
    return {"artifact": artifact, "image": image, "cache": root / "cache", "root": root}


@pytest.fixture(scope="module")
def model(work):
    m = engine.load(work["artifact"], backend="onnxruntime")
    yield m
    m.close()


def cli(work, *args, stdin: bytes | None = None, model: bool = True):
    """Run `python -m engine ARGS` (with --model ARTIFACT unless model=False, and --backend
    onnxruntime unless ARGS give one)."""
    env = dict(os.environ, PALIGEMMA_EDGE_CACHE=str(work["cache"]))
    cmd = [sys.executable, "-m", "engine", *args]
    if model:
        cmd += ["--model", str(work["artifact"])]
    if "--backend" not in args:
        cmd += ["--backend", "onnxruntime"]         # the backend of the in-process `model` fixture
    return subprocess.run(cmd, input=stdin, capture_output=True, cwd=REPO, env=env, timeout=300)


def text_of(proc) -> str:
    return proc.stdout.decode("utf-8")


# --------------------------------------------------------------------------- subcommands
SUBCOMMANDS = {
    "run": (["--prompt", "describe en"], "describe en"),
    "caption": (["--lang", "de"], "caption de"),
    "answer": (["--question", "what  is\nthis?"], "answer en what is this?"),
    "ocr": ([], "ocr"),
    "detect": (["--labels", "cat ; dog"], "detect cat\ndetect dog"),         # one prompt per label
    "segment": (["--labels", "cat"], "segment cat"),
}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_subcommand_json(work, model, command, backend):
    args, prompt = SUBCOMMANDS[command]
    proc = cli(work, command, "--image", str(work["image"]), "--backend", backend, "--json",
               "--max-new-tokens", "8", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(text_of(proc))                           # exactly one JSON object on stdout
    each = [model.generate(str(work["image"]), p, max_new_tokens=8) for p in prompt.split("\n")]
    assert out["task"] == command and out["prompt"] == prompt
    assert out["tokens"] == [t for e in each for t in e.tokens]
    assert out["text"] == (each[0].text if command == "run" else " ; ".join(e.text.strip() for e in each))
    assert out["finish_reason"] == next((e.finish_reason for e in each if e.finish_reason != "eos"), "eos")
    if command in ("detect", "segment"):
        assert [(r["prompt"], r["tokens"]) for r in out["requests"]] == \
            [(p, e.tokens) for p, e in zip(prompt.split("\n"), each)]
        assert out["multi_label"] == "per_label"
    assert out["image"] == {"width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]}
    assert {"image_encode", "prefill", "first_token", "decode", "total"} <= set(out["timings"])
    if command == "detect":
        assert isinstance(out["detections"], list)
    if command == "segment":
        assert isinstance(out["segments"], list)
        assert "no mask decoder" in proc.stderr.decode()
    assert "timings:" in proc.stderr.decode()


def test_streamed_text_and_timings_line(work, model):
    proc = cli(work, "caption", "--image", str(work["image"]), "--max-new-tokens", "10")
    assert proc.returncode == 0, proc.stderr.decode()
    expected = model.generate(str(work["image"]), "caption en", max_new_tokens=10)
    assert text_of(proc) == expected.text + "\n"
    err = proc.stderr.decode().strip().splitlines()
    assert err[-1].startswith(f"finish: {expected.finish_reason}; timings: image ")
    assert f"{len(expected.tokens)} tokens" in err[-1]


def test_beam_search_and_sampling_options(work, model):
    image = str(work["image"])
    proc = cli(work, "run", "--image", image, "--prompt", "caption en", "--num-beams", "2",
               "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    beam = model.generate(image, "caption en", max_new_tokens=6, num_beams=2)
    out = json.loads(text_of(proc))
    assert out["tokens"] == beam.tokens and out["score"] == pytest.approx(beam.score, abs=1e-6)
    proc = cli(work, "run", "--image", image, "--prompt", "caption en", "--sample", "--seed", "5",
               "--temperature", "1.3", "--top-k", "50", "--top-p", "0.9", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    sampled = model.generate(image, "caption en", max_new_tokens=6, do_sample=True, seed=5, temperature=1.3,
                             top_k=50, top_p=0.9)
    assert json.loads(text_of(proc))["tokens"] == sampled.tokens


def test_image_from_stdin(work, model):
    data = work["image"].read_bytes()
    proc = cli(work, "caption", "--image", "-", "--max-new-tokens", "6", "--json", stdin=data)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(text_of(proc))["tokens"] == model.generate(data, "caption en", max_new_tokens=6).tokens


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_draw_writes_a_png_of_the_original_size(work, command, tmp_path):
    out = tmp_path / "drawn.png"
    proc = cli(work, command, "--image", str(work["image"]), "--labels", "cat", "--max-new-tokens", "8",
               "--draw", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == IMAGE_SIZE


def test_default_model_when_model_is_omitted(work):
    proc = cli(work, "caption", "--image", str(work["image"]), "--max-new-tokens", "4", "--json", model=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert 1 <= len(json.loads(text_of(proc))["tokens"]) <= 4
    exported = [p for p in (work["cache"] / "artifacts").iterdir() if not p.name.startswith(".")]   # no locks
    assert [p.name.startswith("default_model-onnx-int8") for p in exported] == [True]   # exported once
    assert "\r" not in proc.stderr.decode()              # stderr is a pipe: no progress bars in the log


# --------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("args, stdin, message", [
    (["caption", "--image", "/nonexistent/cat.png"], None, "/nonexistent/cat.png: no such image file"),
    (["caption", "--image", "IMAGE", "--backend", "cuda"], None, "invalid choice: 'cuda'"),
    (["detect", "--image", "IMAGE"], None, "the following arguments are required: --labels"),
    (["detect", "--image", "IMAGE", "--labels", " ; "], None, "empty label"),
    (["caption", "--image", "-"], b"", "stdin is empty"),
    (["caption", "--image", "-"], b"not an image", "cannot decode the image"),
    (["caption", "--image", "IMAGE", "--max-new-tokens", "0"], None, "must be a positive integer"),
    (["caption", "--image", "IMAGE", "--model", "/nonexistent/model"], None, "/nonexistent/model does not exist"),
    (["segment", "--image", "IMAGE", "--labels", "cat", "--seg-decoder", "/nonexistent/vae.npz"], None,
     "no such mask decoder file"),
    (["caption", "--image", "IMAGE", "--max-new-tokens", "9999"], None, "--max-new-tokens 9999 does not fit"),
    (["detect", "--image", "IMAGE", "--labels", "cat", "--draw", "out.txt"], None, "ending in .png"),
    # found by a new user (issue 16): each said something the user could not act on
    (["detect", "--image", "IMAGE", "--labels", "cat", "--draw", "/nonexistent/dir/out.png"], None,
     "the directory /nonexistent/dir does not exist"),
    (["caption", "--image", "DIR"], None, "is a directory, not an image file"),
    (["segment", "--image", "IMAGE", "--labels", "cat", "--seg-decoder", "TEXTFILE"], None, "not a readable npz"),
    (["caption", "--image", "IMAGE", "--weights", "int3"], None, "argument --weights: invalid choice: 'int3'"),
    (["caption", "--image", "IMAGE", "--sample", "--temperature", "0"], None,
     "--temperature must be a finite number > 0 with --sample"),
    (["caption", "--image", "IMAGE", "--sample", "--num-beams", "2"], None, "drop --sample for beam search"),
    (["caption", "--image", "IMAGE", "--top-p", "0"], None, "--top-p must be in (0, 1]"),
    (["answer", "--image", "IMAGE", "--question", "why " * 9000], None, "--question is too long"),   # > 8192 tokens
    (["caption", "--image", "BOMB"], None, "--max-image-pixels 144000000"),
    (["demo", "--out", "/nonexistent/dir/demo.png"], None, "the directory /nonexistent/dir does not exist"),
    (["demo", "--image", "DIR"], None, "is a directory, not an image file"),
])
def test_user_errors_exit_2_with_one_line(work, args, stdin, message, tmp_path):
    from test_processor import png_header_of_size
    (tmp_path / "notes.txt").write_text("not a mask decoder\n")
    (tmp_path / "bomb.png").write_bytes(png_header_of_size(12000, 12000))
    paths = {"IMAGE": str(work["image"]), "DIR": str(tmp_path), "TEXTFILE": str(tmp_path / "notes.txt"),
             "BOMB": str(tmp_path / "bomb.png")}
    args = [paths.get(a, a) for a in args]
    has_model = "--model" in args
    proc = cli(work, *args, stdin=stdin, model=not has_model)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert proc.stdout == b""
    # no API words reach a CLI user, and nothing was exported before a bad option was found
    for api_word in ("do_sample", "max_new_tokens", "prompt 0", "pickle", "Warning", "exporting"):
        assert api_word not in err, err


def test_every_option_has_help():
    from engine.__main__ import build_parser
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings)}" for name, sub in subparsers.choices.items()
               for action in sub._actions if action.option_strings and not action.help]
    assert missing == []


def test_version():
    proc = subprocess.run([sys.executable, "-m", "engine", "--version"], capture_output=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.decode().strip() == f"paligemma-edge {engine.__version__}"


def test_weight_formats_agree_with_the_exporter(tmp_path, monkeypatch, capsys):
    from export.quantize import WEIGHT_FORMATS
    from engine.__main__ import WEIGHT_FORMATS as CLI_FORMATS
    assert CLI_FORMATS == engine.WEIGHT_FORMATS == WEIGHT_FORMATS
    monkeypatch.setenv("PALIGEMMA_EDGE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        engine.load(weights="int3")                          # the API too: refused before any export
    assert "exporting" not in capsys.readouterr().err and not (tmp_path / "artifacts").exists()


def test_threads_above_the_cores_warn_and_are_capped(work, model):
    from engine.__main__ import available_cores
    cores = available_cores()
    proc = cli(work, "caption", "--image", str(work["image"]), "--max-new-tokens", "4", "--json",
               "--threads", str(cores + 3))
    assert proc.returncode == 0, proc.stderr.decode()
    err = proc.stderr.decode()
    assert f"--threads {cores + 3} is more than the {cores} CPU cores" in err and f"using {cores}" in err
    assert json.loads(text_of(proc))["tokens"] == model.generate(str(work["image"]), "caption en",
                                                                 max_new_tokens=4).tokens
    proc = cli(work, "caption", "--image", str(work["image"]), "--max-new-tokens", "2", "--threads", str(cores))
    assert proc.returncode == 0 and "warning" not in proc.stderr.decode()


def test_empty_prompt_as_in_the_api(work, model):
    """model.generate(image, "") is accepted, so `run --prompt ''` is too, with the same tokens."""
    proc = cli(work, "run", "--image", str(work["image"]), "--prompt", "", "--max-new-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(text_of(proc))
    assert out["prompt"] == "" and out["tokens"] == model.generate(str(work["image"]), "", max_new_tokens=5).tokens


def test_sampling_flags_without_sample_are_noted(work):
    proc = cli(work, "caption", "--image", str(work["image"]), "--max-new-tokens", "2", "--top-k", "5")
    assert proc.returncode == 0 and "note: --top-k: only used with --sample" in proc.stderr.decode()


# --------------------------------------------------------------------------- detections, masks (in process)
def random_seg_decoder_npz(path, dim=8, seed=0):
    """A mask decoder with vae-oid.npz's names and layer shapes, random weights."""
    rng = np.random.default_rng(seed)
    arrays = {"_vq_vae._embedding": rng.standard_normal((128, dim)).astype(np.float32)}

    def conv(name, o, i, k, transpose=False):
        shape = (i, o, k, k) if transpose else (o, i, k, k)
        arrays[f"{name}.weight"] = (rng.standard_normal(shape) / np.sqrt(i * k * k)).astype(np.float32)
        arrays[f"{name}.bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)

    conv("decoder.0", 128, dim, 1)
    for block in ("decoder.2.net", "decoder.3.net"):
        conv(f"{block}.0", 128, 128, 3)
        conv(f"{block}.2", 128, 128, 3)
        conv(f"{block}.4", 128, 128, 1)
    for name, i, o in (("decoder.4", 128, 128), ("decoder.6", 128, 64), ("decoder.8", 64, 32),
                       ("decoder.10", 32, 16)):
        conv(name, o, i, 4, transpose=True)
    conv("decoder.12", 1, 16, 1)
    np.savez(path, **arrays)
    return path


def rle_decode(rle) -> np.ndarray:
    h, w = rle["size"]
    values = np.concatenate([np.full(n, i % 2, dtype=bool) for i, n in enumerate(rle["counts"])])
    assert values.size == h * w
    return values.reshape((h, w), order="F")


SEGS = "".join(f"<seg{i * 7 % 128:03d}>" for i in range(16))
ANSWERS = {
    "detect": "<loc0100><loc0200><loc0700><loc0900> cat ; <loc0000><loc0000><loc0512><loc0512> dog",
    "segment": f"<loc0100><loc0200><loc0700><loc0900>{SEGS} cat ; <loc0512><loc0000><loc1023><loc0512>{SEGS} cat",
}


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_json_instances_and_drawing(work, command, tmp_path, monkeypatch, capsys):
    from engine import __main__ as cli_main
    from engine import tasks
    from engine.masks import SegDecoder
    from engine.model import PaliGemma

    answer = ANSWERS[command]
    tokens = [1] * 5

    def fixed_answer(self, image, prompt, max_new_tokens=32, **kw):
        return GenerationResult(answer, tokens, "eos", None, {
            "image_encode": 0.001, "prefill": 0.002, "first_token": 0.003, "decode": 0.004, "total": 0.007,
            "new_tokens": 5, "decode_tokens_per_s": 1000.0, "load": 0.1})

    monkeypatch.setattr(PaliGemma, "generate", fixed_answer)
    npz = random_seg_decoder_npz(tmp_path / "vae-oid.npz")
    drawn = tmp_path / "drawn.png"
    extra = ["--seg-decoder", str(npz)] if command == "segment" else []
    rc = cli_main.main([command, "--model", str(work["artifact"]), "--backend", "onnxruntime", "--image",
                        str(work["image"]), "--labels", "cat ; dog", "--multi-label", "joint", "--json", "--draw",
                        str(drawn), *extra])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    w, h = IMAGE_SIZE
    if command == "detect":
        expected = tasks.parse_detections(answer, w, h)
        assert [d["label"] for d in out["detections"]] == ["cat", "dog"]
        for got, exp in zip(out["detections"], expected):
            assert got["box"] == pytest.approx(list(exp.box), abs=0.01)
    else:
        expected = tasks.parse_segments(answer, w, h, SegDecoder.from_npz(npz))
        assert len(out["segments"]) == 2
        for got, exp in zip(out["segments"], expected):
            assert got["label"] == exp.label and got["box"] == pytest.approx(list(exp.box), abs=0.01)
            mask = rle_decode(got["mask"])
            assert mask.shape == (h, w) and np.array_equal(mask, exp.mask)
            assert got["mask_area"] == int(exp.mask.sum())
    with Image.open(drawn) as im:
        assert im.format == "PNG" and im.size == IMAGE_SIZE
        assert np.asarray(im.convert("RGB")).tolist() != np.asarray(Image.open(work["image"]).convert("RGB")).tolist()


def test_demo_with_another_model_and_image(work):
    """demo on any model: --model, --image and --labels replace the bundled defaults."""
    out = work["root"] / "demo.png"
    proc = cli(work, "demo", "--image", str(work["image"]), "--labels", "cat ; dog", "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    text = text_of(proc)
    assert "caption  :" in text and "['cat', 'dog']" in text
    assert "caption: timings: image " in proc.stderr.decode()
    with Image.open(out) as im:
        assert im.size == IMAGE_SIZE


def test_demo_json(work, model):
    out = work["root"] / "demo-json.png"
    proc = cli(work, "demo", "--image", str(work["image"]), "--labels", "cat ; dog", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(text_of(proc))
    assert got["labels"] == ["cat", "dog"] and got["prompts"] == ["detect cat", "detect dog"]
    assert got["caption"]["tokens"] == model.caption(str(work["image"])).tokens
    expected = model.detect(str(work["image"]), ["cat", "dog"])
    assert [d["label"] for d in got["detections"]] == [d.label for d in expected]
    assert got["overlay"] == str(out) and {"caption", "detections"} <= set(got["timings"])
    err = proc.stderr.decode()
    assert "caption: timings: image " in err and "detections (2 prompts, batched): timings: " in err


def test_api_words_become_flag_names():
    """The safety net behind the CLI's own checks: an API message reaching a CLI user is
    rephrased with the flags the user can type."""
    from engine.__main__ import _cli_words
    assert _cli_words("prompt 0: 64 image tokens + 9 text tokens + max_new_tokens 9999 = 10072 exceeds the "
                      "model's context") == \
        "64 image tokens + 9 text tokens + --max-new-tokens 9999 = 10072 exceeds the model's context"
    assert _cli_words("temperature must be > 0 when do_sample=True; for deterministic output use "
                      "do_sample=False (greedy)") == \
        "--temperature must be > 0 when --sample; for deterministic output use no --sample (greedy)"
    assert _cli_words("--top-k must be >= 0; seeds and top_k") == "--top-k must be >= 0; seeds and --top-k"


def test_no_progress_bars_when_stderr_is_not_a_terminal(work, tmp_path, capfd):
    """Exports with progress on, both formats, stderr captured (not a terminal): summary lines,
    no tqdm bars (their \\r lines filled logs)."""
    from engine.synth import write_synthetic_checkpoint
    from export.pipeline import export_checkpoint
    ckpt = write_synthetic_checkpoint("tiny-pg2", tmp_path / "ckpt", dtype="fp32", progress=True)
    export_checkpoint(ckpt, tmp_path / "art", formats=("onnx", "openvino"), weights="int8", progress=True)
    err = capfd.readouterr().err
    assert err.strip() and "\r" not in err and "it/s" not in err
