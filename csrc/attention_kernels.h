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

// ---- Prefill (many query rows per kv head): packed keys / values, then tiles of rows in two passes ----
// The keys k0 + x, x < n, of one (layer, slot, kv head) are packed once per call in f32 with the
// int8 scales folded in, zero-padded to np = round_up(n, CW) keys and nc = ceil(D / CW) chunks of
// CW = Kernels::chunk dims (one register-tile row), so the tile kernel streams contiguous memory:
//   kp [np / CW, D, CW]: kp[(x / CW) * D * CW + d * CW + x % CW]    = kscale(k0 + x) * K[k0 + x][d]
//   vp [nc, np, CW]:     vp[(d / CW) * np * CW + x * CW + d % CW]   = vscale(k0 + x) * V[k0 + x][d]
// pack_block writes the rows [first, first + count) of one cache block (packed keys x0, x0 + 1, ...);
// the job with last = true also zeroes the padding keys [x0 + count, np).
struct PackJob {
  const KVBlockView* view;   // the block
  int first, count;          // its rows [first, first + count)
  int D;
  KVDtype dtype;
  float* kp;                 // this (slot, kv head)'s packed keys and values
  float* vp;
  int np;
  int x0;                    // packed index of row `first`
  bool last;
};

// A tile: Task's rows (tokens x heads of one GQA group; lo / hi absolute key indices, all within
// [k0, k0 + n) of the packed keys; Task::blocks and dtype unused) plus the packed keys / values.
// out is written, not accumulated.
struct TileTask {
  Task rows;                 // rows.rows <= kMaxRows; rows.q scaled, rotated
  const float* kp;
  const float* vp;
  int np;                    // a multiple of Kernels::chunk
  int k0;                    // key index of packed key 0
};
// Scratch for one thread: scores / probabilities S [kMaxRows, ld] (ld >= the task's np) and
// 1 / row sums [kMaxRows].
struct TileScratch {
  int ld;
  float* s;
  float* inv;
};

using PackFn = void (*)(const PackJob& job);
using TileFn = void (*)(const TileTask& task, const TileScratch& scratch);

struct Kernels {
  TaskFn decode;   // blocked online softmax, any row count; used for decode / few rows
  PackFn pack;     // prefill: key packing
  TileFn tile;     // prefill: two-pass tile
  int chunk;       // CW: floats per register-tile row of the tile kernel (a multiple of 16)
};

// Null members when the build has no such kernels (the dispatcher then falls back to the reference).
Kernels avx2_kernels();
Kernels avx512_kernels();
Kernels neon_kernels();
// ENGINE_HAVE_AMX: the AVX-512 decode kernel plus the AMX-BF16 prefill pack / tile (attention_amx.cpp;
// f16 and int8 caches, head_dim <= kAmxMaxDim).
Kernels amx_kernels();
constexpr int kAmxMaxDim = 512;

}  // namespace attn
}  // namespace engine
