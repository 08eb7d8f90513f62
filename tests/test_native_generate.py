"""The native decode loop (_native.generate) against independent Python references.

The stand-in model computes logits from the whole token history of a cache slot, and the fake
cache keeps those histories per slot: a wrong position, slot, copy_slot or reorder changes the
logits, so it shows up as a mismatch with references that work on plain token lists.
(test_native_generate_hf.py checks the same loop against transformers' own generate().)
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine import _native

NEG = np.float32(-1e9)


# ---------------------------------------------------------------- stand-in model and cache

class FakeCache:
    """KVCache double: slot s holds the token ids whose keys / values the layers have written."""

    def __init__(self, num_slots: int = 16, capacity: int = 256):
        self._num_slots, self._capacity = num_slots, capacity
        self.hist: list[list[int]] = [[] for _ in range(num_slots)]
        self.reorders = 0

    def capacity(self) -> int:
        return self._capacity

    def num_slots(self) -> int:
        return self._num_slots

    def copy_slot(self, src: int, dst: int) -> None:
        assert src != dst
        self.hist[dst] = list(self.hist[src])

    def reorder(self, src_for_dst) -> None:
        assert isinstance(src_for_dst, list) and len(src_for_dst) == self._num_slots
        assert all(0 <= s < self._num_slots for s in src_for_dst)
        self.hist = [list(self.hist[s]) for s in src_for_dst]
        self.reorders += 1


class StandIn:
    """logits(seq): a decayed sum of token embeddings plus a position term, through a fixed
    projection. Depends on every token of the sequence and on its length."""

    def __init__(self, vocab: int = 48, dim: int = 24, seed: int = 0, scale: float = 4.0,
                 eos_bias: float = 0.0, eos: int = 1):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.E = rng.standard_normal((vocab, dim))
        self.P = rng.standard_normal((1024, dim)) * 0.7
        self.W = rng.standard_normal((dim, vocab)) * scale / math.sqrt(dim)
        self.bias = np.zeros(vocab)
        self.bias[eos] = eos_bias
        self.calls = 0

    def logits(self, seq) -> np.ndarray:
        seq = np.asarray(seq, dtype=np.int64)
        w = 0.6 ** np.arange(len(seq))[::-1]
        h = np.tanh(w @ self.E[seq] + self.P[len(seq) - 1])
        return (h @ self.W + self.bias).astype(np.float32)

    def prefill(self, cache: FakeCache, prompts, slots) -> np.ndarray:
        for p, s in zip(prompts, slots):
            cache.hist[s] = list(p)
        return np.stack([self.logits(p) for p in prompts])

    def step_fn(self, cache: FakeCache):
        def step(tokens, positions, slots):
            self.calls += 1
            assert tokens.dtype == np.int32 and positions.dtype == np.int32 and slots.dtype == np.int32
            assert tokens.shape == positions.shape == slots.shape and tokens.ndim == 1
            assert len(set(slots.tolist())) == len(slots), "a slot fed twice in one step"
            out = np.empty((len(tokens), self.vocab), np.float32)
            for i, (t, p, s) in enumerate(zip(tokens.tolist(), positions.tolist(), slots.tolist())):
                assert p == len(cache.hist[s]), f"slot {s} holds {len(cache.hist[s])} tokens, fed at {p}"
                assert p < cache.capacity(), "fed beyond the cache capacity"
                cache.hist[s].append(t)
                out[i] = self.logits(cache.hist[s])
            return out
        return step


def run(model: StandIn, prompts, *, cache=None, slots=None, **kw):
    cache = cache or FakeCache()
    slots = list(range(len(prompts))) if slots is None else slots
    prefill_slots = slots[::kw.get("num_beams", 1)] if len(slots) != len(prompts) else slots
    first = model.prefill(cache, prompts, prefill_slots)
    return _native.generate(model.step_fn(cache), cache, first, [list(p) for p in prompts],
                            [len(p) for p in prompts], slots, **kw)


# ---------------------------------------------------------------- references

def hf_repetition_penalty(scores: np.ndarray, ids, penalty: float) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor for one row."""
    out = scores.copy()
    ids = np.unique([i for i in ids if 0 <= i < len(scores)]).astype(np.int64)
    s = out[ids]
    out[ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return out


def log_softmax32(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    m = x64.max()
    return (x64 - m - np.log(np.exp(x64 - m).sum())).astype(np.float32)


def ref_greedy(model, prompt, max_new, eos=(1,), stop=(), penalty=1.0):
    seq, out = list(prompt), []
    while True:
        x = model.logits(seq)
        if penalty != 1.0:
            x = hf_repetition_penalty(x, seq, penalty)
        t = int(np.argmax(x))
        seq.append(t)
        out.append(t)
        if t in eos:
            return out, "eos"
        if t in stop:
            return out, "stop"
        if len(out) == max_new:
            return out, "length"


def ref_beam_search(logits_fn, prompt, num_beams, max_new, eos=(1,), length_penalty=1.0,
                    early_stopping=False, penalty=1.0):
    """transformers 5.23 _beam_search for one sequence, written over Python lists.
    Returns (tokens, score)."""
    f32 = np.float32
    k_keep = max(2, 1 + len(set(eos))) * num_beams
    running = [([], f32(0.0))] + [([], NEG)] * (num_beams - 1)    # (tokens, running score)
    finished = [([], NEG, False)] * num_beams                      # (tokens, score, is finished)
    improvable = True
    for t in range(max_new):
        cands = []
        for j, (toks, score) in enumerate(running):
            lp = log_softmax32(logits_fn(list(prompt) + toks))
            if penalty != 1.0:
                lp = hf_repetition_penalty(lp, list(prompt) + toks, penalty)
            acc = (lp + score).astype(f32)
            cands += [(acc[v], j * len(acc) + v, j, v) for v in range(len(acc))]
        top = sorted(cands, key=lambda c: (-c[0], c[1]))[:k_keep]
        hits = [tok in eos or t + 1 >= max_new for (_, _, _, tok) in top]
        run_scores = [f32(s + NEG) if h else s for (s, _, _, _), h in zip(top, hits)]
        keep = sorted(range(len(top)), key=lambda k: (-run_scores[k], k))[:num_beams]
        new_running = [(running[top[k][2]][0] + [top[k][3]], run_scores[k]) for k in keep]

        denom = f32((t + 1) ** length_penalty)
        full = all(f[2] for f in finished) and early_stopping is True
        merged = list(finished)
        for k, ((s, _, j, tok), h) in enumerate(zip(top, hits)):
            v = f32(s / denom)
            done = h and k < num_beams
            for masked in (full, not improvable, not done):
                if masked:
                    v = f32(v + NEG)
            merged.append((running[j][0] + [tok], v, done))
        finished = [merged[i] for i in sorted(range(len(merged)), key=lambda i: (-merged[i][1], i))[:num_beams]]
        running = new_running

        cur = t + 1
        best_len = max_new if (early_stopping == "never" and length_penalty > 0) else cur
        best = f32(running[0][1] / f32(best_len ** length_penalty))
        worst = min(f[1] for f in finished)
        improvable = improvable and any(best > (worst if f[2] else NEG) for f in finished)
        if not improvable or (early_stopping is True and all(f[2] for f in finished)) or cur >= max_new:
            break
    return finished[0][0], float(finished[0][1])


# ---------------------------------------------------------------- greedy

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_python_loop(seed):
    model = StandIn(seed=seed, eos_bias=1.5)
    prompts = [[2, 5, 7], [2, 9, 11, 13, 4, 8], [2, 3]]
    res = run(model, prompts, max_new_tokens=12)
    for p, r in zip(prompts, res):
        toks, reason = ref_greedy(model, p, 12)
        assert r["tokens"] == toks and r["finish_reason"] == reason and r["score"] is None


def test_greedy_eos_mid_way_and_max_new_tokens():
    model = StandIn(seed=3, eos_bias=2.5)
    reasons = set()
    for prompt in ([2, 5], [2, 6, 9], [2, 40, 41, 3], [2, 17], [2, 30, 31]):
        r = run(model, [prompt], max_new_tokens=8)[0]
        assert (r["tokens"], r["finish_reason"]) == ref_greedy(model, prompt, 8)
        assert len(r["tokens"]) <= 8
        reasons.add(r["finish_reason"])
        if r["finish_reason"] == "eos":
            assert r["tokens"][-1] == 1 and 1 not in r["tokens"][:-1]
    assert reasons == {"eos", "length"}


def test_argmax_ties_take_lowest_index():
    logits = np.zeros((1, 10), np.float32)
    logits[0, [3, 7]] = 5.0
    step = lambda t, p, s: np.tile(logits, (len(t), 1))   # noqa: E731
    r = _native.generate(step, FakeCache(), logits, [[2]], [1], [0], max_new_tokens=3, eos_token_ids=[])
    assert r[0]["tokens"] == [3, 3, 3]


def test_stop_tokens_and_eos_set():
    model = StandIn(seed=4)
    free, _ = ref_greedy(model, [2, 5, 6], 10, eos=())
    stop_tok = free[3]
    r = run(model, [[2, 5, 6]], max_new_tokens=10, eos_token_ids=[], stop_token_ids=[stop_tok])[0]
    assert r["tokens"] == free[: free.index(stop_tok) + 1] and r["finish_reason"] == "stop"
    r = run(model, [[2, 5, 6]], max_new_tokens=10, eos_token_ids=[47, stop_tok])[0]
    assert r["finish_reason"] == "eos" and r["tokens"][-1] == stop_tok
    r = run(model, [[2, 5, 6]], max_new_tokens=10, eos_token_ids=stop_tok)[0]   # a bare int
    assert r["finish_reason"] == "eos"
    r = run(model, [[2, 5, 6]], max_new_tokens=10, eos_token_ids=None)[0]
    assert r["tokens"] == free and r["finish_reason"] == "length"


def test_capacity_guard_ends_with_length():
    model = StandIn(seed=5)
    prompts = [[2, 5, 6, 7, 8], [2, 9]]
    cache = FakeCache(capacity=8)
    res = run(model, prompts, cache=cache, max_new_tokens=20, eos_token_ids=[])
    # prompt + generated <= capacity; the step function asserts no position >= capacity is fed
    assert [len(r["tokens"]) for r in res] == [3, 6]
    assert all(r["finish_reason"] == "length" for r in res)
    for p, r in zip(prompts, res):
        assert r["tokens"] == ref_greedy(model, p, 8 - len(p), eos=())[0]
    res = run(StandIn(seed=5), [[2, 5, 6, 7, 8]], cache=FakeCache(capacity=8), num_beams=2,
              max_new_tokens=20, eos_token_ids=[])
    assert len(res[0]["tokens"]) == 3 and res[0]["finish_reason"] == "length"


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_greedy(penalty):
    model = StandIn(seed=6, scale=2.0)
    prompt = [2, 5, 5, 9, 30, 31]
    r = run(model, [prompt], max_new_tokens=15, eos_token_ids=[], repetition_penalty=penalty)[0]
    assert r["tokens"] == ref_greedy(model, prompt, 15, eos=(), penalty=penalty)[0]
    plain = run(model, [prompt], max_new_tokens=15, eos_token_ids=[])[0]
    assert r["tokens"] != plain["tokens"]


def test_repetition_penalty_reference_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((1, 40)).astype(np.float32)
    ids = [3, 3, 7, 39, 0, 12, 7]
    want = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([ids]), torch.tensor(scores)).numpy()[0]
    np.testing.assert_array_equal(hf_repetition_penalty(scores[0], ids, 1.4), want)


# ---------------------------------------------------------------- sampling

def fixed_logits_step(row: np.ndarray):
    return lambda t, p, s: np.tile(row, (len(t), 1))


def sample_fixed(row, n_tokens, batch=1, **kw):
    row = np.asarray(row, np.float32)
    first = np.tile(row, (batch, 1))
    res = _native.generate(fixed_logits_step(row), FakeCache(num_slots=max(batch, 1), capacity=4096),
                           first, [[0]] * batch, [1] * batch, list(range(batch)),
                           max_new_tokens=n_tokens, do_sample=True, eos_token_ids=[], **kw)
    return np.concatenate([r["tokens"] for r in res])


def test_sampling_seeded_reproducible_and_seed_dependent():
    model = StandIn(seed=7, scale=1.5)
    prompts = [[2, 5, 6], [2, 8]]
    a = run(model, prompts, max_new_tokens=25, do_sample=True, seed=123, eos_token_ids=[])
    b = run(model, prompts, max_new_tokens=25, do_sample=True, seed=123, eos_token_ids=[])
    c = run(model, prompts, max_new_tokens=25, do_sample=True, seed=124, eos_token_ids=[])
    assert a == b
    assert a[0]["tokens"] != c[0]["tokens"]
    # sequence b draws from the stream seeded with seed + b
    alone = run(model, [prompts[1]], max_new_tokens=25, do_sample=True, seed=124, eos_token_ids=[])
    assert alone[0]["tokens"] == a[1]["tokens"]


def test_sampling_frequencies_follow_softmax_with_temperature():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(12).astype(np.float32) * 1.5
    for temperature in (0.7, 1.0, 2.0):
        toks = sample_fixed(row, 250, batch=16, temperature=temperature, seed=9)
        freq = np.bincount(toks, minlength=12) / len(toks)
        p = np.exp(row.astype(np.float64) / temperature)
        p /= p.sum()
        # 4000 draws: standard error <= 0.008
        assert np.abs(freq - p).max() < 0.035, (temperature, freq, p)
    cold = sample_fixed(row, 100, temperature=0.02, seed=3)
    assert (cold == np.argmax(row)).all()


def test_top_k_never_leaves_the_top_k():
    rng = np.random.default_rng(2)
    row = rng.standard_normal(300).astype(np.float32)
    allowed = set(np.argsort(-row)[:5].tolist())
    toks = sample_fixed(row, 400, batch=4, top_k=5, temperature=3.0, seed=1)
    assert set(toks.tolist()) == allowed
    # k > 4096 takes the nth_element path
    big = rng.standard_normal(6000).astype(np.float32)
    allowed = set(np.argsort(-big)[:5000].tolist())
    toks = sample_fixed(big, 500, batch=4, top_k=5000, temperature=50.0, seed=2)
    assert set(toks.tolist()) <= allowed and len(set(toks.tolist())) > 1000


def test_top_k_keeps_ties_like_hf():
    row = np.full(20, -5.0, np.float32)
    row[[2, 9, 14]] = 1.0            # k = 2 but three tie for the top: HF keeps all three
    toks = sample_fixed(row, 300, top_k=2, seed=4)
    assert set(toks.tolist()) == {2, 9, 14}


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.1, 0.03], np.float64)   # sorted: 1, 3, 4, 0, 5, 2
    row = np.log(probs).astype(np.float32)
    for top_p, allowed in ((0.45, {1}), (0.75, {1, 3}), (0.85, {1, 3, 4}), (0.93, {1, 3, 4, 0})):
        toks = sample_fixed(row, 400, batch=2, top_p=top_p, seed=5)
        assert set(toks.tolist()) == allowed, (top_p, np.bincount(toks))
    # relative frequencies inside the nucleus follow the renormalized probabilities
    toks = sample_fixed(row, 500, batch=8, top_p=0.85, seed=6)
    freq = np.bincount(toks, minlength=6)[[1, 3, 4]] / len(toks)
    np.testing.assert_allclose(freq, probs[[1, 3, 4]] / 0.9, atol=0.03)


