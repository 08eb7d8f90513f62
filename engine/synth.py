"""Synthetic PaliGemma checkpoints: random weights with the real shapes, in the real HF format.

    python -m engine.synth --preset paligemma2-3b-224 --out /tmp/pg2 [--seed 0] [--dtype bf16]
    python -m engine.synth --list

    from engine.synth import write_synthetic_checkpoint, preset_config, PRESETS
    write_synthetic_checkpoint("tiny-pg2", "/tmp/tiny", seed=0, dtype="fp32")

The output directory is what an HF PaliGemma repository holds: config.json, the weights as
`model.safetensors` (or HF-style shards `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json` when they exceed `max_shard_bytes`, 5 GB by default), with
transformers 4.x key names, a sentencepiece `tokenizer.model` in the PaliGemma layout,
`tokenizer_config.json`, `special_tokens_map.json`, `preprocessor_config.json` and
`generation_config.json`. transformers' PaliGemmaForConditionalGeneration and
PaliGemmaProcessor load it offline. config.json is written last, so an interrupted run
never leaves a directory that looks complete.

Weights are deterministic: every tensor is generated in fixed blocks of BLOCK values, block b
from its own RNG seeded by (seed, crc32(canonical name), b). The bytes of a tensor therefore depend
only on the seed, its name and its shape, never on write order, sharding or dtype (bf16 is the
round-to-nearest-even of the fp32 values, done by ml_dtypes).

Init scheme (normal distributions; keeps activations finite and O(1) after every norm through
all layers of the full-size models, and gives non-degenerate logits):
    linear weights [out, in]            N(0, 1/in)
    vision residual outputs (out_proj, fc2)   N(0, 1/in) / sqrt(2 * vision layers)
    biases                              N(0, 0.02^2)
    patch conv [D, 3, P, P]             N(0, 1/(3*P*P))
    position embedding                  N(0, 0.05^2)
    text embedding (= tied LM head)     N(0, 1/hidden), so E * sqrt(hidden) is about unit
    LayerNorm (SigLIP) weight / bias    1 + N(0, 0.1^2) / N(0, 0.1^2)   (y = x_hat * w + b)
    RMSNorm (Gemma) weight              N(0, 0.1^2)                      (y = x_hat * (1 + w))
  and three deliberate exceptions that make the logits of a random model look like a language
  model's (measured with transformers on the full-size models; see the report in text_growth):
    residual growth  Gemma 1 o_proj / down_proj N(0, 1/in) * g; Gemma 2 post-attention and
                     post-feedforward norms w = g - 1 + N(0, 0.1^2); g = text_growth(config)
                     (about 8.2 for PG1 3B, 3.3 for PG2 3B / 10B). Without it the model copies
                     its input token (tied LM head).
    sharp attention  q_proj / k_proj (vision and text) N(0, 1/in) * QK_GAIN, so scores spread
                     about QK_GAIN^2 instead of 1. Near-uniform attention averages every value
                     into one shared vector and all positions end up predicting the same token.
    final norm       w = LOGIT_STD - 1 + N(0, 0.1^2): logits spread about LOGIT_STD (3), a
                     softmax of ~8 nats over 257k tokens instead of a near-uniform one.
Norm weights are random in every preset (0 would hide mistakes in the (1 + w) scaling).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import PaliGemmaConfig, TextConfig, VisionConfig
from .errors import ConfigError, EngineError
from .layout import expected_tensors, to_hf
from .safetensors import SafetensorsWriter
from .tokenizer import build_tokenizer, compact_vocab_size

REAL_SP_VOCAB = 257152                # sentencepiece pieces of the real PaliGemma tokenizer
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9   # transformers' save_pretrained default, "5GB"
BLOCK = 1 << 20                       # values per RNG block (fixed: it is part of the output bytes)
PROGRESS_MIN_BYTES = 64 << 20         # show a progress bar only for checkpoints larger than this

LINEAR_BIAS_STD = 0.02
POSITION_STD = 0.05
NORM_STD = 0.1
QK_GAIN = 2.0                         # q_proj / k_proj gain: attention scores spread ~QK_GAIN^2
LOGIT_STD = 3.0                       # spread of the logits at the output (final norm 1 + w)
GELU_GATE_VAR = 0.4246                # E[(gelu_tanh(z) * u)^2] for z, u ~ N(0, 1)

DTYPES = {"bf16": ("BF16", np.dtype(ml_dtypes.bfloat16)), "fp32": ("F32", np.dtype(np.float32))}
# Files this module writes; --force deletes exactly these (and stale shards), nothing else.
_OUTPUT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                 "generation_config.json")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class SynthError(EngineError):
    """The synthetic checkpoint cannot be written (bad output directory, arguments, disk space)."""


# ================================================================================ presets
def padded_vocab(sp_vocab_size: int) -> int:
    """Model vocab of a tokenizer with `sp_vocab_size` pieces: + <image>, rounded up to 64."""
    return -(-(sp_vocab_size + 1) // 64) * 64


def _pg1_text(**kw) -> TextConfig:
    return TextConfig(model_type="gemma", layer_types=("full_attention",) * kw["num_hidden_layers"], **kw)


def _pg2_text(**kw) -> TextConfig:
    n = kw["num_hidden_layers"]
    kw.setdefault("attn_logit_softcapping", 50.0)
    kw.setdefault("final_logit_softcapping", 30.0)
    kw.setdefault("sliding_window", 4096)
    return TextConfig(model_type="gemma2",   # transformers' rule: sliding on even layers
                      layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(n)), **kw)


def _paligemma(vision: VisionConfig, text: TextConfig, sp_vocab: int) -> PaliGemmaConfig:
    text = dataclasses.replace(text, vocab_size=padded_vocab(sp_vocab))
    cfg = PaliGemmaConfig(vision=vision, text=text, projection_dim=text.hidden_size,
                          image_token_index=sp_vocab)
    cfg.validate()
    return cfg


def _so400m(image_size: int) -> VisionConfig:
    return VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                        num_attention_heads=16, image_size=image_size, patch_size=14)


def _build_presets() -> dict[str, PaliGemmaConfig]:
    tiny_sp = compact_vocab_size()
    gemma_2b = dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=256)
    gemma2_2b = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256)
    gemma2_9b = dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256)
    presets = {
        # PG1 miniature: MQA (1 kv head) like the real 3B, 4 image tokens.
        "tiny-pg1": _paligemma(
            VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=14),
            _pg1_text(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16),
            tiny_sp),
        # PG2 miniature: 16 image tokens, window 8 (shorter than any prompt), heads*head_dim (96)
        # != hidden (64) as in the real 3B, query_pre_attn_scalar 12 != head_dim 24, real softcaps.
        "tiny-pg2": _paligemma(
            VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=56, patch_size=14),
            _pg2_text(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=12, sliding_window=8),
            tiny_sp),
        "paligemma-3b-224": _paligemma(_so400m(224), _pg1_text(**gemma_2b), REAL_SP_VOCAB),
        "paligemma-3b-448": _paligemma(_so400m(448), _pg1_text(**gemma_2b), REAL_SP_VOCAB),
        "paligemma2-3b-224": _paligemma(_so400m(224), _pg2_text(**gemma2_2b), REAL_SP_VOCAB),
        "paligemma2-3b-448": _paligemma(_so400m(448), _pg2_text(**gemma2_2b), REAL_SP_VOCAB),
        "paligemma2-3b-896": _paligemma(_so400m(896), _pg2_text(**gemma2_2b), REAL_SP_VOCAB),
        "paligemma2-10b-224": _paligemma(_so400m(224), _pg2_text(**gemma2_9b), REAL_SP_VOCAB),
    }
    return presets


PRESETS: dict[str, PaliGemmaConfig] = _build_presets()
TINY_PRESETS = ("tiny-pg1", "tiny-pg2")


def preset_config(name: str) -> PaliGemmaConfig:
    """Config of preset `name` (see PRESETS)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def parameter_count(cfg: PaliGemmaConfig) -> int:
    """Number of parameters (the tied LM head counted once)."""
    return sum(math.prod(s) for s in expected_tensors(cfg).values())


