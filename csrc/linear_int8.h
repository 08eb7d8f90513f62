// Per-row int8 linear layer of the native decoder (decoder_layer.h): y = x W^T with W int8 per
// output channel, x quantized per row, computed exactly as the exported ONNX graph's per-row int8
// MatMulIntegerToFloat (export/onnx_graphs.py, _matmul_dynamic_int8):
//
//   r[m]    = max(max_k |x[m, k]|, 1e-30)
//   u[m, k] = clamp(rint((x[m, k] / r[m]) / (1/127)) + 128, 0, 255)        (QuantizeLinear, uint8)
//   acc     = sum_k (u[m, k] - 128) * W[k, n]                             (exact int32)
//   y[m, n] = (float(acc) * colscale[n]) * r[m],   colscale[n] = (1/127) * scales[n]
//
// W is stored packed for the kernels: panels of 32 output channels, 4 consecutive k per int32
// lane (the operand layout of vpdpbusd and of NEON sdot):
//   codes[p][k4][c][j] = W[4 * k4 + j, 32 * p + c]      shape [O32 / 32, K4 / 4, 32, 4] int8
// with O32 = O rounded up to 32 and K4 = K rounded up to 4 (padding codes are 0), and
// colsum[n] = sum_k W[k, n] (int32, O32 entries) for the kernels that feed u (not u - 128). The
// codes must lie in [-127, 127] (the exporter writes 7-bit codes, [-63, 63]); max_code = max |code|
// decides whether AVX2's vpmaddubsw may take u as it is (u <= 255, so two products stay below
// its int16 saturation only while |code| <= 64: 2 * 255 * 64 = 32640); larger codes take its wide
// variant (|code| x signed u - 128).
//
// Every SIMD path computes the same exact integer sums and the same float ops as the scalar twin,
// so all levels agree bit for bit. Rows never interact. Prefill (hundreds of rows) is
// compute-bound: register tiles of several rows x 32 channels; decode (a few rows) is
// memory-bound: each panel is read once per call, as one sequential stream per thread.
// Kernels (chosen per call from the active SIMD level, the CPU and max_code): AVX-512 VNNI
// (vpdpbusd), AVX-512 BW without VNNI (vpmaddubsw + vpmaddwd on zmm, max_code <= 64), AVX2 (the
// same on ymm; vpsignb too where max_code > 64), NEON with the dot-product extension (sdot,
// ARMv8.2+), else the scalar twin; at the amx level, AMX-INT8 tiles (tdpbusd) for calls
// of >= 16 rows whose K4 is a multiple of 64 (prefill), VNNI for the others.
//
// int4 matrices (PackedLinear::group > 0; MatMulNBits bits=4 of an int4 artifact, zero point 8):
// W[k, n] = (c[k, n] - 8) * s[n, k / group] with codes c in [0, 15]. The rows are quantized as
// above (the same u and r), the products summed exactly per group of `group` k, then scaled:
//
//   acc_g = sum_{k in g} u[m, k] * c[k, n]                                  (exact int32)
//   t_g   = acc_g - gcorr[n, g] - qsum8[m, g]     (= sum_{k in g} (u - 128) (c - 8), exact)
//           gcorr[n, g] = 128 * sum_{k in g} c[k, n],  qsum8[m, g] = 8 * sum_{k in g} (u[m, k] - 128)
//   f     = 0;  for g in order: f = fma(float(t_g), gscale[n, g], f);     gscale = s / 127
//   y     = f * r[m]
//
// Packed 4-bit codes: codes4[p][k4][64] uint8, byte j holding in its low nibble the code that
// byte j of the int8 layout holds (channel j / 4 of the panel, k = 4 k4 + j % 4) and in its high
// nibble that of byte 64 + j (channel 16 + j / 4): one 64-byte load and two masks give vpdpbusd
// the two 16-channel operands. gscale and gcorr are [O32 / 32][K / group][32] (0 for padding
// channels). K must be a multiple of group and group a multiple of 4. u x c needs no care for
// saturation on AVX2 (2 x 255 x 15 = 7650). Every path does the same integer sums and the same
// float ops in the same order (std::fma in the scalar twin), so all levels agree bit for bit.
#pragma once
#include <cstddef>
#include <cstdint>

