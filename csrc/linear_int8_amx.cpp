// AMX-INT8 kernel of linear_int8 (linear_int8.h) for prefill-sized calls.
//
// tdpbusd multiplies a tile of unsigned activations (16 rows x 64 k, u = q + 128) by a tile of
// signed codes (16 groups of 4 k x 16 channels, 4 bytes per channel) into 16 x 16 int32 sums.
// The packed layout already is that B operand: within a panel, k4 group g holds 32 channels x 4
// codes (128 bytes), so channels 0-15 of 16 consecutive groups are one tile loaded with a row
// stride of 128 bytes, and channels 16-31 the same 64 bytes further. A block is 32 rows x one
// panel: two A tiles x two B tiles into four C tiles (tmm0-3), 4 x 16 x 16 x 64 multiply-adds per
// 64 k. The exact sum is then acc - 128 * colsum[n], scaled as in every other kernel, so the
// results equal the scalar twin's bit for bit.
//
// Needs K4 % 64 == 0 (every Gemma width is; linear_int8.cpp sends other shapes to VNNI) and u
// holding whole 32-row blocks (linear_int8.cpp pads the rows; the padding rows' sums are
// computed and dropped). Tiles are configured per call and released after it, so a worker
// thread carries no tile state between tasks.
// Built only where the compiler has -mamx-int8 (CMakeLists.txt, ENGINE_HAVE_AMX); chosen at run
// time only at SimdLevel::Amx, which needs the CPU's and the OS's AMX (cpu_features.cpp).
// GCC 12 warns about its own intrinsics (_mm512_undefined_* in avx512fintrin.h): a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "amx_tiles.h"
#include "linear_int8.h"

namespace engine {
namespace {

// y rows [m0, m0 + rows) x the 32 channels of panel p from the 32 x 32 sums c.
inline void store_block(const lin8::Job& job, const int32_t (*c)[32], int m0, int rows, int p) {
  const PackedLinear& w = *job.w;
  for (int h = 0; h < 2; ++h) {
    const int n = p * kLinearPanel + 16 * h;
    if (n >= w.O) break;
    const __mmask16 mask = w.O - n >= 16 ? __mmask16(0xffff) : __mmask16((1u << (w.O - n)) - 1u);
    const __m512i cs = _mm512_slli_epi32(_mm512_loadu_si512(w.colsum + n), 7);   // 128 * colsum
    const __m512 scale = _mm512_maskz_loadu_ps(mask, w.colscale + n);
    for (int i = 0; i < rows; ++i) {
      const __m512i acc = _mm512_load_si512(c[i] + 16 * h);
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, cs)), scale);
      _mm512_mask_storeu_ps(job.y + (m0 + i) * job.ldy + n, mask, _mm512_mul_ps(f, _mm512_set1_ps(job.r[m0 + i])));
    }
  }
}

constexpr int kChunkRows = 256;

void run_amx(const lin8::Job& job, int p0, int p1) {
  amx::configure_tiles();
  const int K4 = job.w->k4();
  const size_t panel_bytes = size_t(K4) * kLinearPanel;
  static_assert(lin8::kAmxRows == 32, "a block is two 16-row tiles");
  alignas(64) int32_t c[32][32];
  // Rows in chunks of kChunkRows (a 2304-wide chunk is 590 KB of u), the task's panels within a
  // chunk: the chunk and the panels (8 x 74 KB) stay in L2 together.
  for (int mc = 0; mc < job.M; mc += kChunkRows) {
    const int mc_end = job.M - mc < kChunkRows ? job.M : mc + kChunkRows;
    for (int p = p0; p < p1; ++p) {
      const int8_t* panel = job.w->codes + size_t(p) * panel_bytes;
      for (int m0 = mc; m0 < mc_end; m0 += lin8::kAmxRows) {
        const uint8_t* a = job.u + size_t(m0) * K4;
        amx::zero_c_tiles();
        for (int k = 0; k < K4; k += 64) {
          const int8_t* b = panel + size_t(k / 4) * 128;
          _tile_loadd(4, a + k, K4);
          _tile_loadd(5, a + size_t(16) * K4 + k, K4);
          _tile_loadd(6, b, 128);
          _tile_loadd(7, b + 64, 128);
          _tile_dpbusd(0, 4, 6);
          _tile_dpbusd(1, 4, 7);
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
        amx::store_c_tiles(c, sizeof(c[0]));
        store_block(job, c, m0, job.M - m0 < lin8::kAmxRows ? job.M - m0 : lin8::kAmxRows, p);
      }
    }
  }
  _tile_release();
}

}  // namespace

lin8::Kernel lin8::amx_kernel() { return {&run_amx, avx512_vnni_kernel().quantize, "amx", true}; }

}  // namespace engine