# ================================================================================ weights
def text_growth(cfg: PaliGemmaConfig) -> float:
    """Gain of each decoder block's residual update (module docstring, "residual growth").

    The LM head is the embedding (tied), so a token's own logit is sqrt(hidden) * share, where
    `share` is the fraction of the input embedding left in the final hidden state. Trained
    Gemmas bury it under a residual stream that grows through the layers; at the 1/sqrt(2L)
    update scale of a fresh init it stays about 1, and the model just copies its input token
    (measured: own logit 39 against a spread of 1 on PaliGemma 3B). The gain makes the final
    residual variance about hidden / 4, so share ~ 2 / sqrt(hidden): the own token sits
    ~2 standard deviations above the rest, below the maximum of the random logits.
      Gemma 1: x += attn + mlp; an MLP update has variance GELU_GATE_VAR * gain^2 (attention
               updates average many values and are smaller), so gain = sqrt((V - 1) / (L * 0.42)).
      Gemma 2: x += post_norm(...) has variance (1 + w)^2 = gain^2 per update, 2 per layer.
    """
    t = cfg.text
    target = t.hidden_size / 4 - 1
    if t.is_gemma2:
        return math.sqrt(max(target, 1.0) / (2 * t.num_hidden_layers))
    return math.sqrt(max(target, 1.0) / (t.num_hidden_layers * GELU_GATE_VAR))


