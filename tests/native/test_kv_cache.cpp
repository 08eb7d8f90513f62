// KV cache bookkeeping: bounds, capacity overflow, copy-on-write forks, reorder, fp16 conversion.
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "attention.h"
#include "cpu_features.h"
#include "harness.h"
#include "kv_cache.h"

using engine::KVCache;
using engine::KVDtype;

namespace {

// Appends n tokens of value `base + index` (no RoPE) to every layer of slot s.
void append(KVCache& c, int slot, int n, float base) {
  const int KV = c.num_kv_heads(), D = c.head_dim();
  std::vector<float> k(size_t(n) * KV * D), q(size_t(n) * KV * D), out(size_t(n) * KV * D);
  std::vector<int32_t> pos(n);
  for (int t = 0; t < n; ++t) {
    pos[t] = c.length(slot) + t;
    for (int i = 0; i < KV * D; ++i) k[size_t(t) * KV * D + i] = base + float(t) + 0.001f * float(i);
  }
  engine::AttentionParams p;
  p.scale = 1.f;
  p.rope_theta = 0.f;
  for (int l = 0; l < c.num_layers(); ++l)
    engine::attention(c, l, q.data(), k.data(), k.data(), KV, {slot}, n, pos.data(), p, out.data());
}

std::vector<float> read_k(const KVCache& c, int layer, int slot) {
  const size_t n = size_t(c.num_kv_heads()) * c.layer_length(layer, slot) * c.head_dim();
  std::vector<float> k(n), v(n);
  c.read(layer, slot, k.data(), v.data());
  return k;
}

}  // namespace

TEST(kv_bounds_and_overflow) {
  KVCache c(2, 2, 8, 3, 10, KVDtype::F32, 4);
  CHECK_THROWS(std::out_of_range, c.length(3));
  CHECK_THROWS(std::out_of_range, c.length(-1));
  CHECK_THROWS(std::out_of_range, c.layer_length(2, 0));
  CHECK_THROWS(std::out_of_range, c.copy_slot(0, 3));
  CHECK_THROWS(std::out_of_range, c.reorder({0, 1, 2, 0}));
  CHECK_THROWS(std::out_of_range, c.set_prefix_length(0, 11));
  CHECK_THROWS(std::invalid_argument, KVCache(0, 1, 8, 1, 8, KVDtype::F32));
  CHECK_THROWS(std::invalid_argument, engine::parse_kv_dtype("bf16"));
  append(c, 0, 7, 1.f);
  CHECK(c.length(0) == 7);
  const auto before = read_k(c, 1, 0);
  CHECK_THROWS(std::out_of_range, append(c, 0, 4, 100.f));   // 7 + 4 > 10: nothing written
  CHECK(c.length(0) == 7 && c.layer_length(0, 0) == 7);
  CHECK(read_k(c, 1, 0) == before);
  append(c, 0, 3, 50.f);                                      // exactly full is fine
  CHECK(c.length(0) == 10);
  CHECK_THROWS(std::out_of_range, append(c, 0, 1, 0.f));
  CHECK_THROWS(std::out_of_range, c.set_length(0, 11));
  c.set_length(0, 5);
  CHECK(c.length(0) == 5 && c.blocks_in_use(0) == 2);
  c.reset();
  CHECK(c.length(0) == 0 && c.blocks_in_use(0) == 0 && c.blocks_in_use(1) == 0);
}

TEST(kv_copy_on_write_and_reorder) {
  for (KVDtype dt : {KVDtype::F32, KVDtype::F16, KVDtype::I8}) {
    KVCache c(2, 1, 8, 4, 64, dt, 8);
    append(c, 0, 13, 1.f);
    append(c, 1, 5, 20.f);
    c.set_prefix_length(0, 4);
    const int used = c.blocks_in_use(0);
    const auto k0 = read_k(c, 0, 0), k1 = read_k(c, 0, 1);
    c.copy_slot(0, 2);
    CHECK(c.blocks_in_use(0) == used && c.length(2) == 13 && c.prefix_length(2) == 4);
    append(c, 2, 1, 99.f);                                    // copies only the last, shared block
    CHECK(c.blocks_in_use(0) == used + 1);
    CHECK(read_k(c, 0, 0) == k0);
    auto k2 = read_k(c, 0, 2);
    CHECK(std::vector<float>(k2.begin(), k2.begin() + 13 * 8) == k0);
    // reorder: 0 <- 1, 1 <- 0, 2 <- 0, slot 3 untouched; all sources read first
    c.reorder({1, 0, 0});
    CHECK(read_k(c, 0, 0) == k1 && read_k(c, 0, 1) == k0 && read_k(c, 0, 2) == k0);
    CHECK(c.length(0) == 5 && c.length(1) == 13 && c.prefix_length(1) == 4 && c.prefix_length(0) == 0);
    append(c, 1, 2, 7.f);
    CHECK(read_k(c, 0, 2) == k0);                             // sibling unchanged
    c.reorder({0, 0, 0, 0});
    CHECK(c.blocks_in_use(0) == 1);                           // everything shares slot 0's block
    c.set_length(1, 0);
    c.set_length(2, 0);
    c.set_length(3, 0);
    CHECK(read_k(c, 1, 0) == k1);
  }
}

