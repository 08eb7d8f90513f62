// int8 x int8 matrix product for the LM head over the artifact's int8 embedding table (tied
// weights): logits[m, v] = <x[m], E[v]>, E[v] ~= codes[v] * scales[v].
//
// Activations are quantized per row, symmetrically: a[m] = max_k |x[m, k]|,
// q[m, k] = rint(x[m, k] * (127 / a[m])) in [-127, 127] (0 for an all-zero row), and
//   out[m, v] = (sum_k q[m, k] * codes[v, k]) * (scales[v] * (a[m] / 127)).
// The integer sums are exact (int32), so every SIMD path equals the scalar twin up to the one
// float rounding of the last product. codes must lie in [-127, 127] (the exporter's int8 range;
// the AVX2 path's sign trick is undefined for -128). Decode is memory-bound here: the table is
// read once per call, whatever the number of rows M, and rows of one call never interact.
#pragma once
#include <cstdint>

namespace engine {

// max_k |row[k]|; throws std::invalid_argument "<who>: the input has a non-finite value" for a NaN
// or infinity (shared by every per-row quantizer: this one and linear_int8.h's).
float checked_abs_max(const float* row, int K, const char* who);

// Per-row quantization: q [M, K] int8, qscale [M] = a[m] / 127.
void quantize_rows_int8(const float* x, int M, int K, int8_t* q, float* qscale);

// out [M, V] = the formula above. Runs on the current pool (PoolScope) at the active SIMD level.
void matmul_int8(const float* x, int M, int K, const int8_t* codes, const float* scales, int64_t V,
                 float* out);

namespace mm8 {
// One kernel call: vocab rows [v0, v1) for all M quantized rows.
struct Job {
  const int8_t* q;        // [M, K] quantized activations
  const uint8_t* qu;      // [M, K] the kernel's unsigned operand (Kernel::operand), or null
  const float* qscale;    // [M]
  int M, K;
  const int8_t* codes;    // [V, K]
  const float* scales;    // [V]
  float* out;             // [M, ldo]
  int64_t ldo;
};
using Fn = void (*)(const Job& job, int64_t v0, int64_t v1);
// The unsigned form of q a kernel reads as Job::qu: none (scalar, NEON), |q| (AVX2's maddubs,
// which takes the sign from the codes) or q + 128 (AVX-512 VNNI's dpbusd).
enum class Operand { None, Abs, Offset };
struct Kernel {
  Fn run;
  Operand operand;
};
void run_scalar(const Job& job, int64_t v0, int64_t v1);

// out[m, v] from the exact integer dot product `acc` (the same float ops on every path).
inline float scaled(const Job& job, int32_t acc, int64_t v, int m) {
  return float(acc) * (job.scales[v] * job.qscale[m]);
}

// The loop every SIMD kernel shares: table rows [v0, v1), activation rows in blocks of up to 4.
// Dots::run<NB>(job, w, m0, res) writes the NB dot products of table row w with rows m0 + j.
// Instantiated in each ISA's own file, so it is compiled with that file's flags.
template <class Dots>
void run_blocks(const Job& job, int64_t v0, int64_t v1) {
  int32_t res[4];
  for (int64_t v = v0; v < v1; ++v) {
    const int8_t* w = job.codes + v * job.K;
    for (int m0 = 0; m0 < job.M; m0 += 4) {
      const int nb = job.M - m0 < 4 ? job.M - m0 : 4;
      switch (nb) {
        case 4: Dots::template run<4>(job, w, m0, res); break;
        case 3: Dots::template run<3>(job, w, m0, res); break;
        case 2: Dots::template run<2>(job, w, m0, res); break;
        default: Dots::template run<1>(job, w, m0, res); break;
      }
      for (int j = 0; j < nb; ++j) job.out[(m0 + j) * job.ldo + v] = scaled(job, res[j], v, m0 + j);
    }
  }
}
Fn avx2_kernel();   // defined only where ENGINE_HAVE_AVX2 / ENGINE_HAVE_AVX512 / ENGINE_HAVE_NEON
Fn avx512_vnni_kernel();
Fn neon_kernel();
}  // namespace mm8

}  // namespace engine