namespace engine {

struct PackedLinear {
  int K = 0, O = 0;                  // input features, output channels
  const int8_t* codes = nullptr;     // [O32 / 32][K4 / 4][32][4]
  const int32_t* colsum = nullptr;   // [O32]
  const float* colscale = nullptr;   // [O] = (1/127) * scales
  int max_code = 127;                // max |code| (pack_linear_int8 returns it)
  // int4 (group > 0): codes, colsum and colscale unused
  int group = 0;                     // k per scale group; 0: per-channel int8
  const uint8_t* codes4 = nullptr;   // [O32 / 32][K / 4][64], two codes per byte
  const float* gscale = nullptr;     // [O32 / 32][K / group][32] = s / 127
  const int32_t* gcorr = nullptr;    // [O32 / 32][K / group][32] = 128 * sum of the group's codes
  int groups() const { return group > 0 ? K / group : 0; }
  int k4() const { return (K + 3) / 4 * 4; }
  int o32() const { return (O + 31) / 32 * 32; }
};

constexpr int kLinearPanel = 32;     // output channels per panel

// u [M, K4] (row stride K4; the padding columns hold 128) and r [M] as defined above. Throws
// std::invalid_argument for a non-finite input.
void quantize_rows_u8(const float* x, int M, int K, uint8_t* u, float* r);

// y [M, O] (row stride ldy >= O) = the formula above, on the current pool at the active SIMD level.
void linear_int8(const float* x, int M, const PackedLinear& w, float* y, int64_t ldy);

// Several linear layers of the same input x [M, K] (q/k/v; gate/up): x is quantized once and the
// panels of all of them are one task list on the pool, so a decode row streams the matrices
// back to back with one dispatch instead of one per matrix. ys[i] is [M, ws[i]->O], row stride
// ldys[i]. The same results as n calls of linear_int8.
void linear_int8_many(const float* x, int M, int n, const PackedLinear* const* ws, float* const* ys,
                      const int64_t* ldys);

// The kernel a call of M rows on w takes at the active SIMD level: "amx", "avx512_vnni", "avx2",
// "neon_dot" or "scalar"; for int4 matrices "avx512_vnni_int4", "avx512bw_int4", "avx2_int4",
// "neon_dot_int4" or "scalar_int4".
const char* linear_int8_kernel(int M, const PackedLinear& w);

// Packs W^T as the exporter stores it (wt [K, O] int8, row-major) into codes / colsum (sizes above);
// returns max |code| (PackedLinear::max_code).
int pack_linear_int8(const int8_t* wt, int K, int O, int8_t* codes, int32_t* colsum);

// Packs an int4 matrix as MatMulNBits stores it (nbits [O, K / 2] uint8, two codes per byte, low
// nibble first, i.e. code c[k, n] in byte k / 2 of row n) and its scales already divided by 127
// (scales [O, K / group] float32) into codes4 / gscale / gcorr (layouts above). Throws
// std::invalid_argument unless group >= 4, group % 4 == 0 and K % group == 0.
void pack_linear_int4(const uint8_t* nbits, const float* scales, int K, int O, int group, uint8_t* codes4,
                      float* gscale, int32_t* gcorr);

namespace lin8 {
// Output rows [m0, m0 + rows) x panels [p0, p1): u, r as from quantize_rows_u8.
struct Job {
  const uint8_t* u;
  const float* r;
  int M;
  const PackedLinear* w;
  float* y;
  int64_t ldy;
  // u again, interleaved per tile of Kernel::tile_rows rows (whole tiles only: [M / R][K4 / 4][R][4]),
  // for kernels that ask for it; the rows after the last whole tile are read from u.
  const uint8_t* tiles = nullptr;
  // int4 matrices: 8 * sum_{k in g} (u[m, k] - 128), [M][K / group] (see the top of this file)
  const int32_t* qsum8 = nullptr;
};
using Fn = void (*)(const Job& job, int p0, int p1);
// quantize_rows_u8 for rows [0, M) of x (the same results on every path).
using QuantizeFn = void (*)(const float* x, int M, int K, uint8_t* u, float* r);
struct Kernel {
  Fn run;
  QuantizeFn quantize;
  const char* name;
  bool padded_rows = false;   // reads u in whole blocks of kAmxRows rows (AMX)
  int tile_rows = 0;          // > 0: reads Job::tiles for its tiles of this many rows (AVX-512 VNNI)
};
// Job::tiles for rows [0, M / R * R) of u (R = tile_rows), on the current pool.
void interleave_tiles(const uint8_t* u, int M, std::size_t K4, int R, uint8_t* tiles);
void run_scalar(const Job& job, int p0, int p1);
Kernel avx512_vnni_kernel();   // defined only where ENGINE_HAVE_AVX512
Kernel avx512bw_kernel();      // ENGINE_HAVE_AVX512, AVX-512 without VNNI; needs max_code <= 64
// ENGINE_HAVE_AMX; needs K4 % 64 == 0 and u padded to whole blocks of kAmxRows rows
Kernel amx_kernel();
constexpr int kAmxRows = 32;
Kernel avx2_kernel();          // ENGINE_HAVE_AVX2; needs max_code <= 64
Kernel avx2_wide_kernel();     // ENGINE_HAVE_AVX2; any max_code (vpsignb: 2/3 of avx2's speed)
void quantize_rows_avx2(const float* x, int M, int K, uint8_t* u, float* r);   // ENGINE_HAVE_AVX2
Kernel neon_dot_kernel();      // ENGINE_HAVE_NEON_DOT (aarch64 with the dot-product extension)
// int4 matrices (group > 0)
void run_scalar_int4(const Job& job, int p0, int p1);
Kernel avx512_vnni_int4_kernel();   // ENGINE_HAVE_AVX512; reads Job::tiles like avx512_vnni_kernel
Kernel avx512bw_int4_kernel();      // ENGINE_HAVE_AVX512, AVX-512 without VNNI; the same tiles
Kernel avx2_int4_kernel();          // ENGINE_HAVE_AVX2
Kernel neon_dot_int4_kernel();      // ENGINE_HAVE_NEON_DOT (udot)
}  // namespace lin8

}  // namespace engine
