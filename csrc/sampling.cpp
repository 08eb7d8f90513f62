// Token selection: see sampling.h. HF references: transformers/generation/logits_process.py
// (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
#include "sampling.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "vec4.h"

namespace engine {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// ---- 4-wide kernels (see sampling.h). Float selects are written as vector ternaries: scalar
// code with the same selects is turned into branches by GCC and stays scalar.
inline f32x4 exp4(f32x4 x) {
  const i32x4 keep = x >= -87.0f;                        // all ones, or 0 for NaN / below -87
  const f32x4 lo = {-87.0f, -87.0f, -87.0f, -87.0f}, hi = {88.0f, 88.0f, 88.0f, 88.0f};
  x = x > lo ? x : lo;                                   // NaN -> -87
  x = x < hi ? x : hi;
  const f32x4 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   // round(x / ln 2)
  const f32x4 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  f32x4 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f32x4 e = p * r * r + r + 1.0f;
  const i32x4 pow2n = (__builtin_convertvector(n, i32x4) + 127) << 23;   // 2^n, n in [-126, 127]
  f32x4 scale;
  std::memcpy(&scale, &pow2n, sizeof scale);
  const f32x4 y = e * scale;
  i32x4 bits;
  std::memcpy(&bits, &y, sizeof bits);
  bits &= keep;
  f32x4 out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// exp over x[0, n) (shifted, scaled), stored if out != nullptr; the sum in float lanes per block
// of 256 values, then in double.
double exp_pass(const float* x, int n, float shift, float scale, float* out) {
  double total = 0.0;
  int i = 0;
  while (i + 4 <= n) {
    f32x4 acc = {0.0f, 0.0f, 0.0f, 0.0f};
    const int end = std::min(n, i + 256);
    for (; i + 4 <= end; i += 4) {
      const f32x4 e = exp4((load4(x + i) - shift) * scale);
      if (out != nullptr) std::memcpy(out + i, &e, sizeof e);
      acc += e;
    }
    total += (static_cast<double>(acc[0]) + acc[1]) + (static_cast<double>(acc[2]) + acc[3]);
  }
  for (; i < n; ++i) {
    const float e = exp_approx((x[i] - shift) * scale);
    if (out != nullptr) out[i] = e;
    total += e;
  }
  return total;
}

// Value descending, then id ascending: a total order, so results never depend on std::sort.
inline bool before(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// Draws an index j in [0, n) with probability probs[j] / mass, walking in order with one uniform
// number; mass = the sum of the positive probs (pass it when known). Entries <= 0 are never drawn.
int draw_index(const float* probs, int n, double mass, Rng& rng) {
  const double target = rng_uniform(rng) * mass;
  double cum = 0.0;
  int last_positive = 0;
  for (int j = 0; j < n; ++j) {
    if (!(probs[j] > 0.0f)) continue;
    cum += probs[j];
    last_positive = j;
    if (target < cum) return j;
  }
  return last_positive;   // rounding at the very end of the walk
}

int draw_index(const float* probs, int n, Rng& rng) {
  double mass = 0.0;
  for (int j = 0; j < n; ++j) mass += probs[j] > 0.0f ? probs[j] : 0.0f;
  return draw_index(probs, n, mass, rng);
}

// Top-k (plus ties), then optionally top-p within those, then a draw.
int32_t sample_top_k(const float* x, int vocab, const SamplingParams& p, Rng& rng,
                     SamplerScratch& s) {
  Candidate* cands = s.cands.data();
  const int n = top_k_candidates(x, vocab, p.top_k, cands, s);
  const float vmax = cands[0].value;
  if (!(vmax > kNegInf)) return cands[0].id;   // every logit is -inf: nothing to sample from
  const float inv_t = 1.0f / p.temperature;
  float* probs = s.probs.data();
  double total = 0.0;
  for (int j = 0; j < n; ++j) {
    probs[j] = exp_approx((cands[j].value - vmax) * inv_t);
    total += probs[j];
  }
  int keep = n;
  if (p.top_p < 1.0f) {
    const double need = static_cast<double>(p.top_p) * total;
    double cum = 0.0;
    for (int j = 0; j < n; ++j) {
      cum += probs[j];
      if (cum >= need) { keep = j + 1; break; }
    }
  }
  return cands[draw_index(probs, keep, rng)].id;
}

// Probability buckets for the nucleus: the top 16 bits of a positive float (8 exponent bits, 7
// mantissa bits) order like the values; a bucket spans a factor of 2^(1/128). Values <= 1.
constexpr int kBucketShift = 16;
constexpr int kBuckets = (0x3f800000 >> kBucketShift) + 1;   // bucket of 1.0f, plus one

inline uint32_t bucket_of(float p) {
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  return bits >> kBucketShift;
}

// Nucleus over the whole vocabulary without sorting it: 1) the mass per probability bucket;
// 2) from the top bucket down, the bucket where the cumulative mass reaches top_p; 3) sort only
// that bucket's tokens to find the nucleus' last token; 4) draw in id order among the tokens
// ordered before-or-equal that last one. Three passes over the row plus one small sort.
int32_t sample_nucleus(const float* x, int vocab, const SamplingParams& p, Rng& rng,
                       SamplerScratch& s) {
  const float vmax = max_value(x, vocab);
  if (!(vmax > kNegInf)) return argmax(x, vocab);
  float* probs = s.probs.data();   // in [0, 1]: the top token has exp(0) = 1
  const double total = exp_shifted(x, vocab, vmax, 1.0f / p.temperature, probs);
  const double need = static_cast<double>(p.top_p) * total;

  double* mass = s.bucket_mass.data();
  std::fill(mass, mass + kBuckets, 0.0);
  for (int i = 0; i < vocab; ++i) mass[bucket_of(probs[i])] += probs[i];
  int boundary = kBuckets - 1;
  double above = 0.0;   // mass of the buckets above `boundary`
  while (boundary > 0 && above + mass[boundary] < need) above += mass[boundary--];

  Candidate* cands = s.cands.data();
  int n = 0;
  for (int i = 0; i < vocab; ++i)
    if (bucket_of(probs[i]) == static_cast<uint32_t>(boundary)) cands[n++] = Candidate{probs[i], i};
  std::sort(cands, cands + n, before);
  Candidate last = n > 0 ? cands[n - 1] : Candidate{0.0f, vocab};   // empty: everything is in
  double kept = above;
  for (int j = 0; j < n; ++j) {
    kept += cands[j].value;
    if (kept >= need) {
      last = cands[j];
      break;
    }
  }
  const double target = rng_uniform(rng) * kept;
  double cum = 0.0;
  int32_t last_in = 0;   // the top token is always in the nucleus and overrides this
  for (int i = 0; i < vocab; ++i) {
    const float pi = probs[i];
    const bool in = pi > last.value || (pi == last.value && i <= last.id);
    if (!in || !(pi > 0.0f)) continue;
    cum += pi;
    last_in = i;
    if (target < cum) return i;
  }
  return last_in;   // rounding at the very end of the walk
}

// Plain temperature sampling over the whole vocabulary, in id order.
int32_t sample_full(const float* x, int vocab, const SamplingParams& p, Rng& rng,
                    SamplerScratch& s) {
  const float vmax = max_value(x, vocab);
  if (!(vmax > kNegInf)) return argmax(x, vocab);
  float* probs = s.probs.data();
  const double total = exp_shifted(x, vocab, vmax, 1.0f / p.temperature, probs);
  return draw_index(probs, vocab, total, rng);   // ids are 0..vocab-1
}

}  // namespace

float exp_approx(float x) {
  const f32x4 v = {x, x, x, x};   // the same arithmetic as the vector lanes
  return exp4(v)[0];
}

double exp_shifted(const float* x, int n, float shift, float scale, float* out) {
  return exp_pass(x, n, shift, scale, out);
}

double sum_exp_shifted(const float* x, int n, float shift, float scale) {
  return exp_pass(x, n, shift, scale, nullptr);
}

float max_value(const float* x, int n) {
  const float neg_inf = kNegInf;
  f32x4 m = {neg_inf, neg_inf, neg_inf, neg_inf};
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const f32x4 v = load4(x + i);
    m = v > m ? v : m;   // NaN never wins
  }
  float best = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

void rng_seed(Rng& rng, uint64_t seed) {
  uint64_t x = seed;
  for (auto& word : rng.s) word = splitmix64(x);
}

uint64_t rng_next(Rng& rng) {
  uint64_t* s = rng.s;
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double rng_uniform(Rng& rng) { return static_cast<double>(rng_next(rng) >> 11) * 0x1.0p-53; }

void SamplerScratch::reserve(int vocab_size) {
  if (vocab == vocab_size) return;
  vocab = vocab_size;
  const size_t n = static_cast<size_t>(vocab_size);
  row.assign(n, 0.0f);
  probs.assign(n, 0.0f);
  select.assign(n, 0.0f);
  cands.assign(n, Candidate{0.0f, 0});
  bucket_mass.assign(kBuckets, 0.0);
  stamp.assign(n, 0);
  stamp_value = 0;
}

int argmax(const float* x, int n) {
  const float m = max_value(x, n);
  if (!(m > kNegInf)) return 0;   // every value -inf or NaN
  for (int i = 0; i < n; ++i)
    if (x[i] == m) return i;      // the first of equal maxima
  return 0;
}

void apply_repetition_penalty(float* x, int vocab, TokenSpan prompt, TokenSpan generated,
                              float penalty, SamplerScratch& scratch) {
  if (scratch.stamp_value == INT32_MAX) {
    std::fill(scratch.stamp.begin(), scratch.stamp.end(), 0);
    scratch.stamp_value = 0;
  }
  const int32_t mark = ++scratch.stamp_value;
  int32_t* stamp = scratch.stamp.data();
  for (const TokenSpan& span : {prompt, generated}) {
    for (int i = 0; i < span.size; ++i) {
      const int32_t t = span.data[i];
      if (t < 0 || t >= vocab || stamp[t] == mark) continue;   // HF ignores ids outside the vocab
      stamp[t] = mark;
      x[t] = x[t] < 0.0f ? x[t] * penalty : x[t] / penalty;
    }
  }
}

int top_k_candidates(const float* x, int n, int k, Candidate* out, SamplerScratch& scratch) {
  float threshold = kNegInf;
  if (k < n) {
    float* heap = scratch.select.data();
    if (k <= 4096) {
      // Min-heap of the k largest values seen so far; most values fail the first comparison.
      int h = 0, i = 0;
      for (; i < n && h < k; ++i) {
        if (std::isnan(x[i])) continue;
        heap[h++] = x[i];
        std::push_heap(heap, heap + h, std::greater<float>());
      }
      auto offer = [&](float v) {
        if (!(v > heap[0])) return;
        std::pop_heap(heap, heap + k, std::greater<float>());
        heap[k - 1] = v;
        std::push_heap(heap, heap + k, std::greater<float>());
      };
      if (h == k) {
        for (; i + 4 <= n; i += 4) {   // four lanes against the heap's minimum at once
          const f32x4 v = load4(x + i);
          if (!any4(v > heap[0])) continue;
          for (int l = 0; l < 4; ++l) offer(v[l]);
        }
        for (; i < n; ++i) offer(x[i]);
        threshold = heap[0];
      }
    } else {
      int m = 0;
      for (int i = 0; i < n; ++i)
        if (!std::isnan(x[i])) heap[m++] = x[i];
      if (m > k) {
        std::nth_element(heap, heap + (k - 1), heap + m, std::greater<float>());
        threshold = heap[k - 1];
      }
    }
  }
  int count = 0;
  for (int i = 0; i < n; ++i)
    if (x[i] >= threshold) out[count++] = Candidate{x[i], i};
  std::sort(out, out + count, before);
  return count;
}

int32_t select_token(const float* logits, int vocab, const SamplingParams& params,
                     TokenSpan prompt, TokenSpan generated, Rng& rng, SamplerScratch& scratch) {
  const float* x = logits;
  if (params.repetition_penalty != 1.0f) {
    std::copy(logits, logits + vocab, scratch.row.begin());
    apply_repetition_penalty(scratch.row.data(), vocab, prompt, generated,
                             params.repetition_penalty, scratch);
    x = scratch.row.data();
  }
  if (!params.do_sample) return argmax(x, vocab);
  if (params.top_k > 0 && params.top_k < vocab) return sample_top_k(x, vocab, params, rng, scratch);
  if (params.top_p < 1.0f) return sample_nucleus(x, vocab, params, rng, scratch);
  return sample_full(x, vocab, params, rng, scratch);
}

}  // namespace engine
