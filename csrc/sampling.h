// Token selection from one logits row: greedy, temperature, top-k, top-p (nucleus) and the
// repetition penalty, with the semantics of Hugging Face transformers' logits processors, and a
// seeded RNG whose bits are the same on every platform.
//
// Nothing here allocates after SamplerScratch::reserve(): the generation loop owns one scratch
// and reuses it for every row of every step.
#pragma once
#include <cstdint>
#include <vector>

namespace engine {

// ---- RNG: xoshiro256** seeded through splitmix64 (both fully specified, platform independent).
struct Rng {
  uint64_t s[4];
};
void rng_seed(Rng& rng, uint64_t seed);
uint64_t rng_next(Rng& rng);
double rng_uniform(Rng& rng);   // [0, 1) from the top 53 bits; never from <random> distributions

// ---- Whole-row passes (the loop's own hot spots on a 257k vocabulary). 4-wide with GCC/Clang
// vector extensions: SSE2 on x86-64, NEON on aarch64, no ISA flags needed.

// exp(x), about 1 ulp (Cephes expf polynomial); 0 for x < -87 (-inf included) and for NaN.
float exp_approx(float x);
// out[i] = exp_approx((x[i] - shift) * scale) for i < n; returns their sum (double).
double exp_shifted(const float* x, int n, float shift, float scale, float* out);
// The same sum without storing the values.
double sum_exp_shifted(const float* x, int n, float shift, float scale);
// Largest value, NaN skipped; -inf for an empty or all-NaN row.
float max_value(const float* x, int n);

// ---- Parameters (HF names; "off" values as in HF).
struct SamplingParams {
  bool do_sample = false;            // false: greedy (argmax)
  float temperature = 1.0f;          // > 0; used when do_sample
  int top_k = 0;                     // 0: off; used when do_sample
  float top_p = 1.0f;                // (0, 1]; 1: off; used when do_sample
  float repetition_penalty = 1.0f;   // > 0; 1: off; applies to greedy and sampling
};

// A read-only run of token ids. The history of a sequence is two spans: prompt + generated.
struct TokenSpan {
  const int32_t* data = nullptr;
  int size = 0;
};

// One candidate token: its (processed) value and its id.
struct Candidate {
  float value;
  int32_t id;
};

// Reusable buffers, sized once for one vocabulary.
struct SamplerScratch {
  int vocab = 0;
  std::vector<float> row;           // [vocab] penalized copy of the logits / log-probs
  std::vector<float> probs;         // [vocab] unnormalized probabilities exp((x - max) / T)
  std::vector<float> select;        // [vocab] values for nth_element (large top-k)
  std::vector<Candidate> cands;     // [vocab] top-k / nucleus candidates
  std::vector<double> bucket_mass;  // top-p: probability mass per float-exponent bucket
  std::vector<int32_t> stamp;       // [vocab] de-duplication marks for the penalty
  int32_t stamp_value = 0;
  void reserve(int vocab_size);
};

// Index of the largest value; the lowest index among equal maxima (like torch.argmax).
// NaN is skipped (a row of NaN returns 0).
int argmax(const float* x, int n);

// HF RepetitionPenaltyLogitsProcessor, in place: every distinct id of the history that lies in
// [0, vocab) gets x * penalty if x < 0, else x / penalty (once, however often it occurs).
void apply_repetition_penalty(float* x, int vocab, TokenSpan prompt, TokenSpan generated,
                              float penalty, SamplerScratch& scratch);

// The k largest values of x (k >= 1), plus any ties with the k-th (HF's TopKLogitsWarper keeps
// ties), written to out sorted by value descending, then id ascending. Returns the count.
// `out` needs room for n entries in the worst case (all tied). NaN is never selected.
int top_k_candidates(const float* x, int n, int k, Candidate* out, SamplerScratch& scratch);

// Chooses the next token from `logits` [vocab] (not modified). HF order: repetition penalty,
// then (when sampling) temperature, top-k, top-p, then a draw from the renormalized softmax.
// The draw walks the kept tokens in a fixed order with one uniform number from `rng`.
int32_t select_token(const float* logits, int vocab, const SamplingParams& params,
                     TokenSpan prompt, TokenSpan generated, Rng& rng, SamplerScratch& scratch);

}  // namespace engine
