// Per-row int8 linear layer: quantization, packing, the scalar reference kernel and the dispatch
// over panel chunks on the current thread pool (see linear_int8.h).
#include "linear_int8.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "matmul_int8.h"
#include "thread_pool.h"

namespace engine {

void quantize_rows_u8(const float* x, int M, int K, uint8_t* u, float* r) {
  const int K4 = (K + 3) / 4 * 4;
  const float step = 1.0f / 127.0f;   // the graph's QuantizeLinear scale
  for (int m = 0; m < M; ++m) {
    const float* row = x + size_t(m) * K;
    const float a = std::max(checked_abs_max(row, K, "linear_int8"), 1e-30f);   // the graph's Max(row_max, 1e-30)
    uint8_t* ur = u + size_t(m) * K4;
    for (int k = 0; k < K; ++k) {
      const float q = std::nearbyint((row[k] / a) / step);   // Div, then QuantizeLinear (x / scale)
      ur[k] = uint8_t(std::min(255.f, std::max(0.f, q + 128.f)));
    }
    std::fill(ur + K, ur + K4, uint8_t(128));
    r[m] = a;
  }
}

int pack_linear_int8(const int8_t* wt, int K, int O, int8_t* codes, int32_t* colsum) {
  const int K4 = (K + 3) / 4 * 4, O32 = (O + 31) / 32 * 32;
  std::fill(codes, codes + size_t(K4) * O32, int8_t(0));
  std::fill(colsum, colsum + O32, 0);
  int max_code = 0;
  // Panel by panel (its K4 x 32 bytes stay in cache), reading 32 contiguous codes of each row of wt.
  for (int p = 0; p < O32 / kLinearPanel; ++p) {
    int8_t* panel = codes + size_t(p) * K4 * kLinearPanel;
    const int n0 = p * kLinearPanel, width = std::min(kLinearPanel, O - n0);
    for (int k = 0; k < K; ++k) {
      const int8_t* src = wt + size_t(k) * O + n0;
      int8_t* dst = panel + size_t(k / 4) * kLinearPanel * 4 + k % 4;
      for (int c = 0; c < width; ++c) {
        dst[4 * c] = src[c];
        colsum[n0 + c] += src[c];
        max_code = std::max(max_code, std::abs(int(src[c])));
      }
    }
  }
  return max_code;
}

namespace lin8 {
void run_scalar(const Job& job, int p0, int p1) {
  const PackedLinear& w = *job.w;
  const int K4 = w.k4();
  for (int p = p0; p < p1; ++p) {
    const int8_t* panel = w.codes + size_t(p) * K4 * kLinearPanel;
    for (int c = 0; c < kLinearPanel; ++c) {
      const int n = kLinearPanel * p + c;
      if (n >= w.O) break;
      for (int m = 0; m < job.M; ++m) {
        const uint8_t* u = job.u + size_t(m) * K4;
        int32_t acc = 0;
        for (int k = 0; k < K4; ++k) acc += (int32_t(u[k]) - 128) * int32_t(panel[((k / 4) * kLinearPanel + c) * 4 + k % 4]);
        job.y[m * job.ldy + n] = (float(acc) * w.colscale[n]) * job.r[m];
      }
    }
  }
}
}  // namespace lin8

namespace {
// Rows from which the AMX kernel takes a call: below, a call is decode-sized and memory-bound,
// and VNNI streams the panels without computing the padding rows of a 32-row block.
constexpr int kAmxMinRows = 16;

lin8::Kernel kernel_for(SimdLevel level, const PackedLinear& w, int M) {
  if (w.group > 0) {   // int4: VNNI (or BW without it) at the avx512 and amx levels, else AVX2, NEON udot, else the scalar twin
#if defined(ENGINE_HAVE_AVX512)
    if (uses_avx512(level))
      return cpu_features().avx512_vnni ? lin8::avx512_vnni_int4_kernel() : lin8::avx512bw_int4_kernel();
#endif
#if defined(ENGINE_HAVE_AVX2)
    if (level == SimdLevel::Avx2) return lin8::avx2_int4_kernel();
#endif
#if defined(ENGINE_HAVE_NEON_DOT)
    if (level == SimdLevel::Neon && cpu_features().neon_dot) return lin8::neon_dot_int4_kernel();
#endif
    return {&lin8::run_scalar_int4, &quantize_rows_u8, "scalar_int4"};
  }
#if defined(ENGINE_HAVE_AMX)
  if (level == SimdLevel::Amx && M >= kAmxMinRows && w.k4() % 64 == 0) return lin8::amx_kernel();
#endif
#if defined(ENGINE_HAVE_AVX512)
  if (uses_avx512(level) && cpu_features().avx512_vnni) return lin8::avx512_vnni_kernel();
  if (uses_avx512(level) && w.max_code <= 64) return lin8::avx512bw_kernel();
#endif
#if defined(ENGINE_HAVE_AVX2)
  if (level == SimdLevel::Avx2 || uses_avx512(level))
    return w.max_code <= 64 ? lin8::avx2_kernel() : lin8::avx2_wide_kernel();
#endif
#if defined(ENGINE_HAVE_NEON_DOT)
  if (level == SimdLevel::Neon && cpu_features().neon_dot) return lin8::neon_dot_kernel();
#endif
  (void)level;
  (void)w;
  (void)M;
  return {&lin8::run_scalar, &quantize_rows_u8, "scalar"};
}
constexpr int kRowsPerQuantizeTask = 32;
// Panels per task: 8 panels of a 2304-wide matrix are 590 KB of codes, a few dozen tasks per call.
// An AMX call's task is long (all its rows), so a matrix of fewer than 16 such tasks takes 4
// panels per task: a 2304-channel matrix (72 panels) splits into 18 tasks, which two threads
// share evenly (9 would leave one thread 5 of them).
constexpr int kPanelsPerTask = 8;
}  // namespace

void lin8::interleave_tiles(const uint8_t* u, int M, size_t K4, int R, uint8_t* tiles) {
  const int n_tiles = M / R;
  const size_t steps = K4 / 4;
  parallel_for(n_tiles, [&](int t, int) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(tiles + size_t(t) * R * K4);   // [steps][R]
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = u + (size_t(t) * R + i) * K4;
      for (size_t k = 0; k < steps; ++k) std::memcpy(dst + k * R + i, row + 4 * k, 4);
    }
  });
}

