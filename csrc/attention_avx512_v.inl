// The AVX-512 vector-ops struct V of the attention kernels (attention_simd.inl), shared by
// attention_avx512.cpp and attention_amx.cpp, each of which includes it inside its own namespace
// (so each copy is compiled with that file's flags). No include guard: one copy per namespace.
// Needs <immintrin.h> and <cstdint> included before the namespace.
struct V {
  static constexpr int kTileVecs = 2;   // prefill register tiles: 6 rows x kTileVecs vectors
  static constexpr int W = 16;
  using vec = __m512;
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float x) { return _mm512_set1_ps(x); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static vec load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static vec load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static vec load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static vec load_tail(const uint16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static vec load_tail(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(n), p)));
  }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static void store_tail(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static vec min(vec a, vec b) { return _mm512_min_ps(a, b); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static vec round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static vec pow2(vec n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static float reduce(vec v) { return _mm512_reduce_add_ps(v); }
};
