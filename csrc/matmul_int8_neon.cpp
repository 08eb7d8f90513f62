// NEON kernel of matmul_int8 (matmul_int8.h): 16 codes per step, int8 x int8 -> int16 products
// (vmull / vmlal_high: two products of |x| <= 127 sum to at most 32258), pairwise-accumulated
// into int32 (vpadal). Baseline ARMv8.0 (Raspberry Pi 4's Cortex-A72 has no sdot).
#include <arm_neon.h>

#include <algorithm>
#include <cstdint>

#include "matmul_int8.h"

namespace engine {
namespace {

template <int NB>
inline void dots(const mm8::Job& job, const int8_t* w, int m0, int32_t* res) {
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

void run(const mm8::Job& job, int64_t v0, int64_t v1) {
  int32_t res[4];
  for (int64_t v = v0; v < v1; ++v) {
    const int8_t* w = job.codes + v * job.K;
    for (int m0 = 0; m0 < job.M; m0 += 4) {
      const int nb = std::min(4, job.M - m0);
      switch (nb) {
        case 4: dots<4>(job, w, m0, res); break;
        case 3: dots<3>(job, w, m0, res); break;
        case 2: dots<2>(job, w, m0, res); break;
        default: dots<1>(job, w, m0, res); break;
      }
      for (int j = 0; j < nb; ++j)
        job.out[(m0 + j) * job.ldo + v] = float(res[j]) * (job.scales[v] * job.qscale[m0 + j]);
    }
  }
}

}  // namespace

mm8::Fn mm8::neon_kernel() { return &run; }

}  // namespace engine
