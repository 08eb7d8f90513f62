// vpdpbusd that accumulates in place, for the register-tiled int8 kernels.
//
// GCC 12 compiles _mm512_dpbusd_epi32(acc[i][j], a, b) over an array of accumulators with a
// register copy of every accumulator around each step: the 6 x 32 tile of linear_int8 issued 24
// vmovdqa per 12 vpdpbusd, ~48 uops per 4 k where 20 do the work, so the loop was bound by the
// front end rather than by the two VNNI ports. The asm statement ties the accumulator to the
// instruction's destination, which is what vpdpbusd does anyway (acc += a (u8) . b (s8), 4
// products per int32 lane).
#pragma once
#include <immintrin.h>

namespace engine {

// acc + sum over each lane's 4 bytes of u8 x s8 (_mm512_dpbusd_epi32(acc, u8, s8)).
static inline __m512i dpbusd_inplace(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

}  // namespace engine