def test_top_p_on_a_large_flat_vocabulary():
    # the nucleus search must widen its threshold when the mass is spread out
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(50000) * 0.1).astype(np.float32)
    order = np.argsort(-row.astype(np.float64))
    p = np.exp(row.astype(np.float64) - row.max())
    p /= p.sum()
    n_keep = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)
    allowed = set(order[:n_keep + 2].tolist())   # +2: float rounding at the boundary
    toks = sample_fixed(row, 200, batch=4, top_p=0.6, seed=7)
    assert set(toks.tolist()) <= allowed


def test_top_k_then_top_p_then_temperature():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05], np.float64)
    row = np.log(probs).astype(np.float32)
    # top_k=3 renormalizes to .47/.29/.24; top_p=0.7 then keeps two
    toks = sample_fixed(row, 400, batch=2, top_k=3, top_p=0.7, seed=8)
    assert set(toks.tolist()) == {0, 1}
    # temperature 0.5 sharpens before top-p: .62/.24/.15 -> top_p 0.7 keeps two as well,
    # top_p 0.6 keeps one
    toks = sample_fixed(row, 200, top_k=3, top_p=0.6, temperature=0.5, seed=8)
    assert set(toks.tolist()) == {0}


# ---------------------------------------------------------------- beam search

BEAM_CASES = [(nb, lp, es) for nb in (2, 3, 4) for lp in (0.5, 1.0, 2.0) for es in (True, False, "never")]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", BEAM_CASES)
def test_beam_search_matches_reference(num_beams, length_penalty, early_stopping):
    model = StandIn(seed=10 + num_beams, scale=2.5, eos_bias=1.8)
    prompts = [[2, 5, 6], [2, 9, 10, 11, 12], [2, 30]]
    cache = FakeCache()
    res = run(model, prompts, cache=cache, max_new_tokens=9, num_beams=num_beams,
              length_penalty=length_penalty, early_stopping=early_stopping)
    for p, r in zip(prompts, res):
        toks, score = ref_beam_search(model.logits, p, num_beams, 9, length_penalty=length_penalty,
                                      early_stopping=early_stopping)
        assert r["tokens"] == toks
        assert r["score"] == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert r["finish_reason"] == ("eos" if toks[-1] == 1 else "length")
    assert cache.reorders > 0


