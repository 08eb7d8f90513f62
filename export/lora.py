"""Merge a PEFT LoRA adapter into the checkpoint weights before export.

An adapter directory (what peft's `save_pretrained` writes) holds adapter_config.json and
adapter_model.safetensors with, for every adapted Linear module,

    base_model.model.<HF module path>.lora_A.weight    [r, in]
    base_model.model.<HF module path>.lora_B.weight    [out, r]

The merged weight is W' = W + s * B @ A with s = lora_alpha / r (use_rslora: lora_alpha /
sqrt(r)); r is read from each module's lora_A (so rank_pattern needs no special handling) and
lora_alpha from alpha_pattern when a pattern matches the module, as peft does. HF module paths
map to canonical names with engine.layout.to_canonical (transformers 4.x and 5.x layouts).
fan_in_fan_out is irrelevant here: every PaliGemma target is an nn.Linear, for which peft
itself forces it off.

Not supported (a clear error, never a silently different model): other peft types, DoRA,
LoRA on embeddings or convolutions (the SigLIP patch embedding), trained biases (bias != "none"),
modules_to_save, and targets the checkpoint does not have (e.g. lm_head of a tied model).

The merge is lazy: `merge_lora` returns a mapping that computes W' (float32) when the exporter
asks for a weight, so a full-rank-targets adapter on a 3B model never holds every merged
matrix at once.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engine.config import PaliGemmaConfig
from engine.errors import EngineError
from engine.layout import to_canonical

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoraError(EngineError, ValueError):
    """The adapter is missing, malformed, or uses a LoRA feature the exporter does not merge."""


class LoraMergedWeights(Mapping):
    """Canonical name -> weight, with LoRA deltas added (in float32) on access."""

    def __init__(self, base: Mapping[str, np.ndarray], deltas: dict[str, tuple[np.ndarray, np.ndarray, float]]):
        self.base = base
        self.deltas = deltas          # name -> (A [r, in], B [out, r], scale)

    def __getitem__(self, name: str) -> np.ndarray:
        w = self.base[name]
        if name not in self.deltas:
            return w
        A, B, scale = self.deltas[name]
        return np.asarray(w, np.float32) + np.float32(scale) * (B @ A)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraError(f"{adapter_dir}: no {ADAPTER_CONFIG}; pass the directory peft's save_pretrained wrote") from None
    except (OSError, ValueError) as e:
        raise LoraError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters merge")
    if cfg.get("use_dora"):
        raise LoraError(f"{path}: DoRA adapters (use_dora) are not supported; merge them with peft's "
                        "merge_and_unload() and export the merged checkpoint instead")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{path}: adapters with trained biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise LoraError(f"{path}: modules_to_save {cfg['modules_to_save']} is not supported; merge with "
                        "peft's merge_and_unload() and export the merged checkpoint instead")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise LoraError(f"{path}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def _alpha_for(module: str, cfg: dict) -> float:
    """lora_alpha of a module: the first alpha_pattern key matching the module path, as peft does."""
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(cfg["lora_alpha"])


def merge_lora(weights: Mapping[str, np.ndarray], config: PaliGemmaConfig, adapter_dir: str | os.PathLike
               ) -> tuple[LoraMergedWeights, dict]:
    """(weights with the adapter merged, manifest info) for the adapter in `adapter_dir`."""
    from engine.safetensors import SafetensorsFile

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoraError(f"{adapter_dir}: not a directory; pass the LoRA adapter directory (adapter_config.json "
                        "and adapter_model.safetensors)")
    cfg = read_adapter_config(adapter_dir)
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LoraError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (adapters saved as .bin need torch; re-save "
                        "the adapter with safe_serialization=True)")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with SafetensorsFile(path) as f:
        keys = f.keys()
        for marker, what in (("lora_embedding_", "LoRA on embeddings"), ("lora_magnitude_vector", "DoRA")):
            bad = [k for k in keys if marker in k]
            if bad:
                raise LoraError(f"{path}: {what} ({bad[0]!r}) is not supported; only LoRA on Linear layers "
                                "merges. Merge it with peft's merge_and_unload() and export that checkpoint")
        for key in keys:
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
            if m is None:
                raise LoraError(f"{path}: unsupported adapter tensor {key!r}; only LoRA on Linear layers merges")
            module = m.group(1)[len(_PEFT_PREFIX):] if m.group(1).startswith(_PEFT_PREFIX) else m.group(1)
            pairs.setdefault(module, {})[m.group(2)] = np.array(f.get(key), dtype=np.float32)
    if not pairs:
        raise LoraError(f"{path}: the adapter holds no lora_A / lora_B weights")
    deltas = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoraError(f"{path}: module {module} has {sorted(ab)} but needs both lora_A and lora_B")
        name = to_canonical(module + ".weight")
        if name is None or name not in weights:
            what = "is not a PaliGemma tensor" if name is None else "is not in this checkpoint"
            raise LoraError(f"{path}: adapter module {module} ({name or 'no canonical name'}) {what}; was the "
                            "adapter trained on a different model?")
        A, B = ab["lora_A"], ab["lora_B"]
        shape = tuple(weights[name].shape)
        if A.ndim != 2 or B.ndim != 2 or len(shape) != 2:
            raise LoraError(f"{path}: module {module} is not a Linear layer (lora_A {A.shape}, lora_B {B.shape}, "
                            f"weight {shape}); LoRA on convolutions is not supported")
        r = A.shape[0]
        if B.shape[1] != r or (B.shape[0], A.shape[1]) != shape:
            raise LoraError(f"{path}: module {module}: lora_B {B.shape} @ lora_A {A.shape} does not match the "
                            f"weight {shape}; was the adapter trained on a different model size?")
        alpha = _alpha_for(module, cfg)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[name] = (A, B, scale)
    ranks = sorted({a.shape[0] for a, _, _ in deltas.values()})
    scales = sorted({s for _, _, s in deltas.values()})
    info = {"path": str(adapter_dir.resolve()), "merged": len(deltas), "r": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")),
            "scale": scales[0] if len(scales) == 1 else scales[-1],
            "adapter_sha256": _sha256(path)}
    return LoraMergedWeights(weights, deltas), info


def _sha256(path: Path) -> str:
    from engine.artifact import sha256_file
    return sha256_file(path)
