"""engine.synth: synthetic HF checkpoints. Tiny presets only (full-size presets: config checks).

Oracles: transformers loading the files (PaliGemmaForConditionalGeneration, AutoProcessor),
transformers building the full-size models on the meta device (shapes and parameter counts),
sha256 of the files, the safetensors package, and numbers from the model cards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from engine import layout, synth
from engine.config import PaliGemmaConfig
from engine.errors import ConfigError, EngineError
from engine.synth import (PRESETS, TINY_PRESETS, SynthError, parse_size, preset_config,
                          write_synthetic_checkpoint)
from engine.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

FULL_PRESETS = [n for n in PRESETS if n not in TINY_PRESETS]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(d.iterdir()) if p.is_file()}


def read_weights(d: Path) -> dict[str, np.ndarray]:
    """HF key -> array, read with the safetensors package (independent of engine.safetensors)."""
    out = {}
    for p in sorted(d.glob("model*.safetensors")):
        out.update(st_numpy.load_file(str(p)))
    return out


def hf_load(d: Path, dtype):
    from transformers import PaliGemmaForConditionalGeneration
    model = PaliGemmaForConditionalGeneration.from_pretrained(str(d), dtype=dtype).eval()
    model.set_attn_implementation("eager")
    return model


def hf_canonical(model) -> dict[str, np.ndarray]:
    """Canonical name -> fp32 array of every parameter transformers loaded (tied head once)."""
    out = {}
    for key, t in model.state_dict().items():
        name = layout.to_canonical(key)
        assert name is not None, f"transformers key {key!r} matches no layout"
        if name == "lm_head.weight" and model.config.text_config.tie_word_embeddings:
            continue
        out[name] = t.detach().float().numpy()
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(preset, dtype, seed) -> directory, written once per module."""
    cache: dict = {}

    def get(preset: str, dtype: str = "fp32", seed: int = 0, **kw) -> Path:
        key = (preset, dtype, seed, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{preset}-{dtype}-{seed}")
            cache[key] = write_synthetic_checkpoint(preset, d, seed=seed, dtype=dtype, progress=False, **kw)
        return cache[key]
    return get


# ------------------------------------------------------------------------------ presets
def test_unknown_preset_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError) as e:
        preset_config("paligemma-7b")
    for name in PRESETS:
        assert name in str(e.value)
    with pytest.raises(ConfigError):
        write_synthetic_checkpoint("nope", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_tiny_presets_exercise_the_tricky_parts():
    pg1, pg2 = preset_config("tiny-pg1"), preset_config("tiny-pg2")
    assert pg1.version == 1 and pg2.version == 2
    for cfg in (pg1, pg2):
        assert cfg.vision.image_size in (28, 56) and cfg.vision.patch_size == 14
        assert 2 <= cfg.vision.num_hidden_layers <= 3 and 2 <= cfg.text.num_hidden_layers <= 3
        assert cfg.text.vocab_size % 64 == 0 and cfg.text.vocab_size > cfg.image_token_index
    t = pg2.text
    prompt_len = pg2.num_image_tokens + 1 + 4 + 1     # image tokens, <bos>, short prefix, "\n"
    assert t.sliding_window < prompt_len
    assert t.query_pre_attn_scalar != t.head_dim
    assert t.layer_types[0] == "sliding_attention" and "full_attention" in t.layer_types


REAL = {  # name: (text hidden, layers, heads, kv, mlp, image size, approx parameters, bf16 GB)
    "paligemma-3b-224": (2048, 18, 8, 1, 16384, 224, 2.92e9, 5.9),
    "paligemma-3b-448": (2048, 18, 8, 1, 16384, 448, 2.92e9, 5.9),
    "paligemma2-3b-224": (2304, 26, 8, 4, 9216, 224, 3.03e9, 6.1),
    "paligemma2-3b-448": (2304, 26, 8, 4, 9216, 448, 3.03e9, 6.1),
    "paligemma2-3b-896": (2304, 26, 8, 4, 9216, 896, 3.04e9, 6.1),
    "paligemma2-10b-224": (3584, 42, 16, 8, 14336, 224, 9.66e9, 19.3),
}


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_full_size_presets_have_the_real_shapes(name):
    assert set(FULL_PRESETS) == set(REAL)
    hidden, layers, heads, kv, mlp, res, approx_params, gb = REAL[name]
    cfg = preset_config(name)
    v, t = cfg.vision, cfg.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size) == \
        (1152, 27, 16, 4304, 14)
    assert v.image_size == res and cfg.num_image_tokens == (res // 14) ** 2
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.head_dim) == (hidden, layers, heads, kv, mlp, 256)
    assert (t.vocab_size, cfg.image_token_index, cfg.projection_dim) == (257216, 257152, hidden)
    if cfg.version == 2:
        assert (t.query_pre_attn_scalar, t.attn_logit_softcapping, t.final_logit_softcapping,
                t.sliding_window) == (256, 50.0, 30.0, 4096)
        assert t.layer_types[:2] == ("sliding_attention", "full_attention")
    else:
        assert t.query_pre_attn_scalar is None and t.attn_logit_softcapping is None

    shapes = layout.expected_tensors(cfg)
    n = sum(math.prod(s) for s in shapes.values())
    assert n == synth.parameter_count(cfg)
    assert abs(n - approx_params) / approx_params < 0.005, n
    assert abs(n * 2 / 1e9 - gb) < 0.1
    vision = sum(math.prod(s) for k, s in shapes.items() if k.startswith("vision."))
    extra_positions = (cfg.num_image_tokens - 256) * 1152   # the 412M are at 224 px
    assert abs(vision - extra_positions - 412e6) < 1e6, vision