def test_beam_search_eos_mid_way_is_exercised():
    reasons = []
    for nb in (2, 3, 4):
        model = StandIn(seed=10 + nb, scale=2.5, eos_bias=1.8)
        res = run(model, [[2, 5, 6], [2, 9, 10, 11, 12], [2, 30]], max_new_tokens=9, num_beams=nb)
        reasons += [(r["finish_reason"], len(r["tokens"])) for r in res]
    assert any(reason == "eos" and n < 9 for reason, n in reasons)
    assert any(reason == "length" for reason, _ in reasons)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_repetition_penalty_and_several_eos(num_beams):
    model = StandIn(seed=20, scale=2.5, eos_bias=1.0)
    prompt = [2, 5, 5, 6, 7]
    r = run(model, [prompt], max_new_tokens=10, num_beams=num_beams, repetition_penalty=1.5,
            eos_token_ids=[1, 7, 8])[0]
    toks, score = ref_beam_search(model.logits, prompt, num_beams, 10, eos=(1, 7, 8), penalty=1.5)
    assert r["tokens"] == toks and r["score"] == pytest.approx(score, rel=1e-5)


def test_beam_slots_explicit_and_default():
    model = StandIn(seed=21, scale=2.5, eos_bias=1.0)
    prompts = [[2, 5, 6], [2, 9]]
    a = run(model, prompts, cache=FakeCache(num_slots=8), num_beams=3, max_new_tokens=8)
    b = run(model, prompts, cache=FakeCache(num_slots=8), num_beams=3, max_new_tokens=8,
            slots=[7, 0, 3, 5, 2, 6])
    assert a == b


