"""Model configuration, read from an HF `config.json` with the same defaults as transformers.

Three small frozen dataclasses: `VisionConfig` (SigLIP), `TextConfig` (Gemma / Gemma 2)
and `PaliGemmaConfig` which holds both. `PaliGemmaConfig.from_hf(dict)` accepts the
config.json of transformers 4.x and 5.x; `to_hf()` writes a config.json that both load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .errors import ConfigError

MAX_LAYERS = 10_000      # sanity bound (PaliGemma 2 10B has 42); a corrupt count must not build huge lists
RESTORE_CONFIG = "restore config.json from the checkpoint's repository (it is corrupt or was edited)"


# Defaults of transformers' SiglipVisionConfig, GemmaConfig and Gemma2Config.
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
# What PaliGemmaConfig uses when vision_config / text_config is absent altogether.
_PALIGEMMA_VISION_DEFAULTS = dict(intermediate_size=4096, hidden_size=1152, patch_size=14,
                                  image_size=224, num_hidden_layers=27, num_attention_heads=16,
                                  vision_use_head=False)
_GEMMA_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                       head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)
_GEMMA2_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                        query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
_PALIGEMMA_TEXT_DEFAULTS = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                                intermediate_size=16384, num_attention_heads=8,
                                num_key_value_heads=1, vocab_size=257152)
_SUPPORTED_ACTS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = False   # PaliGemma never uses the pooling head; its tensors are ignored

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    model_type: str = "gemma"        # "gemma" (PaliGemma 1) or "gemma2" (PaliGemma 2)
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None      # None: scale by 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None     # None: off
    final_logit_softcapping: float | None = None    # None: off
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()               # "sliding_attention" / "full_attention" per layer
    tie_word_embeddings: bool = True

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def attn_scale(self) -> float:
        """Multiplier of q.k: 1/sqrt(query_pre_attn_scalar) for Gemma 2, 1/sqrt(head_dim) for Gemma."""
        s = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(s) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """Sliding window of decoder layer `layer`, or None for global attention."""
        if self.sliding_window and self.layer_types and self.layer_types[layer] == "sliding_attention":
            return int(self.sliding_window)
        return None


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 2048
    image_token_index: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def version(self) -> int:
        """1 for PaliGemma (Gemma decoder), 2 for PaliGemma 2 (Gemma 2 decoder)."""
        return 2 if self.text.is_gemma2 else 1

    # ------------------------------------------------------------------ HF json
    @classmethod
    def from_hf(cls, d: dict) -> "PaliGemmaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, not a {type(d).__name__}; {RESTORE_CONFIG}")
        if d.get("model_type", "paligemma") != "paligemma":
            raise ConfigError(f"config.json has model_type={d.get('model_type')!r}; "
                              "this engine runs PaliGemma checkpoints (model_type 'paligemma')")
        vd = d.get("vision_config")
        vd = dict(_SIGLIP_DEFAULTS, **vd) if vd is not None else dict(_SIGLIP_DEFAULTS, **_PALIGEMMA_VISION_DEFAULTS)
        td = d.get("text_config")
        td = dict(td) if td is not None else dict(_PALIGEMMA_TEXT_DEFAULTS)
        if "vocab_size" not in td and "vocab_size" in d:   # older configs keep it at the top level
            td["vocab_size"] = d["vocab_size"]
        model_type = td.get("model_type", "gemma")
        if model_type not in ("gemma", "gemma2"):
            raise ConfigError(f"text_config.model_type={model_type!r} is not supported (gemma or gemma2)")
        td = dict(_GEMMA2_DEFAULTS if model_type == "gemma2" else _GEMMA_DEFAULTS, **td)
        act = td.get("hidden_activation") or td.get("hidden_act")
        if act not in _SUPPORTED_ACTS or vd.get("hidden_act", "gelu_pytorch_tanh") not in _SUPPORTED_ACTS:
            raise ConfigError(f"activation {act!r} is not supported; PaliGemma uses gelu_pytorch_tanh")
        rope = td.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", td.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default" or td.get("rope_scaling"):
            raise ConfigError("RoPE scaling is not supported; PaliGemma uses plain RoPE")
        n_layers = int(td["num_hidden_layers"])
        if not 0 < n_layers <= MAX_LAYERS:     # checked before the per-layer list below is built
            raise ConfigError(f"text_config.num_hidden_layers is {n_layers}; it must be 1..{MAX_LAYERS}: "
                              "fix config.json or restore it from the checkpoint's repository")
        layer_types = td.get("layer_types")
        if model_type == "gemma2":
            if layer_types is None:   # transformers 4.x: sliding on even layers
                layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            if len(layer_types) != n_layers:
                raise ConfigError(f"text_config.layer_types has {len(layer_types)} entries for {n_layers} layers")
        else:
            layer_types = ["full_attention"] * n_layers
        text = TextConfig(
            model_type=model_type,
            vocab_size=int(td["vocab_size"]),
            hidden_size=int(td["hidden_size"]),
            intermediate_size=int(td["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=int(td["num_attention_heads"]),
            num_key_value_heads=int(td["num_key_value_heads"]),
            head_dim=int(td["head_dim"]),
            max_position_embeddings=int(td["max_position_embeddings"]),
            rms_norm_eps=float(td["rms_norm_eps"]),
            rope_theta=rope_theta,
            query_pre_attn_scalar=td.get("query_pre_attn_scalar") if model_type == "gemma2" else None,
            attn_logit_softcapping=td.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_logit_softcapping=td.get("final_logit_softcapping") if model_type == "gemma2" else None,
            sliding_window=td.get("sliding_window") if model_type == "gemma2" else None,
            layer_types=tuple(layer_types),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", td.get("tie_word_embeddings", True))),
        )
        image_size = vd["image_size"]
        patch_size = vd["patch_size"]
        if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
            raise ConfigError("non-square image_size / patch_size is not supported")
        vision = VisionConfig(
            hidden_size=int(vd["hidden_size"]), intermediate_size=int(vd["intermediate_size"]),
            num_hidden_layers=int(vd["num_hidden_layers"]), num_attention_heads=int(vd["num_attention_heads"]),
            num_channels=int(vd.get("num_channels", 3)), image_size=int(image_size), patch_size=int(patch_size),
            layer_norm_eps=float(vd["layer_norm_eps"]), vision_use_head=bool(vd.get("vision_use_head", True)))
        cfg = cls(vision=vision, text=text,
                  projection_dim=int(d.get("projection_dim", text.hidden_size)),
                  image_token_index=int(d.get("image_token_index", d.get("image_token_id", 256000))),
                  pad_token_id=int(d.get("pad_token_id", td.get("pad_token_id", 0)) or 0),
                  bos_token_id=int(td.get("bos_token_id", 2)),
                  eos_token_id=_first(td.get("eos_token_id", 1)))
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PaliGemmaConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; point to an HF PaliGemma checkpoint directory") from None
        except (OSError, ValueError, RecursionError) as e:   # RecursionError: absurdly nested JSON
            raise ConfigError(f"{path}: cannot read config.json ({type(e).__name__}: {e}); {RESTORE_CONFIG}") from None
        try:
            return cls.from_hf(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            raise ConfigError(f"{path}: malformed config.json ({type(e).__name__}: {e}); {RESTORE_CONFIG}") from None

    def validate(self) -> None:
        v, t = self.vision, self.text
        for what, value in (("vision hidden_size", v.hidden_size), ("vision intermediate_size", v.intermediate_size),
                            ("vision num_hidden_layers", v.num_hidden_layers),
                            ("vision num_attention_heads", v.num_attention_heads), ("image_size", v.image_size),
                            ("patch_size", v.patch_size), ("text vocab_size", t.vocab_size),
                            ("text hidden_size", t.hidden_size), ("text intermediate_size", t.intermediate_size),
                            ("text num_hidden_layers", t.num_hidden_layers),
                            ("text num_attention_heads", t.num_attention_heads),
                            ("text num_key_value_heads", t.num_key_value_heads), ("head_dim", t.head_dim),
                            ("max_position_embeddings", t.max_position_embeddings)):
            if value < 1 or (what.endswith("num_hidden_layers") and value > MAX_LAYERS):
                raise ConfigError(f"{what} is {value}; it must be a positive integer (layers: at most "
                                  f"{MAX_LAYERS}): fix config.json or restore it from the checkpoint's repository")
        if v.hidden_size % v.num_attention_heads:
            raise ConfigError(f"vision hidden_size {v.hidden_size} is not a multiple of {v.num_attention_heads} heads")
        if v.image_size % v.patch_size:
            raise ConfigError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"{t.num_attention_heads} attention heads do not divide into "
                              f"{t.num_key_value_heads} key/value heads")
        if self.projection_dim != t.hidden_size:
            raise ConfigError(f"projection_dim {self.projection_dim} differs from text hidden_size {t.hidden_size}")
        if not 0 <= self.image_token_index < t.vocab_size:
            raise ConfigError(f"image_token_index {self.image_token_index} is outside the vocabulary ({t.vocab_size})")

    def to_hf(self) -> dict:
        """config.json contents that transformers 4.x and 5.x both load to this model."""
        t, v = self.text, self.vision
        text = dict(model_type=t.model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                    intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                    num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                    head_dim=t.head_dim, max_position_embeddings=t.max_position_embeddings,
                    rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                    rope_parameters=dict(rope_theta=t.rope_theta, rope_type="default"),
                    hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                    num_image_tokens=self.num_image_tokens, pad_token_id=self.pad_token_id,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                    tie_word_embeddings=t.tie_word_embeddings)
        if t.is_gemma2:
            text.update(query_pre_attn_scalar=t.query_pre_attn_scalar, sliding_window=t.sliding_window,
                        attn_logit_softcapping=t.attn_logit_softcapping,
                        final_logit_softcapping=t.final_logit_softcapping, layer_types=list(t.layer_types))
        vision = dict(model_type="siglip_vision_model", **{f.name: getattr(v, f.name) for f in dataclasses.fields(v)},
                      hidden_act="gelu_pytorch_tanh", projection_dim=self.projection_dim)
        return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                    text_config=text, vision_config=vision, projection_dim=self.projection_dim,
                    hidden_size=t.hidden_size, image_token_index=self.image_token_index,
                    vocab_size=t.vocab_size, pad_token_id=self.pad_token_id,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                    tie_word_embeddings=t.tie_word_embeddings)


def _first(x) -> int:
    return int(x[0] if isinstance(x, (list, tuple)) else x)
