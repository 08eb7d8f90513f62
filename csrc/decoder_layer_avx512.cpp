// AVX-512 pieces of the native decoder (decoder_layer.h), 16 floats per step:
// - gelu_tanh(g) * u and gelu_tanh(x): the same rational tanh as the scalar twin (equal to it up to the rounding
//   of fused multiply-adds);
// - one row's rms norm: the sum of squares in double like the scalar twin (the squares are exact
//   there, only the order of the additions differs), then the same x / rms * w1 per element.
// GCC 12 warns about its own intrinsics (_mm512_undefined_* in avx512fintrin.h): a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <iterator>

#include "gelu_tanh.h"

namespace engine {
namespace gelu_avx512 {

namespace {
// gelu_tanh of 16 floats (the scalar twin's formula and rational tanh)
inline __m512 gelu16(__m512 x) {
  using namespace gelu_tanh;
  const __m512 c = _mm512_set1_ps(kSqrt2OverPi), c3 = _mm512_set1_ps(kCubic);
  const __m512 lim = _mm512_set1_ps(kClamp), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
  __m512 y = _mm512_mul_ps(c, _mm512_add_ps(x, _mm512_mul_ps(c3, _mm512_mul_ps(_mm512_mul_ps(x, x), x))));
  y = _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), y));
  const __m512 p = _mm512_mul_ps(y, y);
  __m512 num = _mm512_set1_ps(kNum[0]), den = _mm512_set1_ps(kDen[0]);
  for (size_t i = 1; i < std::size(kNum); ++i) num = _mm512_fmadd_ps(num, p, _mm512_set1_ps(kNum[i]));
  for (size_t i = 1; i < std::size(kDen); ++i) den = _mm512_fmadd_ps(den, p, _mm512_set1_ps(kDen[i]));
  const __m512 t = _mm512_div_ps(_mm512_mul_ps(y, num), den);
  return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, t));
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u); }
}  // namespace

void gelu_mul(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    const __m512 r = gelu16(_mm512_maskz_loadu_ps(mk, g + i));
    _mm512_mask_storeu_ps(g + i, mk, _mm512_mul_ps(r, _mm512_maskz_loadu_ps(mk, u + i)));
  }
}

void gelu(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, mk, gelu16(_mm512_maskz_loadu_ps(mk, x + i)));
  }
}

}  // namespace gelu_avx512

namespace norm_avx512 {

void rms_norm_row(const float* x, int D, const float* w1, float eps, float* y) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int d = 0; d < D; d += 16) {
    const __mmask16 mk = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(mk, x + d);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    s0 = _mm512_fmadd_pd(lo, lo, s0);
    s1 = _mm512_fmadd_pd(hi, hi, s1);
  }
  const double ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  const __m512 rms = _mm512_set1_ps(std::sqrt(float(ss / D) + eps));
  for (int d = 0; d < D; d += 16) {
    const __mmask16 mk = D - d >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - d)) - 1u);
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + d), rms);
    _mm512_mask_storeu_ps(y + d, mk, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, w1 + d)));
  }
}

}  // namespace norm_avx512
}  // namespace engine
