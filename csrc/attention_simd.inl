// Attention kernels, written once over a small vector-ops struct `V` and compiled per ISA:
// attention_avx512.cpp, attention_avx2.cpp and attention_neon.cpp each define V (W floats per
// vector) inside their own namespace and then #include this file, so each copy gets its own
// -m flags and there is no ODR clash. The naive twin of both kernels is attend_reference() in
// attention.cpp. Two kernels:
//
// run_task, the blocked online-softmax kernel (decode and calls with few query rows per kv head).
// For one task (rows = tokens x heads of one GQA group, one kv head) and each key block b:
//   S[r, j]  = q_r . K_j (* kscale_j)          qk_block: 4 rows x 2 keys per register tile
//   S        = softcap * tanh(S / softcap)      (if on)
//   online softmax over the row's visible keys [lo_r, hi_r):
//     m' = max(m, max_j S), corr = exp(m - m'), P = exp(S - m'), l = l * corr + sum P, acc *= corr
//   acc_r += sum_j P[r, j] (* vscale_j) V_j     pv_block: 4 rows per register tile
// and finally out_r = acc_r / l_r. Every dot product / accumulation is computed in the same order
// whatever the row grouping, so results do not depend on how rows are split into tasks (threads).
//
// pack_block + run_tile, the prefill tile kernel (described further down).
//
// Requires from V:  W, kTileVecs (vectors per register-tile row of run_tile), vec, zero, set1,
// load(const E*), load_tail(const E*, n) (zero-filled), store, store_tail, fma(a, b, c) = a*b + c,
// add, sub, mul, div, min, max, round (to nearest), pow2(n) = 2^n for integral n in [-126, 127],
// reduce (horizontal sum)  (E = float, uint16_t (IEEE half), int8_t).

#ifndef ENGINE_UNROLL
#if defined(__clang__) || defined(__GNUC__)
#define ENGINE_UNROLL _Pragma("GCC unroll 16")
#else
#define ENGINE_UNROLL
#endif
#endif

