// AVX-512 kernels of linear_int8 (linear_int8.h): VNNI, and BW for CPUs without VNNI.
//
// GEMM: vpdpbusd multiplies the unsigned activations u (q + 128) by the signed codes and adds the
// four products of each int32 lane, so one instruction does 4 k of 16 output channels; the
// packed layout puts exactly those 64 bytes together. A register tile is MR = 6 rows x 32
// channels (12 accumulators, 2 code loads and 6 broadcasts per 4 k). The exact sum is then
// acc - 128 * colsum[n]. Measured on 2 Zen 4 cores against onnxruntime's MLAS (same shapes, same
// minute): 260 x 2304 x 9216 860 GOP/s (MLAS 799), 260 x 9216 x 2304 880 (836); tiles of 8 rows
// 799-841, 10 rows 611-636, 12 rows 398-410 (register spills).
// The broadcasts of a whole 6-row tile read u interleaved per tile (Job::tiles, built once per
// call): one sequential stream instead of six rows K4 bytes apart. 2-core Intel Xeon, fresh
// processes alternating, 11 rounds: 1,030 x 2304 x 9216 median ~870 -> ~1,035 GOP/s, 266-row
// shapes within the noise (and both alike in this VM's slow phases, ~350-390 GOP/s).
//
// The accumulators go through dpbusd_inplace (vnni_inplace.h): with the intrinsic GCC 12 copied
// every accumulator around each step, and the front end, not the VNNI ports, bound the loop.
// Same machine, alternating processes: 266 x 2304 x 9216 756-802 -> 1,023-1,033 GOP/s, 266 x
// 9216 x 2304 641-802 -> 956-964 (MLAS's MatMulInteger on the same shape in the same minutes:
// 0.9-1.0x of it, against 0.7-0.8x before).
//
// Quantization: the graph's Div and QuantizeLinear (two IEEE divisions, round half to even), so
// u equals the scalar twin's bit for bit.
// Without VNNI (avx512bw_kernel, Skylake-SP class) the same tiles multiply with vpmaddubsw +
// vpmaddwd + vpaddd on zmm (maddubs512_acc_inplace), for codes up to 64 like AVX2's kernel.
// Built only on x86 with the AVX-512 flags plus -mavx512vnni (CMakeLists.txt); the VNNI kernel is
// chosen at run time only where the CPU has AVX-512 VNNI, the other one where it has not
// (linear_int8.cpp): its instantiation has no VNNI instruction.
// GCC 12 warns about its own intrinsics (_mm512_undefined_* in avx512fintrin.h): a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "linear_int8.h"
#include "vnni_inplace.h"

namespace engine {
namespace {

constexpr int kTileRows = 6;

// y rows [m0, m0 + MR) x panel p's 32 channels. Vnni false: vpmaddubsw + vpmaddwd + vpaddd, for
// AVX-512 CPUs without VNNI (Skylake-SP class), exact while max_code <= 64 (as AVX2's kernel).
template <int MR, bool Vnni>
inline void tile(const lin8::Job& job, int m0, int p, const int8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K4 = w.k4();
  // the tile's activations: 4 bytes of row i at step k are at a + k * step + i * row
  const bool interleaved = MR == kTileRows && job.tiles != nullptr;
  const uint8_t* a0 = interleaved ? job.tiles + size_t(m0) * K4 : job.u + size_t(m0) * K4;
  const size_t step = interleaved ? 4 * MR : 4, row = interleaved ? 4 : size_t(K4);
  const __m512i ones = _mm512_set1_epi16(1);
  __m512i acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  for (int k = 0; k < K4 / 4; ++k) {
    const int8_t* b = panel + size_t(k) * 128;
    // 8 steps (1 KB) ahead: one-row calls stream the panel from memory.
    _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 1088), _MM_HINT_T0);
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a0 + size_t(k) * step + size_t(i) * row));
      acc[i][0] = acc512_inplace<Vnni>(acc[i][0], a, b0, ones);
      acc[i][1] = acc512_inplace<Vnni>(acc[i][1], a, b1, ones);
    }
  }
  const int n0 = p * kLinearPanel;
  for (int h = 0; h < 2; ++h) {
    const int n = n0 + 16 * h;
    if (n >= w.O) break;
    const __mmask16 mask = w.O - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (w.O - n)) - 1u);
    const __m512i cs = _mm512_slli_epi32(_mm512_loadu_si512(w.colsum + n), 7);   // 128 * colsum
    const __m512 scale = _mm512_maskz_loadu_ps(mask, w.colscale + n);
    for (int i = 0; i < MR; ++i) {
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][h], cs)), scale);
      _mm512_mask_storeu_ps(job.y + (m0 + i) * job.ldy + n, mask, _mm512_mul_ps(f, _mm512_set1_ps(job.r[m0 + i])));
    }
  }
}

template <bool Vnni>
void run_tiles(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->k4()) * kLinearPanel;
  for (int p = p0; p < p1; ++p) {
    const int8_t* panel = job.w->codes + size_t(p) * panel_bytes;
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

void quantize_avx512(const float* x, int M, int K, uint8_t* u, float* r) {
  const int K4 = (K + 3) / 4 * 4;
  const __m512 step = _mm512_set1_ps(1.0f / 127.0f), zp = _mm512_set1_ps(128.f);
  const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.f);
  for (int m = 0; m < M; ++m) {
    const float* row = x + size_t(m) * K;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int k = 0; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(mk, row + k);
      bad |= _mm512_fpclass_ps_mask(v, 0x99);   // QNaN, SNaN, +inf, -inf
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    if (bad) throw std::invalid_argument("linear_int8: the input has a non-finite value");
    float a = _mm512_reduce_max_ps(amax);
    a = a > 1e-30f ? a : 1e-30f;
    const __m512 av = _mm512_set1_ps(a);
    uint8_t* ur = u + size_t(m) * K4;
    for (int k = 0; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1u);
      __m512 q = _mm512_div_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, row + k), av), step);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zp), lo), hi);
      _mm_mask_storeu_epi8(ur + k, mk, _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(q)));
    }
    for (int k = K; k < K4; ++k) ur[k] = 128;
    r[m] = a;
  }
}

}  // namespace

lin8::Kernel lin8::avx512_vnni_kernel() { return {&run_tiles<true>, &quantize_avx512, "avx512_vnni", false, kTileRows}; }
lin8::Kernel lin8::avx512bw_kernel() { return {&run_tiles<false>, &quantize_avx512, "avx512bw", false, kTileRows}; }

}  // namespace engine
