// Decoder self-attention over the KV cache: RoPE on q and k at explicit positions, append k and v
// to the cache, then prefix-LM / GQA / softcap / sliding-window attention (PALIGEMMA.md).
//
// One call handles one layer for N slots with T new tokens each (prefill: N = 1, T = prompt;
// decode: N = beams, T = 1). Rows are slot-major: row m = i * T + t is token t of slots[i].
//   q   [N*T, H, D]   k, v [N*T, KV, D]   positions [N*T]   out [N*T, H*D]      (float32)
// Query row m sits at cache index j = layer_length(slot) + t (after the append). Key i is visible
// to it iff (i <= j and (window <= 0 or j - i < window)) or (i < P and j < P), P = the slot's
// prefix_length; so each query sees one contiguous key range.
// Scores: s = scale * q.k; if softcap > 0: s = softcap * tanh(s / softcap); then the mask; then a
// numerically stable softmax in fp32. H query heads share KV heads: head h uses kv head h / (H/KV).
// RoPE cos / sin come from the cache's tables (KVCache::rope_tables, attention_rope.h), computed
// once per position. Kernels: the scalar reference, and per ISA a blocked online-softmax kernel for
// decode (fewer than 24 query rows per kv head) and a packed-key two-pass tile kernel for prefill.
#pragma once
#include <cstdint>
#include <vector>

#include "kv_cache.h"

namespace engine {

struct AttentionParams {
  float scale = 0.f;          // 1/sqrt(head_dim) or 1/sqrt(query_pre_attn_scalar); must be > 0
  float softcap = 0.f;        // <= 0: off (Gemma 2: 50)
  int window = 0;             // <= 0: off (Gemma 2 sliding layers: 4096); the prefix block is exempt
  float rope_theta = 10000.f; // <= 0: no RoPE (SigLIP-shaped uses)
};

// Validates everything first (throws std::invalid_argument / std::out_of_range / std::logic_error
// and leaves the cache untouched), then appends and attends. Uses the kernel chosen by
// active_simd() (Scalar = the naive reference below) and the global thread pool.
void attention(KVCache& cache, int layer, const float* q, const float* k, const float* v,
               int num_heads, const std::vector<int>& slots, int tokens_per_slot,
               const int32_t* positions, const AttentionParams& params, float* out);

// Split of attention() for tests and callers that manage the append themselves.
// Rotates k at `positions` and stores k, v for every slot (validation included).
void attention_append(KVCache& cache, int layer, const float* k, const float* v,
                      const std::vector<int>& slots, int tokens_per_slot, const int32_t* positions,
                      float rope_theta);
// Attends the queries of the last `tokens_per_slot` tokens of each slot to the cache (q un-rotated).
void attention_attend(const KVCache& cache, int layer, const float* q, int num_heads,
                      const std::vector<int>& slots, int tokens_per_slot, const int32_t* positions,
                      const AttentionParams& params, float* out);

// RoPE (half-split / rotate_half): x [rows, heads, D] rotated in place at positions[rows]
// (rope_row / rope_apply of attention_rope.h):
// angle_i = float(pos) * inv_freq_i (fp32, as transformers), inv_freq_i = theta^(-2i/D), i < D/2;
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin for the halves x1 = x[:D/2], x2 = x[D/2:].
void rope_inplace(float* x, int rows, int heads, int D, const int32_t* positions, float theta);

}  // namespace engine
