// AVX-512 VNNI kernel of matmul_int8 (matmul_int8.h): 64 codes per step with vpdpbusd, which
// multiplies unsigned by signed bytes and adds the four products of each lane into int32 without
// saturation. The unsigned operand is q + 128 (job.qu), so
//   sum_k q[k] * w[k] = sum_k qu[k] * w[k] - 128 * sum_k w[k],
// and sum_k w[k] comes from one more vpdpbusd of the table row with bytes of 1 per step, done
// once per table row (in its first block of activation rows). All sums are exact
// (|qu * w| <= 255 * 127, K <= 2^16), so the result equals the scalar twin's bit for bit.
//
// Register tile: 4 table rows x up to 4 activation rows, 16 int32 accumulators, so each step
// loads 4 + 4 vectors for 16 vpdpbusd. The first version (1 table row x 4 activation rows, one
// q load per vpdpbusd) took, on the 257k x 2304 table, 2 Zen 4 cores: 4 rows 24.6 ms, 8 rows
// 29.6, 16 rows 80, 24 rows 106; this one 17-19, 24-25, 45, 65 (1 row: memory-bound, 13-19 ms
// either way, as the bandwidth of this VM moves).
// Built only on x86 with the AVX-512 flags plus -mavx512vnni (CMakeLists.txt); chosen at run time
// only where the CPU has AVX-512 VNNI (matmul_int8.cpp).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "matmul_int8.h"
#include "vnni_inplace.h"

namespace engine {
namespace {

constexpr int kTileV = 4;   // table rows per tile
constexpr int kTileM = 4;   // activation rows per tile

// Exact sums of table rows w[i] = codes[v + i] (i < NV) with activation rows m0 + j (j < NM);
// with WSUM also each table row's code sum (wsum_out[i]), the correction's operand.
template <int NV, int NM, bool WSUM>
inline void tile(const mm8::Job& job, const int8_t* w, int m0, int32_t (*res)[kTileM], int32_t* wsum_out) {
  const int K = job.K, K64 = K / 64 * 64;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[NV][NM];
  __m512i wsum[NV];
  for (int i = 0; i < NV; ++i) {
    wsum[i] = _mm512_setzero_si512();
    for (int j = 0; j < NM; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  const uint8_t* qu = job.qu + size_t(m0) * K;
  for (int k = 0; k < K64; k += 64) {
    __m512i wv[NV];
    for (int i = 0; i < NV; ++i) {
      // The tile two ahead, front to back, NV lines per step, into L2: the NV rows read here
      // are NV short streams 2.3 KB apart that the hardware prefetcher follows poorly (one-row
      // calls 16.5 -> 24 ms without it); into L1 it evicts the activation rows of many-row
      // calls. A prefetch past the table's end is harmless (no fault), hence integer addresses.
      if (WSUM)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(w) + (2 * NV) * size_t(K) +
                                                   size_t(k) * NV + size_t(i) * 64), _MM_HINT_T1);
      wv[i] = _mm512_loadu_si512(w + size_t(i) * K + k);
      if (WSUM) wsum[i] = dpbusd_inplace(wsum[i], ones, wv[i]);
    }
    for (int j = 0; j < NM; ++j) {
      const __m512i qv = _mm512_loadu_si512(qu + size_t(j) * K + k);
      for (int i = 0; i < NV; ++i) acc[i][j] = dpbusd_inplace(acc[i][j], qv, wv[i]);
    }
  }
  for (int i = 0; i < NV; ++i) {
    if (WSUM) wsum_out[i] = _mm512_reduce_add_epi32(wsum[i]);   // over the vector part only
    for (int j = 0; j < NM; ++j) res[i][j] = _mm512_reduce_add_epi32(acc[i][j]);
  }
}

template <int NV, int NM>
inline void tile_any(const mm8::Job& job, const int8_t* w, int m0, bool first, int32_t (*res)[kTileM],
                     int32_t* wsum) {
  if (first) tile<NV, NM, true>(job, w, m0, res, wsum);
  else tile<NV, NM, false>(job, w, m0, res, wsum);
}

template <int NV>
inline void tile_rows(const mm8::Job& job, const int8_t* w, int m0, int nm, bool first, int32_t (*res)[kTileM],
                      int32_t* wsum) {
  switch (nm) {
    case 4: tile_any<NV, 4>(job, w, m0, first, res, wsum); break;
    case 3: tile_any<NV, 3>(job, w, m0, first, res, wsum); break;
    case 2: tile_any<NV, 2>(job, w, m0, first, res, wsum); break;
    default: tile_any<NV, 1>(job, w, m0, first, res, wsum); break;
  }
}

// Table rows [v0, v1): tiles of 4 table rows (then single rows) x blocks of up to 4 activation rows.
void run_vnni(const mm8::Job& job, int64_t v0, int64_t v1) {
  const int K = job.K, K64 = K / 64 * 64;
  int32_t res[kTileV][kTileM];
  int32_t wsum[kTileV];
  // One or two activation rows (decode) are memory-bound: one table row at a time reads the
  // table as a single sequential stream, which the tiles' four streams do not match (one-row
  // decode step, 3B, Zen 4: LM head 18 ms this way, 20 ms with tiles).
  const int tile_v = job.M <= 2 ? 1 : kTileV;
  for (int64_t v = v0; v < v1;) {
    const int nv = v1 - v >= tile_v ? tile_v : 1;
    const int8_t* w = job.codes + v * K;
    for (int m0 = 0; m0 < job.M; m0 += kTileM) {
      const int nm = job.M - m0 < kTileM ? job.M - m0 : kTileM;
      if (nv == kTileV) tile_rows<kTileV>(job, w, m0, nm, m0 == 0, res, wsum);
      else tile_rows<1>(job, w, m0, nm, m0 == 0, res, wsum);
      for (int i = 0; i < nv; ++i)
        for (int j = 0; j < nm; ++j) {
          const int m = m0 + j;
          int32_t s = res[i][j] - 128 * wsum[i];
          const int8_t* q = job.q + size_t(m) * K;
          const int8_t* wr = w + size_t(i) * K;
          for (int k = K64; k < K; ++k) s += int32_t(q[k]) * int32_t(wr[k]);   // the tail, from q
          job.out[m * job.ldo + v + i] = mm8::scaled(job, s, v + i, m);
        }
    }
    v += nv;
  }
}

}  // namespace

mm8::Fn mm8::avx512_vnni_kernel() { return &run_vnni; }

}  // namespace engine
