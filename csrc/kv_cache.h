// Preallocated, paged KV cache for the decoder: one "slot" per sequence (batch item or beam).
//
// Layout. Memory is allocated once in the constructor. Each layer owns a pool of physical
// blocks of `block_tokens` tokens; a block stores
//     K [num_kv_heads, block_tokens, head_dim]  then  V [num_kv_heads, block_tokens, head_dim]
// so for one (layer, kv head) the tokens of a block are contiguous rows of head_dim values:
// decode attention streams them linearly, and all query heads of a GQA group reuse each row
// while it is in L1. int8 blocks also have per-token-per-head scales
//     Kscale [num_kv_heads, block_tokens], Vscale [num_kv_heads, block_tokens]  (float).
//
// Paging. A slot maps token index i to (block table[layer][slot][i / B], row i % B). Blocks are
// refcounted: copy_slot / reorder only copy block tables (beams share their common prefix), and
// the first write into a shared block copies that one block (copy-on-write). A pool of
// num_slots * ceil(capacity / B) blocks per layer can never run out: a slot references at most
// ceil(capacity / B) blocks.
//
// Lengths. Tokens are appended layer by layer (the attention call for layer l appends to layer l),
// in lock-step: layer 0 may start a new step only when the last layer finished the previous one,
// and layer l > 0 may not get ahead of layer l - 1. length(slot) counts tokens stored in every
// layer. prefix_length(slot) is the bidirectional prefix block [0, P) of the prefix-LM mask.
//
// Not thread-safe: one owner drives a cache (the attention call parallelizes internally).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attention_rope.h"

namespace engine {

enum class KVDtype { F32 = 0, F16 = 1, I8 = 2 };
KVDtype parse_kv_dtype(const std::string& name);   // "f32" | "f16" | "int8"; throws
const char* kv_dtype_name(KVDtype d);
size_t kv_dtype_size(KVDtype d);

// Where the rows of one (layer, slot, kv head) live: tokens [b*B, b*B + B) are in blocks[b].
struct KVBlockView {
  const void* k;        // [B, head_dim] elements of the cache dtype
  const void* v;        // [B, head_dim]
  const float* kscale;  // [B] (int8 only, else nullptr)
  const float* vscale;  // [B]
};

class KVCache {
 public:
  KVCache(int num_layers, int num_kv_heads, int head_dim, int num_slots, int capacity,
          KVDtype dtype, int block_tokens = 32);
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int num_layers() const { return L_; }
  int num_kv_heads() const { return KV_; }
  int head_dim() const { return D_; }
  int num_slots() const { return S_; }
  int capacity() const { return C_; }
  int block_tokens() const { return B_; }
  KVDtype dtype() const { return dtype_; }
  size_t bytes() const;   // bytes of K/V storage (+ scales)

  // --- sequence bookkeeping (the generation loop's API) ---
  int length(int slot) const;                 // tokens stored in all layers
  int layer_length(int layer, int slot) const;
  void set_length(int slot, int n);           // truncate every layer to n <= length(slot)
  int prefix_length(int slot) const;
  void set_prefix_length(int slot, int n);    // 0 <= n <= capacity
  void copy_slot(int src, int dst);           // dst becomes a logical copy of src (no data copy)
  // For dst in [0, src_for_dst.size()): slot dst becomes a copy of slot src_for_dst[dst];
  // all sources are read before any slot changes. Slots past the vector's end are untouched.
  void reorder(const std::vector<int>& src_for_dst);
  void reset();                               // every slot empty, prefix 0, all blocks free
  int blocks_in_use(int layer) const;         // physical blocks referenced (tests, stats)

  // --- used by the attention kernels ---
  // Checks that n tokens fit after layer_length(layer, slot) and that lock-step holds; throws
  // std::out_of_range / std::logic_error without changing anything.
  void check_append(int layer, int slot, int n) const;
  // Makes the blocks holding [layer_length, layer_length + n) private to the slot (allocating or
  // copying on write). Call check_append first.
  void prepare_append(int layer, int slot, int n);
  // Stores one token's k and v rows (already rotated) for kv head h at token index `index`
  // (inside a block made private by prepare_append). k, v: [head_dim] floats.
  void store(int layer, int slot, int index, int h, const float* k, const float* v);
  void advance(int layer, int slot, int n);   // layer_length += n (after the stores)
  KVBlockView block(int layer, int slot, int h, int b) const;
  // Dequantized copy of the stored rows: k, v [num_kv_heads, layer_length, head_dim].
  void read(int layer, int slot, float* k, float* v) const;

  void check_slot(int slot, const char* what) const;
  void check_layer(int layer, const char* what) const;

  // RoPE cos/sin tables for this cache's head_dim (attention_rope.h): grown by attention() for the
  // positions it is called with; independent of the cached tokens (reset() keeps them).
  RopeTables& rope_tables() { return rope_; }
  const RopeTables& rope_tables() const { return rope_; }

 private:
  int& table(int layer, int slot, int b) { return tables_[(size_t(layer) * S_ + slot) * NB_ + b]; }
  int table(int layer, int slot, int b) const { return tables_[(size_t(layer) * S_ + slot) * NB_ + b]; }
  uint8_t* block_data(int layer, int p) const { return data_.get() + (size_t(layer) * P_ + p) * block_bytes_; }
  float* block_scales(int layer, int p) const { return scales_.get() + (size_t(layer) * P_ + p) * 2 * KV_ * B_; }
  int alloc_block(int layer);
  void release(int layer, int p);
  void release_from(int layer, int slot, int first_block);

  int L_, KV_, D_, S_, C_, B_;
  KVDtype dtype_;
  int NB_;                 // blocks per slot = ceil(capacity / B)
  int P_;                  // physical blocks per layer = S * NB
  size_t block_bytes_;     // 2 * KV * B * D * elem
  struct FreeDeleter { void operator()(void* p) const; };
  std::unique_ptr<uint8_t[], FreeDeleter> data_;  // [L, P, block_bytes], 64-byte aligned
  std::unique_ptr<float[], FreeDeleter> scales_;  // [L, P, 2, KV, B] (int8 only)
  std::vector<int> tables_;             // [L, S, NB] physical block or -1
  std::vector<int> refs_;               // [L, P]
  std::vector<std::vector<int>> free_;  // per layer: free physical blocks (stack)
  std::vector<int> len_;                // [L, S]
  std::vector<int> prefix_;             // [S]
  RopeTables rope_;
};

// IEEE half <-> float, round-to-nearest-even (portable; used for stores and the scalar path).
uint16_t float_to_half(float f);
float half_to_float(uint16_t h);
// y[i] = float_to_half(x[i]): F16C at the x86 SIMD levels (kv_cache_avx2.cpp), the portable loop
// at scalar and on Arm; the same bits either way for every non-NaN input.
void floats_to_halves(const float* x, int n, uint16_t* y);

}  // namespace engine