@pytest.mark.parametrize("name", ["paligemma-3b-224", "paligemma2-3b-224", "paligemma2-10b-224"])
def test_full_size_shapes_match_transformers(name):
    """transformers builds the model from our config.json (meta device: no weights) with exactly
    the tensors and parameter count of engine.layout.expected_tensors."""
    from transformers import PaliGemmaConfig as HFConfig, PaliGemmaForConditionalGeneration
    cfg = preset_config(name)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(HFConfig.from_dict(cfg.to_hf()))
    hf_shapes = {layout.to_canonical(k): tuple(p.shape) for k, p in model.named_parameters()}
    assert hf_shapes == layout.expected_tensors(cfg)
    assert sum(p.numel() for p in model.parameters()) == synth.parameter_count(cfg)
    if name == "paligemma-3b-224":
        assert synth.parameter_count(cfg) == 2_923_466_480   # google/paligemma-3b-pt-224


# ------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_loads_in_engine_and_transformers_identically(written, preset, dtype):
    d = written(preset, dtype)
    assert sorted(p.name for p in d.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"])
    model = hf_load(d, torch.float32 if dtype == "fp32" else torch.bfloat16)
    hf = hf_canonical(model)
    cfg = preset_config(preset)
    expected = layout.expected_tensors(cfg)
    assert set(hf) == set(expected)

    from engine.checkpoint import Checkpoint
    with Checkpoint.open(d) as ckpt:
        assert ckpt.config == cfg
        assert ckpt.dtype == dtype
        assert list(ckpt.tensors) == list(expected)
        for name, shape in expected.items():
            ours = ckpt.tensors[name]
            assert ours.shape == shape
            assert ours.dtype == (np.float32 if dtype == "fp32" else ml_dtypes.bfloat16), name
            np.testing.assert_array_equal(ours.astype(np.float32), hf[name], err_msg=name)

    # Keys on disk are the transformers 4.x layout, every file says format=pt.
    on_disk = read_weights(d)
    assert set(on_disk) == {layout.to_hf(n, "4.x") for n in expected}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_forward_in_transformers_is_sane(written, preset):
    """Random weights give finite, spread-out logits; norms are randomized (not HF's zeros)."""
    d = written(preset, "fp32")
    model = hf_load(d, torch.float32)
    cfg = preset_config(preset)
    n_img = cfg.num_image_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[cfg.image_token_index] * n_img + [2, 10, 20, 30, 108, 40, 50]])
    tt = torch.tensor([[0] * (n_img + 5) + [1, 1]])
    pixels = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels, token_type_ids=tt).logits[0]
    assert torch.isfinite(logits).all()
    std = logits.std(dim=-1)
    assert (std > 0.3).all() and (std < 10).all(), std
    norms = [n for n in layout.expected_tensors(cfg) if "norm" in n and n.endswith(".weight")]
    w = hf_canonical(model)
    for n in norms:
        assert 0.05 < w[n].std() < 0.2, n


