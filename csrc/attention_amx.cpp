// AMX-BF16 prefill tile kernel of the attention (attention_kernels.h): the two passes of the
// AVX-512 tile kernel (attention_simd.inl, pack_block + run_tile) with their matrix products on
// AMX tiles in bf16, for f16 and int8 caches at the amx SIMD level (attention.cpp). f32 caches
// keep the fp32 kernels, so float artifacts stay transformers-exact.
//
//   pass 1  S [Rp, Lw] = Q K^T             tdpbf16ps: Q rows in bf16, K packed per 16 keys
//   softmax per row in fp32 (softcap, mask, max, exp, 1 / sum), as the AVX-512 kernel
//   pass 2  out = inv * (P V)             P = exp(S - max) in bf16 (0 outside a row's keys)
//
// bf16 keeps 8 bits of mantissa (f16 keeps 11): q, k, p and v are rounded to it, the sums stay
// fp32. That is what transformers' bf16 attention does on these CPUs; the errors against the
// float64 oracle are in tests/test_native_attention.py and the logit fidelity in the README.
//
// Layouts (bf16 elements, Dp = head_dim rounded up to 32, np a multiple of 32; padding zero):
//   kp: [np / 16][Dp / 2][16 keys][2 dims]   one key block is tdpbf16ps's B operand for S
//       (16 dim pairs x 16 keys per tile, 64-byte rows)
//   vp: [Dp / 16][np / 2][16 dims][2 keys]   one dim block is B for P V (16 key pairs x 16 dims)
// written into the f32 buffers attention.cpp sizes for the fp32 layouts (these need less).
// Tile blocks: 2 x 2 (32 rows x 32 keys or dims, four fp32 C tiles, two A and two B tiles).
// Built only where the compiler has -mamx-bf16 (CMakeLists.txt, ENGINE_HAVE_AMX).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_tiles.h"
#include "attention_kernels.h"

namespace engine {
namespace attn_amx {

#include "attention_avx512_v.inl"

namespace {

#include "attention_softmax.inl"   // the fp32 softmax of the AVX-512 tile kernel

constexpr int kKeys = 32;   // chunk: keys per S column block, keys per P V step

inline int padded_dim(int D) { return (D + 31) / 32 * 32; }

// fp32 -> bf16, round to nearest even (finite inputs; the values here are).
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// dst[0, n) = bf16(src[0, n) * scale), dst[n, npad) = 0.
inline void row_to_bf16(const float* src, int n, int npad, float scale, uint16_t* dst) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int i = 0; i < npad; i += 16) {
    const int m = std::max(0, std::min(16, n - i));
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(__mmask16((1u << m) - 1u), src + i), sv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), to_bf16(x));
  }
}

template <class E>
void pack_bf16(const attn::PackJob& pj) {
  const int D = pj.D, Dp = padded_dim(D), np = pj.np;
  auto* kp = reinterpret_cast<uint16_t*>(pj.kp);
  auto* vp = reinterpret_cast<uint16_t*>(pj.vp);
  const E* K = static_cast<const E*>(pj.view->k);
  const E* Vs = static_cast<const E*>(pj.view->v);
  alignas(64) float tmp[attn::kAmxMaxDim];
  alignas(64) uint16_t kb[attn::kAmxMaxDim], vb[attn::kAmxMaxDim];
  for (int j = 0; j < pj.count; ++j) {
    const int row = pj.first + j, x = pj.x0 + j;
    for (int d = 0; d < D; d += 16) V::store(tmp + d, V::load_tail(K + size_t(row) * D + d, std::min(16, D - d)));
    row_to_bf16(tmp, D, Dp, pj.view->kscale ? pj.view->kscale[row] : 1.f, kb);
    for (int d = 0; d < D; d += 16) V::store(tmp + d, V::load_tail(Vs + size_t(row) * D + d, std::min(16, D - d)));
    row_to_bf16(tmp, D, Dp, pj.view->vscale ? pj.view->vscale[row] : 1.f, vb);
    uint16_t* kd = kp + size_t(x / 16) * 16 * Dp + (x % 16) * 2;
    for (int d = 0; d < Dp; d += 2) {
      kd[size_t(d / 2) * 32] = kb[d];
      kd[size_t(d / 2) * 32 + 1] = kb[d + 1];
    }
    uint16_t* vd = vp + size_t(x / 2) * 32 + (x % 2);
    for (int d = 0; d < Dp; ++d) vd[(size_t(d / 16) * (np / 2)) * 32 + (d % 16) * 2] = vb[d];
  }
  if (pj.last) {   // zero the padding keys [x0 + count, np)
    const int xe = pj.x0 + pj.count;
    for (int x = xe; x < np; ++x) {
      uint16_t* kd = kp + size_t(x / 16) * 16 * Dp + (x % 16) * 2;
      for (int d = 0; d < Dp; d += 2) kd[size_t(d / 2) * 32] = kd[size_t(d / 2) * 32 + 1] = 0;
      uint16_t* vd = vp + size_t(x / 2) * 32 + (x % 2);
      for (int d = 0; d < Dp; ++d) vd[(size_t(d / 16) * (np / 2)) * 32 + (d % 16) * 2] = 0;
    }
  }
}

