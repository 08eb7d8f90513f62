#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__linux__) && (defined(__aarch64__) || defined(__arm__))
#include <sys/auxv.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace engine {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// AMX-INT8 and AMX-BF16 usable by this process: the CPUID bits, the OS's XCR0 tile state, and (Linux >= 5.16)
// the permission to use the 8 KB tile data state, which a process must ask for once.
bool detect_amx() {
  unsigned a = 7, b = 0, c = 0, d = 0;
  __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
  (void)b;
  const bool bf16 = (d >> 22) & 1u, tile = (d >> 24) & 1u, int8 = (d >> 25) & 1u;
  if (!tile || !int8 || !bf16) return false;
  unsigned a1 = 1, b1 = 0, c1 = 0, d1 = 0;
  __asm__ volatile("cpuid" : "+a"(a1), "=b"(b1), "+c"(c1), "=d"(d1));
  if (!((c1 >> 27) & 1u)) return false;   // OSXSAVE: xgetbv is available
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;   // XTILECFG and XTILEDATA enabled
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
#endif
  return true;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  f.arch = "x86_64";
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  f.avx512_vnni = __builtin_cpu_supports("avx512vnni");
  f.amx = detect_amx();
#elif defined(__aarch64__)
  f.arch = "aarch64";
#if defined(__linux__)
  f.neon = (getauxval(AT_HWCAP) & (1ul << 1)) != 0;   // HWCAP_ASIMD
  f.neon_dot = (getauxval(AT_HWCAP) & (1ul << 20)) != 0;   // HWCAP_ASIMDDP
#else
  f.neon = true;
#endif
#else
  f.arch = "other";
#endif
  f.best = SimdLevel::Scalar;
#if defined(ENGINE_HAVE_NEON)
  if (f.neon) f.best = SimdLevel::Neon;
#endif
#if defined(ENGINE_HAVE_AVX2)
  if (f.avx2) f.best = SimdLevel::Avx2;
#endif
#if defined(ENGINE_HAVE_AVX512)
  if (f.avx512 && f.avx2) f.best = SimdLevel::Avx512;
#endif
#if defined(ENGINE_HAVE_AMX)
  if (f.best == SimdLevel::Avx512 && f.avx512_vnni && f.amx) f.best = SimdLevel::Amx;
#endif
  return f;
}

bool supported(const CpuFeatures& f, SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return true;
    case SimdLevel::Neon: return f.best == SimdLevel::Neon;
    case SimdLevel::Avx2: return f.best == SimdLevel::Avx2 || uses_avx512(f.best);
    case SimdLevel::Avx512: return uses_avx512(f.best);
    case SimdLevel::Amx: return f.best == SimdLevel::Amx;
  }
  return false;
}

SimdLevel initial_level() {
  const CpuFeatures& f = cpu_features();
  const char* env = std::getenv("ENGINE_SIMD");
  if (env == nullptr || *env == '\0') return f.best;
  SimdLevel want = parse_simd_level(env);
  // An env request above what the CPU has falls back to the best level instead of failing
  // at import time; set_simd_level() is strict.
  return supported(f, want) ? want : f.best;
}

std::atomic<int>& level_slot() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

SimdLevel active_simd() { return static_cast<SimdLevel>(level_slot().load(std::memory_order_relaxed)); }

void set_simd_level(SimdLevel level) {
  if (!supported(cpu_features(), level))
    throw std::invalid_argument(std::string("SIMD level '") + simd_name(level) +
                                "' is not available on this CPU/build; best is '" +
                                simd_name(cpu_features().best) + "'");
  level_slot().store(static_cast<int>(level), std::memory_order_relaxed);
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name == "scalar" || name == "generic") return SimdLevel::Scalar;
  if (name == "neon") return SimdLevel::Neon;
  if (name == "avx2") return SimdLevel::Avx2;
  if (name == "avx512") return SimdLevel::Avx512;
  if (name == "amx") return SimdLevel::Amx;
  throw std::invalid_argument("unknown SIMD level '" + name + "' (use scalar, avx2, avx512, amx or neon)");
}

const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Neon: return "neon";
    case SimdLevel::Avx2: return "avx2";
    case SimdLevel::Avx512: return "avx512";
    case SimdLevel::Amx: return "amx";
  }
  return "?";
}

}  // namespace engine