def init_std(name: str, shape: tuple[int, ...], cfg: PaliGemmaConfig) -> tuple[float, float]:
    """(mean, std) of the normal that canonical tensor `name` is drawn from (module docstring)."""
    t = cfg.text
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        return 0.0, t.hidden_size ** -0.5
    if name.endswith("position_embedding.weight"):
        return 0.0, POSITION_STD
    if name.endswith("patch_embedding.weight"):
        return 0.0, math.prod(shape[1:]) ** -0.5
    if name == "text.norm.weight":
        return LOGIT_STD - 1.0, NORM_STD     # (1 + w) sets the spread of the logits
    if t.is_gemma2 and name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
        return text_growth(cfg) - 1.0, NORM_STD
    if "norm" in name:            # vision layer_norm1/2, post_layernorm; text pre-norms
        if name.startswith("vision.") and name.endswith(".weight"):
            return 1.0, NORM_STD      # LayerNorm multiplies by w
        return 0.0, NORM_STD          # LayerNorm bias, RMSNorm w (multiplies by 1 + w)
    if name.endswith(".bias"):
        return 0.0, LINEAR_BIAS_STD
    if len(shape) != 2:
        raise ValueError(f"no init rule for tensor {name!r} of shape {shape}")
    std = shape[1] ** -0.5        # [out, in]: fan-in
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        std *= QK_GAIN
    if name.endswith(("out_proj.weight", "fc2.weight")):
        std /= math.sqrt(2 * cfg.vision.num_hidden_layers)
    elif name.endswith(("o_proj.weight", "down_proj.weight")) and not t.is_gemma2:
        std *= text_growth(cfg)   # Gemma 2 normalizes these outputs: their scale is moot
    return 0.0, std


def random_tensor(name: str, shape: tuple[int, ...], mean: float, std: float, seed: int,
                  dtype=np.float32) -> np.ndarray:
    """mean + std * N(0, 1) of `shape`, generated in BLOCK-value blocks (block b from
    SeedSequence([seed, crc32(name), b])) straight into an array of `dtype`: peak memory is the
    result plus one fp32 block."""
    n = math.prod(shape)
    out = np.empty(n, dtype=dtype)
    crc = zlib.crc32(name.encode("utf-8"))   # stable across runs, unlike hash()
    for b, lo in enumerate(range(0, n, BLOCK)):
        hi = min(n, lo + BLOCK)
        rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, crc, b])))
        block = rng.standard_normal(hi - lo, dtype=np.float32)
        block *= np.float32(std)
        if mean:
            block += np.float32(mean)
        out[lo:hi] = block        # fp32 -> bf16 rounds to nearest even (ml_dtypes)
    return out.reshape(shape)


