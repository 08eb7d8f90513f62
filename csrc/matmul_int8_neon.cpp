// NEON kernel of matmul_int8 (matmul_int8.h): 16 codes per step, int8 x int8 -> int16 products
// (vmull / vmlal_high: two products of |x| <= 127 sum to at most 32258), pairwise-accumulated
// into int32 (vpadal). Baseline ARMv8.0 (Raspberry Pi 4's Cortex-A72 has no sdot).
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>

#include "matmul_int8.h"

namespace engine {
namespace {

struct Dots {
  template <int NB>
  static void run(const mm8::Job& job, const int8_t* w, int m0, int32_t* res);
};

template <int NB>
void Dots::run(const mm8::Job& job, const int8_t* w, int m0, int32_t* res) {
  const int K = job.K, K16 = K / 16 * 16;
  int32x4_t acc[NB];
  for (int j = 0; j < NB; ++j) acc[j] = vdupq_n_s32(0);
  for (int k = 0; k < K16; k += 16) {
    const int8x16_t wv = vld1q_s8(w + k);
    for (int j = 0; j < NB; ++j) {
      const int8x16_t qv = vld1q_s8(job.q + size_t(m0 + j) * K + k);
      int16x8_t p = vmull_s8(vget_low_s8(wv), vget_low_s8(qv));
      p = vmlal_high_s8(p, wv, qv);
      acc[j] = vpadalq_s16(acc[j], p);
    }
  }
  for (int j = 0; j < NB; ++j) {
    int32_t s = vaddvq_s32(acc[j]);
    const int8_t* q = job.q + size_t(m0 + j) * K;
    for (int k = K16; k < K; ++k) s += int32_t(q[k]) * int32_t(w[k]);
    res[j] = s;
  }
}

}  // namespace

mm8::Fn mm8::neon_kernel() { return &mm8::run_blocks<Dots>; }

}  // namespace engine
