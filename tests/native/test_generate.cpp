// Sampling and the generation loop (greedy, sampling, beam search) with fake step models, and
// once with the real KVCache: no Python. Filter with `native_tests sampling` / `generate`.
#include <algorithm>
#include <cmath>
#include <functional>
#include <set>
#include <stdexcept>
#include <vector>

#include "attention.h"
#include "generate.h"
#include "harness.h"
#include "kv_cache.h"
#include "sampling.h"

using engine::Candidate;
using engine::GenerateOptions;
using engine::Rng;
using engine::SamplerScratch;
using engine::SamplingParams;
using engine::SequenceInput;
using engine::SequenceResult;
using engine::TokenSpan;

namespace {

using LogitsFn = std::function<void(const std::vector<int32_t>& seq, float* out)>;

// Cache double: the token history of every slot.
struct HistorySlots final : engine::SlotOps {
  HistorySlots(int slots, int cap) : cap_(cap), hist(slots) {}
  int capacity() const override { return cap_; }
  int num_slots() const override { return static_cast<int>(hist.size()); }
  void copy_slot(int src, int dst) override { hist[dst] = hist[src]; }
  void reorder(const std::vector<int>& src_for_dst) override {
    std::vector<std::vector<int32_t>> next = hist;
    for (size_t d = 0; d < src_for_dst.size(); ++d) next[d] = hist[src_for_dst[d]];
    hist.swap(next);
    ++reorders;
  }
  int cap_;
  std::vector<std::vector<int32_t>> hist;
  int reorders = 0;
};

// Step model over HistorySlots: appends each token to its slot, returns logits of the history.
struct HistoryModel final : engine::StepModel {
  HistoryModel(HistorySlots& s, int v, LogitsFn f) : slots(s), vocab(v), logits_of(std::move(f)) {}
  const float* step(const int32_t* tokens, const int32_t* positions, const int32_t* slot_ids,
                    int n) override {
    if (++calls == fail_at_call) throw std::runtime_error("step failed on purpose");
    out.assign(static_cast<size_t>(n) * vocab, 0.0f);
    for (int i = 0; i < n; ++i) {
      std::vector<int32_t>& h = slots.hist[slot_ids[i]];
      if (positions[i] != static_cast<int>(h.size())) throw std::logic_error("position != slot length");
      if (positions[i] >= slots.capacity()) throw std::logic_error("fed beyond capacity");
      h.push_back(tokens[i]);
      logits_of(h, out.data() + static_cast<size_t>(i) * vocab);
    }
    return out.data();
  }
  HistorySlots& slots;
  int vocab;
  LogitsFn logits_of;
  std::vector<float> out;
  int calls = 0, fail_at_call = -1;
};

// Pseudo-random logits that depend on the length and the last two tokens; eos (1) gets a bonus.
LogitsFn hashed_logits(int vocab, float eos_bonus) {
  return [vocab, eos_bonus](const std::vector<int32_t>& seq, float* out) {
    const uint64_t n = seq.size();
    const uint64_t key = n * 1000003ULL + uint64_t(seq.back()) * 7919ULL + (n > 1 ? uint64_t(seq[n - 2]) : 0);
    Rng r;
    engine::rng_seed(r, key);
    for (int v = 0; v < vocab; ++v) out[v] = static_cast<float>(engine::rng_uniform(r) * 6.0 - 3.0);
    out[1] += eos_bonus;
  };
}

struct Run {
  std::vector<SequenceResult> results;
  int reorders = 0;
};

Run run(const LogitsFn& logits_of, int vocab, const std::vector<std::vector<int32_t>>& prompts,
        const GenerateOptions& o, int capacity = 64, int num_slots = 16,
        const engine::StreamFn& stream = {}) {
  HistorySlots slots(num_slots, capacity);
  HistoryModel model(slots, vocab, logits_of);
  std::vector<std::vector<float>> first(prompts.size(), std::vector<float>(vocab));
  std::vector<SequenceInput> inputs(prompts.size());
  std::vector<int> prefill_slots;
  for (size_t b = 0; b < prompts.size(); ++b) prefill_slots.push_back(static_cast<int>(b));
  const auto beam_slots = engine::default_beam_slots(prefill_slots, o.num_beams, num_slots);
  for (size_t b = 0; b < prompts.size(); ++b) {
    slots.hist[b] = prompts[b];
    logits_of(prompts[b], first[b].data());
    inputs[b].first_logits = first[b].data();
    inputs[b].prompt_tokens = prompts[b];
    inputs[b].prompt_length = static_cast<int>(prompts[b].size());
    inputs[b].slots = beam_slots[b];
  }
  Run r;
  r.results = engine::generate(model, slots, inputs, vocab, o, stream, nullptr);
  r.reorders = slots.reorders;
  return r;
}

std::vector<int32_t> reference_greedy(const LogitsFn& logits_of, int vocab, std::vector<int32_t> seq,
                                      int max_new, int32_t eos) {
  std::vector<int32_t> out;
  std::vector<float> x(vocab);
  while (static_cast<int>(out.size()) < max_new) {
    logits_of(seq, x.data());
    const int32_t t = static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
    seq.push_back(t);
    out.push_back(t);
    if (t == eos) break;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------- sampling

TEST(sampling_rng_matches_reference_values) {
  // splitmix64 + xoshiro256** computed independently (Python) from the published algorithms.
  Rng r;
  engine::rng_seed(r, 0);
  CHECK(r.s[0] == 0xe220a8397b1dcdafULL);
  CHECK(engine::rng_next(r) == 0x99ec5f36cb75f2b4ULL);
  CHECK(engine::rng_next(r) == 0xbf6e1f784956452aULL);
  CHECK(engine::rng_next(r) == 0x1a5f849d4933e6e0ULL);
  engine::rng_seed(r, 42);
  CHECK(engine::rng_next(r) == 0x15780b2e0c2ec716ULL);
  for (int i = 0; i < 1000; ++i) {
    const double u = engine::rng_uniform(r);
    CHECK(u >= 0.0 && u < 1.0);
  }
}

TEST(sampling_exp_approx_accuracy) {
  double worst = 0.0;
  for (int i = -870000; i <= 0; ++i) {   // the range softmax uses: x - max <= 0
    const float x = static_cast<float>(i) * 1e-4f;
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(engine::exp_approx(x) - want) / want);
  }
  CHECK_MSG(worst < 3e-7, "max relative error %g", worst);
  CHECK(engine::exp_approx(0.f) == 1.f);
  CHECK(engine::exp_approx(-INFINITY) == 0.f && engine::exp_approx(NAN) == 0.f);
  CHECK(engine::exp_approx(-88.f) == 0.f);
  CHECK(std::fabs(engine::exp_approx(10.f) / std::exp(10.0) - 1.0) < 3e-7);
  std::vector<float> x(1000), out(1000);
  for (int i = 0; i < 1000; ++i) x[i] = -0.01f * static_cast<float>(i);
  double want = 0.0;
  for (float v : x) want += std::exp((static_cast<double>(v) - 0.5) * 2.0);
  CHECK(std::fabs(engine::exp_shifted(x.data(), 1000, 0.5f, 2.f, out.data()) / want - 1.0) < 1e-6);
  CHECK(std::fabs(engine::sum_exp_shifted(x.data(), 1000, 0.5f, 2.f) / want - 1.0) < 1e-6);
}

TEST(sampling_argmax_lowest_index_on_ties) {
  const float x[] = {1.f, 3.f, -2.f, 3.f, NAN, 3.f};
  CHECK(engine::argmax(x, 6) == 1);
  const float y[] = {NAN, -INFINITY, 2.f};
  CHECK(engine::argmax(y, 3) == 2);
}

TEST(sampling_repetition_penalty_once_per_distinct_id) {
  SamplerScratch s;
  s.reserve(6);
  for (int round = 0; round < 3; ++round) {   // the stamp array is reused across calls
    float x[] = {2.f, -2.f, 0.f, 4.f, -1.f, 1.f};
    const int32_t prompt[] = {0, 1, 1, 9, -3};   // ids outside [0, vocab) are ignored (HF)
    const int32_t gen[] = {3, 0};
    engine::apply_repetition_penalty(x, 6, TokenSpan{prompt, 5}, TokenSpan{gen, 2}, 2.f, s);
    CHECK(x[0] == 1.f && x[1] == -4.f && x[2] == 0.f && x[3] == 2.f && x[4] == -1.f && x[5] == 1.f);
  }
}

TEST(sampling_top_k_candidates_keep_ties_sorted) {
  SamplerScratch s;
  s.reserve(8);
  const float x[] = {0.5f, 2.f, 1.f, 2.f, -1.f, 1.f, NAN, 0.f};
  std::vector<Candidate> out(8);
  int n = engine::top_k_candidates(x, 8, 3, out.data(), s);
  CHECK(n == 4);   // 2, 2, 1, 1: the third value ties with the fourth
  CHECK(out[0].id == 1 && out[1].id == 3 && out[2].id == 2 && out[3].id == 5);
  n = engine::top_k_candidates(x, 8, 1, out.data(), s);
  CHECK(n == 2 && out[0].id == 1 && out[1].id == 3);
  // k > 4096 takes the nth_element path: same set as a full sort
  const int V = 9000, K = 5000;
  s.reserve(V);
  std::vector<float> big(V);
  Rng r;
  engine::rng_seed(r, 7);
  for (float& v : big) v = static_cast<float>(engine::rng_uniform(r));
  std::vector<Candidate> got(V);
  n = engine::top_k_candidates(big.data(), V, K, got.data(), s);
  std::vector<float> sorted = big;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  CHECK(n == K);
  bool ok = true;
  for (int j = 0; j < n; ++j) ok = ok && got[j].value == sorted[j] && big[got[j].id] == got[j].value;
  CHECK(ok);
}

TEST(sampling_top_k_top_p_stay_inside_the_allowed_set) {
  // probabilities .05 .5 .02 .3 .1 .03 (descending ids 1, 3, 4, 0, 5, 2)
  const double probs[] = {0.05, 0.5, 0.02, 0.3, 0.1, 0.03};
  float x[6];
  for (int i = 0; i < 6; ++i) x[i] = static_cast<float>(std::log(probs[i]));
  SamplerScratch s;
  s.reserve(6);
  struct Case { int top_k; float top_p; std::set<int> allowed; };
  const Case cases[] = {{0, 0.45f, {1}}, {0, 0.75f, {1, 3}}, {0, 0.85f, {1, 3, 4}},
                        {2, 1.0f, {1, 3}}, {3, 0.6f, {1, 3}}, {0, 1.0f, {0, 1, 2, 3, 4, 5}}};
  for (const Case& c : cases) {
    SamplingParams p;
    p.do_sample = true;
    p.top_k = c.top_k;
    p.top_p = c.top_p;
    Rng r;
    engine::rng_seed(r, 11);
    std::set<int> seen;
    for (int i = 0; i < 2000; ++i) seen.insert(engine::select_token(x, 6, p, {}, {}, r, s));
    CHECK_MSG(seen == c.allowed, "top_k %d top_p %g", c.top_k, c.top_p);
  }
}

TEST(sampling_frequencies_and_seed_determinism) {
  const float x[] = {0.f, 1.f, 2.f, -1.f};
  SamplerScratch s;
  s.reserve(4);
  SamplingParams p;
  p.do_sample = true;
  p.temperature = 2.f;
  Rng a, b;
  engine::rng_seed(a, 5);
  engine::rng_seed(b, 5);
  std::vector<int> count(4, 0);
  const int N = 20000;
  for (int i = 0; i < N; ++i) {
    const int t = engine::select_token(x, 4, p, {}, {}, a, s);
    CHECK(t == engine::select_token(x, 4, p, {}, {}, b, s));
    ++count[t];
  }
  double z = 0;
  for (float v : x) z += std::exp(v / 2.0);
  for (int i = 0; i < 4; ++i) CHECK(std::fabs(count[i] / double(N) - std::exp(x[i] / 2.0) / z) < 0.015);
}

// ---------------------------------------------------------------- greedy / sampling loop

TEST(generate_greedy_matches_reference_loop) {
  const int V = 40;
  const LogitsFn f = hashed_logits(V, 1.5f);
  const std::vector<std::vector<int32_t>> prompts = {{2, 5, 6}, {2}, {2, 9, 10, 11, 12, 13}};
  GenerateOptions o;
  o.max_new_tokens = 12;
  const Run r = run(f, V, prompts, o);
  for (size_t b = 0; b < prompts.size(); ++b) {
    const auto want = reference_greedy(f, V, prompts[b], 12, 1);
    CHECK(r.results[b].tokens == want);
    CHECK(r.results[b].finish_reason ==
          (want.back() == 1 ? engine::FinishReason::Eos : engine::FinishReason::Length));
  }
}

TEST(generate_stop_tokens_capacity_and_stream) {
  const int V = 40;
  const LogitsFn f = hashed_logits(V, -10.f);
  GenerateOptions o;
  o.max_new_tokens = 30;
  o.eos_token_ids = {};
  const auto free_run = reference_greedy(f, V, {2, 3}, 30, -1);
  o.stop_token_ids = {free_run[4]};
  std::vector<int32_t> streamed;
  Run r = run(f, V, {{2, 3}}, o, 64, 4, [&](int, int32_t t) { streamed.push_back(t); });
  const auto stop_at = std::find(free_run.begin(), free_run.end(), free_run[4]) - free_run.begin();
  CHECK(r.results[0].finish_reason == engine::FinishReason::Stop);
  CHECK(static_cast<long>(r.results[0].tokens.size()) == stop_at + 1);
  CHECK(streamed == r.results[0].tokens);
  // capacity 10 with a prompt of 2: at most 8 tokens in all, for greedy and for beams
  o.stop_token_ids = {};
  r = run(f, V, {{2, 3}}, o, 10);
  CHECK(r.results[0].tokens.size() == 8 && r.results[0].finish_reason == engine::FinishReason::Length);
  o.num_beams = 3;
  r = run(f, V, {{2, 3}}, o, 10);
  CHECK(r.results[0].tokens.size() == 8 && r.results[0].finish_reason == engine::FinishReason::Length);
}

TEST(generate_sampling_batched_equals_alone_with_shifted_seed) {
  const int V = 30;
  const LogitsFn f = hashed_logits(V, 0.f);
  GenerateOptions o;
  o.max_new_tokens = 15;
  o.do_sample = true;
  o.top_p = 0.9f;
  o.seed = 77;
  const std::vector<std::vector<int32_t>> prompts = {{2, 4}, {2, 8, 9, 10}};
  const Run both = run(f, V, prompts, o);
  for (size_t b = 0; b < prompts.size(); ++b) {
    GenerateOptions ob = o;
    ob.seed = o.seed + b;
    CHECK(run(f, V, {prompts[b]}, ob).results[0].tokens == both.results[b].tokens);
  }
}

TEST(generate_step_exception_propagates) {
  const int V = 20;
  HistorySlots slots(4, 32);
  HistoryModel model(slots, V, hashed_logits(V, -10.f));
  model.fail_at_call = 3;
  std::vector<float> first(V, 0.f);
  first[5] = 1.f;
  std::vector<SequenceInput> in(1);
  in[0].first_logits = first.data();
  in[0].prompt_tokens = {2};
  in[0].prompt_length = 1;
  in[0].slots = {0};
  slots.hist[0] = {2};
  GenerateOptions o;
  o.max_new_tokens = 10;
  CHECK_THROWS(std::runtime_error, engine::generate(model, slots, in, V, o, {}, nullptr));
}

TEST(generate_validation_errors) {
  HistorySlots slots(4, 16);
  HistoryModel model(slots, 8, hashed_logits(8, 0.f));
  std::vector<float> first(8, 0.f);
  auto inputs = [&](int prompt_length, std::vector<int> s) {
    std::vector<SequenceInput> in(1);
    in[0].first_logits = first.data();
    in[0].prompt_tokens = {2};
    in[0].prompt_length = prompt_length;
    in[0].slots = std::move(s);
    return in;
  };
  GenerateOptions ok;
  ok.max_new_tokens = 3;
  auto bad = [&](auto edit, int prompt_length = 1, std::vector<int> s = {0}) {
    GenerateOptions o = ok;
    edit(o);
    CHECK_THROWS(std::invalid_argument, engine::generate(model, slots, inputs(prompt_length, s), 8, o, {}, nullptr));
  };
  bad([](GenerateOptions& o) { o.max_new_tokens = 0; });
  bad([](GenerateOptions& o) { o.do_sample = true; o.temperature = 0.f; });
  bad([](GenerateOptions& o) { o.top_p = 0.f; });
  bad([](GenerateOptions& o) { o.top_k = -2; });
  bad([](GenerateOptions& o) { o.repetition_penalty = -1.f; });
  bad([](GenerateOptions& o) { o.eos_token_ids = {8}; });
  bad([](GenerateOptions& o) { o.num_beams = 2; o.do_sample = true; }, 1, {0, 1});
  bad([](GenerateOptions& o) { o.num_beams = 5; }, 1, {0, 1, 2, 3, 4});   // 5 slots > 4
  bad([](GenerateOptions& o) { o.num_beams = 2; }, 1, {0});             // one slot for two beams
  bad([](GenerateOptions&) {}, 16);                                       // prompt fills the cache
  bad([](GenerateOptions&) {}, 1, {4});                                   // slot out of range
  CHECK_THROWS(std::invalid_argument, engine::default_beam_slots({0, 1}, 3, 5));
  CHECK(model.calls == 0);
}

// ---------------------------------------------------------------- beam search

// Markov toy: after the prompt (last token 2), 3 is likelier than 4, but after 3 everything is
// flat while after 4 eos is almost sure. Greedy takes 3; two beams find 4, eos.
TEST(generate_beam_search_finds_the_better_sequence) {
  const int V = 6;
  const LogitsFn f = [](const std::vector<int32_t>& seq, float* out) {
    double p[6] = {0.02, 0.02, 0.02, 0.02, 0.02, 0.02};
    if (seq.back() == 2) { p[3] = 0.5; p[4] = 0.4; p[1] = 0.04; }
    else if (seq.back() == 3) { p[0] = 0.2; p[5] = 0.19; p[1] = 0.18; p[2] = 0.18; p[4] = 0.17; p[3] = 0.08; }
    else if (seq.back() == 4) { p[1] = 0.9; }
    double z = 0;
    for (double v : p) z += v;
    for (int i = 0; i < 6; ++i) out[i] = static_cast<float>(std::log(p[i] / z));
  };
  GenerateOptions o;
  o.max_new_tokens = 2;
  Run r = run(f, V, {{2}}, o);
  CHECK((r.results[0].tokens == std::vector<int32_t>{3, 0}) && !r.results[0].has_score);
  o.num_beams = 2;
  for (float lp : {1.0f, 0.5f, 2.0f}) {
    o.length_penalty = lp;
    r = run(f, V, {{2}}, o);
    CHECK((r.results[0].tokens == std::vector<int32_t>{4, 1}));
    CHECK(r.results[0].finish_reason == engine::FinishReason::Eos && r.results[0].has_score);
    double z4 = 0;   // log p(4 | 2) + log p(1 | 4), normalized like f does
    for (double v : {0.02, 0.04, 0.02, 0.5, 0.4, 0.02}) z4 += v;
    const double want = (std::log(0.4 / z4) + std::log(0.9 / 1.0)) / std::pow(2.0, lp);
    CHECK_MSG(std::fabs(r.results[0].score - want) < 1e-5, "score %g want %g", r.results[0].score, want);
    CHECK(r.reorders >= 1);
  }
}

TEST(generate_beam_batched_equals_alone) {
  const int V = 40;
  const LogitsFn f = hashed_logits(V, 1.0f);
  GenerateOptions o;
  o.max_new_tokens = 10;
  o.num_beams = 3;
  o.length_penalty = 0.7f;
  const std::vector<std::vector<int32_t>> prompts = {{2, 5}, {2, 7, 8, 9}, {2}};
  const Run both = run(f, V, prompts, o);
  for (size_t b = 0; b < prompts.size(); ++b) {
    const Run alone = run(f, V, {prompts[b]}, o);
    CHECK(alone.results[0].tokens == both.results[b].tokens);
    CHECK(alone.results[0].score == both.results[b].score);
  }
}

// The same searches with the real KVCache holding the histories: token ids are stored as key
// rows (no RoPE) and read back, so the cache's copy_slot / reorder must do what the loop expects.
TEST(generate_beam_search_with_real_kv_cache) {
  const int V = 40;
  const LogitsFn f = hashed_logits(V, 1.0f);
  struct KVModel final : engine::StepModel {
    engine::KVCache& cache;
    LogitsFn f;
    int vocab;
    std::vector<float> out;
    KVModel(engine::KVCache& c, LogitsFn fn, int v) : cache(c), f(std::move(fn)), vocab(v) {}
    void append(int slot, int32_t token, int32_t pos) {
      const float kv[2] = {static_cast<float>(token), static_cast<float>(pos)};
      engine::attention_append(cache, 0, kv, kv, {slot}, 1, &pos, 0.f);
    }
    std::vector<int32_t> history(int slot) const {
      const int n = cache.length(slot);
      std::vector<float> k(2 * n), v(2 * n);
      cache.read(0, slot, k.data(), v.data());
      std::vector<int32_t> h(n);
      for (int i = 0; i < n; ++i) h[i] = static_cast<int32_t>(k[2 * i]);
      return h;
    }
    const float* step(const int32_t* tokens, const int32_t* positions, const int32_t* slots,
                      int n) override {
      out.assign(static_cast<size_t>(n) * vocab, 0.f);
      for (int i = 0; i < n; ++i) {
        if (positions[i] != cache.length(slots[i])) throw std::logic_error("position != length");
        append(slots[i], tokens[i], positions[i]);
        f(history(slots[i]), out.data() + static_cast<size_t>(i) * vocab);
      }
      return out.data();
    }
  };
  const std::vector<std::vector<int32_t>> prompts = {{2, 5}, {2, 7, 8, 9}};
  for (int nb : {1, 2, 4}) {
    engine::KVCache cache(1, 1, 2, 8, 24, engine::KVDtype::F32, 4);
    engine::KVCacheSlots ops(cache);
    KVModel model(cache, f, V);
    GenerateOptions o;
    o.max_new_tokens = 12;
    o.num_beams = nb;
    std::vector<std::vector<float>> first(prompts.size(), std::vector<float>(V));
    std::vector<SequenceInput> in(prompts.size());
    for (size_t b = 0; b < prompts.size(); ++b) {
      for (size_t i = 0; i < prompts[b].size(); ++i)
        model.append(static_cast<int>(b), prompts[b][i], static_cast<int32_t>(i));
      f(prompts[b], first[b].data());
      in[b].first_logits = first[b].data();
      in[b].prompt_tokens = prompts[b];
      in[b].prompt_length = static_cast<int>(prompts[b].size());
    }
    const auto beam_slots = engine::default_beam_slots({0, 1}, nb, 8);
    for (size_t b = 0; b < prompts.size(); ++b) in[b].slots = beam_slots[b];
    const auto got = engine::generate(model, ops, in, V, o, {}, nullptr);
    const Run want = run(f, V, prompts, o);
    for (size_t b = 0; b < prompts.size(); ++b) {
      CHECK_MSG(got[b].tokens == want.results[b].tokens, "num_beams %d sequence %zu", nb, b);
      CHECK(got[b].score == want.results[b].score);
    }
  }
}
