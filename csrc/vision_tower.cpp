// The native vision tower (vision_tower.h): layer norms, biases and the residual stream around the
// per-row int8 linear layers and the core's attention, on the current thread pool.
#include "vision_tower.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "decoder_layer.h"
#include "thread_pool.h"

namespace engine {

namespace {

constexpr int kLanes = 16;   // independent partial sums: the compiler vectorizes them

float row_sum(const float* x, int D) {
  float acc[kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[d + j];
  float s = 0.f;
  for (; d < D; ++d) s += x[d];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// sum (x - shift) and sum (x - shift)^2 of one row
void row_shifted_sums(const float* x, int D, float shift, float* sum, float* squares) {
  float a[kLanes] = {}, q[kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float c = x[d + j] - shift;
      a[j] += c;
      q[j] += c * c;
    }
  float s = 0.f, ss = 0.f;
  for (; d < D; ++d) {
    s += x[d] - shift;
    ss += (x[d] - shift) * (x[d] - shift);
  }
  for (int j = 0; j < kLanes; ++j) {
    s += a[j];
    ss += q[j];
  }
  *sum = s;
  *squares = ss;
}

// y[r, :O] += bias for rows [0, M) of row stride ldy
void add_bias(float* y, int M, int O, int64_t ldy, const float* bias) {
  parallel_chunks(M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = y + r * ldy;
      for (int o = 0; o < O; ++o) yr[o] += bias[o];
    }
  });
}

// y = x W^T + b for rows [M, w.O], row stride ldy (a linear_int8 call, then the bias)
void biased_linear(const float* x, int M, const BiasedLinear& l, float* y, int64_t ldy) {
  linear_int8(x, M, l.w, y, ldy);
  add_bias(y, M, l.w.O, ldy, l.bias);
}

void add_into(float* x, const float* a, int64_t n) {
  parallel_chunks(n, int64_t(1) << 16, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) x[i] += a[i];
  });
}

void check_tower(const VisionTower& t, int N) {
  if (N < 1) throw std::invalid_argument("vision tower: needs at least one image");
  if (t.image_size < 1 || t.patch_size < 1 || t.image_size % t.patch_size != 0 || t.channels < 1)
    throw std::invalid_argument("vision tower: image_size must be a positive multiple of patch_size");
  if (t.heads < 1 || t.head_dim < 1 || t.heads * t.head_dim != t.D || t.F < 1 || t.out_dim < 1)
    throw std::invalid_argument("vision tower: needs heads * head_dim == hidden size and positive widths");
  if (t.mlp_stride < t.F) throw std::invalid_argument("vision tower: mlp_stride must be >= the MLP width");
  for (const VisionLayer& l : t.layers)
    if (l.fc2.w.K != t.mlp_stride) throw std::invalid_argument("vision tower: fc2's K must equal mlp_stride");
  const int64_t rows = int64_t(N) * t.tokens();
  if (rows > (int64_t(1) << 24)) throw std::invalid_argument("vision tower: too many images in one call");
}

}  // namespace

void extract_patches(const float* pixels, int N, int C, int S, int p, float* patches) {
  const int G = S / p, K = C * p * p;
  parallel_chunks(int64_t(N) * G, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t ng = r0; ng < r1; ++ng) {          // one row of patches of one image
      const int64_t n = ng / G;
      const int gy = int(ng % G);
      for (int gx = 0; gx < G; ++gx) {
        float* dst = patches + ((n * G + gy) * G + gx) * K;
        for (int c = 0; c < C; ++c)
          for (int py = 0; py < p; ++py) {
            const float* src = pixels + ((n * C + c) * S + (gy * p + py)) * int64_t(S) + gx * p;
            std::copy(src, src + p, dst + (c * p + py) * p);
          }
      }
    }
  });
}