namespace {

#include "attention_softmax.inl"   // vexp, softcap_span, exp_sum_span, max_span, softmax_row

// ---- S[r0..r0+R, j0..j0+J] = q . K ----
template <int R, int J, class E>
inline void dot_tile(const float* const* q, int r0, const E* K, int j0, int D, float* s, int ld) {
  typename V::vec acc[R][J];
  ENGINE_UNROLL for (int r = 0; r < R; ++r)
    ENGINE_UNROLL for (int c = 0; c < J; ++c) acc[r][c] = V::zero();
  const int Dfull = D / V::W * V::W;
  for (int d = 0; d < Dfull; d += V::W) {
    typename V::vec k[J];
    ENGINE_UNROLL for (int c = 0; c < J; ++c) k[c] = V::load(K + size_t(j0 + c) * D + d);
    ENGINE_UNROLL for (int r = 0; r < R; ++r) {
      const typename V::vec qv = V::load(q[r0 + r] + d);
      ENGINE_UNROLL for (int c = 0; c < J; ++c) acc[r][c] = V::fma(qv, k[c], acc[r][c]);
    }
  }
  if (Dfull < D) {
    const int n = D - Dfull;
    typename V::vec k[J];
    for (int c = 0; c < J; ++c) k[c] = V::load_tail(K + size_t(j0 + c) * D + Dfull, n);
    for (int r = 0; r < R; ++r) {
      const typename V::vec qv = V::load_tail(q[r0 + r] + Dfull, n);
      for (int c = 0; c < J; ++c) acc[r][c] = V::fma(qv, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < J; ++c) s[size_t(r0 + r) * ld + j0 + c] = V::reduce(acc[r][c]);
}

// Tiles of at least 8 accumulators where the rows allow: with 2 (one row x 2 keys, decode of a
// GQA pair) the FMA latency chains, not the loads, set the pace. Every tile sums each dot
// product over d in the same order, so the scores do not depend on the tiling.
template <class E>
void qk_block(const float* const* q, int rows, const E* K, int n, int D, float* s, int ld) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    int j = 0;
    for (; j + 2 <= n; j += 2) dot_tile<4, 2>(q, r, K, j, D, s, ld);
    for (; j < n; ++j) dot_tile<4, 1>(q, r, K, j, D, s, ld);
  }
  for (; r + 2 <= rows; r += 2) {
    int j = 0;
    for (; j + 4 <= n; j += 4) dot_tile<2, 4>(q, r, K, j, D, s, ld);
    for (; j < n; ++j) dot_tile<2, 1>(q, r, K, j, D, s, ld);
  }
  for (; r < rows; ++r) {
    int j = 0;
    for (; j + 4 <= n; j += 4) dot_tile<1, 4>(q, r, K, j, D, s, ld);
    for (; j < n; ++j) dot_tile<1, 1>(q, r, K, j, D, s, ld);
  }
}

// ---- acc[r0..r0+R] += sum_{j in [a, e)} p[r, j] * V_j ----
// Accumulator vectors held in registers per pass over a block's values (AVX2 has 16 vector
// registers, AVX-512 and NEON 32).
constexpr int kPvVecs = sizeof(typename V::vec) == 32 ? 8 : 16;

// Each pass keeps CH vectors of each of the R rows in registers and reads CH consecutive vectors
// of every value row, so a block's values are read in runs of CH * W floats rather than one
// vector per value row at a time (1 KB strides, 32 rows deep). Decode, PaliGemma 2 3B shapes
// (4 kv heads of 256, groups of 2, f32, 290-490 tokens), one thread, Zen 4: 289-297 -> 241-262 us
// per layer call. Every output element still sums its products in token order, so results do
// not depend on CH. (Tiles of 2 query rows for GQA groups of 2, tried too, were slower: 287-320.)
// The loops over the tile's vectors are unrolled by force: GCC 12 left the one-row tile's 16
// (AVX-512) accumulators in a stack array, each FMA a load and a store. Decode, 3B shapes, f16
// cache, 26 layers back to back, 2 Zen 4 threads: 1,030 tokens 7.7-8.0 -> 7.2-7.5 ms, and with
// qk_block's wider tiles 6.2-6.4 ms; 276 tokens 1.74-1.76 -> 1.44-1.54 ms. Inside a generate on
// that machine the step's attention did not move (3.4-3.9 ms at 224 px, 8.4-9.7 at 448: its
// keys and values come cold from memory there); the fix is for cores where the compute shows.
template <int R, class E>
inline void pv_tile(const float* p, int ld, int r0, const E* Vd, int a, int e, int D, float* acc) {
  constexpr int CH = kPvVecs / R > 0 ? kPvVecs / R : 1;
  const int Dfull = D / V::W * V::W;
  int d = 0;
  for (; d + CH * V::W <= Dfull; d += CH * V::W) {
    typename V::vec o[R][CH];
    ENGINE_UNROLL for (int r = 0; r < R; ++r)
      ENGINE_UNROLL for (int c = 0; c < CH; ++c) o[r][c] = V::load(acc + size_t(r0 + r) * D + d + c * V::W);
    for (int j = a; j < e; ++j) {
      typename V::vec pj[R];
      ENGINE_UNROLL for (int r = 0; r < R; ++r) pj[r] = V::set1(p[size_t(r0 + r) * ld + j]);
      const E* vrow = Vd + size_t(j) * D + d;
      ENGINE_UNROLL for (int c = 0; c < CH; ++c) {
        const typename V::vec vv = V::load(vrow + c * V::W);
        ENGINE_UNROLL for (int r = 0; r < R; ++r) o[r][c] = V::fma(pj[r], vv, o[r][c]);
      }
    }
    ENGINE_UNROLL for (int r = 0; r < R; ++r)
      ENGINE_UNROLL for (int c = 0; c < CH; ++c) V::store(acc + size_t(r0 + r) * D + d + c * V::W, o[r][c]);
  }
  for (; d < Dfull; d += V::W) {
    typename V::vec o[R];
    for (int r = 0; r < R; ++r) o[r] = V::load(acc + size_t(r0 + r) * D + d);
    for (int j = a; j < e; ++j) {
      const typename V::vec vv = V::load(Vd + size_t(j) * D + d);
      for (int r = 0; r < R; ++r) o[r] = V::fma(V::set1(p[size_t(r0 + r) * ld + j]), vv, o[r]);
    }
    for (int r = 0; r < R; ++r) V::store(acc + size_t(r0 + r) * D + d, o[r]);
  }
  if (Dfull < D) {
    const int n = D - Dfull;
    typename V::vec o[R];
    for (int r = 0; r < R; ++r) o[r] = V::load_tail(acc + size_t(r0 + r) * D + Dfull, n);
    for (int j = a; j < e; ++j) {
      const typename V::vec vv = V::load_tail(Vd + size_t(j) * D + Dfull, n);
      for (int r = 0; r < R; ++r) o[r] = V::fma(V::set1(p[size_t(r0 + r) * ld + j]), vv, o[r]);
    }
    for (int r = 0; r < R; ++r) V::store_tail(acc + size_t(r0 + r) * D + Dfull, o[r], n);
  }
}

// Rows whose range misses the block have all-zero p there, so a row group can use the union of
// its rows' ranges (adding 0 * v leaves the accumulator unchanged).
template <class E>
void pv_block(const float* p, int ld, int rows, const int* a, const int* e, const E* Vd, int D, float* acc) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    int ua = a[r], ue = e[r];
    for (int k = 1; k < 4; ++k) ua = std::min(ua, a[r + k]), ue = std::max(ue, e[r + k]);
    if (ua < ue) pv_tile<4>(p, ld, r, Vd, ua, ue, D, acc);
  }
  for (; r < rows; ++r)
    if (a[r] < e[r]) pv_tile<1>(p, ld, r, Vd, a[r], e[r], D, acc);
}

