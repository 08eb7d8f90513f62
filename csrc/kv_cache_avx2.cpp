// F16C float -> IEEE half for the cache's f16 stores (kv_cache.h floats_to_halves): vcvtps2ph
// rounds to nearest even like the portable float_to_half, so both give the same bits for every
// non-NaN float (NaNs stay NaNs). Compiled with the AVX2 file flags (-mf16c included).
#include <immintrin.h>

#include <cstdint>

namespace engine {
namespace f16c {

void floats_to_halves(const float* x, int n, uint16_t* y) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) {
    const __m128i h = _mm_cvtps_ph(_mm_set_ss(x[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y[i] = uint16_t(_mm_extract_epi16(h, 0));
  }
}

}  // namespace f16c
}  // namespace engine
