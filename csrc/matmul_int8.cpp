// int8 LM-head product: quantization, the scalar reference kernel and the dispatch over vocab
// chunks on the current thread pool (see matmul_int8.h).
#include "matmul_int8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "thread_pool.h"

namespace engine {

float checked_abs_max(const float* row, int K, const char* who) {
  float a = 0.f;
  bool finite = true;
  for (int k = 0; k < K; ++k) {
    a = std::max(a, std::fabs(row[k]));
    finite &= std::isfinite(row[k]);
  }
  if (!finite) throw std::invalid_argument(std::string(who) + ": the input has a non-finite value");
  return a;
}

void quantize_rows_int8(const float* x, int M, int K, int8_t* q, float* qscale) {
  for (int m = 0; m < M; ++m) {
    const float* row = x + size_t(m) * K;
    const float a = checked_abs_max(row, K, "matmul_int8");
    int8_t* qr = q + size_t(m) * K;
    if (a == 0.f) {
      std::fill(qr, qr + K, int8_t(0));
      qscale[m] = 0.f;
      continue;
    }
    const float inv = 127.f / a;
    for (int k = 0; k < K; ++k) {
      const float r = std::nearbyint(row[k] * inv);   // round half to even, as numpy's rint
      qr[k] = int8_t(std::min(127.f, std::max(-127.f, r)));
    }
    qscale[m] = a / 127.f;
  }
}

namespace mm8 {
void run_scalar(const Job& job, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v) {
    const int8_t* w = job.codes + v * job.K;
    for (int m = 0; m < job.M; ++m) {
      const int8_t* q = job.q + size_t(m) * job.K;
      int32_t acc = 0;
      for (int k = 0; k < job.K; ++k) acc += int32_t(q[k]) * int32_t(w[k]);
      job.out[m * job.ldo + v] = scaled(job, acc, v, m);
    }
  }
}
}  // namespace mm8

namespace {
mm8::Kernel kernel_for(SimdLevel level) {
  using mm8::Operand;
  switch (level) {
#if defined(ENGINE_HAVE_AVX512)
    case SimdLevel::Amx:      // the LM head is memory-bound at decode: VNNI, no tiles
    case SimdLevel::Avx512:   // AVX-512 without VNNI (Skylake-X) runs the AVX2 kernel
      if (cpu_features().avx512_vnni) return {mm8::avx512_vnni_kernel(), Operand::Offset};
      return {mm8::avx2_kernel(), Operand::Abs};
#endif
#if defined(ENGINE_HAVE_AVX2)
    case SimdLevel::Avx2: return {mm8::avx2_kernel(), Operand::Abs};
#endif
#if defined(ENGINE_HAVE_NEON)
    case SimdLevel::Neon: return {mm8::neon_kernel(), Operand::None};
#endif
    default: return {&mm8::run_scalar, Operand::None};
  }
}
// Vocab rows per task: 512 rows of a 2304-wide table are 1.2 MB, a few hundred tasks per call.
constexpr int64_t kRowsPerTask = 512;
}  // namespace

void matmul_int8(const float* x, int M, int K, const int8_t* codes, const float* scales, int64_t V,
                 float* out) {
  if (M < 0 || K < 1 || V < 0) throw std::invalid_argument("matmul_int8: needs M >= 0, K >= 1, V >= 0");
  if (M == 0 || V == 0) return;
  const size_t n = size_t(M) * K;
  const mm8::Kernel kernel = kernel_for(active_simd());
  const size_t n_qu = kernel.operand == mm8::Operand::None ? 0 : n;    // only the operand the kernel reads
  // q and qu start on 64-byte boundaries: with K a multiple of 64 (2304) no SIMD load of a row
  // then straddles two cache lines (measured: the VNNI kernel's 8-row call 30 ms aligned, 43 ms
  // when malloc happened to place the buffer off a line).
  std::vector<uint8_t> buf(n + n_qu + 128);
  auto* q = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  uint8_t* qu = reinterpret_cast<uint8_t*>(q) + (n + 63) / 64 * 64;
  std::vector<float> qscale(static_cast<size_t>(M));
  quantize_rows_int8(x, M, K, q, qscale.data());
  if (kernel.operand == mm8::Operand::Abs)
    for (size_t i = 0; i < n_qu; ++i) qu[i] = uint8_t(q[i] < 0 ? -q[i] : q[i]);
  if (kernel.operand == mm8::Operand::Offset)
    for (size_t i = 0; i < n_qu; ++i) qu[i] = uint8_t(int(q[i]) + 128);
  const mm8::Job job{q, qu, qscale.data(), M, K, codes, scales, out, V};
  const int64_t tasks = (V + kRowsPerTask - 1) / kRowsPerTask;
  if (tasks > (int64_t(1) << 30)) throw std::invalid_argument("matmul_int8: table too large");
  parallel_for(int(tasks), [&](int t, int) {
    const int64_t v0 = int64_t(t) * kRowsPerTask;
    kernel.run(job, v0, std::min(V, v0 + kRowsPerTask));
  });
}

}  // namespace engine
