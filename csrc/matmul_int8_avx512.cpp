// AVX-512 VNNI kernel of matmul_int8 (matmul_int8.h): 64 codes per step with vpdpbusd, which
// multiplies unsigned by signed bytes and adds the four products of each lane into int32 without
// saturation. The unsigned operand is q + 128 (job.qu), so
//   sum_k q[k] * w[k] = sum_k qu[k] * w[k] - 128 * sum_k w[k],
// and sum_k w[k] comes from one more vpdpbusd of the table row with bytes of 1 per step, shared
// by the up to 4 activation rows that share each load of a table row. All sums are exact
// (|qu * w| <= 255 * 127, K <= 2^16), so the result equals the scalar twin's bit for bit.
// Built only on x86 with the AVX-512 flags plus -mavx512vnni (CMakeLists.txt); chosen at run time
// only where the CPU has AVX-512 VNNI (matmul_int8.cpp).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "matmul_int8.h"

namespace engine {
namespace {

struct DotsVnni {
  template <int NB>
  static void run(const mm8::Job& job, const int8_t* w, int m0, int32_t* res);
};

template <int NB>
void DotsVnni::run(const mm8::Job& job, const int8_t* w, int m0, int32_t* res) {
  const int K = job.K, K64 = K / 64 * 64;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[NB];
  __m512i wsum = _mm512_setzero_si512();
  for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_si512();
  for (int k = 0; k < K64; k += 64) {
    const __m512i wv = _mm512_loadu_si512(w + k);
    wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
    for (int j = 0; j < NB; ++j) {
      const __m512i qv = _mm512_loadu_si512(job.qu + size_t(m0 + j) * K + k);
      acc[j] = _mm512_dpbusd_epi32(acc[j], qv, wv);
    }
  }
  const int32_t correction = 128 * _mm512_reduce_add_epi32(wsum);
  for (int j = 0; j < NB; ++j) {
    int32_t s = _mm512_reduce_add_epi32(acc[j]) - correction;
    const int8_t* q = job.q + size_t(m0 + j) * K;
    for (int k = K64; k < K; ++k) s += int32_t(q[k]) * int32_t(w[k]);
    res[j] = s;
  }
}

}  // namespace

mm8::Fn mm8::avx512_vnni_kernel() { return &mm8::run_blocks<DotsVnni>; }

}  // namespace engine
