"""The serving core's native step kernels (csrc/bind_serving.cpp) against the whole-loop ones:

- Decoder + decode_rows + select_step, many requests interleaved in shared steps, against
  _native.generate on each request alone (same options, same stand-in model);
- attention_plan over several caches in one call against one _native.attention call per cache;
- ThreadPool sizes, and the errors of bad calls.

The stand-in model keeps every slot's token history in a real KVCache (a token is stored as
its key row, without RoPE), so beam search's slot reorders must move the right histories.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine import _native

VOCAB = 40


class HistoryModel:
    """logits(history): a decayed sum of token embeddings through a fixed projection."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.E = rng.standard_normal((VOCAB, 16))
        self.W = rng.standard_normal((16, VOCAB)) * 4 / math.sqrt(16)
        self.W[:, 1] -= 0.5                      # eos (1) a little less likely

    def logits(self, seq) -> np.ndarray:
        seq = np.asarray(seq, dtype=np.int64)
        h = np.tanh((0.6 ** np.arange(len(seq))[::-1]) @ self.E[seq])
        return (h @ self.W).astype(np.float32)

    @staticmethod
    def cache(num_slots: int, capacity: int = 64):
        return _native.KVCache(1, 1, 2, num_slots, capacity)

    @staticmethod
    def append(cache, tokens, positions, slots):
        """Store tokens (as key rows [token, position]) at their positions in their slots."""
        for t, p, s in zip(tokens, positions, slots):
            kv = np.array([[[t, p]]], np.float32)
            _native.attention(cache, 0, kv, kv, kv, [int(s)], [int(p)], scale=1.0, rope_theta=0.0)

    @staticmethod
    def history(cache, slot) -> list[int]:
        k, _ = cache.read(0, slot)
        return [int(round(x)) for x in k[0, :, 0]]

    def prefill(self, cache, prompt, slot):
        self.append(cache, prompt, range(len(prompt)), [slot] * len(prompt))
        return self.logits(prompt)

    def step(self, cache, tokens, positions, slots):
        self.append(cache, tokens, positions, slots)
        return np.stack([self.logits(self.history(cache, s)) for s in slots]).astype(np.float32)


REQUESTS = [
    dict(prompts=[[2, 5, 6], [2, 7]], kw=dict(max_new_tokens=9)),
    dict(prompts=[[2, 9]], kw=dict(max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.3, seed=4,
                                   eos_token_ids=[])),
    dict(prompts=[[2, 3, 4, 8]], kw=dict(max_new_tokens=7, num_beams=3, length_penalty=0.7,
                                         repetition_penalty=1.2)),
    dict(prompts=[[2], [2, 11, 12]], kw=dict(max_new_tokens=10, num_beams=2, early_stopping=True)),
    dict(prompts=[[2, 30]], kw=dict(max_new_tokens=15, stop_token_ids=[5, 6, 7], do_sample=True, seed=8)),
]


def start(model, req):
    nb = req["kw"].get("num_beams", 1)
    cache = model.cache(len(req["prompts"]) * nb)
    first = np.stack([model.prefill(cache, p, i * nb) for i, p in enumerate(req["prompts"])])
    args = (cache, first, [list(p) for p in req["prompts"]], [len(p) for p in req["prompts"]],
            [i * nb for i in range(len(req["prompts"]))])
    return cache, args


def alone(model, req):
    cache, args = start(model, req)
    return _native.generate(lambda t, p, s: model.step(cache, t, p, s), *args, **req["kw"])


def test_interleaved_decoders_equal_generate_alone():
    model = HistoryModel()
    want = [alone(model, r) for r in REQUESTS]
    decoders, caches, accepted = [], [], {}
    live: list[int] = []
    pending = list(range(len(REQUESTS)))
    rows = None
    for step in range(200):
        logits = None
        if rows is not None and len(rows.tokens):
            # one shared "graph call": each decoder's rows go to its own cache
            parts, offset = [], 0
            for k, n in zip(live, rows.rows.tolist()):
                sl = slice(offset, offset + n)
                parts.append(model.step(caches[k], rows.tokens[sl], rows.positions[sl], decoders[k].slots))
                offset += n
            logits = np.concatenate(parts)
        joining = [pending.pop(0)] if pending and step % 2 == 0 else []   # a new request every other step
        for k in joining:
            cache, args = start(model, REQUESTS[k])
            caches.append(cache)               # requests join in index order
            decoders.append(_native.Decoder(*args, **REQUESTS[k]["kw"]))
        order = live + joining
        sel = _native.select_step([decoders[k] for k in order], logits)
        offset = 0
        for i, k in enumerate(order):
            n = int(sel.accepted[i])
            for seq, tok in zip(sel.accepted_sequences[offset:offset + n], sel.accepted_tokens[offset:offset + n]):
                accepted.setdefault((k, int(seq)), []).append(int(tok))
            offset += n
        live = [k for i, k in enumerate(order) if not sel.done[i]]
        if not live and not pending:
            break
        rows = _native.decode_rows([decoders[k] for k in live]) if live else None
        assert rows is None or rows.plan.rows == len(rows.tokens)
    assert not live and not pending
    for k, req in enumerate(REQUESTS):
        got = decoders[k].results()
        assert got == want[k], k
        for b, r in enumerate(got):             # accepted tokens = the final tokens, in order
            assert accepted.get((k, b), []) == r["tokens"]
    assert any(r["score"] is not None for w in want for r in w)