void pack_amx(const attn::PackJob& pj) {
  switch (pj.dtype) {
    case KVDtype::F32: pack_bf16<float>(pj); break;
    case KVDtype::F16: pack_bf16<uint16_t>(pj); break;
    case KVDtype::I8: pack_bf16<int8_t>(pj); break;
  }
}

void tile_amx(const attn::TileTask& tt, const attn::TileScratch& sc) {
  const attn::Task& t = tt.rows;
  const int R = t.rows, D = t.D, Dp = padded_dim(D), lds = sc.ld, np = tt.np;
  const int Rp = (R + 31) / 32 * 32;
  int ulo = t.lo[0], uhi = t.hi[0];
  for (int r = 1; r < R; ++r) ulo = std::min(ulo, t.lo[r]), uhi = std::max(uhi, t.hi[r]);
  const int xs = (ulo - tt.k0) / kKeys * kKeys;                   // first packed key used
  const int Lw = (uhi - tt.k0 + kKeys - 1) / kKeys * kKeys - xs;  // columns of S (<= np)
  const int key0 = tt.k0 + xs;
  const auto* kp = reinterpret_cast<const uint16_t*>(tt.kp);
  const auto* vp = reinterpret_cast<const uint16_t*>(tt.vp);

  thread_local std::vector<uint16_t> qbuf, pbuf;
  if (qbuf.size() < size_t(attn::kMaxRows + 32) * Dp) qbuf.resize(size_t(attn::kMaxRows + 32) * Dp);
  if (pbuf.size() < size_t(attn::kMaxRows + 32) * np) pbuf.resize(size_t(attn::kMaxRows + 32) * np);
  uint16_t* qb = qbuf.data();   // [Rp, Dp]
  uint16_t* pb = pbuf.data();   // [Rp, Lw]
  for (int r = 0; r < R; ++r) row_to_bf16(t.q[r], D, Dp, 1.f, qb + size_t(r) * Dp);
  std::memset(qb + size_t(R) * Dp, 0, sizeof(uint16_t) * size_t(Rp - R) * Dp);

  amx::configure_tiles();
  // ---- pass 1: S = Q K^T ----
  for (int r0 = 0; r0 < Rp; r0 += 32) {
    for (int x = 0; x < Lw; x += 32) {
      amx::zero_c_tiles();
      const uint16_t* k0 = kp + size_t((xs + x) / 16) * 16 * Dp;
      const uint16_t* k1 = k0 + size_t(16) * Dp;
      for (int d = 0; d < Dp; d += 32) {
        _tile_loadd(4, qb + size_t(r0) * Dp + d, Dp * 2);
        _tile_loadd(5, qb + size_t(r0 + 16) * Dp + d, Dp * 2);
        _tile_loadd(6, k0 + size_t(d) * 16, 64);
        _tile_loadd(7, k1 + size_t(d) * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      amx::store_c_tiles(sc.s + size_t(r0) * lds + x, sizeof(float) * size_t(lds));
    }
  }

  // ---- softcap, mask, softmax (fp32; 1 / sum kept in inv), P in bf16 ----
  for (int r = 0; r < R; ++r) {
    float* s = sc.s + size_t(r) * lds;
    sc.inv[r] = softmax_row(s, t.lo[r] - key0, t.hi[r] - key0, Lw, t.softcap);
    row_to_bf16(s, Lw, Lw, 1.f, pb + size_t(r) * Lw);
  }
  std::memset(pb + size_t(R) * Lw, 0, sizeof(uint16_t) * size_t(Rp - R) * Lw);

  // ---- pass 2: out = inv * (P V), 32 rows x 32 dims per block ----
  alignas(64) float c[32][32];
  for (int r0 = 0; r0 < Rp; r0 += 32) {
    for (int d0 = 0; d0 < Dp; d0 += 32) {
      amx::zero_c_tiles();
      const uint16_t* v0 = vp + (size_t(d0 / 16) * (np / 2) + xs / 2) * 32;
      const uint16_t* v1 = v0 + size_t(np / 2) * 32;
      for (int x = 0; x < Lw; x += 32) {
        _tile_loadd(4, pb + size_t(r0) * Lw + x, Lw * 2);
        _tile_loadd(5, pb + size_t(r0 + 16) * Lw + x, Lw * 2);
        _tile_loadd(6, v0 + size_t(x / 2) * 32, 64);
        _tile_loadd(7, v1 + size_t(x / 2) * 32, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      amx::store_c_tiles(c, sizeof(c[0]));
      const int rows = std::min(32, R - r0);
      for (int i = 0; i < rows; ++i) {
        const __m512 iv = _mm512_set1_ps(sc.inv[r0 + i]);
        float* o = t.out[r0 + i] + d0;
        for (int h = 0; h < 2; ++h) {
          const int n = std::min(16, D - d0 - 16 * h);
          if (n <= 0) break;
          _mm512_mask_storeu_ps(o + 16 * h, __mmask16((1u << n) - 1u), _mm512_mul_ps(_mm512_load_ps(&c[i][16 * h]), iv));
        }
      }
    }
  }
  _tile_release();
}

}  // namespace
}  // namespace attn_amx

attn::Kernels attn::amx_kernels() {
  return {avx512_kernels().decode, &attn_amx::pack_amx, &attn_amx::tile_amx, attn_amx::kKeys};
}

}  // namespace engine
