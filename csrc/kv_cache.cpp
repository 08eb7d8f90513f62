#include "kv_cache.h"

#include "cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>

namespace engine {
namespace {

std::string str(long long v) { return std::to_string(v); }

void* alloc_aligned(size_t bytes) {
  bytes = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return p;
}

}  // namespace

void KVCache::FreeDeleter::operator()(void* p) const { std::free(p); }

KVDtype parse_kv_dtype(const std::string& name) {
  if (name == "f32" || name == "float32") return KVDtype::F32;
  if (name == "f16" || name == "float16") return KVDtype::F16;
  if (name == "int8" || name == "i8") return KVDtype::I8;
  throw std::invalid_argument("unknown KV cache dtype '" + name + "' (use \"f32\", \"f16\" or \"int8\")");
}

const char* kv_dtype_name(KVDtype d) {
  switch (d) {
    case KVDtype::F32: return "f32";
    case KVDtype::F16: return "f16";
    case KVDtype::I8: return "int8";
  }
  return "?";
}

size_t kv_dtype_size(KVDtype d) { return d == KVDtype::F32 ? 4 : d == KVDtype::F16 ? 2 : 1; }

KVCache::KVCache(int num_layers, int num_kv_heads, int head_dim, int num_slots, int capacity,
                 KVDtype dtype, int block_tokens)
    : L_(num_layers), KV_(num_kv_heads), D_(head_dim), S_(num_slots), C_(capacity),
      B_(block_tokens), dtype_(dtype) {
  if (L_ < 1 || KV_ < 1 || D_ < 1 || S_ < 1 || C_ < 1 || B_ < 1)
    throw std::invalid_argument(
        "KVCache: num_layers, num_kv_heads, head_dim, num_slots, capacity and block_tokens must "
        "all be >= 1 (got " + str(L_) + ", " + str(KV_) + ", " + str(D_) + ", " + str(S_) + ", " +
        str(C_) + ", " + str(B_) + ")");
  NB_ = (C_ + B_ - 1) / B_;
  const long long P = static_cast<long long>(S_) * NB_;
  if (P > std::numeric_limits<int>::max() / 2)
    throw std::invalid_argument("KVCache: num_slots * capacity is too large");
  P_ = static_cast<int>(P);
  block_bytes_ = 2 * size_t(KV_) * B_ * D_ * kv_dtype_size(dtype_);
  const double total = double(block_bytes_) * L_ * P_;
  if (total > 1e12)
    throw std::invalid_argument("KVCache: " + str((long long)(total / 1e9)) +
                                " GB requested; lower capacity or num_slots");
  data_.reset(static_cast<uint8_t*>(alloc_aligned(block_bytes_ * L_ * P_)));
  if (dtype_ == KVDtype::I8)
    scales_.reset(static_cast<float*>(alloc_aligned(sizeof(float) * 2 * KV_ * B_ * size_t(L_) * P_)));
  tables_.assign(size_t(L_) * S_ * NB_, -1);
  refs_.assign(size_t(L_) * P_, 0);
  free_.resize(L_);
  len_.assign(size_t(L_) * S_, 0);
  prefix_.assign(S_, 0);
  reset();
}

size_t KVCache::bytes() const {
  size_t b = block_bytes_ * L_ * P_;
  if (dtype_ == KVDtype::I8) b += sizeof(float) * 2 * KV_ * B_ * size_t(L_) * P_;
  return b;
}

void KVCache::check_slot(int slot, const char* what) const {
  if (slot < 0 || slot >= S_)
    throw std::out_of_range(std::string(what) + ": slot " + str(slot) + " is out of range; the cache has " +
                            str(S_) + " slots (0.." + str(S_ - 1) + ")");
}

void KVCache::check_layer(int layer, const char* what) const {
  if (layer < 0 || layer >= L_)
    throw std::out_of_range(std::string(what) + ": layer " + str(layer) + " is out of range; the cache has " +
                            str(L_) + " layers");
}

int KVCache::length(int slot) const {
  check_slot(slot, "length");
  return len_[size_t(L_ - 1) * S_ + slot];
}

int KVCache::layer_length(int layer, int slot) const {
  check_layer(layer, "layer_length");
  check_slot(slot, "layer_length");
  return len_[size_t(layer) * S_ + slot];
}

int KVCache::prefix_length(int slot) const {
  check_slot(slot, "prefix_length");
  return prefix_[slot];
}

void KVCache::set_prefix_length(int slot, int n) {
  check_slot(slot, "set_prefix_length");
  if (n < 0 || n > C_)
    throw std::out_of_range("set_prefix_length: n = " + str(n) + " must be in [0, capacity = " + str(C_) + "]");
  prefix_[slot] = n;
}

int KVCache::alloc_block(int layer) {
  auto& fl = free_[layer];
  if (fl.empty()) throw std::logic_error("KVCache: block pool exhausted (internal error: refcount bug)");
  int p = fl.back();
  fl.pop_back();
  refs_[size_t(layer) * P_ + p] = 1;
  return p;
}

void KVCache::release(int layer, int p) {
  int& r = refs_[size_t(layer) * P_ + p];
  if (--r == 0) free_[layer].push_back(p);
}

void KVCache::release_from(int layer, int slot, int first_block) {
  for (int b = first_block; b < NB_; ++b) {
    int& p = table(layer, slot, b);
    if (p >= 0) release(layer, p);
    p = -1;
  }
}

void KVCache::set_length(int slot, int n) {
  check_slot(slot, "set_length");
  int shortest = C_;
  for (int l = 0; l < L_; ++l) shortest = std::min(shortest, len_[size_t(l) * S_ + slot]);
  if (n < 0 || n > shortest)
    throw std::out_of_range("set_length: can only truncate; slot " + str(slot) + " holds " + str(shortest) +
                            " tokens in every layer, asked for " + str(n));
  for (int l = 0; l < L_; ++l) {
    len_[size_t(l) * S_ + slot] = n;
    release_from(l, slot, (n + B_ - 1) / B_);
  }
}

void KVCache::copy_slot(int src, int dst) {
  check_slot(src, "copy_slot");
  check_slot(dst, "copy_slot");
  if (src == dst) return;
  for (int l = 0; l < L_; ++l) {
    for (int b = 0; b < NB_; ++b) {   // take the new references first, then drop the old ones
      int p = table(l, src, b);
      if (p >= 0) ++refs_[size_t(l) * P_ + p];
    }
    release_from(l, dst, 0);
    for (int b = 0; b < NB_; ++b) table(l, dst, b) = table(l, src, b);
    len_[size_t(l) * S_ + dst] = len_[size_t(l) * S_ + src];
  }
  prefix_[dst] = prefix_[src];
}

void KVCache::reorder(const std::vector<int>& src_for_dst) {
  const int n = static_cast<int>(src_for_dst.size());
  if (n > S_)
    throw std::out_of_range("reorder: got " + str(n) + " entries but the cache has " + str(S_) + " slots");
  for (int s : src_for_dst) check_slot(s, "reorder");
  // Snapshot the sources, add their references, then drop the destinations' old references.
  std::vector<int> new_tables(size_t(L_) * n * NB_), new_len(size_t(L_) * n), new_prefix(n);
  for (int l = 0; l < L_; ++l)
    for (int d = 0; d < n; ++d) {
      const int s = src_for_dst[d];
      for (int b = 0; b < NB_; ++b) {
        const int p = table(l, s, b);
        new_tables[(size_t(l) * n + d) * NB_ + b] = p;
        if (p >= 0) ++refs_[size_t(l) * P_ + p];
      }
      new_len[size_t(l) * n + d] = len_[size_t(l) * S_ + s];
    }
  for (int d = 0; d < n; ++d) new_prefix[d] = prefix_[src_for_dst[d]];
  for (int l = 0; l < L_; ++l)
    for (int d = 0; d < n; ++d) {
      release_from(l, d, 0);
      for (int b = 0; b < NB_; ++b) table(l, d, b) = new_tables[(size_t(l) * n + d) * NB_ + b];
      len_[size_t(l) * S_ + d] = new_len[size_t(l) * n + d];
    }
  for (int d = 0; d < n; ++d) prefix_[d] = new_prefix[d];
}

void KVCache::reset() {
  std::fill(tables_.begin(), tables_.end(), -1);
  std::fill(refs_.begin(), refs_.end(), 0);
  std::fill(len_.begin(), len_.end(), 0);
  std::fill(prefix_.begin(), prefix_.end(), 0);
  for (int l = 0; l < L_; ++l) {
    free_[l].clear();
    free_[l].reserve(P_);
    for (int p = P_ - 1; p >= 0; --p) free_[l].push_back(p);   // hand out block 0 first
  }
}

int KVCache::blocks_in_use(int layer) const {
  check_layer(layer, "blocks_in_use");
  return P_ - static_cast<int>(free_[layer].size());
}

void KVCache::check_append(int layer, int slot, int n) const {
  check_layer(layer, "attention");
  check_slot(slot, "attention");
  const int len = len_[size_t(layer) * S_ + slot];
  if (n < 0 || len + n > C_)
    throw std::out_of_range("KV cache is full: slot " + str(slot) + " holds " + str(len) + " tokens, appending " +
                            str(n) + " would exceed capacity " + str(C_) +
                            "; create the cache with a larger capacity or shorten the prompt / max_new_tokens");
  const int last = len_[size_t(L_ - 1) * S_ + slot];
  if (layer == 0 && L_ > 1 && len != last)
    throw std::logic_error("KV cache lock-step: layer 0 of slot " + str(slot) + " starts a new step but the last layer "
                           "has " + str(last) + " tokens vs " + str(len) + "; run every layer once per step, in order");
  if (layer > 0 && len + n > len_[size_t(layer - 1) * S_ + slot])
    throw std::logic_error("KV cache lock-step: layer " + str(layer) + " of slot " + str(slot) +
                           " would get ahead of layer " + str(layer - 1) + "; run the layers in order 0..L-1");
}

void KVCache::prepare_append(int layer, int slot, int n) {
  const int len = len_[size_t(layer) * S_ + slot];
  if (n <= 0) return;
  for (int b = len / B_; b <= (len + n - 1) / B_; ++b) {
    int& p = table(layer, slot, b);
    if (p < 0) {
      p = alloc_block(layer);
    } else if (refs_[size_t(layer) * P_ + p] > 1) {   // shared with another slot: copy on write
      const int fresh = alloc_block(layer);
      std::memcpy(block_data(layer, fresh), block_data(layer, p), block_bytes_);
      if (dtype_ == KVDtype::I8)
        std::memcpy(block_scales(layer, fresh), block_scales(layer, p), sizeof(float) * 2 * KV_ * B_);
      release(layer, p);
      p = fresh;
    }
  }
}

void KVCache::advance(int layer, int slot, int n) { len_[size_t(layer) * S_ + slot] += n; }

void KVCache::store(int layer, int slot, int index, int h, const float* k, const float* v) {
  const int p = table(layer, slot, index / B_);
  const int row = index % B_;
  const size_t es = kv_dtype_size(dtype_);
  uint8_t* base = block_data(layer, p);
  uint8_t* kd = base + (size_t(h) * B_ + row) * D_ * es;
  uint8_t* vd = base + (size_t(KV_ + h) * B_ + row) * D_ * es;
  switch (dtype_) {
    case KVDtype::F32:
      std::memcpy(kd, k, sizeof(float) * D_);
      std::memcpy(vd, v, sizeof(float) * D_);
      break;
    case KVDtype::F16: {
      auto* kh = reinterpret_cast<uint16_t*>(kd);
      auto* vh = reinterpret_cast<uint16_t*>(vd);
      floats_to_halves(k, D_, kh);
      floats_to_halves(v, D_, vh);
      break;
    }
    case KVDtype::I8: {
      // Symmetric per-token-per-head quantization: x ~= scale * q, q in [-127, 127].
      float* sc = block_scales(layer, p);
      const float* src[2] = {k, v};
      int8_t* dst[2] = {reinterpret_cast<int8_t*>(kd), reinterpret_cast<int8_t*>(vd)};
      for (int t = 0; t < 2; ++t) {
        float amax = 0.f;
        for (int d = 0; d < D_; ++d) amax = std::max(amax, std::fabs(src[t][d]));
        const float scale = amax / 127.f;
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int d = 0; d < D_; ++d)
          dst[t][d] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(src[t][d] * inv))));
        sc[(size_t(t) * KV_ + h) * B_ + row] = scale;
      }
      break;
    }
  }
}

