// AVX2 + FMA + F16C attention kernels: 8 floats per vector; head_dim tails (head_dim % 8 != 0)
// use masked f32 loads or a zero-filled copy for f16 / int8. Built only on x86, own -m flags.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention_kernels.h"

namespace engine {
namespace attn_avx2 {

struct V {
  static constexpr int kTileVecs = 2;   // prefill register tiles: 6 rows x kTileVecs vectors
  static constexpr int W = 8;
  using vec = __m256;
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float x) { return _mm256_set1_ps(x); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static vec load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static vec load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static vec load_tail(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static vec load_tail(const uint16_t* p, int n) {
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, sizeof(uint16_t) * n);
    return load(tmp);
  }
  static vec load_tail(const int8_t* p, int n) {
    int8_t tmp[16] = {0};
    std::memcpy(tmp, p, n);
    return load(tmp);
  }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static void store_tail(float* p, vec v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static vec min(vec a, vec b) { return _mm256_min_ps(a, b); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static vec pow2(vec n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static float reduce(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "attention_simd.inl"

}  // namespace attn_avx2

attn::Kernels attn::avx2_kernels() {
  return {&attn_avx2::run_task, &attn_avx2::pack_block, &attn_avx2::run_tile, attn_avx2::kChunk};
}

}  // namespace engine
