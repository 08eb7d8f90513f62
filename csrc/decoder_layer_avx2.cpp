// AVX2 pieces of the native decoder and vision tower (decoder_layer.h), 8 floats per step, for
// CPUs whose best level is AVX2 (there they had run on the scalar twins: about 5% of a prefill):
// - gelu_tanh(g) * u and gelu_tanh(x): decoder_layer_avx512.cpp's rational tanh on 256 bits (equal
//   to the scalar twin up to the rounding of fused multiply-adds);
// - one row's rms norm: the sum of squares in double like the scalar twin (the squares are exact
//   there, only the order of the additions differs), then the same x / rms * w1 per element.
// Built only on x86 with -mavx2 -mfma (CMakeLists.txt); chosen at run time (decoder_layer.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <iterator>

#include "gelu_tanh.h"

namespace engine {

float gelu_tanh_scalar(float x);   // decoder_layer.cpp: the tails

namespace gelu_avx2 {

namespace {
inline __m256 gelu8(__m256 x) {
  using namespace gelu_tanh;
  const __m256 c = _mm256_set1_ps(kSqrt2OverPi), c3 = _mm256_set1_ps(kCubic);
  const __m256 lim = _mm256_set1_ps(kClamp), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  __m256 y = _mm256_mul_ps(c, _mm256_add_ps(x, _mm256_mul_ps(c3, _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
  y = _mm256_min_ps(lim, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), y));
  const __m256 p = _mm256_mul_ps(y, y);
  __m256 num = _mm256_set1_ps(kNum[0]), den = _mm256_set1_ps(kDen[0]);
  for (size_t i = 1; i < std::size(kNum); ++i) num = _mm256_fmadd_ps(num, p, _mm256_set1_ps(kNum[i]));
  for (size_t i = 1; i < std::size(kDen); ++i) den = _mm256_fmadd_ps(den, p, _mm256_set1_ps(kDen[i]));
  const __m256 t = _mm256_div_ps(_mm256_mul_ps(y, num), den);
  return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
}
}  // namespace

void gelu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(g + i, _mm256_mul_ps(gelu8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
  for (; i < n; ++i) g[i] = gelu_tanh_scalar(g[i]) * u[i];
}

void gelu(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = gelu_tanh_scalar(x[i]);
}

}  // namespace gelu_avx2

namespace norm_avx2 {

void rms_norm_row(const float* x, int D, const float* w1, float eps, float* y) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_fmadd_pd(lo, lo, s0);
    s1 = _mm256_fmadd_pd(hi, hi, s1);
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(s0, s1));
  double ss = (part[0] + part[1]) + (part[2] + part[3]);
  for (int t = d; t < D; ++t) ss += double(x[t]) * double(x[t]);
  const float rms = std::sqrt(float(ss / D) + eps);
  const __m256 rv = _mm256_set1_ps(rms);
  for (d = 0; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), rv), _mm256_loadu_ps(w1 + d)));
  for (; d < D; ++d) y[d] = x[d] / rms * w1[d];
}

}  // namespace norm_avx2
}  // namespace engine