TEST(kv_lockstep_and_prefix_checks) {
  KVCache c(2, 1, 4, 1, 16, KVDtype::F32);
  std::vector<float> x(4 * 4, 0.5f), out(4 * 4);
  std::vector<int32_t> pos = {0, 1, 2, 3};
  engine::AttentionParams p;
  p.scale = 0.5f;
  CHECK_THROWS(std::logic_error, engine::attention(c, 1, x.data(), x.data(), x.data(), 1, {0}, 1, pos.data(), p, out.data()));
  engine::attention(c, 0, x.data(), x.data(), x.data(), 1, {0}, 1, pos.data(), p, out.data());
  CHECK_THROWS(std::logic_error, engine::attention(c, 0, x.data(), x.data(), x.data(), 1, {0}, 1, pos.data(), p, out.data()));
  engine::attention(c, 1, x.data(), x.data(), x.data(), 1, {0}, 1, pos.data(), p, out.data());
  c.set_prefix_length(0, 5);   // 1 + 3 < 5: the prefix block would be split
  CHECK_THROWS(std::logic_error, engine::attention(c, 0, x.data(), x.data(), x.data(), 1, {0}, 3, pos.data(), p, out.data()));
  CHECK(c.layer_length(0, 0) == 1);
  CHECK_THROWS(std::invalid_argument, engine::attention(c, 0, x.data(), x.data(), x.data(), 0, {0}, 1, pos.data(), p, out.data()));
}

TEST(half_conversion) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {   // every non-NaN half round-trips exactly
    const float f = engine::half_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    if (engine::float_to_half(f) != h) ++bad;
  }
  CHECK(bad == 0);
  CHECK(engine::float_to_half(1.0f) == 0x3c00);
  CHECK(engine::float_to_half(65504.f) == 0x7bff);
  CHECK(engine::float_to_half(65520.f) == 0x7c00);            // rounds to inf
  CHECK(engine::float_to_half(1.0f + 1.0f / 2048) == 0x3c00); // tie -> even
  CHECK(engine::float_to_half(1.0f + 3.0f / 2048) == 0x3c02); // tie -> even (up)
  CHECK(engine::float_to_half(5.9604645e-8f) == 0x0001);      // smallest subnormal
  CHECK(engine::float_to_half(2.9802322e-8f) == 0x0000);      // half of it: tie -> even (0)
  CHECK(std::isnan(engine::half_to_float(engine::float_to_half(std::nanf("")))));
}

// The vector conversion (F16C where the level has it) against the portable one: every half's
// value, the midpoints between neighbours (ties to even), random bit patterns, subnormals,
// overflow, and lengths with tails.
TEST(half_conversion_vector_equals_scalar) {
  std::vector<float> x;
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float a = engine::half_to_float(uint16_t(h)), b = engine::half_to_float(uint16_t(h + 1));
    for (float s : {1.f, -1.f}) {
      x.push_back(s * a);
      x.push_back(s * (a + (b - a) / 2));   // exact midpoint
      x.push_back(s * std::nextafter(a + (b - a) / 2, 0.f));
    }
  }
  uint32_t state = 12345;
  for (int i = 0; i < 100000; ++i) {
    state = state * 1664525u + 1013904223u;
    float f;
    std::memcpy(&f, &state, 4);
    if (!std::isnan(f)) x.push_back(f);
  }
  for (float f : {65504.f, 65519.f, 65520.f, 1e30f, -1e30f, std::numeric_limits<float>::infinity(), 1e-30f, -0.f})
    x.push_back(f);
  const engine::SimdLevel before = engine::active_simd();
  for (engine::SimdLevel level : {engine::SimdLevel::Scalar, engine::cpu_features().best}) {
    engine::set_simd_level(level);
    for (int n : {int(x.size()), 1, 7, 9, 15}) {
      std::vector<uint16_t> y(size_t(n), 0xffff);
      engine::floats_to_halves(x.data(), n, y.data());
      int bad = 0;
      for (int i = 0; i < n; ++i) bad += y[size_t(i)] != engine::float_to_half(x[size_t(i)]);
      CHECK_MSG(bad == 0, "level %s n %d: %d mismatches", engine::simd_name(level), n, bad);
    }
  }
  engine::set_simd_level(before);
}
