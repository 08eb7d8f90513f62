// Attention: every SIMD level this CPU has vs the scalar reference (tolerance 1e-5 abs), the
// scalar reference vs a double-precision brute-force oracle (2e-5), and threads 1 vs 2 (bitwise).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "attention_rope.h"
#include "cpu_features.h"
#include "harness.h"
#include "thread_pool.h"

using engine::KVCache;
using engine::KVDtype;
using engine::SimdLevel;

namespace {

struct Rng {   // xorshift + Box-Muller-free approximate normal (sum of uniforms)
  uint64_t s;
  float uniform() {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
    return float((s >> 11) * (1.0 / 9007199254740992.0));
  }
  float normal() { return (uniform() + uniform() + uniform() + uniform() - 2.f) * 1.7320508f; }
};

struct Scenario {
  int D, KV, G;
  std::vector<int> prompts, prefixes;   // per slot
  int decode_steps;
  KVDtype dtype;
  float softcap;
  int window;
  float theta;
  float qscale;
};

// Runs the scenario (2 layers) and returns every attention output, concatenated.
std::vector<float> run(const Scenario& sc, SimdLevel level, int threads) {
  engine::set_simd_level(level);
  engine::set_num_threads(threads);
  const int H = sc.KV * sc.G, S = int(sc.prompts.size()), L = 2;
  const int cap = *std::max_element(sc.prompts.begin(), sc.prompts.end()) + sc.decode_steps;
  KVCache cache(L, sc.KV, sc.D, S, cap, sc.dtype, 8);
  engine::AttentionParams p;
  p.scale = 1.f / std::sqrt(float(sc.D));
  p.softcap = sc.softcap;
  p.window = sc.window;
  p.rope_theta = sc.theta;
  Rng rng{12345};
  std::vector<float> all, q, k, v, out;
  std::vector<int32_t> pos;
  auto call = [&](const std::vector<int>& slots, int T, int layer) {
    const size_t M = slots.size() * T;
    q.resize(M * H * sc.D); k.resize(M * sc.KV * sc.D); v.resize(k.size()); out.resize(M * H * sc.D);
    for (auto& x : q) x = rng.normal() * sc.qscale;
    for (auto& x : k) x = rng.normal();
    for (auto& x : v) x = rng.normal();
    engine::attention(cache, layer, q.data(), k.data(), v.data(), H, slots, T, pos.data(), p, out.data());
    all.insert(all.end(), out.begin(), out.end());
  };
  for (int s = 0; s < S; ++s) {
    cache.set_prefix_length(s, sc.prefixes[s]);
    pos.resize(sc.prompts[s]);
    for (int t = 0; t < sc.prompts[s]; ++t) pos[t] = t;
    for (int l = 0; l < L; ++l) call({s}, sc.prompts[s], l);
  }
  std::vector<int> slots(S);
  for (int s = 0; s < S; ++s) slots[s] = s;
  for (int step = 0; step < sc.decode_steps; ++step) {
    pos.resize(S);
    for (int s = 0; s < S; ++s) pos[s] = cache.length(s);
    for (int l = 0; l < L; ++l) call(slots, 1, l);
  }
  return all;
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  float m = 0.f;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

std::vector<SimdLevel> fast_levels() {
  std::vector<SimdLevel> out;
  const SimdLevel best = engine::cpu_features().best;
  if (best == SimdLevel::Neon) out.push_back(SimdLevel::Neon);
  if (best == SimdLevel::Avx2 || engine::uses_avx512(best)) out.push_back(SimdLevel::Avx2);
  if (engine::uses_avx512(best)) out.push_back(SimdLevel::Avx512);
  if (best == SimdLevel::Amx) out.push_back(SimdLevel::Amx);
  return out;
}

std::vector<Scenario> scenarios() {
  std::vector<Scenario> s;
  // PG1-3B-like, PG2 GQA with softcap + window, SigLIP-like (no RoPE, bidirectional), odd head_dims.
  s.push_back({256, 1, 8, {21, 6}, {9, 6}, 3, KVDtype::F32, 0.f, 0, 10000.f, 1.f});
  s.push_back({128, 4, 2, {33, 1}, {1, 1}, 3, KVDtype::F32, 5.f, 7, 10000.f, 3.f});
  s.push_back({72, 4, 1, {19}, {19}, 0, KVDtype::F32, 0.f, 0, 0.f, 1.f});
  s.push_back({72, 2, 4, {17, 9, 2}, {10, 3, 2}, 2, KVDtype::F16, 10.f, 5, 10000.f, 2.f});
  s.push_back({20, 1, 3, {13}, {4}, 3, KVDtype::I8, 0.f, 4, 10000.f, 2.f});
  s.push_back({6, 2, 2, {7, 11}, {7, 2}, 2, KVDtype::F32, 3.f, 0, 100.f, 1.f});
  s.push_back({36, 1, 16, {40}, {25}, 2, KVDtype::I8, 20.f, 9, 10000.f, 2.f});
  // Prefill tile kernel (>= 24 query rows per kv head): PaliGemma 2 shape, tails of rows, keys and
  // head dims, GQA 1 / 2 / 8, prefix 0 / partial / full, window < T, softcap on / off.
  s.push_back({256, 4, 2, {61, 26}, {61, 0}, 2, KVDtype::F32, 50.f, 9, 10000.f, 2.f});
  s.push_back({64, 8, 1, {30, 47}, {30, 5}, 1, KVDtype::F16, 0.f, 0, 10000.f, 2.f});
  s.push_back({20, 1, 8, {3, 50}, {2, 20}, 2, KVDtype::I8, 5.f, 0, 10000.f, 2.f});
  s.push_back({72, 2, 2, {45}, {0}, 1, KVDtype::F32, 0.f, 7, 10000.f, 3.f});
  return s;
}

}  // namespace

TEST(attention_simd_vs_scalar) {
  const auto levels = fast_levels();
  std::printf("  comparing %zu fast level(s) with scalar\n", levels.size());
  for (const auto& sc : scenarios()) {
    const auto ref = run(sc, SimdLevel::Scalar, 2);
    float ref_max = 0.f;
    for (float x : ref) ref_max = std::max(ref_max, std::fabs(x));
    for (SimdLevel lvl : levels) {
      const float err = max_abs_diff(run(sc, lvl, 2), ref);
      // amx: prefill tiles on f16 / int8 caches multiply in bf16 (attention_amx.cpp; the Python
      // tests measure 3-7e-3 relative), everything else is fp32 as in the reference
      const float tol = lvl == SimdLevel::Amx && sc.dtype != KVDtype::F32 ? 1.5e-2f * ref_max : 1e-5f;
      CHECK_MSG(err < tol, "%s D=%d KV=%d G=%d dtype=%s: max |diff| %.3g", engine::simd_name(lvl), sc.D, sc.KV,
                sc.G, engine::kv_dtype_name(sc.dtype), err);
    }
  }
  engine::set_simd_level(engine::cpu_features().best);
}

TEST(attention_threads_identical) {
  for (const auto& sc : scenarios()) {
    for (SimdLevel lvl : fast_levels()) {
      const auto a = run(sc, lvl, 1), b = run(sc, lvl, 2), c = run(sc, lvl, 3);
      CHECK_MSG(a == b && a == c, "%s D=%d: results depend on the thread count", engine::simd_name(lvl), sc.D);
    }
  }
  engine::set_simd_level(engine::cpu_features().best);
  engine::set_num_threads(2);
}

// The scalar reference against a brute-force double-precision oracle written from the spec.
TEST(attention_reference_vs_double_oracle) {
  const int D = 16, KV = 2, G = 2, H = KV * G, T = 11, P = 4, window = 5;
  const float softcap = 4.f, theta = 10000.f, scale = 0.4f;
  for (SimdLevel lvl : std::vector<SimdLevel>{SimdLevel::Scalar, engine::cpu_features().best}) {
    engine::set_simd_level(lvl);
    KVCache cache(1, KV, D, 1, T, KVDtype::F32, 4);
    cache.set_prefix_length(0, P);
    Rng rng{7};
    std::vector<float> q(T * H * D), k(T * KV * D), v(T * KV * D), out(T * H * D);
    for (auto& x : q) x = rng.normal() * 2.f;
    for (auto& x : k) x = rng.normal();
    for (auto& x : v) x = rng.normal();
    std::vector<int32_t> pos(T);
    for (int t = 0; t < T; ++t) pos[t] = 3 + t;
    engine::AttentionParams p;
    p.scale = scale; p.softcap = softcap; p.window = window; p.rope_theta = theta;
    engine::attention(cache, 0, q.data(), k.data(), v.data(), H, {0}, T, pos.data(), p, out.data());
    auto rot = [&](const float* x, int t, std::vector<double>& y) {
      y.assign(x, x + D);
      for (int i = 0; i < D / 2; ++i) {
        const float inv = 1.0f / float(std::pow(double(theta), double(float(2 * i) / float(D))));
        const double a = double(float(pos[t]) * inv);
        y[i] = x[i] * std::cos(a) - x[i + D / 2] * std::sin(a);
        y[i + D / 2] = x[i + D / 2] * std::cos(a) + x[i] * std::sin(a);
      }
    };
    double worst = 0;
    std::vector<double> qr, kr;
    for (int j = 0; j < T; ++j)
      for (int h = 0; h < H; ++h) {
        const int g = h / G;
        rot(&q[(j * H + h) * D], j, qr);
        std::vector<double> s(T, -INFINITY);
        double mx = -INFINITY;
        for (int i = 0; i < T; ++i) {
          const bool vis = (i <= j && j - i < window) || (i < P && j < P);
          if (!vis) continue;
          rot(&k[(i * KV + g) * D], i, kr);
          double d = 0;
          for (int e = 0; e < D; ++e) d += qr[e] * kr[e];
          s[i] = softcap * std::tanh(d * scale / softcap);
          mx = std::max(mx, s[i]);
        }
        double sum = 0;
        for (int i = 0; i < T; ++i) sum += (s[i] = std::exp(s[i] - mx));
        for (int e = 0; e < D; ++e) {
          double o = 0;
          for (int i = 0; i < T; ++i) o += s[i] / sum * v[(i * KV + g) * D + e];
          worst = std::max(worst, std::fabs(o - out[(j * H + h) * D + e]));
        }
      }
    CHECK_MSG(worst < 2e-5, "%s vs double oracle: max |diff| %.3g", engine::simd_name(lvl), worst);
  }
  engine::set_simd_level(engine::cpu_features().best);
}

// RoPE tables: tabulated rows, rows computed past the table and the naive rope_row are bit-identical;
// a cache keeps one table per theta, grown on demand up to its bound.
TEST(rope_table_rows_bit_identical) {
  for (int D : {2, 6, 64, 256}) {
    for (float theta : {10000.f, 500.f, 1e6f}) {
      engine::RopeTable t(D, theta);
      t.grow(100);
      CHECK(t.size() == 100);
      std::vector<float> naive(static_cast<size_t>(D)), tmp(static_cast<size_t>(D));
      for (int32_t pos : {0, 1, 7, 99, 100, 4097, 123456, -3}) {
        engine::rope_row(D, theta, pos, naive.data());
        const float* row = t.row(pos, tmp.data());
        CHECK((pos >= 0 && pos < 100) == (row != tmp.data()));
        CHECK_MSG(std::equal(naive.begin(), naive.end(), row), "D=%d theta=%g pos=%d", D, theta, int(pos));
      }
    }
  }
  engine::RopeTables tabs;
  const engine::RopeTable& a = tabs.prepare(64, 10000.f, 10, 50);
  CHECK(a.size() >= 10 && a.size() <= 50);
  CHECK(tabs.prepare(64, 10000.f, 1000, 50).size() == 50);   // bounded
  CHECK(tabs.find(64, 10000.f) != nullptr && tabs.find(64, 500.f) == nullptr);
  tabs.prepare(64, 500.f, 5, 50);
  CHECK(tabs.find(64, 500.f) != nullptr && tabs.find(64, 10000.f) != nullptr);
}
