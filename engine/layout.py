"""Tensor names: the canonical names used inside the engine, their shapes, and HF key layouts.

Canonical names (what `Checkpoint.tensors`, the reference model and the exporter use):

    vision.embeddings.patch_embedding.{weight,bias}     [Dv, 3, P, P], [Dv]
    vision.embeddings.position_embedding.weight         [num_patches, Dv]
    vision.encoder.layers.{i}.layer_norm{1,2}.{weight,bias}
    vision.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    vision.encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
    vision.post_layernorm.{weight,bias}
    projector.{weight,bias}                              [D, Dv], [D]
    text.embed_tokens.weight                             [vocab, D]  (also the tied LM head)
    text.layers.{i}.input_layernorm.weight               (Gemma 2: also post_attention_layernorm,
    text.layers.{i}.post_attention_layernorm.weight       pre_feedforward_layernorm,
    text.layers.{i}.self_attn.{q,k,v,o}_proj.weight       post_feedforward_layernorm)
    text.layers.{i}.mlp.{gate,up,down}_proj.weight
    text.norm.weight
    lm_head.weight                                       only when tie_word_embeddings is false

Linear weights keep the PyTorch [out, in] orientation.

HF key layouts on disk:
    transformers 4.x: vision_tower.vision_model.*, multi_modal_projector.linear.*,
                      language_model.model.*, language_model.lm_head.weight
    transformers 5.x (in memory / some saves): model.vision_tower[.vision_model].*,
                      model.multi_modal_projector.linear.*, model.language_model.*, lm_head.weight
    transformers 5.x save_pretrained: vision_tower.*, multi_modal_projector.linear.*, language_model.model.*
"""
from __future__ import annotations

from .config import PaliGemmaConfig

# (HF prefix, canonical prefix). Longest prefixes first: the first match wins.
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.linear.", "projector."),
    ("multi_modal_projector.linear.", "projector."),
    ("model.language_model.model.", "text."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)

# Tensors PaliGemma checkpoints may carry but the model never uses.
IGNORED_PREFIXES = ("vision.head.",)   # SigLIP pooling head (vision_use_head)


def to_canonical(hf_key: str) -> str | None:
    """Canonical name of an HF key, or None when the key matches no known layout."""
    for hf_prefix, canon in _PREFIXES:
        if hf_key.startswith(hf_prefix):
            return canon + hf_key[len(hf_prefix):]
    return None


def to_hf(name: str, layout: str = "4.x") -> str:
    """HF key of a canonical name. "4.x" is the layout every transformers release loads."""
    if layout == "4.x":
        table = {"vision.": "vision_tower.vision_model.", "projector.": "multi_modal_projector.linear.",
                 "text.": "language_model.model.", "lm_head.": "language_model.lm_head."}
    elif layout == "5.x":
        table = {"vision.": "model.vision_tower.vision_model.", "projector.": "model.multi_modal_projector.linear.",
                 "text.": "model.language_model.", "lm_head.": "lm_head."}
    else:
        raise ValueError(f"unknown layout {layout!r} (use '4.x' or '5.x')")
    for canon, hf in table.items():
        if name.startswith(canon):
            return hf + name[len(canon):]
    raise ValueError(f"{name!r} is not a canonical tensor name")


def expected_tensors(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, canonical name -> shape, in a stable order."""
    v, t = cfg.vision, cfg.text
    dv, p = v.hidden_size, v.patch_size
    out: dict[str, tuple[int, ...]] = {
        "vision.embeddings.patch_embedding.weight": (dv, v.num_channels, p, p),
        "vision.embeddings.patch_embedding.bias": (dv,),
        "vision.embeddings.position_embedding.weight": (v.num_patches, dv),
    }
    for i in range(v.num_hidden_layers):
        pre = f"vision.encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out[pre + ln + ".weight"] = (dv,)
            out[pre + ln + ".bias"] = (dv,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[pre + f"self_attn.{proj}.weight"] = (dv, dv)
            out[pre + f"self_attn.{proj}.bias"] = (dv,)
        out[pre + "mlp.fc1.weight"] = (v.intermediate_size, dv)
        out[pre + "mlp.fc1.bias"] = (v.intermediate_size,)
        out[pre + "mlp.fc2.weight"] = (dv, v.intermediate_size)
        out[pre + "mlp.fc2.bias"] = (dv,)
    out["vision.post_layernorm.weight"] = (dv,)
    out["vision.post_layernorm.bias"] = (dv,)
    d = t.hidden_size
    out["projector.weight"] = (d, dv)
    out["projector.bias"] = (d,)
    out["text.embed_tokens.weight"] = (t.vocab_size, d)
    qd, kvd = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    norms = ["input_layernorm", "post_attention_layernorm"]
    if t.is_gemma2:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(t.num_hidden_layers):
        pre = f"text.layers.{i}."
        for n in norms:
            out[pre + n + ".weight"] = (d,)
        out[pre + "self_attn.q_proj.weight"] = (qd, d)
        out[pre + "self_attn.k_proj.weight"] = (kvd, d)
        out[pre + "self_attn.v_proj.weight"] = (kvd, d)
        out[pre + "self_attn.o_proj.weight"] = (d, qd)
        out[pre + "mlp.gate_proj.weight"] = (t.intermediate_size, d)
        out[pre + "mlp.up_proj.weight"] = (t.intermediate_size, d)
        out[pre + "mlp.down_proj.weight"] = (d, t.intermediate_size)
    out["text.norm.weight"] = (d,)
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = (t.vocab_size, d)
    return out
