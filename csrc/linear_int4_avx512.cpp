// AVX-512 kernels of the int4 matrices of linear_int8 (linear_int8.h, "int4 matrices").
//
// The int8 kernel's register tile (linear_int8_avx512.cpp: 6 rows x 32 channels, u broadcast from
// the interleaved row tiles) with the codes unpacked on the fly: one 64-byte load per 4 k, the low
// nibbles are channels 0-15 and the high ones 16-31, both operands as they are (codes 0..15 as the
// signed operand, u as the unsigned one). After each group the exact sums are corrected (gcorr,
// qsum8) and added into float sums with one fma (FloatSums). A decode row reads half the bytes of
// int8.
// With VNNI each k4 step is one vpdpbusd per vector: 6 x 2 int32 and 6 x 2 float sums, 24 of the
// 32 registers. Without it (Skylake-SP class) vpmaddubsw:
// u x code <= 255 x 15, so a pair sum is <= 7650 and four k4 steps add up in int16 (<= 30600 <
// 32767) before one vpmaddwd + vpaddd: 9 multiply-port ops per 4 steps and vector instead of 12
// (the int8 kernel's 7-bit codes leave no such room); the float sums move to L1 (one load / fma /
// store per vector and group) so that 12 int32 sums, 8 code vectors and 4 broadcast rows fit the
// 32 registers.
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

// J k4 steps from k on into the tile's int32 sums: vpdpbusd (VNNI, J = 1), or the int16 sums of
// J <= 4 vpmaddubsw steps, then one vpmaddwd + vpaddd per vector.
template <int MR, int J, bool Vnni>
inline void steps(__m512i (&acc)[MR][2], const uint8_t* panel, const uint8_t* a0, int k, size_t step,
                  size_t row, __m512i low, __m512i ones) {
  static_assert(Vnni ? J == 1 : J >= 1 && J <= 4, "int16 sums hold at most 4 steps");
  const uint8_t* b = panel + size_t(k) * 64;
  __m512i b0[J], b1[J];
  for (int j = 0; j < J; ++j) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 1024 + 64 * j), _MM_HINT_T0);   // 16 steps ahead
    const __m512i bw = _mm512_loadu_si512(b + 64 * j);
    b0[j] = _mm512_and_si512(bw, low);
    b1[j] = _mm512_and_si512(_mm512_srli_epi16(bw, 4), low);
  }
  for (int i = 0; i < MR; ++i) {
    const uint8_t* ai = a0 + size_t(k) * step + size_t(i) * row;
    __m512i a[J];
    for (int j = 0; j < J; ++j) a[j] = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ai + j * step));
    if constexpr (Vnni) {
      acc[i][0] = dpbusd_inplace(acc[i][0], a[0], b0[0]);
      acc[i][1] = dpbusd_inplace(acc[i][1], a[0], b1[0]);
    } else {
      __m512i t0 = _mm512_maddubs_epi16(a[0], b0[0]), t1 = _mm512_maddubs_epi16(a[0], b1[0]);
      for (int j = 1; j < J; ++j) {
        t0 = _mm512_add_epi16(t0, _mm512_maddubs_epi16(a[j], b0[j]));
        t1 = _mm512_add_epi16(t1, _mm512_maddubs_epi16(a[j], b1[j]));
      }
      acc[i][0] = madd16_acc_inplace(acc[i][0], t0, ones);
      acc[i][1] = madd16_acc_inplace(acc[i][1], t1, ones);
    }
  }
}

// The tile's float sums, f[i][h] += v once per group: in registers (InRegs: the VNNI tile), or in
// L1 where the loop needs every register (the BW tile).
template <int MR, bool InRegs>
struct FloatSums {
  __m512 v[MR][2];
  FloatSums() { for (int i = 0; i < MR; ++i) v[i][0] = v[i][1] = _mm512_setzero_ps(); }
  void fma(int i, int h, __m512 x, __m512 s) { v[i][h] = _mm512_fmadd_ps(x, s, v[i][h]); }
  __m512 get(int i, int h) const { return v[i][h]; }
};
template <int MR>
struct FloatSums<MR, false> {
  alignas(64) float v[MR][kLinearPanel] = {};
  void fma(int i, int h, __m512 x, __m512 s) {
    _mm512_store_ps(v[i] + 16 * h, _mm512_fmadd_ps(x, s, _mm512_load_ps(v[i] + 16 * h)));
  }
  __m512 get(int i, int h) const { return _mm512_load_ps(v[i] + 16 * h); }
};

template <int MR, bool Vnni>
inline void tile(const lin8::Job& job, int m0, int p, const uint8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K = w.K, G = w.groups(), steps_per_group = w.group / 4;
  const bool interleaved = MR == kTileRows && job.tiles != nullptr;
  const uint8_t* a0 = interleaved ? job.tiles + size_t(m0) * K : job.u + size_t(m0) * K;
  const size_t step = interleaved ? 4 * MR : 4, row = interleaved ? 4 : size_t(K);
  const __m512i low = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
  const float* gs = w.gscale + size_t(p) * G * kLinearPanel;
  const int32_t* gc = w.gcorr + size_t(p) * G * kLinearPanel;
  const int32_t* qs = job.qsum8 + size_t(m0) * G;
  constexpr int J = Vnni ? 1 : 4;
  FloatSums<MR, Vnni> f;
  for (int g = 0; g < G; ++g) {
    __m512i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const int end = (g + 1) * steps_per_group;
    int k = g * steps_per_group;
    for (; k + J <= end; k += J) steps<MR, J, Vnni>(acc, panel, a0, k, step, row, low, ones);
    for (; k < end; ++k) steps<MR, 1, Vnni>(acc, panel, a0, k, step, row, low, ones);   // BW, group % 16 != 0
    for (int h = 0; h < 2; ++h) {
      const __m512i corr = _mm512_loadu_si512(gc + size_t(g) * kLinearPanel + 16 * h);
      const __m512 scale = _mm512_loadu_ps(gs + size_t(g) * kLinearPanel + 16 * h);
      for (int i = 0; i < MR; ++i) {
        const __m512i t = _mm512_sub_epi32(_mm512_sub_epi32(acc[i][h], corr), _mm512_set1_epi32(qs[size_t(i) * G + g]));
        f.fma(i, h, _mm512_cvtepi32_ps(t), scale);
      }
    }
  }
  const int n0 = p * kLinearPanel;
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + 16 * h;
    if (n >= w.O) break;
    const __mmask16 mask = w.O - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (w.O - n)) - 1u);
    for (int i = 0; i < MR; ++i)
      _mm512_mask_storeu_ps(job.y + (m0 + i) * job.ldy + n, mask,
                            _mm512_mul_ps(f.get(i, h), _mm512_set1_ps(job.r[m0 + i])));
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
