"""engine.checkpoint against transformers' save_pretrained (the oracle) and broken checkpoints."""
from __future__ import annotations

import copy
import json
import mmap
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # for hf_tiny, whatever the rootdir
from hf_tiny import tiny_model  # noqa: E402

from engine import layout  # noqa: E402
from engine.checkpoint import Checkpoint  # noqa: E402
from engine.errors import CheckpointError, ConfigError  # noqa: E402
from engine.safetensors import SafetensorsFile, write_safetensors  # noqa: E402

_MODELS: dict[int, torch.nn.Module] = {}


def model(version: int) -> torch.nn.Module:
    """fp32 tiny random model, built once per version."""
    if version not in _MODELS:
        _MODELS[version] = tiny_model(version, seed=version)
    return _MODELS[version]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# transformers 5.x in-memory names -> canonical names, written out here rather than taken from
# engine.layout so that a wrong mapping there cannot hide in the oracle.
_IN_MEMORY_PREFIXES = {"model.vision_tower.": "vision.", "model.multi_modal_projector.linear.": "projector.",
                       "model.language_model.": "text.", "lm_head.": "lm_head."}


def canonical_state(m: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's own parameters under canonical names (tied lm_head dropped)."""
    out = {}
    for k, t in m.state_dict().items():
        prefix = next(p for p in _IN_MEMORY_PREFIXES if k.startswith(p))
        name = _IN_MEMORY_PREFIXES[prefix] + k[len(prefix):]
        if name == "lm_head.weight" and m.config.text_config.tie_word_embeddings:
            continue
        out[name] = to_numpy(t)
    return out


def assert_same(ckpt: Checkpoint, expected: dict[str, np.ndarray]) -> None:
    assert sorted(ckpt.names) == sorted(expected)
    for name, want in expected.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        # bit-exact: the loader must not round or convert anything
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), name


def mmap_base(a: np.ndarray):
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.obj if isinstance(a, memoryview) else a.base
    return a


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """version -> directory written by save_pretrained in fp32."""
    out = {}
    for v in (1, 2):
        d = tmp_path_factory.mktemp(f"pg{v}")
        model(v).save_pretrained(d)
        out[v] = d
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg2_sharded")
    model(2).save_pretrained(d, max_shard_size="20KB")
    return d


