// int4 matrices of the native linear layer (linear_int8.h, "int4 matrices"): packing and the
// scalar twin that the SIMD kernels (linear_int4_avx512.cpp, linear_int4_avx2.cpp) equal bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "linear_int8.h"

namespace engine {

void pack_linear_int4(const uint8_t* nbits, const float* scales, int K, int O, int group, uint8_t* codes4,
                      float* gscale, int32_t* gcorr) {
  if (group < 4 || group % 4 != 0 || K < group || K % group != 0 || O < 1)
    throw std::invalid_argument("pack_linear_int4: needs O >= 1, a group that is a multiple of 4 and K a multiple "
                                "of it; got K=" + std::to_string(K) + " group=" + std::to_string(group));
  const int O32 = (O + 31) / 32 * 32, G = K / group;
  std::memset(codes4, 0, size_t(O32) * K / 2);
  std::fill(gscale, gscale + size_t(O32) * G, 0.f);
  std::fill(gcorr, gcorr + size_t(O32) * G, 0);
  for (int n = 0; n < O; ++n) {
    const int p = n / kLinearPanel, c = n % kLinearPanel;
    const int shift = 4 * (c / 16), lane = c % 16;
    const uint8_t* row = nbits + size_t(n) * (K / 2);
    uint8_t* panel = codes4 + size_t(p) * K * (kLinearPanel / 2);   // [K / 4][64]
    for (int k = 0; k < K; ++k) {
      const int code = (row[k / 2] >> (4 * (k % 2))) & 0x0F;
      panel[size_t(k / 4) * 64 + lane * 4 + k % 4] |= uint8_t(code << shift);
      gcorr[(size_t(p) * G + k / group) * kLinearPanel + c] += 128 * code;
    }
    for (int g = 0; g < G; ++g) gscale[(size_t(p) * G + g) * kLinearPanel + c] = scales[size_t(n) * G + g];
  }
}

namespace lin8 {
void run_scalar_int4(const Job& job, int p0, int p1) {
  const PackedLinear& w = *job.w;
  const int K = w.K, G = w.groups();
  for (int p = p0; p < p1; ++p) {
    const uint8_t* panel = w.codes4 + size_t(p) * K * (kLinearPanel / 2);
    for (int c = 0; c < kLinearPanel; ++c) {
      const int n = kLinearPanel * p + c;
      if (n >= w.O) break;
      const int shift = 4 * (c / 16), lane = c % 16;
      for (int m = 0; m < job.M; ++m) {
        const uint8_t* u = job.u + size_t(m) * K;
        float f = 0.f;
        for (int g = 0; g < G; ++g) {
          int32_t acc = 0;
          for (int k = g * w.group; k < (g + 1) * w.group; ++k)
            acc += int32_t(u[k]) * ((panel[size_t(k / 4) * 64 + lane * 4 + k % 4] >> shift) & 0x0F);
          const size_t gi = (size_t(p) * G + g) * kLinearPanel + c;
          const int32_t t = acc - w.gcorr[gi] - job.qsum8[size_t(m) * G + g];
          f = std::fma(float(t), w.gscale[gi], f);
        }
        job.y[m * job.ldy + n] = f * job.r[m];
      }
    }
  }
}
}  // namespace lin8

}  // namespace engine
