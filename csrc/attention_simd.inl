// Blocked attention kernel, written once over a small vector-ops struct `V` and compiled per ISA:
// attention_avx512.cpp, attention_avx2.cpp and attention_neon.cpp each define V (W floats per
// vector) inside their own namespace and then #include this file, so each copy gets its own
// -m flags and there is no ODR clash. The naive twin is attend_reference() in attention.cpp.
//
// For one task (rows = tokens x heads of one GQA group, one kv head) and each key block b:
//   S[r, j]  = q_r . K_j (* kscale_j)          qk_block: 4 rows x 2 keys per register tile
//   S        = softcap * tanh(S / softcap)      (if on)
//   online softmax over the row's visible keys [lo_r, hi_r):
//     m' = max(m, max_j S), corr = exp(m - m'), P = exp(S - m'), l = l * corr + sum P, acc *= corr
//   acc_r += sum_j P[r, j] (* vscale_j) V_j     pv_block: 4 rows per register tile
// and finally out_r = acc_r / l_r. Every dot product / accumulation is computed in the same order
// whatever the row grouping, so results do not depend on how rows are split into tasks (threads).
//
// Requires from V:  W, vec, zero, set1, load(const E*), load_tail(const E*, n) (zero-filled),
// store, store_tail, fma(a, b, c) = a*b + c, add, sub, mul, div, min, max, round (to nearest),
// pow2(n) = 2^n for integral n in [-126, 127], reduce (horizontal sum)
// (E = float, uint16_t (IEEE half), int8_t).

namespace {

// exp(x), Cephes-style: 2^round(x log2 e) * poly(r); relative error ~1e-7; x clamped to [-87, 88].
inline typename V::vec vexp(typename V::vec x) {
  x = V::min(V::max(x, V::set1(-87.0f)), V::set1(88.0f));
  const typename V::vec fx = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  x = V::sub(x, V::mul(fx, V::set1(0.693359375f)));
  x = V::sub(x, V::mul(fx, V::set1(-2.12194440e-4f)));
  typename V::vec y = V::set1(1.9875691500e-4f);
  y = V::fma(y, x, V::set1(1.3981999507e-3f));
  y = V::fma(y, x, V::set1(8.3334519073e-3f));
  y = V::fma(y, x, V::set1(4.1665795894e-2f));
  y = V::fma(y, x, V::set1(1.6666665459e-1f));
  y = V::fma(y, x, V::set1(5.0000001201e-1f));
  y = V::fma(y, V::mul(x, x), V::add(x, V::set1(1.f)));
  return V::mul(y, V::pow2(fx));
}

// ---- S[r0..r0+R, j0..j0+J] = q . K ----
template <int R, int J, class E>
inline void dot_tile(const float* const* q, int r0, const E* K, int j0, int D, float* s, int ld) {
  typename V::vec acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < J; ++c) acc[r][c] = V::zero();
  const int Dfull = D / V::W * V::W;
  for (int d = 0; d < Dfull; d += V::W) {
    typename V::vec k[J];
    for (int c = 0; c < J; ++c) k[c] = V::load(K + size_t(j0 + c) * D + d);
    for (int r = 0; r < R; ++r) {
      const typename V::vec qv = V::load(q[r0 + r] + d);
      for (int c = 0; c < J; ++c) acc[r][c] = V::fma(qv, k[c], acc[r][c]);
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

template <class E>
void qk_block(const float* const* q, int rows, const E* K, int n, int D, float* s, int ld) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    int j = 0;
    for (; j + 2 <= n; j += 2) dot_tile<4, 2>(q, r, K, j, D, s, ld);
    for (; j < n; ++j) dot_tile<4, 1>(q, r, K, j, D, s, ld);
  }
  for (; r < rows; ++r) {
    int j = 0;
    for (; j + 2 <= n; j += 2) dot_tile<1, 2>(q, r, K, j, D, s, ld);
    for (; j < n; ++j) dot_tile<1, 1>(q, r, K, j, D, s, ld);
  }
}

// ---- acc[r0..r0+R] += sum_{j in [a, e)} p[r, j] * V_j ----
template <int R, class E>
inline void pv_tile(const float* p, int ld, int r0, const E* Vd, int a, int e, int D, float* acc) {
  const int Dfull = D / V::W * V::W;
  for (int d = 0; d < Dfull; d += V::W) {
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

}  // namespace
