// Runtime CPU feature detection and the SIMD level the kernels dispatch on.
#pragma once
#include <string>

namespace engine {

// Amx: the AVX-512 level plus AMX-INT8 tiles for the prefill-sized int8 products (linear_int8_amx.cpp);
// every other kernel runs its AVX-512 form there. ENGINE_SIMD=avx512 keeps AVX-512 without tiles.
enum class SimdLevel { Scalar = 0, Neon = 1, Avx2 = 2, Avx512 = 3, Amx = 4 };

// True for the levels whose kernels use AVX-512 (Avx512 and Amx).
inline bool uses_avx512(SimdLevel level) { return level == SimdLevel::Avx512 || level == SimdLevel::Amx; }

struct CpuFeatures {
  std::string arch;       // "x86_64", "aarch64", or "other"
  bool avx2 = false;      // AVX2 + FMA + F16C
  bool avx512 = false;    // AVX-512 F/BW/DQ/VL
  bool avx512_vnni = false;
  // AMX-TILE + AMX-INT8 + AMX-BF16 in CPUID, the tile state enabled by the OS (XCR0) and, on Linux, this
  // process granted it (arch_prctl ARCH_REQ_XCOMP_PERM, asked once at detection).
  bool amx = false;
  bool neon = false;
  bool neon_dot = false;  // the ARMv8.2 dot-product extension (sdot; HWCAP_ASIMDDP)
  SimdLevel best = SimdLevel::Scalar;   // best level this CPU and this build support
};

const CpuFeatures& cpu_features();

// The level kernels use now: the best supported one, lowered by ENGINE_SIMD=scalar|avx2|avx512|amx|neon
// at start-up or by set_simd_level(). Asking for a level the CPU lacks throws std::invalid_argument.
SimdLevel active_simd();
void set_simd_level(SimdLevel level);
SimdLevel parse_simd_level(const std::string& name);   // throws std::invalid_argument
const char* simd_name(SimdLevel level);

}  // namespace engine
