// AVX2 kernel of the int4 matrices of linear_int8 (linear_int8.h, "int4 matrices"), for CPUs
// without VNNI.
//
// vpmaddubsw multiplies u (unsigned) by the codes 0..15 (signed operand) into int16 pair sums of
// at most 2 x 255 x 15 = 7650, so four k4 steps add up in int16 (<= 30600 < 32767) before one
// vpmaddwd by ones into int32 lanes of 4 k: 5 multiply-port ops per 4 steps and 8 channels, where
// the int8 kernel (7-bit codes, no such room) takes 8. A 64-byte k4 row of a panel is two 32-byte
// vectors: their low nibbles are channels 0-7 and 8-15, their high nibbles 16-23 and 24-31. After
// each group the exact sums are corrected (gcorr, qsum8) and added into float sums, in L1, with one
// fma. Tiles (16 ymm), both with the int16 sums: one row x 32 channels for a one-row call
// (decode: the panel streams once); else 8 rows x 8 channels (tile_rows: 8 int32 sums, the 4
// steps' codes, one broadcast and one int16 sum). The 4 rows x 16 channels tile of one step (the
// int8 kernel's) ran at ~0.85x the int8 kernel; two-step int16 sums in that tile spilled and were
// no faster.
// Built only on x86 with -mavx2 -mfma (CMakeLists.txt); chosen at run time (linear_int8.cpp).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "linear_int8.h"
#include "vnni_inplace.h"

namespace engine {
namespace {

// y[m0 + i, channels of panel p] = f[i] * r[m0 + i] for the channels below O (f: [MR][32]).
template <int MR>
inline void store_rows(const lin8::Job& job, int m0, int p, const float* f) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int c = 0; c < kLinearPanel; c += 8) {
    const int n = p * kLinearPanel + c;
    if (n >= job.w->O) break;
    const int width = job.w->O - n >= 8 ? 8 : job.w->O - n;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width), lanes);
    for (int i = 0; i < MR; ++i)
      _mm256_maskstore_ps(job.y + (m0 + i) * job.ldy + n, mask,
                          _mm256_mul_ps(_mm256_load_ps(f + i * kLinearPanel + c), _mm256_set1_ps(job.r[m0 + i])));
  }
}

// f8[0, 8) += float(acc - corr - qsum) * scale: a group's exact int32 sums (gcorr, qsum8 removed)
// into the float sums, which live in L1.
inline void add_group(float* f8, __m256i acc, __m256i corr, __m256 scale, int32_t qsum) {
  const __m256i t = _mm256_sub_epi32(_mm256_sub_epi32(acc, corr), _mm256_set1_epi32(qsum));
  _mm256_store_ps(f8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), scale, _mm256_load_ps(f8)));
}

// J k4 steps from k on into the one-row tile's 4 int32 sums (acc[h][j]): per step one broadcast
// of u and the 64-byte row unpacked; per vector J vpmaddubsw summed in int16 (<= J x 7650), then
// one vpmaddwd + vpaddd.
template <int J>
inline void one_row_steps(__m256i (&acc)[2][2], const uint8_t* panel, const uint8_t* u, int k, __m256i low,
                          __m256i ones) {
  __m256i t[2][2];
  for (int s = 0; s < J; ++s) {
    const uint8_t* b = panel + size_t(k + s) * 64;
    _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);
    const __m256i a = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(u + 4 * size_t(k + s)));
    for (int j = 0; j < 2; ++j) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * j));
      const __m256i lo = _mm256_maddubs_epi16(a, _mm256_and_si256(raw, low));
      const __m256i hi = _mm256_maddubs_epi16(a, _mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
      t[0][j] = s == 0 ? lo : _mm256_add_epi16(t[0][j], lo);
      t[1][j] = s == 0 ? hi : _mm256_add_epi16(t[1][j], hi);
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 2; ++j) acc[h][j] = madd16_acc_inplace(acc[h][j], t[h][j], ones);
}

// y row 0 x the 32 channels of panel p, for a one-row call (decode): each 64-byte k4 row of the
// panel is read once and both nibble halves used (vector j of half h: channels 16 h + 8 j .. + 7).
// The int32 sums of a group (4 vectors) stay in registers, the float sums in L1 (one load / fma /
// store per group).
inline void one_row(const lin8::Job& job, int p, const uint8_t* panel) {
  const PackedLinear& w = *job.w;
  const int G = w.groups(), steps = w.group / 4;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  const float* gs = w.gscale + size_t(p) * G * kLinearPanel;
  const int32_t* gc = w.gcorr + size_t(p) * G * kLinearPanel;
  alignas(32) float f[kLinearPanel] = {};
  for (int g = 0; g < G; ++g) {
    __m256i acc[2][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()},
                         {_mm256_setzero_si256(), _mm256_setzero_si256()}};
    const int end = (g + 1) * steps;
    int k = g * steps;
    for (; k + 4 <= end; k += 4) one_row_steps<4>(acc, panel, job.u, k, low, ones);
    for (; k < end; ++k) one_row_steps<1>(acc, panel, job.u, k, low, ones);
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 2; ++j) {
        const size_t at = size_t(g) * kLinearPanel + 16 * h + 8 * j;
        add_group(f + 16 * h + 8 * j, acc[h][j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gc + at)),
                  _mm256_loadu_ps(gs + at), job.qsum8[g]);
      }
  }
  store_rows<1>(job, 0, p, f);
}

