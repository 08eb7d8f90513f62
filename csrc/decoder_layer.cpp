// The native decoder boundary (decoder_layer.h): norms, residuals and the MLP's gelu around the
// per-row int8 linear layers, on the current thread pool.
#include "decoder_layer.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <iterator>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "gelu_tanh.h"
#include "thread_pool.h"

namespace engine {

namespace gelu_avx512 {
void gelu_mul(float* g, const float* u, int64_t n);   // decoder_layer_avx512.cpp
void gelu(float* x, int64_t n);
}
namespace norm_avx512 {
void rms_norm_row(const float* x, int D, const float* w1, float eps, float* y);   // decoder_layer_avx512.cpp
}
namespace gelu_avx2 {
void gelu_mul(float* g, const float* u, int64_t n);   // decoder_layer_avx2.cpp
void gelu(float* x, int64_t n);
}
namespace norm_avx2 {
void rms_norm_row(const float* x, int D, const float* w1, float eps, float* y);   // decoder_layer_avx2.cpp
}

float gelu_tanh_scalar(float x) {
  using namespace gelu_tanh;   // tanh(y) = y P(y^2) / Q(y^2), |y| <= 9 (gelu_tanh.h)
  float y = kSqrt2OverPi * (x + kCubic * x * x * x);
  y = std::min(kClamp, std::max(-kClamp, y));
  const float p = y * y;
  float num = kNum[0], den = kDen[0];
  for (size_t i = 1; i < std::size(kNum); ++i) num = num * p + kNum[i];
  for (size_t i = 1; i < std::size(kDen); ++i) den = den * p + kDen[i];
  return 0.5f * x * (1.f + y * num / den);
}

namespace {

void gelu_mul_scalar(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = gelu_tanh_scalar(g[i]) * u[i];
}

void gelu_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_tanh_scalar(x[i]);
}

void add_rows(const float* a, const float* b, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

void linear(const float* x, int T, const PackedLinear& w, float* y) { linear_int8(x, T, w, y, w.O); }

// Linear layers sharing the input x: one quantization, one task list (linear_int8_many).
template <size_t N>
void many(const float* x, int T, const std::array<const PackedLinear*, N>& ws, const std::array<float*, N>& ys) {
  std::array<int64_t, N> ld;
  for (size_t i = 0; i < N; ++i) ld[i] = ws[i]->O;
  linear_int8_many(x, T, int(N), ws.data(), ys.data(), ld.data());
}

}  // namespace

void rms_norm_rows(const float* x, int T, int D, const float* w1, float eps, float* y) {
#if defined(ENGINE_HAVE_AVX512)
  if (uses_avx512(active_simd())) {
    parallel_chunks(T, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm_avx512::rms_norm_row(x + r * D, D, w1, eps, y + r * D);
    });
    return;
  }
#endif
#if defined(ENGINE_HAVE_AVX2)
  if (active_simd() == SimdLevel::Avx2) {
    parallel_chunks(T, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm_avx2::rms_norm_row(x + r * D, D, w1, eps, y + r * D);
    });
    return;
  }
#endif
  parallel_chunks(T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      float* yr = y + r * D;
      double ss = 0.0;
      for (int d = 0; d < D; ++d) ss += double(xr[d]) * double(xr[d]);
      const float rms = std::sqrt(float(ss / D) + eps);
      for (int d = 0; d < D; ++d) yr[d] = xr[d] / rms * w1[d];
    }
  });
}

void gelu_mul(float* g, const float* u, int64_t n) {
  void (*fn)(float*, const float*, int64_t) = &gelu_mul_scalar;
#if defined(ENGINE_HAVE_AVX512)
  if (uses_avx512(active_simd())) fn = &gelu_avx512::gelu_mul;
#endif
#if defined(ENGINE_HAVE_AVX2)
  if (active_simd() == SimdLevel::Avx2) fn = &gelu_avx2::gelu_mul;
#endif
  parallel_chunks(n, int64_t(1) << 15, [&](int64_t a, int64_t b) { fn(g + a, u + a, b - a); });
}

void gelu_inplace(float* x, int64_t n) {
  void (*fn)(float*, int64_t) = &gelu_scalar;
#if defined(ENGINE_HAVE_AVX512)
  if (uses_avx512(active_simd())) fn = &gelu_avx512::gelu;
#endif
#if defined(ENGINE_HAVE_AVX2)
  if (active_simd() == SimdLevel::Avx2) fn = &gelu_avx2::gelu;
#endif
  parallel_chunks(n, int64_t(1) << 15, [&](int64_t a, int64_t b) { fn(x + a, b - a); });
}

void run_decoder_boundary(const DecoderBoundary& b, const float* hidden, const float* attn, int T,
                          const BoundaryOutputs& out, DecoderScratch& scratch) {
  if (T < 1) throw std::invalid_argument("decoder boundary: needs at least one row");
  const int64_t TD = int64_t(T) * b.D;
  auto at_least = [](std::vector<float>& v, int64_t n) {   // grows, never shrinks: one allocation per pass
    if (v.size() < size_t(n)) v.resize(size_t(n));
    return v.data();
  };
  float* h = at_least(scratch.h, TD);                // the current norm's output
  const float* x = hidden;                           // the residual stream after this boundary's end
  if (b.has_end) {
    float* o = at_least(scratch.o, TD);
    linear(attn, T, b.o, o);                                          // [T, D]
    if (b.gemma2) rms_norm_rows(o, T, b.D, b.post_attention, b.eps, o);
    parallel_chunks(TD, int64_t(1) << 16, [&](int64_t s, int64_t e) { add_rows(hidden + s, o + s, e - s, out.hidden_out + s); });
    rms_norm_rows(out.hidden_out, T, b.D, b.gemma2 ? b.pre_feedforward : b.post_attention, b.eps, h);
    if (scratch.mlp_rows < 1) throw std::invalid_argument("decoder boundary: mlp_rows must be >= 1");
    const int blocks = (T + scratch.mlp_rows - 1) / scratch.mlp_rows;
    const int rows = (T + blocks - 1) / blocks;                       // balanced row blocks
    float* g = at_least(scratch.g, int64_t(rows) * b.F);
    float* u = at_least(scratch.u, int64_t(rows) * b.F);
    for (int r0 = 0; r0 < T; r0 += rows) {
      const int n = std::min(rows, T - r0);
      const int64_t off = int64_t(r0) * b.D;
      many<2>(h + off, n, {&b.gate, &b.up}, {g, u});                  // [n, F] each
      gelu_mul(g, u, int64_t(n) * b.F);
      linear(g, n, b.down, o + off);                                  // [n, D]
    }
    if (b.gemma2) rms_norm_rows(o, T, b.D, b.post_feedforward, b.eps, o);
    parallel_chunks(TD, int64_t(1) << 16, [&](int64_t s, int64_t e) { add_rows(out.hidden_out + s, o + s, e - s, out.hidden_out + s); });
    x = out.hidden_out;
  }
  if (b.has_start) {
    rms_norm_rows(x, T, b.D, b.input, b.eps, h);
    many<3>(h, T, {&b.q, &b.k, &b.v}, {out.q, out.k, out.v});         // [T, H * hd], [T, KV * hd] x 2
  }
}

}  // namespace engine