def plan_shards(specs: list[tuple[str, str, tuple[int, ...], int]], max_shard_bytes: int
                ) -> list[list[tuple[str, str, tuple[int, ...], int]]]:
    """Split (key, dtype, shape, nbytes) specs like transformers' save_pretrained: start a new
    shard when the next tensor would push the current one past max_shard_bytes (a tensor larger
    than the limit gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec[3]
    return shards


# ================================================================================ side files
def preprocessor_config(cfg: PaliGemmaConfig) -> dict:
    """preprocessor_config.json as in the HF PaliGemma repositories."""
    s = cfg.vision.image_size
    return {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_seq_length": cfg.num_image_tokens,
            "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": s, "width": s}}


def _token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_configs(cfg: PaliGemmaConfig) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) as in the HF PaliGemma repositories:
    <image> is an added special token right after the sentencepiece vocabulary."""
    specials = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", cfg.image_token_index: "<image>"}
    tok_cfg = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): dict(_token(t), special=True) for i, t in specials.items()},
        "additional_special_tokens": ["<image>"],
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "processor_class": "PaliGemmaProcessor", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "use_default_system_prompt": False,
    }
    special_map = {"additional_special_tokens": [_token("<image>")], "bos_token": _token("<bos>"),
                   "eos_token": _token("<eos>"), "pad_token": _token("<pad>"), "unk_token": _token("<unk>")}
    return tok_cfg, special_map