# ---------------------------------------------------------------- the real KVCache

class KVStandIn(StandIn):
    """The same model with its histories in a real _native.KVCache: each token's (id, position)
    is stored as its key / value row (head_dim 2, no RoPE) and read back for the logits."""

    @staticmethod
    def append(cache, slot, tokens, positions):
        kv = np.zeros((len(tokens), 1, 2), np.float32)
        kv[:, 0, 0], kv[:, 0, 1] = tokens, positions
        _native.attention(cache, 0, np.zeros_like(kv), kv, kv, [slot], list(positions), scale=1.0,
                          rope_theta=0.0)

    @staticmethod
    def history(cache, slot):
        k, _ = cache.read(0, slot)
        assert (k[0, :, 1] == np.arange(k.shape[1])).all(), "positions out of order in the cache"
        return k[0, :, 0].astype(np.int64).tolist()

    def prefill(self, cache, prompts, slots):
        for p, s in zip(prompts, slots):
            self.append(cache, s, list(p), list(range(len(p))))
        return np.stack([self.logits(p) for p in prompts])

    def step_fn(self, cache):
        def step(tokens, positions, slots):
            out = np.empty((len(tokens), self.vocab), np.float32)
            for i, (t, p, s) in enumerate(zip(tokens.tolist(), positions.tolist(), slots.tolist())):
                assert p == cache.length(s)
                self.append(cache, s, [t], [p])
                out[i] = self.logits(self.history(cache, s))
            return out
        return step


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=2), dict(num_beams=4, length_penalty=0.5),
                                dict(num_beams=3, early_stopping=True)])
