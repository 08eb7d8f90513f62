// vpdpbusd (and AVX2's vpmaddubsw + vpmaddwd + vpaddd) that accumulates in place, for the
// register-tiled int8 kernels.
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

#if defined(__AVX512F__)
// acc + sum over each lane's 4 bytes of u8 x s8 (_mm512_dpbusd_epi32(acc, u8, s8)).
static inline __m512i dpbusd_inplace(__m512i acc, __m512i u8, __m512i s8) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u8, s8);
#endif
}

// acc + vpmaddwd(t16, ones) on 512 bits: int16 pair sums t16 (vpmaddubsw, or several of them
// added in int16 by an int4 kernel) into the int32 sums. Only the add, the instruction that writes
// the accumulator, is asm: with the multiplies in the same statement GCC copied the accumulators
// around it again.
static inline __m512i madd16_acc_inplace(__m512i acc, __m512i t16, __m512i ones) {
#if defined(__GNUC__) && !defined(__clang__)
  const __m512i t = _mm512_madd_epi16(t16, ones);
  __asm__("vpaddd %1, %0, %0" : "+v"(acc) : "v"(t));
  return acc;
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(t16, ones));
#endif
}

// acc + vpmaddwd(vpmaddubsw(u8, s8), ones) on 512 bits: the same step for AVX-512 CPUs without
// VNNI (the caller keeps the int16 pair sums below saturation, as for AVX2 below).
static inline __m512i maddubs512_acc_inplace(__m512i acc, __m512i u8, __m512i s8, __m512i ones) {
  return madd16_acc_inplace(acc, _mm512_maddubs_epi16(u8, s8), ones);
}

// The step of the 512-bit tiles (linear_int8_avx512.cpp, linear_int4_avx512.cpp): vpdpbusd where
// the kernel is the VNNI one, else vpmaddubsw + vpmaddwd (the caller keeps the pairs unsaturated).
template <bool Vnni>
static inline __m512i acc512_inplace(__m512i acc, __m512i u8, __m512i s8, __m512i ones) {
  if constexpr (Vnni) return dpbusd_inplace(acc, u8, s8);
  else return maddubs512_acc_inplace(acc, u8, s8, ones);
}
#endif

#if defined(__AVX2__)
// madd16_acc_inplace on 256 bits: acc + vpmaddwd(t16, ones), the add in place.
static inline __m256i madd16_acc_inplace(__m256i acc, __m256i t16, __m256i ones) {
#if defined(__GNUC__) && !defined(__clang__)
  const __m256i t = _mm256_madd_epi16(t16, ones);
  __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(t));
  return acc;
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(t16, ones));
#endif
}

// acc + vpmaddwd(vpmaddubsw(u8, s8), ones): the AVX2 form of maddubs512_acc_inplace, its add in place too
// (the caller keeps the int16 pair sums below saturation). The same register copies appeared
// around the int32 add in the 4 x 16 tile of the AVX2 int8 kernel (8 vmovdqa and a spill per 8 updates).
static inline __m256i maddubs_acc_inplace(__m256i acc, __m256i u8, __m256i s8, __m256i ones) {
  return madd16_acc_inplace(acc, _mm256_maddubs_epi16(u8, s8), ones);
}
#endif

}  // namespace engine