// J k4 steps from k on of channel vector (h, j) into MR int32 sums: the codes of the J steps in
// registers, then per row J vpmaddubsw summed in int16 (u x code <= 255 x 15: J = 4 steps are at
// most 30600 < 32767) and one vpmaddwd + vpaddd.
template <int MR, int J>
inline void steps(__m256i (&acc)[MR], const uint8_t* panel, const uint8_t* u, size_t K, int k, int h, int j,
                  __m256i low, __m256i ones) {
  __m256i c[J];
  for (int s = 0; s < J; ++s) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + size_t(k + s) * 64 + 32 * j));
    c[s] = _mm256_and_si256(h == 0 ? raw : _mm256_srli_epi16(raw, 4), low);
  }
  for (int i = 0; i < MR; ++i) {
    const uint8_t* ui = u + size_t(i) * K + 4 * size_t(k);
    __m256i t = _mm256_maddubs_epi16(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(ui)), c[0]);
    for (int s = 1; s < J; ++s)
      t = _mm256_add_epi16(t, _mm256_maddubs_epi16(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(ui + 4 * s)), c[s]));
    acc[i] = madd16_acc_inplace(acc[i], t, ones);
  }
}

// y rows [m0, m0 + MR) x the 32 channels of panel p, for calls of several rows. Per group, one
// channel vector (8 channels) at a time: MR int32 sums and the 4 steps' codes in registers, the
// float sums in L1; the group's u bytes (MR x 128) and codes (2 KB) stay in L1 across the 4 vectors.
template <int MR>
inline void tile_rows(const lin8::Job& job, int m0, int p, const uint8_t* panel) {
  const PackedLinear& w = *job.w;
  const int K = w.K, G = w.groups(), per_group = w.group / 4;
  const uint8_t* u = job.u + size_t(m0) * K;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  const float* gs = w.gscale + size_t(p) * G * kLinearPanel;
  const int32_t* gc = w.gcorr + size_t(p) * G * kLinearPanel;
  const int32_t* qs = job.qsum8 + size_t(m0) * G;
  alignas(32) float f[MR][kLinearPanel] = {};
  for (int g = 0; g < G; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + size_t(g + 1) * per_group * 64), _MM_HINT_T0);
    for (int v = 0; v < 4; ++v) {    // channels 16 h + 8 j .. + 7
      const int h = v / 2, j = v % 2;
      __m256i acc[MR];
      for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
      const int end = (g + 1) * per_group;
      int k = g * per_group;
      for (; k + 4 <= end; k += 4) steps<MR, 4>(acc, panel, u, K, k, h, j, low, ones);
      for (; k < end; ++k) steps<MR, 1>(acc, panel, u, K, k, h, j, low, ones);
      const size_t at = size_t(g) * kLinearPanel + 16 * h + 8 * j;
      const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gc + at));
      const __m256 scale = _mm256_loadu_ps(gs + at);
      for (int i = 0; i < MR; ++i) add_group(f[i] + 16 * h + 8 * j, acc[i], corr, scale, qs[size_t(i) * G + g]);
    }
  }
  store_rows<MR>(job, m0, p, f[0]);
}

constexpr int kRowTile = 8;   // rows of tile_rows: 8 int32 sums + 4 codes + a broadcast + an int16 sum

void run_avx2_int4(const lin8::Job& job, int p0, int p1) {
  const size_t panel_bytes = size_t(job.w->K) * (kLinearPanel / 2);
  for (int p = p0; p < p1; ++p) {
    const uint8_t* panel = job.w->codes4 + size_t(p) * panel_bytes;
    if (job.M == 1) {
      one_row(job, p, panel);
      continue;
    }
    int m = 0;
    for (; m + kRowTile <= job.M; m += kRowTile) tile_rows<kRowTile>(job, m, p, panel);
    switch (job.M - m) {
      case 7: tile_rows<7>(job, m, p, panel); break;
      case 6: tile_rows<6>(job, m, p, panel); break;
      case 5: tile_rows<5>(job, m, p, panel); break;
      case 4: tile_rows<4>(job, m, p, panel); break;
      case 3: tile_rows<3>(job, m, p, panel); break;
      case 2: tile_rows<2>(job, m, p, panel); break;
      case 1: tile_rows<1>(job, m, p, panel); break;
      default: break;
    }
  }
}

}  // namespace

lin8::Kernel lin8::avx2_int4_kernel() { return {&run_avx2_int4, &quantize_rows_avx2, "avx2_int4"}; }

}  // namespace engine
