"""Full-sequence logits from an artifact's graphs with the numpy reference attention between
them: checks exported graphs without the native core (shared by the ONNX and OpenVINO tests)."""
import numpy as np

from engine.reference import attention, prefix_lm_mask, rope


def compose_logits(runner, cfg, h, ids, pixel_values, token_type_ids):
    """h: the embedded prompt [T, D] (image rows are overwritten with the vision graph's output)."""
    t = cfg.text
    T = len(ids)
    prefix = int((np.asarray(token_type_ids) == 0).sum())
    img = runner.run("vision", {"pixel_values": pixel_values})["image_features"]
    h = np.array(h, dtype=np.float32)
    h[np.asarray(ids) == cfg.image_token_index] = img.reshape(-1, t.hidden_size)
    pos = np.arange(T)
    attn = None
    for i in range(t.num_hidden_layers + 1):
        out = runner.run(f"decoder_{i}", {"hidden": h} if i == 0 else {"hidden": h, "attn": attn})
        if i > 0:
            h = out["hidden_out"]
        if i == t.num_hidden_layers:
            break
        q, k = rope(out["q"], pos, t.rope_theta), rope(out["k"], pos, t.rope_theta)
        mask = prefix_lm_mask(pos, pos, prefix, t.layer_window(i))
        attn = attention(q, k, out["v"], mask, t.attn_scale, t.attn_logit_softcapping).reshape(T, -1)
    return runner.run("lm_head", {"hidden": h})["logits"]