KVBlockView KVCache::block(int layer, int slot, int h, int b) const {
  const int p = table(layer, slot, b);
  const size_t es = kv_dtype_size(dtype_);
  const uint8_t* base = block_data(layer, p);
  KVBlockView view;
  view.k = base + size_t(h) * B_ * D_ * es;
  view.v = base + size_t(KV_ + h) * B_ * D_ * es;
  view.kscale = nullptr;
  view.vscale = nullptr;
  if (dtype_ == KVDtype::I8) {
    const float* sc = block_scales(layer, p);
    view.kscale = sc + size_t(h) * B_;
    view.vscale = sc + size_t(KV_ + h) * B_;
  }
  return view;
}

void KVCache::read(int layer, int slot, float* k, float* v) const {
  check_layer(layer, "read");
  check_slot(slot, "read");
  const int len = len_[size_t(layer) * S_ + slot];
  for (int h = 0; h < KV_; ++h)
    for (int i = 0; i < len; ++i) {
      const KVBlockView bv = block(layer, slot, h, i / B_);
      const int row = i % B_;
      float* kd = k + (size_t(h) * len + i) * D_;
      float* vd = v + (size_t(h) * len + i) * D_;
      for (int d = 0; d < D_; ++d) {
        const size_t e = size_t(row) * D_ + d;
        switch (dtype_) {
          case KVDtype::F32:
            kd[d] = static_cast<const float*>(bv.k)[e];
            vd[d] = static_cast<const float*>(bv.v)[e];
            break;
          case KVDtype::F16:
            kd[d] = half_to_float(static_cast<const uint16_t*>(bv.k)[e]);
            vd[d] = half_to_float(static_cast<const uint16_t*>(bv.v)[e]);
            break;
          case KVDtype::I8:
            kd[d] = bv.kscale[row] * static_cast<const int8_t*>(bv.k)[e];
            vd[d] = bv.vscale[row] * static_cast<const int8_t*>(bv.v)[e];
            break;
        }
      }
    }
}

#if defined(ENGINE_HAVE_AVX2)
namespace f16c {
void floats_to_halves(const float* x, int n, uint16_t* y);   // kv_cache_avx2.cpp
}
#endif

void floats_to_halves(const float* x, int n, uint16_t* y) {
#if defined(ENGINE_HAVE_AVX2)
  const SimdLevel level = active_simd();
  if (level == SimdLevel::Avx2 || uses_avx512(level)) return f16c::floats_to_halves(x, n, y);
#endif
  for (int i = 0; i < n; ++i) y[i] = float_to_half(x[i]);
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xffu;
  uint32_t man = x & 0x7fffffu;
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0u));   // inf / nan
  int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);                            // overflow -> inf
  if (e <= 0) {                                                                          // subnormal / zero
    if (e < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    const int shift = 14 - e;   // 14..24
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;   // may carry into the exponent: fine
  return static_cast<uint16_t>(sign | h);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t(h) & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t x;
  if (exp == 0) {
    if (man == 0) {
      x = sign;
    } else {   // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      x = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000u | (man << 13);
  } else {
    x = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

}  // namespace engine
