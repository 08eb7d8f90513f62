// AVX2 kernel of matmul_int8 (matmul_int8.h): 32 codes per step. maddubs multiplies unsigned by
// signed bytes, so it takes |q| (job.qu) and the codes with q's sign (sign_epi8); |q|, |code| <= 127 keep
// its int16 pair sums below 32767 (127 * 127 * 2 = 32258). Up to 4 activation rows share each
// load of a table row. Built only on x86, with its own -m flags.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "matmul_int8.h"

namespace engine {
namespace {

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Dot products of table row w with activation rows m0 .. m0 + NB - 1.
struct Dots {
  template <int NB>
  static void run(const mm8::Job& job, const int8_t* w, int m0, int32_t* res);
};

template <int NB>
void Dots::run(const mm8::Job& job, const int8_t* w, int m0, int32_t* res) {
  const int K = job.K, K32 = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_si256();
  for (int k = 0; k < K32; k += 32) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    for (int j = 0; j < NB; ++j) {
      const size_t off = size_t(m0 + j) * K + k;
      const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(job.q + off));
      const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(job.qu + off));
      const __m256i p = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(wv, qs));
      acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, ones));
    }
  }
  for (int j = 0; j < NB; ++j) {
    int32_t s = hsum(acc[j]);
    const int8_t* q = job.q + size_t(m0 + j) * K;
    for (int k = K32; k < K; ++k) s += int32_t(q[k]) * int32_t(w[k]);
    res[j] = s;
  }
}

}  // namespace

mm8::Fn mm8::avx2_kernel() { return &mm8::run_blocks<Dots>; }

}  // namespace engine
