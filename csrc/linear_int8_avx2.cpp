// AVX2 kernel of linear_int8 (linear_int8.h), for CPUs without VNNI.
//
// vpmaddubsw multiplies the unsigned activations u (q + 128) by the signed codes and adds adjacent
// pairs into int16, saturating; with |code| <= 64 a pair is at most 2 * 255 * 64 = 32640, so it
// never saturates (the caller picks the kernel from max_code). vpmaddwd by ones then adds the two
// pairs of each 4-k group into an int32 lane: 8 output channels x 4 k per 3 instructions, from the same packed
// bytes vpdpbusd reads (a 128-byte k4 row of a panel is 4 vectors of 8 channels). The exact sum
// is acc - 128 * colsum[n]. Register tiles: 1 row x 32 channels when a call has one row (decode:
// the panel streams once), else up to 4 rows x 16 channels (8 accumulators, 2 code vectors).
// Codes above 64 (the 8-bit per-channel matrices of int4 artifacts exported before their 7-bit
// codes, export/onnx_graphs.py INT8_CODE_MAX) take the wide variant (tile, below):
// one more multiply-port op per step (vpsignb), about 2/3 of the speed.
// Quantization (quantize_avx2, also the int4 kernel's): the scalar twin's arithmetic on 8 floats,
// the same bytes; scalar it was ~3% of a prefill.
// Built only on x86 with -mavx2 -mfma (CMakeLists.txt); chosen at run time (linear_int8.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "linear_int8.h"
#include "vnni_inplace.h"

namespace engine {
namespace {

// y rows [m0, m0 + MR) x channels [n0 + 8 v0, n0 + 8 (v0 + NV)) of panel p. Wide: codes up to
// 127 (max_code > 64): vpmaddubsw takes |code| (unsigned) and q = u - 128 with the code's sign
// (vpsignb), whose pair sums stay below 2 x 127 x 127 = 32258, and the sums need no colsum term.
template <int MR, int NV, bool Wide>
inline void tile(const lin8::Job& job, int m0, int p, int v0, const int8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K4 = w.k4();
  const uint8_t* u = job.u + size_t(m0) * K4;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  __m256i acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int k = 0; k < K4 / 4; ++k) {
    const int8_t* b = panel + size_t(k) * 128 + 32 * v0;
    _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);
    if (NV == 4) _mm_prefetch(reinterpret_cast<const char*>(b + 1088), _MM_HINT_T0);
    for (int j = 0; j < NV; ++j) {
      const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
      const __m256i babs = Wide ? _mm256_abs_epi8(bv) : bv;
      for (int i = 0; i < MR; ++i) {
        const __m256i a = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(u + size_t(i) * K4 + 4 * k));
        if (Wide)   // u ^ 0x80 = u - 128 as int8
          acc[i][j] = maddubs_acc_inplace(acc[i][j], babs, _mm256_sign_epi8(_mm256_xor_si256(a, flip), bv), ones);
        else
          acc[i][j] = maddubs_acc_inplace(acc[i][j], a, bv, ones);
      }
    }
  }
  for (int j = 0; j < NV; ++j) {
    const int n = p * kLinearPanel + 8 * (v0 + j);
    if (n >= w.O) break;
    const int width = w.O - n >= 8 ? 8 : w.O - n;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width), lanes);
    const __m256i cs = Wide ? _mm256_setzero_si256()
                            : _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.colsum + n)), 7);
    const __m256 scale = _mm256_maskload_ps(w.colscale + n, mask);
    for (int i = 0; i < MR; ++i) {
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][j], cs)), scale);
      _mm256_maskstore_ps(job.y + (m0 + i) * job.ldy + n, mask, _mm256_mul_ps(f, _mm256_set1_ps(job.r[m0 + i])));
    }
  }
}

// quantize_rows_u8 (linear_int8.cpp) on 8 floats per step: the same divisions, round half to
// even (nearbyint's default mode), clamp; the tail of a row by the scalar formula.
void quantize_avx2(const float* x, int M, int K, uint8_t* u, float* r) {
  const int K4 = (K + 3) / 4 * 4;
  const float step = 1.0f / 127.0f;
  const __m256 stepv = _mm256_set1_ps(step), zp = _mm256_set1_ps(128.f), lo = _mm256_setzero_ps(),
               hi = _mm256_set1_ps(255.f), inf = _mm256_set1_ps(INFINITY),
               absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int m = 0; m < M; ++m) {
    const float* row = x + size_t(m) * K;
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_and_ps(_mm256_loadu_ps(row + k), absmask);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));   // NaN or infinite
      amax = _mm256_max_ps(amax, v);
    }
    alignas(32) float part[8];
    _mm256_store_ps(part, amax);
    float a = 0.f;
    bool finite = _mm256_movemask_ps(bad) == 0;
    for (float p : part) a = p > a ? p : a;
    for (int t = k; t < K; ++t) {
      const float v = row[t] < 0 ? -row[t] : row[t];
      finite &= v < INFINITY;   // false for NaN too
      a = v > a ? v : a;
    }
    if (!finite) throw std::invalid_argument("linear_int8: the input has a non-finite value");
    a = a > 1e-30f ? a : 1e-30f;
    const __m256 av = _mm256_set1_ps(a);
    uint8_t* ur = u + size_t(m) * K4;
    for (k = 0; k + 8 <= K; k += 8) {
      __m256 q = _mm256_div_ps(_mm256_div_ps(_mm256_loadu_ps(row + k), av), stepv);
      q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, zp), lo), hi);
      const __m256i q32 = _mm256_cvtps_epi32(q);
      const __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(ur + k), _mm_packus_epi16(q16, q16));
    }
    for (; k < K; ++k) {
      const float q = std::nearbyint((row[k] / a) / step);
      ur[k] = uint8_t(std::min(255.f, std::max(0.f, q + 128.f)));
    }
    for (k = K; k < K4; ++k) ur[k] = 128;
    r[m] = a;
  }
}

template <bool Wide>
void run_avx2(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->k4()) * kLinearPanel;
  for (int p = p0; p < p1; ++p) {
    const int8_t* panel = job.w->codes + size_t(p) * panel_bytes;
    if (job.M == 1) {
      tile<1, 4, Wide>(job, 0, p, 0, panel);
      continue;
    }
    for (int v0 = 0; v0 < 4; v0 += 2) {
      int m = 0;
      for (; m + 4 <= job.M; m += 4) tile<4, 2, Wide>(job, m, p, v0, panel);
      switch (job.M - m) {
        case 3: tile<3, 2, Wide>(job, m, p, v0, panel); break;
        case 2: tile<2, 2, Wide>(job, m, p, v0, panel); break;
        case 1: tile<1, 2, Wide>(job, m, p, v0, panel); break;
        default: break;
      }
    }
  }
}

}  // namespace

void lin8::quantize_rows_avx2(const float* x, int M, int K, uint8_t* u, float* r) { quantize_avx2(x, M, K, u, r); }

lin8::Kernel lin8::avx2_kernel() { return {&run_avx2<false>, &quantize_avx2, "avx2"}; }
lin8::Kernel lin8::avx2_wide_kernel() { return {&run_avx2<true>, &quantize_avx2, "avx2_wide"}; }

}  // namespace engine