def clone(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def write_layout(tmp_path, src_dir, arrays: dict[str, np.ndarray], name="custom", config_patch=None):
    """A checkpoint dir with src_dir's config.json (optionally patched) and the given HF keys."""
    d = tmp_path / name
    d.mkdir()
    cfg = json.loads((src_dir / "config.json").read_text())
    if config_patch:
        config_patch(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    write_safetensors(d / "model.safetensors", arrays)
    return d


def hf_arrays(version: int, hf_layout: str = "4.x") -> dict[str, np.ndarray]:
    return {layout.to_hf(n, hf_layout): a for n, a in canonical_state(model(version)).items()}


# ------------------------------------------------------------------------ loads what HF saves
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_pretrained_roundtrip(tmp_path, version, dtype):
    m = copy.deepcopy(model(version)).to(dtype)
    m.save_pretrained(tmp_path)
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.config.version == version
        assert ckpt.dtype == {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        assert ckpt.names == list(layout.expected_tensors(ckpt.config))
        assert_same(ckpt, canonical_state(m))
        assert ckpt.tokenizer_path is None and ckpt.preprocessor_config is None
        assert ckpt.path == str(tmp_path)


@pytest.mark.parametrize("version, dtype", [(1, torch.float32), (2, torch.bfloat16)])
def test_sharded_save_pretrained(tmp_path, version, dtype):
    m = copy.deepcopy(model(version)).to(dtype)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    with Checkpoint.open(tmp_path) as ckpt:
        assert_same(ckpt, canonical_state(m))
        assert len({ckpt.source(n)[0] for n in ckpt.names}) > 3     # really read from many shards


def test_tensors_are_readonly_mmap_views(saved):
    with Checkpoint.open(saved[2]) as ckpt:
        name = "text.layers.0.mlp.up_proj.weight"
        a = ckpt.tensors[name]
        assert not a.flags.writeable and not a.flags.owndata
        assert isinstance(mmap_base(a), mmap.mmap)
        assert np.shares_memory(a, ckpt.get(name))
        with pytest.raises(ValueError):
            a[0, 0] = 0
        with pytest.raises(TypeError):
            ckpt.tensors[name] = np.zeros(1)                   # the mapping is read-only too
        path, key = ckpt.source(name)
        assert path.endswith("model.safetensors") and key == "language_model.model.layers.0.mlp.up_proj.weight"
        with pytest.raises(KeyError, match="no tensor named 'text.nope'"):
            ckpt.get("text.nope")
        with pytest.raises(CheckpointError, match=str(saved[2])):
            ckpt.get("text.nope")
    # closing keeps arrays already handed out valid (no dangling mapping)
    np.testing.assert_array_equal(a, canonical_state(model(2))[name])


@pytest.mark.parametrize("version", [1, 2])
def test_transformers_4x_layout(tmp_path, saved, version):
    arrays = hf_arrays(version, "4.x")
    # spelled out by hand: the 4.x layout of transformers' convert script / older saves
    for key in ("vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight",
                "multi_modal_projector.linear.weight", "language_model.model.layers.2.mlp.down_proj.weight",
                "language_model.model.embed_tokens.weight", "vision_tower.vision_model.post_layernorm.bias"):
        assert key in arrays, key
    embed = arrays["language_model.model.embed_tokens.weight"]
    arrays["language_model.lm_head.weight"] = embed                     # tied copy: skipped
    arrays["vision_tower.vision_model.head.probe"] = np.ones((1, 1, 40), np.float32)   # pooling head: skipped
    arrays["vision_tower.vision_model.head.mlp.fc1.weight"] = np.ones((3, 40), np.float32)
    d = write_layout(tmp_path, saved[version], arrays)
    with Checkpoint.open(d) as ckpt:
        assert_same(ckpt, canonical_state(model(version)))
    with Checkpoint.open(saved[version]) as ref, Checkpoint.open(d) as ckpt:   # same as the HF save
        for n in ref.names:
            np.testing.assert_array_equal(ckpt.get(n), ref.get(n))


@pytest.mark.parametrize("version", [1, 2])
def test_transformers_5x_in_memory_layouts(tmp_path, saved, version):
    sd = {k: to_numpy(t) for k, t in model(version).state_dict().items()}   # model.vision_tower.*, lm_head.weight
    assert any(k.startswith("model.vision_tower.") for k in sd) and "lm_head.weight" in sd
    d = write_layout(tmp_path, saved[version], sd, name="state_dict")
    with Checkpoint.open(d) as ckpt:
        assert_same(ckpt, canonical_state(model(version)))
    d = write_layout(tmp_path, saved[version], hf_arrays(version, "5.x"), name="to_hf_5x")
    with Checkpoint.open(d) as ckpt:
        assert_same(ckpt, canonical_state(model(version)))


def untie(cfg):
    cfg["tie_word_embeddings"] = False
    cfg["text_config"]["tie_word_embeddings"] = False


def test_untied_lm_head_is_loaded_and_required(tmp_path, saved):
    arrays = hf_arrays(1)
    head = np.random.default_rng(1).standard_normal(arrays["language_model.model.embed_tokens.weight"].shape)
    arrays["language_model.lm_head.weight"] = head.astype(np.float32)
    d = write_layout(tmp_path, saved[1], arrays, config_patch=untie)
    with Checkpoint.open(d) as ckpt:
        assert not ckpt.config.text.tie_word_embeddings
        np.testing.assert_array_equal(ckpt.get("lm_head.weight"), head.astype(np.float32))
    d = write_layout(tmp_path, saved[1], hf_arrays(1), name="no_head", config_patch=untie)
    with pytest.raises(CheckpointError, match="no_head/model.safetensors: missing tensor 'lm_head.weight'"):
        Checkpoint.open(d)


def test_tokenizer_and_preprocessor_recorded(tmp_path, saved):
    d = clone(saved[1], tmp_path)
    (d / "tokenizer.model").write_bytes(b"not parsed here")
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "size": {"height": 28}}))
    with Checkpoint.open(d) as ckpt:
        assert ckpt.tokenizer_path == str(d / "tokenizer.model")
        assert ckpt.preprocessor_config["size"] == {"height": 28}
    (d / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        Checkpoint.open(d)


# ------------------------------------------------------------------------ broken checkpoints
def expect_error(d, *fragments, exc=CheckpointError):
    with pytest.raises(exc) as ei:
        Checkpoint.open(d)
    msg = str(ei.value)
    for f in fragments:
        assert str(f) in msg, f"{f!r} not in: {msg}"
    return msg


def test_missing_tensor(tmp_path, saved):
    arrays = hf_arrays(2)
    del arrays["language_model.model.layers.1.self_attn.k_proj.weight"]
    d = write_layout(tmp_path, saved[2], arrays)
    expect_error(d, d / "model.safetensors", "missing tensor", "'text.layers.1.self_attn.k_proj.weight'",
                 "language_model.model.layers.1.self_attn.k_proj.weight", "(32, 48)")


def test_unexpected_tensor_in_known_layout(tmp_path, saved):
    arrays = hf_arrays(1)
    arrays["language_model.model.layers.7.mlp.up_proj.weight"] = np.zeros((80, 48), np.float32)   # only 3 layers
    d = write_layout(tmp_path, saved[1], arrays)
    expect_error(d, d / "model.safetensors", "unexpected tensor", "'language_model.model.layers.7.mlp.up_proj.weight'")


def test_key_matching_no_layout(tmp_path, saved):
    arrays = hf_arrays(1)
    arrays["decoder.weight"] = np.zeros(2, np.float32)
    d = write_layout(tmp_path, saved[1], arrays)
    expect_error(d, d / "model.safetensors", "unexpected tensor 'decoder.weight'", "key layout")


def test_shape_mismatch_with_config(tmp_path, saved):
    def patch(cfg):
        cfg["text_config"]["intermediate_size"] = 96
    d = write_layout(tmp_path, saved[2], hf_arrays(2), config_patch=patch)
    expect_error(d, d / "model.safetensors", "'language_model.model.layers.0.mlp.gate_proj.weight'",
                 "(80, 48)", "(96, 48)")


def test_wrong_shape_tensor(tmp_path, saved):
    arrays = hf_arrays(2)
    arrays["multi_modal_projector.linear.bias"] = np.zeros(47, np.float32)
    d = write_layout(tmp_path, saved[2], arrays)
    expect_error(d, d / "model.safetensors", "'multi_modal_projector.linear.bias'", "(47,)", "(48,)")


def test_duplicate_canonical_mapping(tmp_path, saved):
    arrays = hf_arrays(2, "4.x")
    arrays["model.language_model.norm.weight"] = arrays["language_model.model.norm.weight"]   # 5.x twin
    d = write_layout(tmp_path, saved[2], arrays)
    expect_error(d, d / "model.safetensors", "'model.language_model.norm.weight'",
                 "'language_model.model.norm.weight'", "'text.norm.weight'")


def test_unsupported_dtype(tmp_path, saved):
    arrays = hf_arrays(1)
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    arrays[key] = arrays[key].astype(np.int32)
    d = write_layout(tmp_path, saved[1], arrays)
    expect_error(d, d / "model.safetensors", repr(key), "I32")


def test_mixed_linear_dtypes(tmp_path, saved):
    arrays = hf_arrays(1)
    key = "language_model.model.layers.2.mlp.down_proj.weight"
    arrays[key] = arrays[key].astype(ml_dtypes.bfloat16)
    d = write_layout(tmp_path, saved[1], arrays)
    expect_error(d, "mix dtypes", repr(key), "BF16", "F32")


def test_fp32_norms_with_bf16_linear_weights(tmp_path, saved):
    arrays = {k: a.astype(ml_dtypes.bfloat16) if a.ndim == 2 else a for k, a in hf_arrays(2).items()}
    d = write_layout(tmp_path, saved[2], arrays)
    with Checkpoint.open(d) as ckpt:
        assert ckpt.dtype == "bf16"
        assert ckpt.get("text.norm.weight").dtype == np.float32
        assert ckpt.get("projector.weight").dtype == ml_dtypes.bfloat16


def test_missing_config(tmp_path, saved):
    d = clone(saved[1], tmp_path)
    os.remove(d / "config.json")
    expect_error(d, d / "config.json", exc=ConfigError)


def test_not_a_directory_and_no_weights(tmp_path, saved):
    expect_error(tmp_path / "nowhere", tmp_path / "nowhere", "not a checkpoint directory")
    d = clone(saved[1], tmp_path)
    expect_error(d / "model.safetensors", "pass the directory")
    os.remove(d / "model.safetensors")
    expect_error(d, d, "model.safetensors")


def test_truncated_safetensors(tmp_path, saved):
    d = clone(saved[2], tmp_path)
    p = d / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:-100])
    with SafetensorsFile(saved[2] / "model.safetensors") as f:
        last = max(f.keys(), key=lambda k: f.info(k).end)
    expect_error(d, p, "truncated", repr(last))
    p.write_bytes(raw[:5])
    expect_error(d, p, "shorter than the 8-byte header")


