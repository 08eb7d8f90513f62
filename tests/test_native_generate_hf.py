"""The native decode loop against transformers' own generate() on a tiny random torch LM:
greedy, beam search (num_beams, length_penalty, early_stopping) and repetition penalty."""
from __future__ import annotations

import pytest

from test_native_generate import StandIn, ref_beam_search, run

@pytest.fixture(scope="module")
def tiny_lm():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   pad_token_id=0, bos_token_id=2, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.8)    # varied continuations, per-token log-probs around -1
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return torch, model


def torch_logits(torch, model):
    cache = model.__dict__.setdefault("_logits_memo", {})   # the same sequences come back often

    def logits(seq):
        key = tuple(int(t) for t in seq)
        if key not in cache:
            with torch.no_grad():
                cache[key] = model(input_ids=torch.tensor([key])).logits[0, -1].float().numpy()
        return cache[key]
    return logits


def run_torch(torch, model, prompt, **kw):
    logits = torch_logits(torch, model)

    class Adapter(StandIn):
        def __init__(self):
            self.vocab, self.calls = 64, 0

        def logits(self, seq):
            return logits(seq)

    return run(Adapter(), [prompt], **kw)[0]


def hf_generate(torch, model, prompt, **kw):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **kw)
    score = float(out.sequences_scores[0]) if getattr(out, "sequences_scores", None) is not None else None
    return out.sequences[0, len(prompt):].tolist(), score


PROMPTS = [[2, 10, 11, 12], [2, 40, 7], [2, 33, 34, 35, 36, 20]]


def test_greedy_matches_transformers(tiny_lm):
    torch, model = tiny_lm
    for prompt in PROMPTS:
        for penalty in (1.0, 1.4):
            free, _ = hf_generate(torch, model, prompt, max_new_tokens=10, eos_token_id=None,
                                  repetition_penalty=penalty)
            eos = free[4]
            want, _ = hf_generate(torch, model, prompt, max_new_tokens=10, eos_token_id=[eos],
                                  repetition_penalty=penalty)
            got = run_torch(torch, model, prompt, max_new_tokens=10, eos_token_ids=[eos],
                            repetition_penalty=penalty)
            assert got["tokens"] == want


HF_BEAM_CASES = [(2, 1.0, False), (2, 0.5, True), (2, 2.0, "never"), (3, 1.0, True),
                 (3, 2.0, False), (3, 0.5, "never"), (4, 0.5, False), (4, 1.0, "never"), (4, 2.0, True)]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", HF_BEAM_CASES)
def test_beam_search_matches_transformers(tiny_lm, num_beams, length_penalty, early_stopping):
    torch, model = tiny_lm
    finished_early = 0
    for i, prompt in enumerate(PROMPTS):
        kw = dict(max_new_tokens=8, num_beams=num_beams, length_penalty=length_penalty,
                  early_stopping=early_stopping)
        free, _ = hf_generate(torch, model, prompt, eos_token_id=None, **kw)
        eos = [free[2 + i]]                      # an eos the search meets mid-way
        want, want_score = hf_generate(torch, model, prompt, eos_token_id=eos, **kw)
        got = run_torch(torch, model, prompt, eos_token_ids=eos, **kw)
        assert got["tokens"] == want
        assert got["score"] == pytest.approx(want_score, rel=1e-4, abs=1e-5)
        ref_toks, ref_score = ref_beam_search(torch_logits(torch, model), prompt, num_beams, 8, eos=eos,
                                              length_penalty=length_penalty, early_stopping=early_stopping)
        assert ref_toks == want and ref_score == pytest.approx(want_score, rel=1e-4, abs=1e-5)
        finished_early += len(want) < 8
    if length_penalty <= 1.0:     # length_penalty 2 favours long hypotheses: they may all run on
        assert finished_early > 0


def test_beam_search_repetition_penalty_matches_transformers(tiny_lm):
    torch, model = tiny_lm
    for prompt in PROMPTS:
        kw = dict(max_new_tokens=8, num_beams=3, repetition_penalty=1.3)
        want, want_score = hf_generate(torch, model, prompt, eos_token_id=[1, 5], **kw)
        got = run_torch(torch, model, prompt, eos_token_ids=[1, 5], **kw)
        assert got["tokens"] == want and got["score"] == pytest.approx(want_score, rel=1e-4)