def test_real_kv_cache_gives_the_same_results(kw):
    prompts = [[2, 5, 6], [2, 9, 10, 11, 12]]
    want = run(StandIn(seed=50, scale=2.5, eos_bias=1.5), prompts, max_new_tokens=10, **kw)
    cache = _native.KVCache(1, 1, 2, 8, 32, "f32", 4)
    got = run(KVStandIn(seed=50, scale=2.5, eos_bias=1.5), prompts, cache=cache, max_new_tokens=10, **kw)
    assert got == want


# ---------------------------------------------------------------- batching

@pytest.mark.parametrize("kw", [
    dict(),
    dict(repetition_penalty=1.2),
    dict(num_beams=3, length_penalty=0.8),
    dict(num_beams=2, early_stopping=True),
])
def test_batched_equals_each_alone(kw):
    model = StandIn(seed=30, scale=2.5, eos_bias=1.5)
    prompts = [[2, 5, 6], [2, 9, 10, 11, 12, 13, 14], [2], [2, 40, 41, 3]]
    batched = run(model, prompts, max_new_tokens=10, **kw)
    for p, r in zip(prompts, batched):
        assert run(model, [p], max_new_tokens=10, **kw)[0] == r


def test_batched_sampling_equals_alone_with_shifted_seed():
    model = StandIn(seed=31, scale=1.5)
    prompts = [[2, 5, 6], [2, 9, 10, 11], [2]]
    batched = run(model, prompts, max_new_tokens=12, do_sample=True, top_p=0.9, seed=50)
    for b, (p, r) in enumerate(zip(prompts, batched)):
        alone = run(model, [p], max_new_tokens=12, do_sample=True, top_p=0.9, seed=50 + b)[0]
        assert alone == r


