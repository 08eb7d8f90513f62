"""Tiny random HF PaliGemma models: the numerical oracle for tests (needs torch + transformers).

Every parameter is randomized, norms included: HF initializes RMSNorm weights to 0, which
would hide mistakes in the (1 + w) scaling.
"""
from __future__ import annotations

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

# vocab: real-layout ids would need 257k rows; tiny models keep a compact vocabulary
# whose last id is <image>.
TINY_VOCAB = 320  # models that need the compact tokenizer pass vocab_size=1537 (1536 sp pieces + <image>)


def tiny_config(version: int = 2, *, image_size: int = 28, vocab_size: int = TINY_VOCAB,
                sliding_window: int = 6, query_pre_attn_scalar: int = 12, num_kv_heads: int = 2,
                num_layers: int = 3, **text_overrides) -> PaliGemmaConfig:
    """PG1 (Gemma) or PG2 (Gemma 2) with odd small sizes; PG2 gets a window shorter than
    the prompt and a query_pre_attn_scalar different from head_dim (16)."""
    text = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
                vocab_size=vocab_size)
    if version == 2:
        text.update(model_type="gemma2", query_pre_attn_scalar=query_pre_attn_scalar,
                    sliding_window=sliding_window, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0)
    else:
        text.update(model_type="gemma")
    text.update(text_overrides)
    vision = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=14, vision_use_head=False)
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                           vocab_size=vocab_size, projection_dim=48, hidden_size=48)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Overwrite every parameter with N(0, scale^2) noise (norm weights too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def tiny_model(version: int = 2, seed: int = 0, **cfg_kwargs) -> PaliGemmaForConditionalGeneration:
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(tiny_config(version, **cfg_kwargs)).eval()
    randomize_(model, seed)
    model.set_attn_implementation("eager")
    return model