def test_config_round_trip(written):
    from transformers import PaliGemmaConfig as HFConfig
    for preset in TINY_PRESETS:
        d = written(preset, "fp32")
        cfg = preset_config(preset)
        assert PaliGemmaConfig.from_file(d / "config.json") == cfg
        assert PaliGemmaConfig.from_hf(cfg.to_hf()) == cfg
        hf = HFConfig.from_pretrained(str(d))
        assert hf.image_token_index == cfg.image_token_index
        assert hf.text_config.vocab_size == cfg.text.vocab_size
        assert hf.vision_config.image_size == cfg.vision.image_size
        if cfg.version == 2:
            assert hf.text_config.sliding_window == cfg.text.sliding_window
            assert hf.text_config.query_pre_attn_scalar == cfg.text.query_pre_attn_scalar
            assert tuple(hf.text_config.layer_types) == cfg.text.layer_types
    for name in FULL_PRESETS:
        assert PaliGemmaConfig.from_hf(json.loads(json.dumps(PRESETS[name].to_hf()))) == PRESETS[name]


# ------------------------------------------------------------------------------ determinism
def test_same_seed_identical_files(written, tmp_path):
    a = written("tiny-pg2", "bf16", seed=7)
    b = write_synthetic_checkpoint("tiny-pg2", tmp_path / "again", seed=7, dtype="bf16", progress=False)
    assert file_hashes(a) == file_hashes(b)


def test_different_seeds_differ_in_every_tensor(written):
    a, b = read_weights(written("tiny-pg1", "fp32", seed=0)), read_weights(written("tiny-pg1", "fp32", seed=1))
    assert set(a) == set(b)
    for key in a:
        assert not np.array_equal(a[key], b[key]), key
    assert sha256(written("tiny-pg1", "fp32", seed=0) / "model.safetensors") != \
        sha256(written("tiny-pg1", "fp32", seed=1) / "model.safetensors")


def test_tensor_bytes_depend_only_on_seed_and_name(written):
    """Each tensor equals random_tensor(name, ...) generated on its own (no write-order state)."""
    cfg = preset_config("tiny-pg2")
    weights = read_weights(written("tiny-pg2", "fp32", seed=3))
    for name, shape in reversed(list(layout.expected_tensors(cfg).items())):
        mean, std = synth.init_std(name, shape, cfg)
        alone = synth.random_tensor(name, shape, mean, std, seed=3)
        np.testing.assert_array_equal(weights[layout.to_hf(name)], alone, err_msg=name)