def test_finished_sequences_are_not_stepped():
    fed = []
    model = StandIn(seed=3, eos_bias=2.5)
    cache = FakeCache()
    inner = model.step_fn(cache)

    def step(t, p, s):
        fed.append(s.tolist())
        return inner(t, p, s)

    prompts = [[2, 5], [2, 40, 41, 3]]
    first = model.prefill(cache, prompts, [0, 1])
    res = _native.generate(step, cache, first, prompts, [2, 4], [0, 1], max_new_tokens=8)
    lengths = [len(r["tokens"]) for r in res]
    assert lengths[0] != lengths[1]
    for b in range(2):   # a sequence with n tokens was fed n - 1 times (its last token never)
        assert sum(b in f for f in fed) == lengths[b] - 1


# ---------------------------------------------------------------- streaming, errors, stats

@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, seed=3), dict(num_beams=3)])
def test_stream_yields_exactly_the_final_tokens(kw):
    model = StandIn(seed=40, eos_bias=1.5)
    prompts = [[2, 5, 6], [2, 9], [2, 30, 31]]
    got = [[] for _ in prompts]
    res = run(model, prompts, max_new_tokens=9, stream=lambda b, t: got[b].append(t), **kw)
    assert got == [r["tokens"] for r in res]


class Boom(Exception):
    pass


def test_exception_in_step_fn_propagates():
    err = Boom("runner failed")
    cache = FakeCache()
    first = np.zeros((1, 8), np.float32)

    def step(t, p, s):
        raise err

    for kw in (dict(), dict(num_beams=2)):
        with pytest.raises(Boom) as info:
            _native.generate(step, cache, first, [[2]], [1], [0], max_new_tokens=5, eos_token_ids=[], **kw)
        assert info.value is err
    # the module still works afterwards
    assert run(StandIn(), [[2, 3]], max_new_tokens=3)[0]["tokens"]