void layer_norm_rows(const float* x, int T, int D, const float* w, const float* b, float eps, float* y) {
  parallel_chunks(T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      float* yr = y + r * D;
      // the corrected two-pass algorithm: sums about a first estimate of the mean, so a row far
      // from zero (mean >> spread) keeps its variance in float
      const float mean0 = row_sum(xr, D) / float(D);
      float s = 0.f, ss = 0.f;
      row_shifted_sums(xr, D, mean0, &s, &ss);
      const float c = s / float(D);                     // mean = mean0 + c, kept as the two parts
      const float inv = 1.f / std::sqrt(std::max(0.f, ss / float(D) - c * c) + eps);
      for (int d = 0; d < D; ++d) yr[d] = ((xr[d] - mean0) - c) * inv * w[d] + b[d];
    }
  });
}

void run_vision_tower(const VisionTower& t, const float* pixels, int N, float* out) {
  check_tower(t, N);
  const int P = t.tokens(), D = t.D, K0 = t.channels * t.patch_size * t.patch_size;
  const int M = N * P;
  const int64_t MD = int64_t(M) * D;
  // One allocation per call, none per layer: x, h, q, k, v, attention output [M, D]; MLP
  // activations [M, mlp_stride].
  std::vector<float> patches(size_t(M) * K0), x(MD), h(MD), q(MD), k(MD), v(MD), a(MD);
  std::vector<float> f(size_t(M) * t.mlp_stride);   // zero-initialized: the padding columns stay 0
  extract_patches(pixels, N, t.channels, t.image_size, t.patch_size, patches.data());
  biased_linear(patches.data(), M, t.patch, x.data(), D);                         // [M, D]
  parallel_chunks(M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* pos = t.position + (r % P) * D;
      float* xr = x.data() + r * D;
      for (int d = 0; d < D; ++d) xr[d] += pos[d];
    }
  });
  // The attention's cache: one layer, one slot per image, every token in the prefix block.
  KVCache cache(1, t.heads, t.head_dim, N, P, t.attn_dtype);
  std::vector<int> slots(N);
  std::iota(slots.begin(), slots.end(), 0);
  std::vector<int32_t> positions(M);
  for (int m = 0; m < M; ++m) positions[m] = m % P;
  AttentionParams params;
  params.scale = 1.f / std::sqrt(float(t.head_dim));
  params.rope_theta = 0.f;
  for (const VisionLayer& l : t.layers) {
    layer_norm_rows(x.data(), M, D, l.ln1_w, l.ln1_b, t.eps, h.data());
    // q, k, v: one quantization of h for the three (linear_int8_many), then the biases
    const PackedLinear* ws[3] = {&l.q.w, &l.k.w, &l.v.w};
    float* ys[3] = {q.data(), k.data(), v.data()};
    const int64_t ld[3] = {D, D, D};
    linear_int8_many(h.data(), M, 3, ws, ys, ld);
    add_bias(q.data(), M, D, D, l.q.bias);
    add_bias(k.data(), M, D, D, l.k.bias);
    add_bias(v.data(), M, D, D, l.v.bias);
    cache.reset();
    for (int s = 0; s < N; ++s) cache.set_prefix_length(s, P);
    attention(cache, 0, q.data(), k.data(), v.data(), t.heads, slots, P, positions.data(), params, a.data());
    biased_linear(a.data(), M, l.o, h.data(), D);
    add_into(x.data(), h.data(), MD);
    layer_norm_rows(x.data(), M, D, l.ln2_w, l.ln2_b, t.eps, h.data());
    biased_linear(h.data(), M, l.fc1, f.data(), t.mlp_stride);                      // [M, F] (stride)
    gelu_inplace(f.data(), int64_t(M) * t.mlp_stride);                              // gelu(0) = 0
    biased_linear(f.data(), M, l.fc2, h.data(), D);                                 // [M, D]
    add_into(x.data(), h.data(), MD);
  }
  layer_norm_rows(x.data(), M, D, t.post_w, t.post_b, t.eps, h.data());
  biased_linear(h.data(), M, t.projector, out, t.out_dim);                        // [M, out_dim]
}

}  // namespace engine
