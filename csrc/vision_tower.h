// The native vision tower: graph "vision" of export/graph_def.py (build_vision: SigLIP and the
// linear projector) computed in C++ from per-row int8 weights (linear_int8.h), for artifacts whose
// vision matrices are all per-row int8. For N images of S x S pixels, p x p patches, G = S / p,
// P = G * G tokens per image:
//
//   x = patches(pixels) Wpatch + bpatch + position         patches: [N*P, C*p*p], (C, py, px) order
//   per layer:  h = ln(x, ln1);  q, k, v = h Wq + bq, h Wk + bk, h Wv + bv      [N*P, heads*hd]
//               a = softmax(q k^T / sqrt(hd)) v  per image and head (bidirectional)
//               x = x + (a Wo + bo)
//               h = ln(x, ln2);  x = x + (gelu_tanh(h Wfc1 + b1) Wfc2 + b2)
//   out = ln(x, post) Wproj + bproj                         [N, P, text hidden size] (unscaled)
//
// ln(x, w, b) = (x - mean) / sqrt(var + eps) * w + b per row (biased variance). Each linear layer
// is the graph's per-row int8 MatMulIntegerToFloat, bit for bit, then + bias in fp32; the
// attention is the core's (attention.h, no RoPE, every token in the prefix block), on a KV cache
// of the tower's own (f16 at the amx level: AMX-BF16 tiles; f32 elsewhere). Rows are tokens:
// all N*P rows go through each linear layer in one call; images only meet in the attention,
// which keeps them apart (one cache slot each).
#pragma once
#include <cstdint>
#include <vector>

#include "kv_cache.h"
#include "linear_int8.h"

namespace engine {

struct BiasedLinear {
  PackedLinear w;
  const float* bias = nullptr;   // [w.O]
};

struct VisionLayer {
  const float *ln1_w = nullptr, *ln1_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr;   // [D] each
  BiasedLinear q, k, v, o, fc1, fc2;
};

struct VisionTower {
  int image_size = 0, patch_size = 0, channels = 3;
  int D = 0, F = 0, heads = 0, head_dim = 0;   // hidden size, MLP width; heads * head_dim == D
  int out_dim = 0;                             // projector output (the text model's hidden size)
  // fc2's K: F, or F rounded up to 64 with zero codes in the extra rows, so that the AMX kernel
  // (K4 % 64 == 0) takes the MLP's second matrix too (SigLIP's 4,304 is 64 x 67 + 16). The
  // MLP activations are kept with this row stride, their padding columns zero: a zero column
  // quantizes to the zero point and adds exactly nothing, so the results are the same bits.
  int mlp_stride = 0;
  float eps = 1e-6f;
  KVDtype attn_dtype = KVDtype::F32;
  BiasedLinear patch;                          // C*p*p -> D
  const float* position = nullptr;             // [P, D]
  std::vector<VisionLayer> layers;
  const float *post_w = nullptr, *post_b = nullptr;
  BiasedLinear projector;                      // D -> out_dim
  int grid() const { return image_size / patch_size; }
  int tokens() const { return grid() * grid(); }
};

// pixels [N, C, S, S] -> out [N, P, out_dim]. Runs on the current pool. Throws
// std::invalid_argument for bad sizes or a non-finite value reaching a linear layer.
void run_vision_tower(const VisionTower& t, const float* pixels, int N, float* out);

// The pieces, exposed for tests. patches: pixels [N, C, S, S] -> [N * G * G, C * p * p].
void extract_patches(const float* pixels, int N, int C, int S, int p, float* patches);
// y = (x - mean) / sqrt(var + eps) * w + b per row of x [T, D] (y may be x).
void layer_norm_rows(const float* x, int T, int D, const float* w, const float* b, float eps, float* y);

}  // namespace engine
