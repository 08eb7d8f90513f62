// 4-wide float / int vectors with GCC/Clang vector extensions: SSE2 on x86-64, NEON on aarch64,
// no ISA flags needed. Used by the whole-vocabulary passes of sampling and beam search.
#pragma once
#include <cstdint>
#include <cstring>

namespace engine {

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {   // unaligned
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline bool any4(i32x4 mask) { return (mask[0] | mask[1] | mask[2] | mask[3]) != 0; }

}  // namespace engine