// x[0..n) = c * tanh(x / c) via tanh(y) = 1 - 2 / (exp(2y) + 1).
inline void softcap_row(float* x, int n, float c) {
  const typename V::vec inv2 = V::set1(2.f / c), cv = V::set1(c), one = V::set1(1.f), two = V::set1(2.f);
  for (int j = 0; j < n; j += V::W) {   // rows are padded to a multiple of W
    const typename V::vec ex = vexp(V::mul(V::load(x + j), inv2));
    const typename V::vec t = V::sub(one, V::div(two, V::add(ex, one)));
    V::store(x + j, V::mul(cv, t));
  }
}

inline void exp_row(float* x, int n, float m) {
  const typename V::vec mv = V::set1(m);
  for (int j = 0; j < n; j += V::W) V::store(x + j, vexp(V::sub(V::load(x + j), mv)));
}

template <class E>
void run_task_typed(const attn::Task& t, const attn::Scratch& sc) {
  const int R = t.rows, D = t.D, B = t.block_tokens;
  const float ninf = -std::numeric_limits<float>::infinity();
  int lo = t.lo[0], hi = t.hi[0];
  for (int r = 0; r < R; ++r) {
    lo = std::min(lo, t.lo[r]);
    hi = std::max(hi, t.hi[r]);
    sc.m[r] = ninf;
    sc.l[r] = 0.f;
    for (int d = 0; d < D; ++d) sc.acc[size_t(r) * D + d] = 0.f;
  }
  int a[attn::kMaxRows], e[attn::kMaxRows];
  for (int b = lo / B; b * B < hi; ++b) {
    const KVBlockView& bv = t.blocks[b];
    const int base = b * B, n = std::min(B, hi - base);
    const int npad = (n + V::W - 1) / V::W * V::W;
    // The next block's keys and values, into L2, while this one computes: blocks lie 256 KB
    // apart, and each new one restarted the hardware prefetcher (decode as above, one thread:
    // 330-364 -> 281-304 us per layer call).
    if ((b + 1) * B < hi) {
      const KVBlockView& nx = t.blocks[b + 1];
      const size_t bytes = size_t(std::min(B, hi - (b + 1) * B)) * D * sizeof(E);
      for (size_t off = 0; off < bytes; off += 64) {
        __builtin_prefetch(static_cast<const char*>(nx.k) + off, 0, 2);
        __builtin_prefetch(static_cast<const char*>(nx.v) + off, 0, 2);
      }
    }
    qk_block(t.q, R, static_cast<const E*>(bv.k), n, D, sc.s, sc.ld);
    for (int r = 0; r < R; ++r) {
      float* s = sc.s + size_t(r) * sc.ld;
      a[r] = std::max(0, std::min(n, t.lo[r] - base));
      e[r] = std::max(0, std::min(n, t.hi[r] - base));
      for (int j = n; j < npad; ++j) s[j] = 0.f;   // padding read by the vector loops
      if (a[r] >= e[r]) {                          // nothing visible in this block
        for (int j = 0; j < npad; ++j) s[j] = 0.f;
        continue;
      }
      if (bv.kscale)
        for (int j = 0; j < n; ++j) s[j] *= bv.kscale[j];
      if (t.softcap > 0.f) softcap_row(s, npad, t.softcap);
      float bm = ninf;
      for (int j = a[r]; j < e[r]; ++j) bm = std::max(bm, s[j]);
      const float m_new = std::max(sc.m[r], bm);
      const float corr = sc.m[r] == ninf ? 0.f : std::exp(sc.m[r] - m_new);
      exp_row(s, npad, m_new);
      for (int j = 0; j < a[r]; ++j) s[j] = 0.f;
      for (int j = e[r]; j < npad; ++j) s[j] = 0.f;
      float sum = 0.f;
      for (int j = a[r]; j < e[r]; ++j) sum += s[j];
      sc.l[r] = sc.l[r] * corr + sum;
      sc.m[r] = m_new;
      if (corr != 1.f) {
        float* acc = sc.acc + size_t(r) * D;
        for (int d = 0; d < D; ++d) acc[d] *= corr;
      }
      if (bv.vscale)
        for (int j = a[r]; j < e[r]; ++j) s[j] *= bv.vscale[j];
    }
    pv_block(sc.s, sc.ld, R, a, e, static_cast<const E*>(bv.v), D, sc.acc);
  }
  for (int r = 0; r < R; ++r) {
    const float inv = 1.f / sc.l[r];
    const float* acc = sc.acc + size_t(r) * D;
    float* o = t.out[r];
    for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
  }
}

