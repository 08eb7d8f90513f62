// The native decoder: graph decoder_i of export/graph_def.py (build_decoder_boundary) computed in
// C++ from per-row int8 weights (linear_int8.h), for artifacts whose decoder matrices are all
// per-row int8. Boundary i finishes layer i - 1 (o_proj, Gemma 2 post-attention norm, residual,
// MLP block) when i > 0 and starts layer i (input norm, q/k/v projections, un-rotated: the
// attention kernels apply RoPE) when i < L:
//
//   end:    o = attn Wo;  [Gemma 2: o = rms(o, post_attention)]   x = hidden + o
//           h = rms(x, Gemma 2 ? pre_feedforward : post_attention)
//           h = (gelu_tanh(h Wgate) * (h Wup)) Wdown;  [Gemma 2: h = rms(h, post_feedforward)]
//           hidden_out = x + h
//   start:  h = rms(x, input);  q = h Wq, k = h Wk, v = h Wv
//
// rms(x, w1) = x / sqrt(mean(x^2) + eps) * w1, w1 = 1 + w (precomputed by the exporter, fp32).
// gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh by the rational
// approximation onnxruntime's MLAS uses (|x| clamped to 9). Rows are independent tokens.
#pragma once
#include <cstdint>
#include <vector>

#include "linear_int8.h"

namespace engine {

struct DecoderBoundary {
  bool has_end = false, has_start = false, gemma2 = false;
  int D = 0;                       // hidden size
  int attn_width = 0;              // H * head_dim (input of o_proj)
  int F = 0;                       // MLP width
  int q_width = 0, kv_width = 0;   // H * head_dim, KV * head_dim
  float eps = 1e-6f;
  PackedLinear o, gate, up, down, q, k, v;
  // (1 + w) norm weights [D]; null where the boundary has no such norm
  const float* post_attention = nullptr;   // Gemma 2: on o; Gemma 1: the MLP's input norm
  const float* pre_feedforward = nullptr;  // Gemma 2 only
  const float* post_feedforward = nullptr; // Gemma 2 only
  const float* input = nullptr;            // start of layer i
};

// Outputs: hidden_out [T, D] (end only), q [T, q_width], k and v [T, kv_width] (start only).
struct BoundaryOutputs {
  float* hidden_out = nullptr;
  float* q = nullptr;
  float* k = nullptr;
  float* v = nullptr;
};

// The temporaries of run_decoder_boundary (the norm's output, o / down output, gate, up), kept
// by the caller across the boundaries of one forward pass: a 448 px prefill's gate and up are
// 1,030 x 9,216 floats, 38 MB each, above glibc's largest mmap threshold (32 MB), so allocated
// per boundary they were fresh pages every time (~20% of the native prefill at 1,030 rows).
// The MLP runs on row blocks of at most mlp_rows (balanced: 1,030 rows are 3 x 344), so gate
// and up hold one block: at 448 px 13 MB each instead of 38 (-51 MB of peak RSS). The rows of
// a linear layer are independent, so the blocks change no result. One caller at a time.
constexpr int kMlpRows = 512;
struct DecoderScratch {
  std::vector<float> h, o, g, u;
  int mlp_rows = kMlpRows;
};

// hidden [T, D]; attn [T, attn_width] (end only, else ignored). Runs on the current pool.
// Throws std::invalid_argument on a non-finite input to a linear layer.
void run_decoder_boundary(const DecoderBoundary& b, const float* hidden, const float* attn, int T,
                          const BoundaryOutputs& out, DecoderScratch& scratch);

// The elementwise pieces, exposed for tests: y = rms(x, w1) per row; g = gelu_tanh(g) * u;
// x = gelu_tanh(x) (the vision tower's MLP, vision_tower.h). On the current pool.
void rms_norm_rows(const float* x, int T, int D, const float* w1, float eps, float* y);
void gelu_mul(float* g, const float* u, int64_t n);
void gelu_inplace(float* x, int64_t n);
float gelu_tanh_scalar(float x);

}  // namespace engine
