// The AMX tile set-up shared by the AMX kernels (linear_int8_amx.cpp, attention_amx.cpp): all
// eight tiles 16 rows x 64 bytes, used as a 2 x 2 block: C tiles 0-3 (16 x 16 int32 or fp32),
// A tiles 4-5 (rows 0-15 and 16-31), B tiles 6-7 (columns 0-15 and 16-31). Include only from
// files compiled with the AMX flags (CMakeLists.txt, ENGINE_HAVE_AMX).
#pragma once
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace engine {
namespace amx {

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};   // bytes per row
  uint8_t rows[16] = {};
};

// Loads the configuration on the calling thread; call _tile_release() when the call is done, so a
// worker thread carries no tile state between tasks.
inline void configure_tiles() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    return c;
  }();
  _tile_loadconfig(&cfg);
}

inline void zero_c_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The 32 x 32 block of 4-byte sums (int32 or fp32) at dst, `stride` bytes per row.
inline void store_c_tiles(void* dst, size_t stride) {
  char* d = static_cast<char*>(dst);
  _tile_stored(0, d, stride);
  _tile_stored(1, d + 64, stride);
  _tile_stored(2, d + 16 * stride, stride);
  _tile_stored(3, d + 16 * stride + 64, stride);
}

}  // namespace amx
}  // namespace engine