def test_decoder_advance_alone_and_misuse():
    model = HistoryModel()
    req = REQUESTS[0]
    cache, args = start(model, req)
    d = _native.Decoder(*args, **req["kw"])
    assert not d.started and not d.done and d.rows == 0 and d.batch == 2
    with pytest.raises(ValueError, match="has not started"):
        _native.decode_rows([d])
    got = d.advance()
    assert d.started and len(got) == 2 and d.rows == 2
    while not d.done:
        d.advance(model.step(cache, d.tokens, d.positions, d.slots))
    assert d.results() == alone(model, req)
    with pytest.raises(ValueError, match="done"):
        d.advance(np.zeros((1, VOCAB), np.float32))
    with pytest.raises(ValueError, match="is done"):
        _native.select_step([d], None)


def test_step_kernels_reject_bad_calls():
    model = HistoryModel()
    cache, args = start(model, REQUESTS[0])
    with pytest.raises(TypeError, match="KVCache"):
        _native.Decoder(object(), *args[1:], max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p must be in"):
        _native.Decoder(*args, max_new_tokens=3, top_p=0.0)
    d = _native.Decoder(*args, max_new_tokens=3)
    _native.select_step([d], None)
    with pytest.raises(ValueError, match=r"logits must be float32 \[2, 40\]"):
        _native.select_step([d], np.zeros((3, VOCAB), np.float32))
    with pytest.raises(ValueError, match="logits must be float32"):
        _native.select_step([d], None)
    with pytest.raises(ValueError, match="listed twice"):
        _native.select_step([d, d], np.zeros((4, VOCAB), np.float32))
    with pytest.raises(ValueError, match=r"advance: logits must be float32 \[2, 40\]"):
        d.advance(np.zeros((2, 7), np.float32))
    plan = _native.AttentionPlan()
    with pytest.raises(ValueError, match="positions for 2 slots"):
        plan.add(cache, [0, 1], np.arange(3, dtype=np.int32))
    with pytest.raises(TypeError, match="KVCache"):
        plan.add("cache", [0], np.arange(1, dtype=np.int32))
    with pytest.raises(ValueError, match="no rows"):
        _native.attention_plan(plan, 0, *(np.zeros((1, 1, 2), np.float32),) * 3, scale=1.0)
    with pytest.raises(ValueError):
        _native.ThreadPool(0)
    with pytest.raises(ValueError, match=r"spin_us must be in \[0, 100000\], got -1"):
        _native.ThreadPool(2, spin_us=-1)
    assert _native.ThreadPool(2).spin_us == 200 and _native.ThreadPool(2, 0).spin_us == 0


def test_attention_plan_equals_one_call_per_cache():
    """Decode rows of three caches (one with two beams, different lengths) and a prefill of a
    fourth in one attention_plan call: each group's output and cache contents are exactly those
    of a separate attention() call on an identical cache."""
    rng = np.random.default_rng(1)
    L, KV, H, D = 2, 2, 4, 16
    kw = dict(scale=D ** -0.5, softcap=50.0, rope_theta=10000.0)

    def make(num_slots, lengths, prefix):
        a, b = (_native.KVCache(L, KV, D, num_slots, 96) for _ in range(2))
        for slot, n in enumerate(lengths):
            for c in (a, b):
                c.set_prefix_length(slot, prefix)
            if n == 0:
                continue
            k = rng.standard_normal((n, KV, D)).astype(np.float32)
            v = rng.standard_normal((n, KV, D)).astype(np.float32)
            q = rng.standard_normal((n, H, D)).astype(np.float32)
            for c in (a, b):
                for layer in range(L):
                    _native.attention(c, layer, q, k, v, [slot], np.arange(n), **kw)
        return a, b

    groups = [(make(1, [5], 3), [0], [5]), (make(2, [9, 9], 4), [0, 1], [9, 9]), (make(1, [30], 20), [0], [30]),
              (make(1, [0], 12), [0], list(range(12)))]
    plan = _native.AttentionPlan()
    positions = []
    for (shared, _), slots, pos in groups:
        plan.add(shared, slots, np.asarray(pos, np.int32))
        positions.append(pos)
    n = plan.rows
    assert n == 1 + 2 + 1 + 12 and plan.groups == 4
    pool = _native.ThreadPool(3)
    for layer in range(L):
        q = rng.standard_normal((n, H, D)).astype(np.float32)
        k = rng.standard_normal((n, KV, D)).astype(np.float32)
        v = rng.standard_normal((n, KV, D)).astype(np.float32)
        out = _native.attention_plan(plan, layer, q, k, v, pool=pool, **kw)
        row = 0
        for ((_, alone_cache), slots, pos) in groups:
            m = len(pos)
            ref = _native.attention(alone_cache, layer, q[row:row + m], k[row:row + m], v[row:row + m], slots,
                                    np.asarray(pos), **kw)
            np.testing.assert_array_equal(out[row:row + m], ref)
            row += m
    for (shared, alone_cache), slots, _ in groups:
        for slot in slots:
            for layer in range(L):
                np.testing.assert_array_equal(shared.read(layer, slot)[0], alone_cache.read(layer, slot)[0])
    assert pool.num_threads == 3
