// AVX2 kernel of the int4 matrices of linear_int8 (linear_int8.h, "int4 matrices"), for CPUs
// without VNNI.
//
// vpmaddubsw multiplies u (unsigned) by the codes 0..15 (signed operand) into int16 pair sums of
// at most 2 x 255 x 15 = 7650 (no saturation), vpmaddwd by ones adds the pairs into int32 lanes
// of 4 k. A 64-byte k4 row of a panel is two 32-byte vectors: their low nibbles are channels 0-7
// and 8-15, their high nibbles 16-23 and 24-31. After each group the exact sums are corrected
// (gcorr, qsum8) and added into float accumulators with one fma. Register tiles (16 ymm, int32
// accumulators only): one row x 32 channels for a one-row call (decode: the panel streams once),
// else 4 rows x 16 channels, the int8 kernel's tile. Tried and dropped: int16 sums of two k4
// steps before vpmaddwd (fewer multiply-port ops, but the tile then spills; no faster).
// Built only on x86 with -mavx2 -mfma (CMakeLists.txt); chosen at run time (linear_int8.cpp).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "linear_int8.h"
#include "vnni_inplace.h"

namespace engine {
namespace {

// y rows [m0, m0 + MR) x the channels of nibble halves [h0, h0 + NH) of panel p (half h: channels
// 16 h .. 16 h + 15; vector j of a half: channels 16 h + 8 j .. + 7). The int32 sums of a group
// stay in registers (accumulated in place, vnni_inplace.h); the float sums live in f, in L1, and
// take one load / fma / store per group: with them in registers too a 4-row tile would not fit in
// 16 ymm, and the 2-row tile it replaces issued ~7 uops per cycle for its 2 multiply ports' 4
// (front-end bound, ~0.8x the int8 kernel).
template <int MR, int NH>
inline void tile(const lin8::Job& job, int m0, int p, int h0, const uint8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K = w.K, G = w.groups(), steps = w.group / 4;
  const uint8_t* u = job.u + size_t(m0) * K;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  const float* gs = w.gscale + size_t(p) * G * kLinearPanel;
  const int32_t* gc = w.gcorr + size_t(p) * G * kLinearPanel;
  const int32_t* qs = job.qsum8 + size_t(m0) * G;
  alignas(32) float f[MR][NH][2][8] = {};
  for (int g = 0; g < G; ++g) {
    __m256i acc[MR][NH][2];
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < NH; ++h) acc[i][h][0] = acc[i][h][1] = _mm256_setzero_si256();
    for (int k = g * steps; k < (g + 1) * steps; ++k) {
      const uint8_t* b = panel + size_t(k) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);
      __m256i bv[NH][2];
      for (int j = 0; j < 2; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
        for (int h = 0; h < NH; ++h)
          bv[h][j] = _mm256_and_si256(h0 + h == 0 ? raw : _mm256_srli_epi16(raw, 4), low);
      }
      for (int i = 0; i < MR; ++i) {
        const __m256i a = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(u + size_t(i) * K + 4 * size_t(k)));
        for (int h = 0; h < NH; ++h)
          for (int j = 0; j < 2; ++j) acc[i][h][j] = maddubs_acc_inplace(acc[i][h][j], a, bv[h][j], ones);
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < 2; ++j) {
        const size_t at = size_t(g) * kLinearPanel + 16 * (h0 + h) + 8 * j;
        const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gc + at));
        const __m256 scale = _mm256_loadu_ps(gs + at);
        for (int i = 0; i < MR; ++i) {
          const __m256i t = _mm256_sub_epi32(_mm256_sub_epi32(acc[i][h][j], corr), _mm256_set1_epi32(qs[size_t(i) * G + g]));
          _mm256_store_ps(f[i][h][j], _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), scale, _mm256_load_ps(f[i][h][j])));
        }
      }
  }
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < 2; ++j) {
      const int n = p * kLinearPanel + 16 * (h0 + h) + 8 * j;
      if (n >= w.O) continue;
      const int width = w.O - n >= 8 ? 8 : w.O - n;
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width), lanes);
      for (int i = 0; i < MR; ++i)
        _mm256_maskstore_ps(job.y + (m0 + i) * job.ldy + n, mask,
                            _mm256_mul_ps(_mm256_load_ps(f[i][h][j]), _mm256_set1_ps(job.r[m0 + i])));
    }
}

void run_avx2_int4(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->K) * (kLinearPanel / 2);
  for (int p = p0; p < p1; ++p) {
    const uint8_t* panel = job.w->codes4 + size_t(p) * panel_bytes;
    if (job.M == 1) {
      tile<1, 2>(job, 0, p, 0, panel);
      continue;
    }
    for (int h = 0; h < 2; ++h) {
      int m = 0;
      for (; m + 4 <= job.M; m += 4) tile<4, 1>(job, m, p, h, panel);
      switch (job.M - m) {
        case 3: tile<3, 1>(job, m, p, h, panel); break;
        case 2: tile<2, 1>(job, m, p, h, panel); break;
        case 1: tile<1, 1>(job, m, p, h, panel); break;
        default: break;
      }
    }
  }
}

}  // namespace

lin8::Kernel lin8::avx2_int4_kernel() { return {&run_avx2_int4, &quantize_rows_avx2, "avx2_int4"}; }

}  // namespace engine