void run_task(const attn::Task& t, const attn::Scratch& sc) {
  switch (t.dtype) {
    case KVDtype::F32: run_task_typed<float>(t, sc); break;
    case KVDtype::F16: run_task_typed<uint16_t>(t, sc); break;
    case KVDtype::I8: run_task_typed<int8_t>(t, sc); break;
  }
}


// =====================================================================================
// Prefill tile kernel (many query rows per kv head). The naive twin is still attend_reference().
//
// pack_block: kp / vp (attention_kernels.h): keys and values in f32, int8 scales folded in, in
// chunks of CW = kChunk keys (K) or dims (V), so both passes stream contiguous memory. (The cache's
// own rows of one kv head sit at power-of-two strides, which alias in L1 / L2.)
// run_tile, for rows = tokens x heads of one GQA group and the columns [0, Lw) of S, i.e. packed
// keys xs + [0, Lw) (xs: the tile's first visible key rounded down to CW; key0 = k0 + xs):
//   pass 1  S [rows, Lw] = Q K^T                 qk_tile: kTileRows rows x kTileVecs vectors of
//                                                keys per register tile, q[r][d] broadcast, sums
//                                                over d in order (no horizontal reductions)
//           per row r: softcap, mask to [lo_r, hi_r) (zero elsewhere), max, p = exp(s - max),
//           inv_r = 1 / sum p
//   pass 2  out_r = inv_r * sum_j p[r, j] V_j    pv_tile: kTileRows rows x kTileVecs vectors of
//                                                head_dim per register tile, p broadcast, over the
//                                                union of the group's visible keys (p = 0 outside
//                                                a row's range, so adding it changes nothing)
// Each row's sums run in the same order whatever rows it is grouped with, so results do not
// depend on the tiling of rows into tasks or on the thread count.

constexpr int kTileRows = 6;
constexpr int kChunk = V::kTileVecs * V::W;   // CW