def test_bf16_is_fp32_rounded(written):
    f32 = read_weights(written("tiny-pg2", "fp32"))
    bf16 = read_weights(written("tiny-pg2", "bf16"))
    for key, a in f32.items():
        assert bf16[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(bf16[key], a.astype(ml_dtypes.bfloat16), err_msg=key)


def test_blocks_are_chunk_independent():
    """A tensor bigger than one RNG block: its first block equals a one-block tensor's values."""
    big = synth.random_tensor("x", (3, synth.BLOCK // 2 + 5), 0.0, 1.0, seed=1)
    small = synth.random_tensor("x", (synth.BLOCK,), 0.0, 1.0, seed=1)
    np.testing.assert_array_equal(big.reshape(-1)[:synth.BLOCK], small)
    assert not np.array_equal(big.reshape(-1)[synth.BLOCK:synth.BLOCK + 10], small[:10])
    assert abs(big.std() - 1.0) < 0.01 and abs(big.mean()) < 0.01


def test_init_scheme_values():
    cfg = preset_config("paligemma2-3b-224")
    g = synth.text_growth(cfg)
    assert g == pytest.approx(math.sqrt((2304 / 4 - 1) / 52))
    assert synth.init_std("text.embed_tokens.weight", (257216, 2304), cfg) == (0.0, 2304 ** -0.5)
    assert synth.init_std("text.layers.0.self_attn.q_proj.weight", (2048, 2304), cfg) == \
        (0.0, synth.QK_GAIN * 2304 ** -0.5)
    assert synth.init_std("text.layers.0.self_attn.v_proj.weight", (1024, 2304), cfg) == (0.0, 2304 ** -0.5)
    assert synth.init_std("vision.encoder.layers.0.self_attn.k_proj.weight", (1152, 1152), cfg) == \
        (0.0, synth.QK_GAIN * 1152 ** -0.5)
    assert synth.init_std("text.layers.0.mlp.down_proj.weight", (2304, 9216), cfg) == (0.0, 9216 ** -0.5)
    assert synth.init_std("text.layers.3.post_feedforward_layernorm.weight", (2304,), cfg) == \
        pytest.approx((g - 1, synth.NORM_STD))
    assert synth.init_std("text.layers.3.pre_feedforward_layernorm.weight", (2304,), cfg) == (0.0, synth.NORM_STD)
    assert synth.init_std("text.norm.weight", (2304,), cfg) == (synth.LOGIT_STD - 1, synth.NORM_STD)
    assert synth.init_std("vision.encoder.layers.0.layer_norm1.weight", (1152,), cfg) == (1.0, synth.NORM_STD)
    assert synth.init_std("vision.encoder.layers.0.mlp.fc2.weight", (1152, 4304), cfg) == \
        pytest.approx((0.0, 4304 ** -0.5 / math.sqrt(54)))
    assert synth.init_std("vision.embeddings.patch_embedding.weight", (1152, 3, 14, 14), cfg) == (0.0, 588 ** -0.5)
    pg1 = preset_config("paligemma-3b-224")
    g1 = math.sqrt((2048 / 4 - 1) / (18 * synth.GELU_GATE_VAR))
    assert synth.init_std("text.layers.0.self_attn.o_proj.weight", (2048, 2048), pg1) == \
        pytest.approx((0.0, g1 / math.sqrt(2048)))
    assert synth.init_std("text.layers.0.post_attention_layernorm.weight", (2048,), pg1) == (0.0, synth.NORM_STD)


def test_gelu_gate_variance():
    from engine.reference import gelu_tanh
    z = np.random.default_rng(0).standard_normal(2_000_000)
    assert np.mean(gelu_tanh(z) ** 2) == pytest.approx(synth.GELU_GATE_VAR, rel=0.01)


# ------------------------------------------------------------------------------ sharding
def test_sharded_checkpoint_loads_everywhere(written):
    limit = 150_000
    d = written("tiny-pg2", "fp32", max_shard_bytes=limit)
    single = read_weights(written("tiny-pg2", "fp32"))
    shards = sorted(d.glob("model-*.safetensors"))
    assert not (d / "model.safetensors").exists() and len(shards) >= 3
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    sharded = read_weights(d)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in sharded.values())
    assert set(index["weight_map"]) == set(sharded) == set(single)
    for p in shards:
        held = st_numpy.load_file(str(p))
        assert all(index["weight_map"][k] == p.name for k in held)
        assert sum(a.nbytes for a in held.values()) <= limit or len(held) == 1
    for key in single:   # sharding does not change a single byte
        np.testing.assert_array_equal(sharded[key], single[key], err_msg=key)

    hf = hf_canonical(hf_load(d, torch.float32))
    from engine.checkpoint import Checkpoint
    with Checkpoint.open(d) as ckpt:
        for name, a in ckpt.tensors.items():
            np.testing.assert_array_equal(a, hf[name], err_msg=name)


def test_plan_shards_follows_transformers_rule():
    specs = [(f"t{i}", "F32", (n,), n) for i, n in enumerate([40, 40, 30, 200, 10, 50])]
    plan = synth.plan_shards(specs, 100)
    assert [[s[0] for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20 and parse_size("123") == 123
    with pytest.raises(SynthError):
        parse_size("lots")


# ------------------------------------------------------------------------------ tokenizer / processor
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tokenizer_matches_config(written, preset):
    d = written(preset, "bf16")
    cfg = preset_config(preset)
    tok = Tokenizer(d / "tokenizer.model", cfg.image_token_index)
    assert tok.sp_vocab_size == cfg.image_token_index
    assert cfg.text.vocab_size == -(-(tok.sp_vocab_size + 1) // 64) * 64
    for piece in ("<loc0000>", "<loc0511>", "<loc1023>", "<seg000>", "<seg127>"):
        (i,) = tok.encode(piece)
        assert tok.id_to_piece(i) == piece
    ids = tok.encode("detect cat <loc0001><loc1023><seg127>\n")
    assert ids[-4:-1] == [tok.loc_id(1), tok.loc_id(1023), tok.seg_id(127)]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_hf_processor_loads_offline(written, preset):
    from PIL import Image
    from transformers import AutoProcessor
    d = written(preset, "bf16")
    cfg = preset_config(preset)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5] and pre["resample"] == 3
    assert pre["rescale_factor"] == 1 / 255 and pre["image_seq_length"] == cfg.num_image_tokens

    proc = AutoProcessor.from_pretrained(str(d))
    assert type(proc).__name__ == "PaliGemmaProcessor"
    assert proc.image_token_id == cfg.image_token_index
    s = cfg.vision.image_size
    img = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3))
    out = proc(images=img, text="<image>detect cat", suffix="<loc0001><seg012>", return_tensors="np")
    pv = out["pixel_values"]
    assert pv.shape == (1, 3, s, s) and pv.min() >= -1 and pv.max() <= 1
    expected = (np.asarray(img.resize((s, s), Image.BICUBIC), np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(pv[0].transpose(1, 2, 0), expected, atol=1e-6)

    tok = Tokenizer(d / "tokenizer.model", cfg.image_token_index)
    ids = out["input_ids"][0].tolist()
    n = cfg.num_image_tokens
    assert ids[:n] == [cfg.image_token_index] * n and ids[n] == 2
    assert ids[n + 1:] == tok.encode("detect cat\n") + [tok.loc_id(1), tok.seg_id(12), 1]
    assert out["token_type_ids"][0].tolist() == [0] * (n + 1 + len(tok.encode("detect cat\n"))) + [1, 1, 1]


# ------------------------------------------------------------------------------ errors / CLI
def test_output_dir_errors(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(SynthError, match="not empty.*--force"):
        write_synthetic_checkpoint("tiny-pg1", d, progress=False)
    # --force replaces our files, removes stale shards, keeps everything else.
    (d / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (d / "model.safetensors.index.json").write_text("{}")
    write_synthetic_checkpoint("tiny-pg1", d, progress=False, force=True)
    assert (d / "notes.txt").read_text() == "keep me"
    assert not (d / "model-00001-of-00002.safetensors").exists()
    assert not (d / "model.safetensors.index.json").exists()
    assert (d / "model.safetensors").exists() and (d / "config.json").exists()

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SynthError, match="not a directory"):
        write_synthetic_checkpoint("tiny-pg1", blocker, progress=False)
    with pytest.raises(SynthError, match="cannot create"):
        write_synthetic_checkpoint("tiny-pg1", blocker / "sub", progress=False)
    with pytest.raises(SynthError, match="dtype"):
        write_synthetic_checkpoint("tiny-pg1", tmp_path / "a", dtype="fp8", progress=False)
    with pytest.raises(SynthError, match="seed"):
        write_synthetic_checkpoint("tiny-pg1", tmp_path / "b", seed=-1, progress=False)
    assert issubclass(SynthError, EngineError)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SynthError, match="not writable|cannot create"):
            write_synthetic_checkpoint("tiny-pg1", ro / "x", progress=False)
    finally:
        ro.chmod(0o700)


def test_cli(tmp_path, capsys):
    assert synth.main(["--preset", "tiny-pg1", "--out", str(tmp_path / "c"), "--seed", "5",
                       "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and " s" in err.splitlines()[-1]
    assert read_weights(tmp_path / "c")["language_model.model.norm.weight"].dtype == np.float32
    assert synth.main(["--preset", "tiny-pg1", "--out", str(tmp_path / "c")]) == 2
    assert "--force" in capsys.readouterr().err
    assert synth.main(["--preset", "bogus", "--out", str(tmp_path / "d")]) == 2
    assert "paligemma2-3b-224" in capsys.readouterr().err
    assert synth.main(["--list"]) == 0
    assert "paligemma2-10b-224" in capsys.readouterr().out
