// Runtime CPU feature detection and the SIMD level the kernels dispatch on.
#pragma once
#include <string>

namespace engine {

enum class SimdLevel { Scalar = 0, Neon = 1, Avx2 = 2, Avx512 = 3 };

struct CpuFeatures {
  std::string arch;       // "x86_64", "aarch64", or "other"
  bool avx2 = false;      // AVX2 + FMA + F16C
  bool avx512 = false;    // AVX-512 F/BW/DQ/VL
  bool avx512_vnni = false;
  bool amx = false;       // AMX-TILE (reported only; no kernel uses it)
  bool neon = false;
  bool neon_dot = false;  // the ARMv8.2 dot-product extension (sdot; HWCAP_ASIMDDP)
  SimdLevel best = SimdLevel::Scalar;   // best level this CPU and this build support
};

const CpuFeatures& cpu_features();

// The level kernels use now: the best supported one, lowered by ENGINE_SIMD=scalar|avx2|avx512|neon
// at start-up or by set_simd_level(). Asking for a level the CPU lacks throws std::invalid_argument.
SimdLevel active_simd();
void set_simd_level(SimdLevel level);
SimdLevel parse_simd_level(const std::string& name);   // throws std::invalid_argument
const char* simd_name(SimdLevel level);

}  // namespace engine
