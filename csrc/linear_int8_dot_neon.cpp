// NEON kernel of linear_int8 (linear_int8.h) for aarch64 CPUs with the dot-product extension
// (ARMv8.2 sdot: Cortex-A55/A76 and later, e.g. Raspberry Pi 5; not the Pi 4's A72, which keeps the
// scalar twin). sdot adds the four products of 4 signed bytes into each int32 lane, so one
// instruction does 4 k of 4 output channels; a 128-byte k4 row of a panel is 8 such vectors. The
// activation operand is q = u - 128 (signed, |q| <= 127), so the sum needs no column-sum term.
// Register tiles: up to 2 rows x 32 channels (16 accumulators, 8 code vectors).
// Quantization is the scalar twin's (quantize_rows_u8).
// Built only for aarch64, with -march=armv8.2-a+dotprod for this file alone (CMakeLists.txt);
// chosen at run time only where the CPU reports asimddp (cpu_features.cpp).
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "linear_int8.h"

namespace engine {
namespace {

template <int MR>
inline void tile(const lin8::Job& job, int m0, int p, const int8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K4 = w.k4();
  const uint8_t* u = job.u + size_t(m0) * K4;
  int32x4_t acc[MR][8];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 8; ++j) acc[i][j] = vdupq_n_s32(0);
  for (int k = 0; k < K4 / 4; ++k) {
    const int8_t* b = panel + size_t(k) * 128;
    __builtin_prefetch(b + 1024);
    int8x16_t bv[8];
    for (int j = 0; j < 8; ++j) bv[j] = vld1q_s8(b + 16 * j);
    for (int i = 0; i < MR; ++i) {
      uint32_t word;
      std::memcpy(&word, u + size_t(i) * K4 + 4 * k, 4);
      const int8x16_t a = vreinterpretq_s8_u32(vdupq_n_u32(word ^ 0x80808080u));   // q = u - 128
      for (int j = 0; j < 8; ++j) acc[i][j] = vdotq_s32(acc[i][j], a, bv[j]);
    }
  }
  for (int j = 0; j < 8; ++j) {
    const int n = p * kLinearPanel + 4 * j;
    if (n >= w.O) break;
    const int width = w.O - n >= 4 ? 4 : w.O - n;
    for (int i = 0; i < MR; ++i) {
      int32_t s[4];
      vst1q_s32(s, acc[i][j]);
      float* y = job.y + (m0 + i) * job.ldy + n;
      for (int c = 0; c < width; ++c) y[c] = (float(s[c]) * w.colscale[n + c]) * job.r[m0 + i];
    }
  }
}

void run_neon_dot(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->k4()) * kLinearPanel;
  for (int p = p0; p < p1; ++p) {
    const int8_t* panel = job.w->codes + size_t(p) * panel_bytes;
    int m = 0;
    for (; m + 2 <= job.M; m += 2) tile<2>(job, m, p, panel);
    if (m < job.M) tile<1>(job, m, p, panel);
  }
}

}  // namespace

lin8::Kernel lin8::neon_dot_kernel() { return {&run_neon_dot, &quantize_rows_u8, "neon_dot"}; }

}  // namespace engine
