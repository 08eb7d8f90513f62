// AVX-512 VNNI kernel of the int4 matrices of linear_int8 (linear_int8.h, "int4 matrices").
//
// The int8 kernel's register tile (linear_int8_avx512.cpp: 6 rows x 32 channels, u broadcast from
// the interleaved row tiles) with the codes unpacked on the fly: one 64-byte load per 4 k, the low
// nibbles are channels 0-15 and the high ones 16-31, both vpdpbusd operands as they are (codes
// 0..15 as the signed operand, u as the unsigned one). After each group the exact sums are
// corrected (gcorr, qsum8) and added into float accumulators with one fma: 6 x 2 int32 and
// 6 x 2 float accumulators, 24 of the 32 registers. A decode row reads half the bytes of int8.
// Without VNNI (Skylake-SP class) the same tile multiplies with vpmaddubsw + vpmaddwd + vpaddd
// (u x code <= 255 x 15: pair sums never saturate), as linear_int8_avx512.cpp's BW kernel does.
// Built with the AVX-512 flags plus -mavx512vnni (CMakeLists.txt); the VNNI kernel is chosen at
// run time only where the CPU has AVX-512 VNNI, the BW one on other AVX-512 CPUs (linear_int8.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "linear_int8.h"
#include "vnni_inplace.h"

namespace engine {
namespace {

constexpr int kTileRows = 6;   // the int8 kernel's, so both read the same Job::tiles

template <int MR, bool Vnni>
inline void tile(const lin8::Job& job, int m0, int p, const uint8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K = w.K, G = w.groups(), steps = w.group / 4;
  const bool interleaved = MR == kTileRows && job.tiles != nullptr;
  const uint8_t* a0 = interleaved ? job.tiles + size_t(m0) * K : job.u + size_t(m0) * K;
  const size_t step = interleaved ? 4 * MR : 4, row = interleaved ? 4 : size_t(K);
  const __m512i low = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
  const float* gs = w.gscale + size_t(p) * G * kLinearPanel;
  const int32_t* gc = w.gcorr + size_t(p) * G * kLinearPanel;
  const int32_t* qs = job.qsum8 + size_t(m0) * G;
  __m512 f[MR][2];
  for (int i = 0; i < MR; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m512i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    for (int k = g * steps; k < (g + 1) * steps; ++k) {
      const uint8_t* b = panel + size_t(k) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);   // 16 steps ahead
      const __m512i bw = _mm512_loadu_si512(b);
      const __m512i b0 = _mm512_and_si512(bw, low), b1 = _mm512_and_si512(_mm512_srli_epi16(bw, 4), low);
      for (int i = 0; i < MR; ++i) {
        const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a0 + size_t(k) * step + size_t(i) * row));
        acc[i][0] = acc512_inplace<Vnni>(acc[i][0], a, b0, ones);
        acc[i][1] = acc512_inplace<Vnni>(acc[i][1], a, b1, ones);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512i corr = _mm512_loadu_si512(gc + size_t(g) * kLinearPanel + 16 * h);
      const __m512 scale = _mm512_loadu_ps(gs + size_t(g) * kLinearPanel + 16 * h);
      for (int i = 0; i < MR; ++i) {
        const __m512i t = _mm512_sub_epi32(_mm512_sub_epi32(acc[i][h], corr), _mm512_set1_epi32(qs[size_t(i) * G + g]));
        f[i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, f[i][h]);
      }
    }
  }
  const int n0 = p * kLinearPanel;
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + 16 * h;
    if (n >= w.O) break;
    const __mmask16 mask = w.O - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (w.O - n)) - 1u);
    for (int i = 0; i < MR; ++i)
      _mm512_mask_storeu_ps(job.y + (m0 + i) * job.ldy + n, mask, _mm512_mul_ps(f[i][h], _mm512_set1_ps(job.r[m0 + i])));
  }
}

template <bool Vnni>
void run_int4(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->K) * (kLinearPanel / 2);
  for (int p = p0; p < p1; ++p) {
    const uint8_t* panel = job.w->codes4 + size_t(p) * panel_bytes;
    int m = 0;
    for (; m + kTileRows <= job.M; m += kTileRows) tile<kTileRows, Vnni>(job, m, p, panel);
    switch (job.M - m) {
      case 5: tile<5, Vnni>(job, m, p, panel); break;
      case 4: tile<4, Vnni>(job, m, p, panel); break;
      case 3: tile<3, Vnni>(job, m, p, panel); break;
      case 2: tile<2, Vnni>(job, m, p, panel); break;
      case 1: tile<1, Vnni>(job, m, p, panel); break;
      default: break;
    }
  }
}

}  // namespace

lin8::Kernel lin8::avx512_vnni_int4_kernel() {
  return {&run_int4<true>, avx512_vnni_kernel().quantize, "avx512_vnni_int4", false, kTileRows};
}
lin8::Kernel lin8::avx512bw_int4_kernel() {
  return {&run_int4<false>, avx512bw_kernel().quantize, "avx512bw_int4", false, kTileRows};
}

}  // namespace engine
