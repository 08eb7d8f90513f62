// Internal interface between the attention driver (attention.cpp) and the per-ISA kernels
// (attention_avx2.cpp, attention_avx512.cpp, attention_neon.cpp, all built from
// attention_simd.inl). Not part of the public API.
#pragma once
#include <cstdint>

#include "kv_cache.h"

namespace engine {
namespace attn {

// One unit of work: `rows` query rows (tokens x heads of one GQA group) of one slot against the
// rows of one (layer, slot, kv head), streamed block by block with an online softmax.
struct Task {
  int rows;                   // <= kMaxRows
  int D;
  int block_tokens;           // B
  KVDtype dtype;
  const float* const* q;      // [rows] -> [D], rotated and multiplied by the score scale
  float* const* out;          // [rows] -> [D]
  const int* lo;              // [rows] first visible key
  const int* hi;              // [rows] one past the last visible key (hi > lo)
  const KVBlockView* blocks;  // [ceil(max hi / B)] this (layer, slot, kv head)'s blocks
  float softcap;              // <= 0: off
};

constexpr int kMaxRows = 64;

// Scratch for one thread: scores/probs [kMaxRows, ld] and accumulators [kMaxRows, D].
inline int scores_ld(int block_tokens) { return (block_tokens + 15) / 16 * 16 + 16; }
struct Scratch {
  int ld;       // scores_ld(B): a multiple of 16 with room for vector padding
  float* s;     // kMaxRows * ld floats
  float* acc;   // kMaxRows * D floats
  float* m;     // kMaxRows (running max)
  float* l;     // kMaxRows (running sum)
};

using TaskFn = void (*)(const Task& task, const Scratch& scratch);

// Null when the build has no such kernels (the dispatcher then falls back to the reference).
TaskFn avx2_task();
TaskFn avx512_task();
TaskFn neon_task();

}  // namespace attn
}  // namespace engine
