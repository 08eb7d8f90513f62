// NEON (ASIMD, baseline on aarch64) attention kernels: 4 floats per vector; fp16 via vcvt_f32_f16;
// head_dim tails (head_dim % 4 != 0) use a zero-filled copy. Built only on aarch64.
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention_kernels.h"

namespace engine {
namespace attn_neon {

struct V {
  static constexpr int kTileVecs = 4;   // prefill register tiles: 6 rows x kTileVecs vectors
  static constexpr int W = 4;
  using vec = float32x4_t;
  static vec zero() { return vdupq_n_f32(0.f); }
  static vec set1(float x) { return vdupq_n_f32(x); }
  static vec load(const float* p) { return vld1q_f32(p); }
  static vec load(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static vec load(const int8_t* p) {
    int32_t w;
    std::memcpy(&w, p, 4);
    const int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
  }
  template <class E>
  static vec load_tail(const E* p, int n) {
    E tmp[4] = {E(0), E(0), E(0), E(0)};
    std::memcpy(tmp, p, sizeof(E) * n);
    return load(static_cast<const E*>(tmp));
  }
  static void store(float* p, vec v) { vst1q_f32(p, v); }
  static void store_tail(float* p, vec v, int n) {
    float tmp[4];
    vst1q_f32(tmp, v);
    std::memcpy(p, tmp, sizeof(float) * n);
  }
  static vec fma(vec a, vec b, vec c) { return vfmaq_f32(c, a, b); }
  static vec add(vec a, vec b) { return vaddq_f32(a, b); }
  static vec sub(vec a, vec b) { return vsubq_f32(a, b); }
  static vec mul(vec a, vec b) { return vmulq_f32(a, b); }
  static vec div(vec a, vec b) { return vdivq_f32(a, b); }
  static vec min(vec a, vec b) { return vminq_f32(a, b); }
  static vec max(vec a, vec b) { return vmaxq_f32(a, b); }
  static vec round(vec x) { return vrndnq_f32(x); }
  static vec pow2(vec n) {
    const int32x4_t e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
  }
  static float reduce(vec v) { return vaddvq_f32(v); }
};

#include "attention_simd.inl"

}  // namespace attn_neon

attn::Kernels attn::neon_kernels() {
  return {&attn_neon::run_task, &attn_neon::pack_block, &attn_neon::run_tile, attn_neon::kChunk};
}

}  // namespace engine