def shard_of(d, key):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][key]


def edit_index(d, fn):
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index["weight_map"])
    p.write_text(json.dumps(index))
    return p


KEY = "language_model.model.layers.1.mlp.up_proj.weight"


def test_index_names_missing_shard(tmp_path, sharded):
    d = clone(sharded, tmp_path)
    shard = shard_of(d, KEY)
    os.remove(d / shard)
    expect_error(d, d / "model.safetensors.index.json", shard, "does not exist")


def test_index_names_wrong_shard(tmp_path, sharded):
    d = clone(sharded, tmp_path)
    right = shard_of(d, KEY)
    wrong = next(s for s in sorted(os.listdir(d)) if s.startswith("model-") and s != right)
    p = edit_index(d, lambda wm: wm.__setitem__(KEY, wrong))
    expect_error(d, p, repr(KEY), wrong, right)


def test_shard_tensor_missing_from_index(tmp_path, sharded):
    d = clone(sharded, tmp_path)
    shard = shard_of(d, KEY)
    p = edit_index(d, lambda wm: wm.pop(KEY))
    expect_error(d, d / shard, repr(KEY), "not listed in", p)


def test_index_lists_tensor_no_shard_holds(tmp_path, sharded):
    d = clone(sharded, tmp_path)
    shard = shard_of(d, KEY)
    p = edit_index(d, lambda wm: wm.__setitem__("language_model.model.layers.1.mlp.extra.weight", shard))
    expect_error(d, p, "'language_model.model.layers.1.mlp.extra.weight'", "does not hold it")


def test_tensor_in_two_shards(tmp_path, sharded):
    d = clone(sharded, tmp_path)
    shard = shard_of(d, KEY)
    other = next(s for s in sorted(os.listdir(d)) if s.startswith("model-") and s != shard)
    with SafetensorsFile(d / other) as f:
        arrays = {k: np.array(f.get(k)) for k in f.keys()}
    with SafetensorsFile(d / shard) as f:
        arrays[KEY] = np.array(f.get(KEY))
    write_safetensors(d / other, arrays)
    expect_error(d, d, repr(KEY), "appears in several shards")


def test_truncated_shard(tmp_path, sharded):
    d = clone(sharded, tmp_path)
    shard = d / shard_of(d, KEY)
    shard.write_bytes(shard.read_bytes()[:-10])
    expect_error(d, shard, "truncated")


@pytest.mark.parametrize("text", ["{not json", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}',
                                  '{"weight_map": {"a": "../model.safetensors"}}'])
def test_malformed_index(tmp_path, sharded, text):
    d = clone(sharded, tmp_path)
    (d / "model.safetensors.index.json").write_text(text)
    expect_error(d, d / "model.safetensors.index.json")