def generation_config(cfg: PaliGemmaConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_tokenizer(cfg: PaliGemmaConfig, out: Path) -> None:
    """tokenizer.model whose <image> id (sp vocab size) is config.image_token_index."""
    if cfg.image_token_index == REAL_SP_VOCAB:
        real_layout = True
    elif cfg.image_token_index == compact_vocab_size():
        real_layout = False
    else:
        raise ConfigError(
            f"image_token_index {cfg.image_token_index} matches no synthetic tokenizer: use "
            f"{REAL_SP_VOCAB} (real layout) or {compact_vocab_size()} (compact layout)")
    tmp = out / f".tokenizer.model.{os.getpid()}.tmp"
    sp_vocab = build_tokenizer(tmp, real_layout=real_layout)
    os.replace(tmp, out / "tokenizer.model")
    if sp_vocab != cfg.image_token_index or cfg.text.vocab_size <= sp_vocab:
        raise SynthError(f"the tokenizer has {sp_vocab} pieces but config.json puts <image> at "
                         f"{cfg.image_token_index} with vocab {cfg.text.vocab_size}; engine.tokenizer "
                         "and engine.synth disagree (a bug)")


# ================================================================================ output dir
def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SynthError(f"{out} is not empty; choose a new output directory, or pass --force "
                             "(force=True) to replace the checkpoint files in it")
        for p in out.iterdir():   # only our files: never delete anything else the user keeps there
            if p.is_file() and (p.name in _OUTPUT_FILES or _SHARD_RE.match(p.name)):
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SynthError(f"cannot create {out} ({e.strerror}); choose a directory you can write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SynthError(f"{out} is not writable; choose a directory you can write to")


def _check_free_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if free < need:
        raise SynthError(f"{out}: the checkpoint needs {_gb(need)} but only {_gb(free)} is free; "
                         "free some space or choose another directory")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 10**8 else f"{n / 1e6:.2f}M"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


# ================================================================================ writer
def write_synthetic_checkpoint(preset_or_config: str | PaliGemmaConfig, out_dir: str | os.PathLike,
                               seed: int = 0, dtype: str = "bf16", progress: bool = True, *,
                               force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a random-weight HF PaliGemma checkpoint to `out_dir` and return its path.

    preset_or_config: a PRESETS name or a PaliGemmaConfig (its image_token_index must be 257152
    or the compact tokenizer's size, see _write_tokenizer). dtype: "bf16" or "fp32".
    progress: tqdm bar over bytes for checkpoints above PROGRESS_MIN_BYTES, plus a final
    summary line on stderr. force: replace the checkpoint files of a non-empty `out_dir`.
    max_shard_bytes: shard when the weights exceed this (transformers' rule and file names).
    """
    cfg = preset_config(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if not isinstance(cfg, PaliGemmaConfig):
        raise ConfigError(f"expected a preset name or a PaliGemmaConfig, got {type(cfg).__name__}")
    cfg.validate()
    if dtype not in DTYPES:
        raise SynthError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(max_shard_bytes, (int, np.integer)) or max_shard_bytes <= 0:
        raise SynthError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    seed = int(seed)
    st_dtype, np_dtype = DTYPES[dtype]
    out = Path(out_dir)
    t0 = time.perf_counter()

    shapes = expected_tensors(cfg)
    specs = [(name, to_hf(name, "4.x"), shape, math.prod(shape) * np_dtype.itemsize)
             for name, shape in shapes.items()]
    total = sum(s[3] for s in specs)
    _prepare_out_dir(out, force)
    _check_free_space(out, total + (8 << 20))

    _write_tokenizer(cfg, out)
    tok_cfg, special_map = tokenizer_configs(cfg)
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "preprocessor_config.json", preprocessor_config(cfg))
    _write_json(out / "generation_config.json", generation_config(cfg))

    canon = {key: name for name, key, _, _ in specs}
    shards = plan_shards([(key, st_dtype, shape, nbytes) for _, key, shape, nbytes in specs], max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = None
    if progress and total >= PROGRESS_MIN_BYTES and sys.stderr.isatty():     # no \r lines in logs
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {out.name}",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        for fname, shard in zip(names, shards):
            with SafetensorsWriter(out / fname, [(k, dt, shp) for k, dt, shp, _ in shard],
                                   metadata={"format": "pt"}) as w:
                for key, _, shape, nbytes in shard:
                    mean, std = init_std(canon[key], shape, cfg)
                    w.write(key, random_tensor(canon[key], shape, mean, std, seed, np_dtype))
                    if bar is not None:
                        bar.update(nbytes)
    finally:
        if bar is not None:
            bar.close()
    if len(shards) > 1:
        weight_map = {key: fname for fname, shard in zip(names, shards) for key, *_ in shard}
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out / "config.json", cfg.to_hf())   # last: marks the checkpoint complete

    if progress:
        print(f"wrote {out}: {len(specs)} tensors, {_count(parameter_count(cfg))} parameters, "
              f"{_gb(total)} {dtype} in {len(shards)} file(s), {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return out


# ================================================================================ CLI
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '200MiB' -> 209715200, '123' -> 123 (like transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise SynthError(f"cannot read size {text!r}; write e.g. 5GB, 500MB, 2GiB or a byte count")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise SynthError(f"size {text!r} must be positive")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.synth",
                                description="Write a random-weight PaliGemma checkpoint in HF format.")
    p.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", help="output directory (created; must be empty unless --force)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="weight dtype (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace the checkpoint files in a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary line")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, cfg in PRESETS.items():
            print(f"{name:20s} PaliGemma {cfg.version}, {_count(parameter_count(cfg))} parameters, "
                  f"{cfg.vision.image_size} px, {cfg.num_image_tokens} image tokens")
        return 0
    if not args.preset or not args.out:
        p.error("--preset and --out are required (or --list)")
    try:
        write_synthetic_checkpoint(args.preset, args.out, seed=args.seed, dtype=args.dtype,
                                   progress=not args.no_progress, force=args.force,
                                   max_shard_bytes=parse_size(args.max_shard_size))
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the output directory is incomplete (no config.json)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
