// NEON kernel of the int4 matrices of linear_int8 (linear_int8.h, "int4 matrices"), for aarch64
// CPUs with the dot-product extension (ARMv8.2: Cortex-A55/A76 and later, e.g. Raspberry Pi 5).
//
// udot adds the four products of 4 unsigned bytes into each uint32 lane: u (0..255) times the
// codes (0..15), the same exact acc_g as vpdpbusd on x86 (at most 128 x 255 x 15 per group lane, well
// inside int32). A 64-byte k4 row of a panel is four 16-byte vectors; vector v's low nibbles are
// channels 4v..4v+3 and its high nibbles 16+4v..16+4v+3, so one load, a mask and a shift give two
// of the eight 4-channel operands (the int8 NEON kernel's layout). After each group the exact sums
// are corrected (gcorr, qsum8) and added into the float sums with one fused multiply-add (vfmaq:
// the scalar twin's std::fma), which stay in L1 between groups: the register tile of up to 2 rows
// x 32 channels holds 16 accumulators and 8 code vectors.
// Built only for aarch64, with -march=armv8.2-a+dotprod for this file alone (CMakeLists.txt);
// chosen at run time only where the CPU reports asimddp (linear_int8.cpp).
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "linear_int8.h"

namespace engine {
namespace {

template <int MR>
inline void tile(const lin8::Job& job, int m0, int p, const uint8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K = w.K, G = w.groups(), steps = w.group / 4;
  const uint8_t* u = job.u + size_t(m0) * K;
  const float* gs = w.gscale + size_t(p) * G * kLinearPanel;
  const int32_t* gc = w.gcorr + size_t(p) * G * kLinearPanel;
  const int32_t* qs = job.qsum8 + size_t(m0) * G;
  const uint8x16_t low = vdupq_n_u8(0x0F);
  float f[MR][kLinearPanel] = {};
  for (int g = 0; g < G; ++g) {
    uint32x4_t acc[MR][8];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 8; ++j) acc[i][j] = vdupq_n_u32(0);
    for (int k = g * steps; k < (g + 1) * steps; ++k) {
      const uint8_t* b = panel + size_t(k) * 64;
      __builtin_prefetch(b + 1024);
      uint8x16_t bv[8];
      for (int v = 0; v < 4; ++v) {
        const uint8x16_t raw = vld1q_u8(b + 16 * v);
        bv[v] = vandq_u8(raw, low);        // channels 4v .. 4v + 3
        bv[4 + v] = vshrq_n_u8(raw, 4);    // channels 16 + 4v .. 16 + 4v + 3
      }
      for (int i = 0; i < MR; ++i) {
        uint32_t word;
        std::memcpy(&word, u + size_t(i) * K + 4 * size_t(k), 4);
        const uint8x16_t a = vreinterpretq_u8_u32(vdupq_n_u32(word));
        for (int j = 0; j < 8; ++j) acc[i][j] = vdotq_u32(acc[i][j], a, bv[j]);
      }
    }
    for (int j = 0; j < 8; ++j) {
      const size_t at = size_t(g) * kLinearPanel + 4 * j;
      const int32x4_t corr = vld1q_s32(gc + at);
      const float32x4_t scale = vld1q_f32(gs + at);
      for (int i = 0; i < MR; ++i) {
        const int32x4_t t = vsubq_s32(vsubq_s32(vreinterpretq_s32_u32(acc[i][j]), corr), vdupq_n_s32(qs[size_t(i) * G + g]));
        vst1q_f32(f[i] + 4 * j, vfmaq_f32(vld1q_f32(f[i] + 4 * j), vcvtq_f32_s32(t), scale));
      }
    }
  }
  const int n0 = p * kLinearPanel, width = w.O - n0 >= kLinearPanel ? kLinearPanel : w.O - n0;
  for (int i = 0; i < MR; ++i) {
    float* y = job.y + (m0 + i) * job.ldy + n0;
    for (int c = 0; c < width; ++c) y[c] = f[i][c] * job.r[m0 + i];
  }
}

void run_neon_dot_int4(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->K) * (kLinearPanel / 2);
  for (int p = p0; p < p1; ++p) {
    const uint8_t* panel = job.w->codes4 + size_t(p) * panel_bytes;
    int m = 0;
    for (; m + 2 <= job.M; m += 2) tile<2>(job, m, p, panel);
    if (m < job.M) tile<1>(job, m, p, panel);
  }
}

}  // namespace

lin8::Kernel lin8::neon_dot_int4_kernel() { return {&run_neon_dot_int4, &quantize_rows_u8, "neon_dot_int4"}; }

}  // namespace engine
