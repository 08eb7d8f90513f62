"""export/lora.py: merged weights vs peft's own merge_and_unload(), and the exported model's
logits vs the numpy reference model on peft's merged weights."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from engine.artifact import load_manifest                      # noqa: E402
from engine.checkpoint import Checkpoint                       # noqa: E402
from engine.layout import IGNORED_PREFIXES, to_canonical       # noqa: E402
from engine.reference import ReferenceModel                    # noqa: E402
from engine.safetensors import SafetensorsFile                 # noqa: E402
from export.lora import LoraError, merge_lora                  # noqa: E402
from test_export_onnx import write_tiny_checkpoint             # noqa: E402
from export.pipeline import export_checkpoint                  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
           "fc1", "fc2", "linear"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(2, tmp_path_factory.mktemp("ckpt") / "pg2")


def make_adapter(checkpoint, out, seed=0, **lora_kwargs):
    """A random LoRA adapter saved by peft, and peft's merged weights (canonical names)."""
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora_kwargs})
    model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:          # lora_B starts at zero: randomize both
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    merged = model.merge_and_unload()
    weights = {}
    for key, value in merged.state_dict().items():
        name = to_canonical(key)
        if name and not name.startswith(IGNORED_PREFIXES) and name != "lm_head.weight":
            weights[name] = value.detach().numpy().copy()
    return out, weights


@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True}, {"alpha_pattern": {"down_proj": 2}},
                                    {"rank_pattern": {"q_proj": 2}, "lora_alpha": 16}])
def test_merge_matches_peft(checkpoint, tmp_path, kwargs):
    adapter, want = make_adapter(checkpoint, tmp_path / "adapter", **kwargs)
    with Checkpoint.open(checkpoint) as ckpt:
        merged, info = merge_lora(ckpt.tensors, ckpt.config, adapter)
        assert info["merged"] > 0 and info["use_rslora"] == bool(kwargs.get("use_rslora"))
        changed = 0
        for name, w in want.items():
            got = np.asarray(merged[name], np.float32)
            np.testing.assert_allclose(got, w, atol=1e-5, rtol=0, err_msg=name)
            changed += not np.array_equal(got, np.asarray(ckpt.tensors[name], np.float32))
    assert changed == info["merged"]
    assert any(n.startswith("vision.") for n in merged.deltas) and "projector.weight" in merged.deltas


def test_exported_lora_model_matches_reference_on_peft_weights(checkpoint, tmp_path):
    from test_export_onnx import _prompt, compose_logits
    adapter, want_weights = make_adapter(checkpoint, tmp_path / "adapter", seed=3)
    art = export_checkpoint(checkpoint, tmp_path / "art", lora_dir=adapter, progress=False)
    m = load_manifest(art)
    with SafetensorsFile(adapter / "adapter_model.safetensors") as f:
        assert m.lora["merged"] == sum(".lora_A." in k for k in f.keys())
    with Checkpoint.open(checkpoint) as ckpt:
        ref = ReferenceModel(ckpt.config, want_weights)
        base = ReferenceModel(ckpt.config, ckpt.tensors)
    ids, pv, tt = _prompt(ref.config, np.random.default_rng(0))
    got = compose_logits(art, ids, pv, tt)
    want = ref.logits(ids, pv, tt)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(base.logits(ids, pv, tt) - want).max() > 1e-2      # the adapter does change the model


def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"bias": "all"}, "trained biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 0}, "r must be a positive number"),
])
def test_unsupported_adapter_features(checkpoint, tmp_path, changes, message):
    adapter, _ = make_adapter(checkpoint, tmp_path / "adapter", target_modules=["q_proj"])
    _edit_config(adapter, **changes)
    with Checkpoint.open(checkpoint) as ckpt, pytest.raises(LoraError, match=message):
        merge_lora(ckpt.tensors, ckpt.config, adapter)


def test_bad_adapter_directories(checkpoint, tmp_path):
    adapter, _ = make_adapter(checkpoint, tmp_path / "adapter", target_modules=["q_proj"])
    with Checkpoint.open(checkpoint) as ckpt:
        with pytest.raises(LoraError, match="not a directory"):
            merge_lora(ckpt.tensors, ckpt.config, tmp_path / "missing")
        broken = tmp_path / "no_weights"
        shutil.copytree(adapter, broken)
        (broken / "adapter_model.safetensors").unlink()
        with pytest.raises(LoraError, match="no adapter_model.safetensors"):
            merge_lora(ckpt.tensors, ckpt.config, broken)
        (broken / "adapter_config.json").unlink()
        with pytest.raises(LoraError, match="no adapter_config.json"):
            merge_lora(ckpt.tensors, ckpt.config, broken)


def test_adapter_for_another_model_size(checkpoint, tmp_path):
    """An adapter trained on tiny-pg1 does not fit tiny-pg2: a clear error, not a broadcast."""
    other = write_tiny_checkpoint(1, tmp_path / "pg1")
    adapter, _ = make_adapter(other, tmp_path / "adapter", target_modules=["gate_proj"])
    with Checkpoint.open(checkpoint) as ckpt, pytest.raises(LoraError, match="different model"):
        merge_lora(ckpt.tensors, ckpt.config, adapter)


def test_embedding_lora_is_rejected(checkpoint, tmp_path):
    adapter, _ = make_adapter(checkpoint, tmp_path / "adapter", target_modules=["q_proj", "embed_tokens"])
    with Checkpoint.open(checkpoint) as ckpt, pytest.raises(LoraError, match="LoRA on embeddings"):
        merge_lora(ckpt.tensors, ckpt.config, adapter)