void linear_int8_many(const float* x, int M, int n, const PackedLinear* const* ws, float* const* ys,
                      const int64_t* ldys) {
  if (M < 0 || n < 1) throw std::invalid_argument("linear_int8: needs M >= 0 and at least one matrix");
  const int K = ws[0]->K;
  int group = 0;   // of the call's int4 matrices (one size per call: they share qsum8)
  for (int i = 0; i < n; ++i) {
    if (ws[i]->K != K || ws[i]->K < 1 || ws[i]->O < 1 || ldys[i] < ws[i]->O)
      throw std::invalid_argument("linear_int8: the matrices of one call need the same K >= 1, O >= 1 and ldy >= O");
    if (ws[i]->group > 0) {
      if (K % ws[i]->group != 0 || ws[i]->group % 4 != 0 || (group > 0 && ws[i]->group != group))
        throw std::invalid_argument("linear_int8: the int4 matrices of one call need one group size, a multiple of "
                                    "4 that divides K");
      group = ws[i]->group;
    }
  }
  if (M == 0) return;
  const SimdLevel level = active_simd();
  std::vector<lin8::Kernel> kernels(static_cast<size_t>(n));
  std::vector<int> first_task(static_cast<size_t>(n) + 1, 0);   // matrix i owns tasks [first_task[i], first_task[i + 1])
  std::vector<int> task_panels(static_cast<size_t>(n), kPanelsPerTask);
  int rows = M;   // rows of u: whole AMX blocks where a matrix takes the AMX kernel
  for (int i = 0; i < n; ++i) {
    kernels[i] = kernel_for(level, *ws[i], M);
    if (kernels[i].padded_rows) {
      rows = (M + lin8::kAmxRows - 1) / lin8::kAmxRows * lin8::kAmxRows;
      if (ws[i]->o32() / kLinearPanel < 16 * kPanelsPerTask) task_panels[i] = kPanelsPerTask / 2;
    }
    const int panels = ws[i]->o32() / kLinearPanel;
    first_task[i + 1] = first_task[i] + (panels + task_panels[i] - 1) / task_panels[i];
  }
  const size_t K4 = size_t(ws[0]->k4());
  // u starts on a 64-byte boundary, so the kernels' row reads never straddle lines needlessly.
  std::vector<uint8_t> ubuf(size_t(rows) * K4 + 64);
  auto* u = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(ubuf.data()) + 63) & ~uintptr_t(63));
  std::fill(u + size_t(M) * K4, u + size_t(rows) * K4, uint8_t(128));   // padding rows: zeros after the offset
  std::vector<float> r(static_cast<size_t>(M));
  const int qtasks = (M + kRowsPerQuantizeTask - 1) / kRowsPerQuantizeTask;
  // Every kernel's quantizer writes the same u and r (the scalar twin's), so one serves all.
  const int G = group > 0 ? K / group : 0;
  std::vector<int32_t> qsum8(size_t(M) * G);   // int4 matrices: 8 * sum_{k in g} (u - 128) per row and group
  parallel_for(qtasks, [&](int t, int) {
    const int m0 = t * kRowsPerQuantizeTask, nrows = std::min(M - m0, kRowsPerQuantizeTask);
    kernels[0].quantize(x + size_t(m0) * K, nrows, K, u + size_t(m0) * K4, r.data() + m0);
    for (int m = m0; m < m0 + nrows; ++m)
      for (int g = 0; g < G; ++g) {
        const uint8_t* ug = u + size_t(m) * K4 + size_t(g) * group;
        int32_t sum = 0;
        for (int k = 0; k < group; ++k) sum += int32_t(ug[k]) - 128;
        qsum8[size_t(m) * G + g] = 8 * sum;
      }
  });
  // kernels that read their row tiles' activations as one stream: u interleaved once per call
  int tile_rows = 0;
  for (int i = 0; i < n; ++i) tile_rows = std::max(tile_rows, kernels[i].tile_rows);
  std::vector<uint8_t> tiles;
  if (tile_rows > 0 && M >= tile_rows) {
    tiles.resize(size_t(M / tile_rows) * tile_rows * K4);
    lin8::interleave_tiles(u, M, K4, tile_rows, tiles.data());
  }
  parallel_for(first_task[n], [&](int t, int) {
    int i = 0;
    while (t >= first_task[i + 1]) ++i;
    lin8::Job job{u, r.data(), M, ws[i], ys[i], ldys[i]};
    if (kernels[i].tile_rows == tile_rows && !tiles.empty()) job.tiles = tiles.data();
    job.qsum8 = qsum8.data();
    const int p0 = (t - first_task[i]) * task_panels[i];
    kernels[i].run(job, p0, std::min(ws[i]->o32() / kLinearPanel, p0 + task_panels[i]));
  });
}

const char* linear_int8_kernel(int M, const PackedLinear& w) { return kernel_for(active_simd(), w, M).name; }

void linear_int8(const float* x, int M, const PackedLinear& w, float* y, int64_t ldy) {
  const PackedLinear* ws[1] = {&w};
  float* ys[1] = {y};
  const int64_t ldys[1] = {ldy};
  linear_int8_many(x, M, 1, ws, ys, ldys);
}

}  // namespace engine
