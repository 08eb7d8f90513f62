// Elementwise softmax pieces of the attention kernels over the vector-ops struct V (see
// attention_simd.inl, which includes this file; attention_amx.cpp includes it too for its
// fp32 softmax). Include inside a namespace that defines V, within an anonymous namespace.

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

// x[0, n) = c * tanh(x / c) (see softcap_row), any n.
inline void softcap_span(float* x, int n, float c) {
  const typename V::vec inv2 = V::set1(2.f / c), cv = V::set1(c), one = V::set1(1.f), two = V::set1(2.f);
  for (int j = 0; j < n; j += V::W) {
    const int m = std::min(V::W, n - j);
    const typename V::vec xv = m == V::W ? V::load(x + j) : V::load_tail(x + j, m);
    const typename V::vec ex = vexp(V::mul(xv, inv2));
    const typename V::vec y = V::mul(cv, V::sub(one, V::div(two, V::add(ex, one))));
    if (m == V::W)
      V::store(x + j, y);
    else
      V::store_tail(x + j, y, m);
  }
}

// x[0, n) = exp(x - m); returns the sum (n >= 1).
inline float exp_sum_span(float* x, int n, float m) {
  const typename V::vec mv = V::set1(m);
  typename V::vec acc = V::zero();
  int j = 0;
  for (; j + V::W <= n; j += V::W) {
    const typename V::vec e = vexp(V::sub(V::load(x + j), mv));
    V::store(x + j, e);
    acc = V::add(acc, e);
  }
  float sum = V::reduce(acc);
  if (j < n) {
    V::store_tail(x + j, vexp(V::sub(V::load_tail(x + j, n - j), mv)), n - j);
    for (; j < n; ++j) sum += x[j];
  }
  return sum;
}

inline float max_span(const float* x, int n) {
  float m = -std::numeric_limits<float>::infinity();
  int j = 0;
  if (n >= V::W) {
    typename V::vec mv = V::load(x);
    for (j = V::W; j + V::W <= n; j += V::W) mv = V::max(mv, V::load(x + j));
    float tmp[V::W];
    V::store(tmp, mv);
    for (int i = 0; i < V::W; ++i) m = std::max(m, tmp[i]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// The tile kernels' softmax of one row of S [0, Lw): visible columns [a, e) (e > a) softcapped
// (softcap > 0), p = exp(s - max) there, 0 elsewhere; returns 1 / sum p.
inline float softmax_row(float* s, int a, int e, int Lw, float softcap) {
  if (softcap > 0.f) softcap_span(s + a, e - a, softcap);
  const float m = max_span(s + a, e - a);
  const float inv = 1.f / exp_sum_span(s + a, e - a, m);
  for (int j = 0; j < a; ++j) s[j] = 0.f;
  for (int j = e; j < Lw; ++j) s[j] = 0.f;
  return inv;
}
