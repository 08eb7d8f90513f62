// AVX-512 (F/BW/VL) attention kernels: 16 floats per vector; masked loads handle head_dim tails
// (e.g. 72 = 4 x 16 + 8). Built only on x86 with this file's own -mavx512* flags.
// GCC 12 warns about its own intrinsics (_mm512_undefined_* in avx512fintrin.h): a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention_kernels.h"

namespace engine {
namespace attn_avx512 {

#include "attention_avx512_v.inl"

#include "attention_simd.inl"

}  // namespace attn_avx512

attn::Kernels attn::avx512_kernels() {
  return {&attn_avx512::run_task, &attn_avx512::pack_block, &attn_avx512::run_tile, attn_avx512::kChunk};
}

}  // namespace engine