def test_exception_and_interrupt_in_stream_stop_the_loop():
    model = StandIn(seed=41)
    for exc in (Boom("stream failed"), KeyboardInterrupt()):
        seen = []

        def stream(b, t):
            seen.append(t)
            if len(seen) == 3:
                raise exc

        with pytest.raises(type(exc)):
            run(model, [[2, 5]], max_new_tokens=20, eos_token_ids=[], stream=stream)
        assert len(seen) == 3
    with pytest.raises(KeyboardInterrupt):
        run(model, [[2, 5]], max_new_tokens=20, num_beams=2, eos_token_ids=[],
            stream=lambda b, t: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_bad_step_output_raises():
    cache = FakeCache()
    first = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="expected \\(1, 8\\)"):
        _native.generate(lambda t, p, s: np.zeros((1, 7), np.float32), cache, first, [[2]], [1], [0],
                         max_new_tokens=3, eos_token_ids=[])
    with pytest.raises(TypeError, match="step_fn must return"):
        _native.generate(lambda t, p, s: None, cache, first, [[2]], [1], [0],
                         max_new_tokens=3, eos_token_ids=[])
    # float64 / lists are converted
    r = _native.generate(lambda t, p, s: np.zeros((len(t), 8)), cache, first, [[2]], [1], [0],
                         max_new_tokens=3, eos_token_ids=[])
    assert r[0]["tokens"] == [0, 0, 0]


BAD_ARGS = [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=5), "cache slots"),          # 2 sequences * 5 beams > 8 slots
    (dict(num_beams=2, do_sample=True), "beam sampling"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(eos_token_ids=[8]), "outside the vocabulary"),
    (dict(stop_token_ids=[-1]), "outside the vocabulary"),
    (dict(length_penalty=float("nan"), num_beams=2), "length_penalty"),
    (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("kw,match", BAD_ARGS)
def test_bad_arguments_raise_value_error_before_any_step(kw, match):
    called = []
    args = dict(max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        _native.generate(lambda *a: called.append(1), FakeCache(num_slots=8, capacity=16),
                         np.zeros((2, 8), np.float32), [[2], [2, 3]], [1, 2], [0, 1], **args)
    assert not called


@pytest.mark.parametrize("call,match", [
    (lambda g, c, f: g(c, f, [[2]], [1], [0, 1]), "prompt_tokens"),                # batch mismatch
    (lambda g, c, f: g(c, f, [[2], [3]], [1, 16], [0, 1]), "prompt_length 16"),   # == capacity
    (lambda g, c, f: g(c, f, [[2], [3]], [1, 0], [0, 1]), "prompt_length 0"),
    (lambda g, c, f: g(c, f, [[2], [3]], [1, 1], [0, 0]), "used twice"),
    (lambda g, c, f: g(c, f, [[2], [3]], [1, 1], [0, 8]), "outside the cache"),
    (lambda g, c, f: g(c, f, [[2], [3]], [1, 1], [0, 1, 2]), "slots has 3"),
    (lambda g, c, f: g(c, f, [[2], [-3]], [1, 1], [0, 1]), "negative"),
    (lambda g, c, f: g(c, f[0], [[2]], [1], [0]), "2-D"),
])
def test_bad_inputs_raise_value_error(call, match):
    def g(cache, first, toks, lens, slots):
        return _native.generate(lambda *a: None, cache, first, toks, lens, slots, max_new_tokens=3)

    with pytest.raises(ValueError, match=match):
        call(g, FakeCache(num_slots=8, capacity=16), np.zeros((2, 8), np.float32))


def test_type_errors():
    first = np.zeros((1, 8), np.float32)
    with pytest.raises(TypeError, match="step_fn must be callable"):
        _native.generate(3, FakeCache(), first, [[2]], [1], [0], max_new_tokens=3)
    with pytest.raises(TypeError, match="has no 'capacity'"):
        _native.generate(lambda *a: None, object(), first, [[2]], [1], [0], max_new_tokens=3)
    with pytest.raises(TypeError, match="stream must be"):
        _native.generate(lambda *a: None, FakeCache(), first, [[2]], [1], [0], max_new_tokens=3, stream=5)


def test_stats_split_step_time_from_loop_time():
    model = StandIn(seed=42)
    res = run(model, [[2, 5], [2, 6, 7]], max_new_tokens=6, eos_token_ids=[])
    s = _native.last_generate_stats()
    assert s["steps"] == 5 and s["tokens_stepped"] == 10
    assert 0 < s["step_fn_s"] <= s["step_s"] <= s["total_s"]
    assert s["loop_s"] == pytest.approx(s["total_s"] - s["step_fn_s"] - s["stream_s"])
    assert len(res) == 2