template <class E>
void pack_typed(const attn::PackJob& pj) {
  constexpr int CW = kChunk;
  const int D = pj.D, np = pj.np;
  const E* K = static_cast<const E*>(pj.view->k);
  const E* Vs = static_cast<const E*>(pj.view->v);
  const float* ks = pj.view->kscale;
  const float* vs = pj.view->vscale;
  float tmp[V::W];
  for (int j = 0; j < pj.count; ++j) {
    const int row = pj.first + j, x = pj.x0 + j;
    // K: kp[(x / CW) * D * CW + d * CW + x % CW]
    const E* kr = K + size_t(row) * D;
    const typename V::vec kscale = V::set1(ks ? ks[row] : 1.f);
    float* kd = pj.kp + size_t(x / CW) * D * CW + x % CW;
    for (int d = 0; d < D; d += V::W) {
      const int n = std::min(V::W, D - d);
      V::store(tmp, V::mul(n == V::W ? V::load(kr + d) : V::load_tail(kr + d, n), kscale));
      for (int i = 0; i < n; ++i) kd[size_t(d + i) * CW] = tmp[i];
    }
    // V: vp[(d / CW) * np * CW + x * CW + d % CW], lanes past D zero
    const E* vr = Vs + size_t(row) * D;
    const typename V::vec vscale = V::set1(vs ? vs[row] : 1.f);
    for (int d = 0; d < D; d += CW) {
      float* vd = pj.vp + (size_t(d / CW) * np + x) * CW;
      for (int c = 0; c < V::kTileVecs; ++c) {
        const int n = std::max(0, std::min(V::W, D - d - c * V::W));
        const typename V::vec v = n == V::W ? V::load(vr + d + c * V::W)
                                            : n > 0 ? V::load_tail(vr + d + c * V::W, n) : V::zero();
        V::store(vd + c * V::W, V::mul(v, vscale));
      }
    }
  }
  if (pj.last) {   // zero the padding keys [x0 + count, np)
    const int xe = pj.x0 + pj.count;
    for (int d = 0; d < D; ++d)
      for (int x = xe; x < np; ++x) pj.kp[size_t(x / CW) * D * CW + size_t(d) * CW + x % CW] = 0.f;
    for (int d = 0; d < D; d += CW)
      for (int x = xe; x < np; ++x)
        for (int i = 0; i < CW; ++i) pj.vp[(size_t(d / CW) * np + x) * CW + i] = 0.f;
  }
}

void pack_block(const attn::PackJob& pj) {
  switch (pj.dtype) {
    case KVDtype::F32: pack_typed<float>(pj); break;
    case KVDtype::F16: pack_typed<uint16_t>(pj); break;
    case KVDtype::I8: pack_typed<int8_t>(pj); break;
  }
}

// Calls fn(std::integral_constant<int, R>, r0) for row groups [r0, r0 + R) covering [0, rows):
// full groups of kTileRows, then one group of the remaining rows.
template <class Fn>
inline void for_row_groups(int rows, Fn&& fn) {
  static_assert(kTileRows == 6, "for_row_groups handles remainders up to 5 rows");
  int r0 = 0;
  for (; r0 + kTileRows <= rows; r0 += kTileRows) fn(std::integral_constant<int, kTileRows>(), r0);
  switch (rows - r0) {
    case 1: fn(std::integral_constant<int, 1>(), r0); break;
    case 2: fn(std::integral_constant<int, 2>(), r0); break;
    case 3: fn(std::integral_constant<int, 3>(), r0); break;
    case 4: fn(std::integral_constant<int, 4>(), r0); break;
    case 5: fn(std::integral_constant<int, 5>(), r0); break;
    default: break;
  }
}

// s[(r0 + r) * lds + i] = sum_d q[r0 + r][d] * kc[d * CW + i]   (r < R, i < CW; kc: one key chunk)
template <int R>
inline void qk_tile(const float* const* q, int r0, const float* kc, int D, float* s, int lds) {
  constexpr int C = V::kTileVecs;
  typename V::vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const float* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = q[r0 + r];
  for (int d = 0; d < D; ++d) {
    typename V::vec k[C];
    for (int c = 0; c < C; ++c) k[c] = V::load(kc + size_t(d) * kChunk + c * V::W);
    for (int r = 0; r < R; ++r) {
      const typename V::vec qv = V::set1(qr[r][d]);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fma(qv, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) V::store(s + size_t(r0 + r) * lds + c * V::W, acc[r][c]);
}

// out[r0 + r][d0 + i] = inv[r0 + r] * sum_{col in [ca, ce)} s[(r0 + r) * lds + col] * vc[col * CW + i]
// for i < min(CW, D - d0); vc: the value chunk of dims [d0, d0 + CW), row col = packed key xs + col.
template <int R>
inline void pv_tile(const float* s, int lds, int r0, const float* vc, int ca, int ce, int D, int d0,
                    const float* inv, float* const* out) {
  constexpr int C = V::kTileVecs;
  typename V::vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
  const float* sr[R];
  for (int r = 0; r < R; ++r) sr[r] = s + size_t(r0 + r) * lds;
  for (int col = ca; col < ce; ++col) {
    typename V::vec v[C];
    for (int c = 0; c < C; ++c) v[c] = V::load(vc + size_t(col) * kChunk + c * V::W);
    for (int r = 0; r < R; ++r) {
      const typename V::vec p = V::set1(sr[r][col]);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fma(p, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const typename V::vec iv = V::set1(inv[r0 + r]);
    for (int c = 0; c < C; ++c) {
      const int n = std::min(V::W, D - d0 - c * V::W);   // valid lanes of this vector
      if (n >= V::W)
        V::store(out[r0 + r] + d0 + c * V::W, V::mul(acc[r][c], iv));
      else if (n > 0)
        V::store_tail(out[r0 + r] + d0 + c * V::W, V::mul(acc[r][c], iv), n);
    }
  }
}


void run_tile(const attn::TileTask& tt, const attn::TileScratch& sc) {
  constexpr int CW = kChunk;
  const attn::Task& t = tt.rows;
  const int R = t.rows, D = t.D, lds = sc.ld, np = tt.np;
  int ulo = t.lo[0], uhi = t.hi[0];
  for (int r = 1; r < R; ++r) ulo = std::min(ulo, t.lo[r]), uhi = std::max(uhi, t.hi[r]);
  const int xs = (ulo - tt.k0) / CW * CW;                   // first packed key used (chunk-aligned)
  const int Lw = (uhi - tt.k0 + CW - 1) / CW * CW - xs;     // columns of S, a multiple of CW (<= np)
  const int key0 = tt.k0 + xs;                              // key of S column 0

  int ua[attn::kMaxRows], ue[attn::kMaxRows];   // per row group (at its first row): visible columns
  for_row_groups(R, [&](auto rc, int r0) {
    int a = t.lo[r0], e = t.hi[r0];
    for (int r = 1; r < decltype(rc)::value; ++r) a = std::min(a, t.lo[r0 + r]), e = std::max(e, t.hi[r0 + r]);
    ua[r0] = a - key0;
    ue[r0] = e - key0;
  });

  // ---- pass 1: S = Q K^T, one key chunk at a time (it stays in L1 across the row groups); chunks
  // a row group cannot see are skipped (their columns are zeroed below) ----
  for (int x = 0; x < Lw; x += CW) {
    const float* kc = tt.kp + size_t(xs + x) * D;   // chunk (xs + x) / CW: [D, CW]
    for_row_groups(R, [&](auto rc, int r0) {
      if (x + CW > ua[r0] && x < ue[r0]) qk_tile<decltype(rc)::value>(t.q, r0, kc, D, sc.s + x, lds);
    });
  }

  // ---- softcap, mask, softmax (unnormalized; 1 / sum kept in inv) ----
  for (int r = 0; r < R; ++r)
    sc.inv[r] = softmax_row(sc.s + size_t(r) * lds, t.lo[r] - key0, t.hi[r] - key0, Lw, t.softcap);

  // ---- pass 2: out = inv * (P V), one head_dim chunk at a time ----
  for (int d0 = 0; d0 < D; d0 += CW) {
    const float* vc = tt.vp + (size_t(d0 / CW) * np + xs) * CW;   // [Lw, CW] from column 0
    for_row_groups(R, [&](auto rc, int r0) {
      pv_tile<decltype(rc)::value>(sc.s, lds, r0, vc, ua[r0], ue[r0], D, d0, sc.inv, t.out);
    });
  }
}

}  // namespace
