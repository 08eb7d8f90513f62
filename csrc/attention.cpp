// Attention driver: validation, RoPE (cached tables, attention_rope.h) + cache append, the naive
// scalar reference, and dispatch of the SIMD kernels (attention_simd.inl, one build per ISA) across
// the pool: the blocked online-softmax kernel for decode / few query rows, and for prefill the
// packed-key two-pass tile kernel.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "attention_kernels.h"
#include "cpu_features.h"
#include "thread_pool.h"

namespace engine {
namespace {

std::string str(long long v) { return std::to_string(v); }

// Grow-only per-thread buffer: no allocation once it reached its working size.
float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// The first 64-byte aligned float of p (p must have 15 spare floats).
float* align64(float* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((a + 63) / 64 * 64);
}

void check_common(const KVCache& cache, int layer, const std::vector<int>& slots, int T, const char* what) {
  cache.check_layer(layer, what);
  if (slots.empty()) throw std::invalid_argument(std::string(what) + ": slots is empty; pass at least one slot");
  if (T < 1) throw std::invalid_argument(std::string(what) + ": tokens_per_slot must be >= 1, got " + str(T));
  for (size_t i = 0; i < slots.size(); ++i) {
    cache.check_slot(slots[i], what);
    for (size_t k = 0; k < i; ++k)
      if (slots[k] == slots[i])
        throw std::invalid_argument(std::string(what) + ": slot " + str(slots[i]) +
                                    " appears twice in one call; each slot may be written once per call");
  }
}

void check_heads(const KVCache& cache, int H, const char* what) {
  if (H < 1 || H % cache.num_kv_heads() != 0)
    throw std::invalid_argument(std::string(what) + ": num_heads (" + str(H) + ") must be a positive multiple of the "
                                "cache's num_kv_heads (" + str(cache.num_kv_heads()) + ")");
}

void check_params(const AttentionParams& p, const char* what) {
  if (!(p.scale > 0.f) || !std::isfinite(p.scale))
    throw std::invalid_argument(std::string(what) + ": scale must be a positive finite number (1/sqrt(head_dim) or "
                                "1/sqrt(query_pre_attn_scalar)), got " + std::to_string(p.scale));
  if (!std::isfinite(p.softcap) || !std::isfinite(p.rope_theta))
    throw std::invalid_argument(std::string(what) + ": softcap and rope_theta must be finite (use 0 for off)");
}

void check_rope(int D, float theta, const char* what) {
  if (theta > 0.f && D % 2 != 0)
    throw std::invalid_argument(std::string(what) + ": RoPE needs an even head_dim, got " + str(D) +
                                "; pass rope_theta=0 to skip RoPE");
}

// Visible key range [lo, hi) of the query at cache index j (PALIGEMMA.md prefix-LM mask).
inline void key_range(int j, int P, int window, int* lo, int* hi) {
  if (j < P) {
    *lo = 0;
    *hi = P;
  } else {
    *lo = window > 0 ? std::max(0, j - window + 1) : 0;
    *hi = j + 1;
  }
}

inline float load_elem(KVDtype dt, const void* base, size_t e) {
  switch (dt) {
    case KVDtype::F32: return static_cast<const float*>(base)[e];
    case KVDtype::F16: return half_to_float(static_cast<const uint16_t*>(base)[e]);
    case KVDtype::I8: return static_cast<const int8_t*>(base)[e];
  }
  return 0.f;
}

// ---- Naive scalar reference: one query row at a time, two passes, fp32 ----
// q [M, H, D] rotated (not scaled); out [M, H*D].
void attend_reference(const KVCache& cache, int layer, const float* q, int H, const std::vector<int>& slots,
                      int T, const AttentionParams& p, float* out) {
  const int KV = cache.num_kv_heads(), D = cache.head_dim(), B = cache.block_tokens(), G = H / KV;
  const KVDtype dt = cache.dtype();
  const int N = static_cast<int>(slots.size());
  parallel_for(N * H, [&](int task, int) {
    thread_local std::vector<float> buf;
    float* s = scratch(buf, cache.capacity());   // [len] scores / probabilities
    const int i = task / H, h = task % H, g = h / G, slot = slots[i];
    const int len = cache.layer_length(layer, slot), P = cache.prefix_length(slot);
    for (int t = 0; t < T; ++t) {
      const int m = i * T + t, j = len - T + t;
      const float* qr = q + (size_t(m) * H + h) * D;
      int lo, hi;
      key_range(j, P, p.window, &lo, &hi);
      float mx = -std::numeric_limits<float>::infinity();
      for (int key = lo; key < hi; ++key) {
        const KVBlockView bv = cache.block(layer, slot, g, key / B);
        const size_t row = size_t(key % B) * D;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qr[d] * load_elem(dt, bv.k, row + d);
        if (bv.kscale) dot *= bv.kscale[key % B];
        float sc = dot * p.scale;
        if (p.softcap > 0.f) sc = p.softcap * std::tanh(sc / p.softcap);
        s[key] = sc;
        mx = std::max(mx, sc);
      }
      float sum = 0.f;
      for (int key = lo; key < hi; ++key) {
        s[key] = std::exp(s[key] - mx);
        sum += s[key];
      }
      float* o = out + size_t(m) * H * D + size_t(h) * D;
      for (int d = 0; d < D; ++d) o[d] = 0.f;
      for (int key = lo; key < hi; ++key) {
        const KVBlockView bv = cache.block(layer, slot, g, key / B);
        const size_t row = size_t(key % B) * D;
        const float w = s[key] / sum * (bv.vscale ? bv.vscale[key % B] : 1.f);
        for (int d = 0; d < D; ++d) o[d] += w * load_elem(dt, bv.v, row + d);
      }
    }
  });
}

// The query rows of one attention task: heads [h0, h1) of kv group g for tokens [t0, t1) of
// sequence i, where task = ((i * KV + g) * hsplit + part) * ntiles + tile. Fills the row pointers
// and each row's visible key range; returns the number of rows (0: an empty head range).
struct TaskRows {
  int i = 0, g = 0, n = 0;
  const float* q[attn::kMaxRows];
  float* out[attn::kMaxRows];
  int lo[attn::kMaxRows], hi[attn::kMaxRows];
};

inline void task_rows(int task, int ntiles, int hsplit, int KV, int G, int gh, int tq, int T, int H, int D,
                      const float* q, float* out, const int* lens, const int* prefixes, int window,
                      TaskRows* rows) {
  int rest = task;
  const int tile = rest % ntiles; rest /= ntiles;
  const int part = rest % hsplit; rest /= hsplit;
  rows->g = rest % KV;
  rows->i = rest / KV;
  const int i = rows->i, len = lens[i], P = prefixes[i];
  const int h0 = rows->g * G + part * gh, h1 = std::min(rows->g * G + G, h0 + gh);
  const int t0 = tile * tq, t1 = std::min(T, t0 + tq);
  int r = 0;
  for (int t = t0; t < t1 && h0 < h1; ++t)
    for (int h = h0; h < h1; ++h, ++r) {
      const size_t m = size_t(i) * T + t;
      rows->q[r] = q + (m * H + h) * D;
      rows->out[r] = out + m * H * D + size_t(h) * D;
      key_range(len - T + t, P, window, &rows->lo[r], &rows->hi[r]);
    }
  rows->n = r;
}

// ---- Blocked kernels: tasks of (slot, kv head, group of heads, tile of tokens) ----
void attend_blocked(attn::TaskFn fn, const KVCache& cache, int layer, const float* q, int H,
                    const std::vector<int>& slots, int T, const AttentionParams& p, float* out) {
  const int KV = cache.num_kv_heads(), D = cache.head_dim(), B = cache.block_tokens(), G = H / KV;
  const int N = static_cast<int>(slots.size());
  // Split a GQA group over several tasks when there are too few tasks for the threads (decode
  // with one kv head) or the group exceeds kMaxRows; then tile tokens to ~32 rows per task.
  int hsplit = (G + attn::kMaxRows - 1) / attn::kMaxRows;
  const int threads = get_num_threads();
  if (T == 1 && N * KV < threads) hsplit = std::max(hsplit, std::min(G, (threads + N * KV - 1) / (N * KV)));
  const int gh = (G + hsplit - 1) / hsplit;          // heads per task
  const int tq = std::max(1, std::min(T, 32 / gh));  // tokens per task
  const int ntiles = (T + tq - 1) / tq;
  const int ntasks = N * KV * hsplit * ntiles;

  // Block views per (slot, kv head), and each slot's length and prefix, built once per call.
  const int nb_max = (cache.capacity() + B - 1) / B;
  std::vector<KVBlockView> views(size_t(N) * KV * nb_max);
  std::vector<int> lens(static_cast<size_t>(N)), prefixes(static_cast<size_t>(N));
  for (int i = 0; i < N; ++i) {
    const int len = cache.layer_length(layer, slots[i]);
    lens[size_t(i)] = len;
    prefixes[size_t(i)] = cache.prefix_length(slots[i]);
    for (int g = 0; g < KV; ++g)
      for (int b = 0; b * B < len; ++b) views[(size_t(i) * KV + g) * nb_max + b] = cache.block(layer, slots[i], g, b);
  }
  parallel_for(ntasks, [&](int task, int) {
    TaskRows rows;
    task_rows(task, ntiles, hsplit, KV, G, gh, tq, T, H, D, q, out, lens.data(), prefixes.data(), p.window, &rows);
    if (rows.n == 0) return;
    const int i = rows.i, g = rows.g;
    thread_local std::vector<float> buf;
    const int ld = attn::scores_ld(B);
    float* base = scratch(buf, size_t(attn::kMaxRows) * (ld + D + 2));
    attn::Scratch sc{ld, base, base + attn::kMaxRows * ld, base + attn::kMaxRows * (ld + D),
                     base + attn::kMaxRows * (ld + D + 1)};
    attn::Task tk{rows.n, D, B, cache.dtype(), rows.q, rows.out, rows.lo, rows.hi, &views[(size_t(i) * KV + g) * nb_max], p.softcap};
    fn(tk, sc);
  });
}

// ---- Prefill tile kernel: packed keys / values per (slot, kv head), then tasks of (slot, kv head,
// heads, tokens) ----
void attend_tiles(const attn::Kernels& kn, const KVCache& cache, int layer, const float* q, int H,
                  const std::vector<int>& slots, int T, const AttentionParams& p, float* out) {
  const int KV = cache.num_kv_heads(), D = cache.head_dim(), B = cache.block_tokens(), G = H / KV;
  const int N = static_cast<int>(slots.size()), CW = kn.chunk;
  const int nb_max = (cache.capacity() + B - 1) / B;

  // Per slot: the keys [k0, len) any of its queries sees (k0: the first query's first key; later
  // queries start no earlier), packed as attention_kernels.h describes: np keys (padded), each
  // (slot, kv head) owning `stride` floats of kv = [kp (np * D) | vp (ceil(D / CW) * CW * np)].
  std::vector<int> k0s(static_cast<size_t>(N)), lens(static_cast<size_t>(N)), prefixes(static_cast<size_t>(N));
  int np = CW;
  for (int i = 0; i < N; ++i) {
    const int len = cache.layer_length(layer, slots[size_t(i)]), P = cache.prefix_length(slots[size_t(i)]);
    int lo, hi;
    key_range(len - T, P, p.window, &lo, &hi);
    k0s[size_t(i)] = lo;
    lens[size_t(i)] = len;
    prefixes[size_t(i)] = P;
    np = std::max(np, (len - lo + CW - 1) / CW * CW);
  }
  const size_t dpad = size_t(D + CW - 1) / CW * CW;
  const size_t stride = size_t(np) * (D + dpad);
  std::vector<KVBlockView> views(size_t(N) * KV * nb_max);
  for (int i = 0; i < N; ++i)
    for (int g = 0; g < KV; ++g)
      for (int b = 0; b * B < lens[size_t(i)]; ++b)
        views[(size_t(i) * KV + g) * nb_max + b] = cache.block(layer, slots[size_t(i)], g, b);
  thread_local std::vector<float> kvbuf;   // the calling thread's; workers use the pointer
  float* kv = align64(scratch(kvbuf, size_t(N) * KV * stride + 16));

  // Pack: one task per (slot, kv head, cache block).
  parallel_for(N * KV * nb_max, [&](int task, int) {
    const int b = task % nb_max, g = (task / nb_max) % KV, i = task / (nb_max * KV);
    const int k0 = k0s[size_t(i)], len = lens[size_t(i)];
    const int first = std::max(k0, b * B), last = std::min(len, b * B + B);   // keys [first, last)
    if (first >= last) return;
    float* kp = kv + (size_t(i) * KV + g) * stride;
    const attn::PackJob job{&views[(size_t(i) * KV + g) * nb_max + b], first - b * B, last - first, D,
                            cache.dtype(), kp, kp + size_t(np) * D, np, first - k0, last == len};
    kn.pack(job);
  });

  // Tiles: up to kMaxRows heads of a GQA group x enough tokens for ~kTileTarget rows.
  constexpr int kTileTarget = 48;
  const int hsplit = (G + attn::kMaxRows - 1) / attn::kMaxRows;
  const int gh = (G + hsplit - 1) / hsplit;                           // heads per task
  const int tq = std::max(1, std::min(T, kTileTarget / gh));          // tokens per task
  const int ntiles = (T + tq - 1) / tq;
  parallel_for(N * KV * hsplit * ntiles, [&](int task, int) {
    TaskRows rows;
    task_rows(task, ntiles, hsplit, KV, G, gh, tq, T, H, D, q, out, lens.data(), prefixes.data(), p.window, &rows);
    if (rows.n == 0) return;
    const int i = rows.i, g = rows.g;
    thread_local std::vector<float> buf;
    float* base = align64(scratch(buf, size_t(attn::kMaxRows) * (np + 1) + 16));
    const attn::TileScratch sc{np, base, base + size_t(attn::kMaxRows) * np};
    const float* kp = kv + (size_t(i) * KV + g) * stride;
    const attn::TileTask tt{{rows.n, D, B, cache.dtype(), rows.q, rows.out, rows.lo, rows.hi, nullptr, p.softcap},
                            kp, kp + size_t(np) * D, np, k0s[size_t(i)]};
    kn.tile(tt, sc);
  });
}

attn::Kernels fast_kernels(SimdLevel level) {
  switch (level) {
#if defined(ENGINE_HAVE_AVX512)
    case SimdLevel::Amx:
    case SimdLevel::Avx512: return attn::avx512_kernels();
#endif
#if defined(ENGINE_HAVE_AVX2)
    case SimdLevel::Avx2: return attn::avx2_kernels();
#endif
#if defined(ENGINE_HAVE_NEON)
    case SimdLevel::Neon: return attn::neon_kernels();
#endif
    default: return attn::Kernels{nullptr, nullptr, nullptr, 0};
  }
}

// The prefill tile kernels: at the amx level, AMX-BF16 products for f16 and int8 caches (an f32
// cache keeps fp32 products, so float artifacts stay transformers-exact); else the level's own.
attn::Kernels tile_kernels(const attn::Kernels& kn, const KVCache& cache) {
#if defined(ENGINE_HAVE_AMX)
  if (active_simd() == SimdLevel::Amx && cache.dtype() != KVDtype::F32 && cache.head_dim() <= attn::kAmxMaxDim)
    return attn::amx_kernels();
#endif
  (void)cache;
  return kn;
}

// Floats of work per parallel task in prepare_q and the append (smaller calls stay on one thread).
constexpr size_t kSerialFloats = size_t(1) << 15;

int max_position(const int32_t* positions, size_t n) {
  int mx = -1;
  for (size_t m = 0; m < n; ++m) mx = std::max(mx, int(positions[m]));
  return mx;
}

// Copies q [M, H, D] into a per-thread buffer of the calling thread, rotated (rope != nullptr) and
// multiplied by `mul`.
const float* prepare_q(const float* q, int M, int H, int D, const int32_t* positions, const RopeTable* rope,
                       float mul) {
  thread_local std::vector<float> qbuf;
  float* qr = scratch(qbuf, size_t(M) * H * D);
  const int rows_per_task = std::max(1, int(kSerialFloats / (size_t(H) * D)));
  const int ntasks = (M + rows_per_task - 1) / rows_per_task;
  parallel_for(ntasks, [&](int task, int) {
    thread_local std::vector<float> tabs;
    float* tmp = scratch(tabs, size_t(D));
    const int m1 = std::min(M, (task + 1) * rows_per_task);
    for (int m = task * rows_per_task; m < m1; ++m) {
      const float* cs = rope ? rope->row(positions[m], tmp) : nullptr;
      for (int h = 0; h < H; ++h) {
        const float* src = q + (size_t(m) * H + h) * D;
        float* dst = qr + (size_t(m) * H + h) * D;
        for (int d = 0; d < D; ++d) dst[d] = src[d];
        if (cs) rope_apply(dst, D, cs);
        if (mul != 1.f)
          for (int d = 0; d < D; ++d) dst[d] *= mul;
      }
    }
  });
  return qr;
}

// Query rows per kv head (T * G) from which a call takes the prefill tile kernel: below ~20-30 rows
// (measured, AVX2) packing the keys and values costs more than the register tiles save.
constexpr int kTileMinRows = 24;

void attend_impl(const KVCache& cache, int layer, const float* q, int H, const std::vector<int>& slots, int T,
                 const int32_t* positions, const AttentionParams& p, float* out) {
  const int D = cache.head_dim(), G = H / cache.num_kv_heads();
  const int M = static_cast<int>(slots.size()) * T;
  // The cache's RoPE table when attention() prepared one, else a local one (rows computed on the fly).
  const RopeTable* rope = p.rope_theta > 0.f ? cache.rope_tables().find(D, p.rope_theta) : nullptr;
  std::optional<RopeTable> local;
  if (p.rope_theta > 0.f && rope == nullptr) rope = &local.emplace(D, p.rope_theta);
  const attn::Kernels kn = fast_kernels(active_simd());
  if (kn.decode == nullptr) {
    const float* qr = prepare_q(q, M, H, D, positions, rope, 1.f);
    attend_reference(cache, layer, qr, H, slots, T, p, out);
  } else {
    const float* qr = prepare_q(q, M, H, D, positions, rope, p.scale);   // scale folded into q
    if (T * G >= kTileMinRows)
      attend_tiles(tile_kernels(kn, cache), cache, layer, qr, H, slots, T, p, out);
    else
      attend_blocked(kn.decode, cache, layer, qr, H, slots, T, p, out);
  }
}

void check_attend(const KVCache& cache, int layer, int H, const std::vector<int>& slots, int T,
                  const AttentionParams& p, const char* what) {
  check_common(cache, layer, slots, T, what);
  check_heads(cache, H, what);
  check_params(p, what);
  check_rope(cache.head_dim(), p.rope_theta, what);
}

void check_prefix_whole(const KVCache& cache, int slot, int len_after, int T, const char* what) {
  const int P = cache.prefix_length(slot), first = len_after - T;
  if (first < P && len_after < P)
    throw std::logic_error(std::string(what) + ": slot " + str(slot) + " has a bidirectional prefix of " + str(P) +
                           " tokens but only " + str(len_after) + " would be cached after this call; append the "
                           "whole prefix block in one call (queries in it attend to all of it)");
}

}  // namespace

void rope_inplace(float* x, int rows, int heads, int D, const int32_t* positions, float theta) {
  if (theta <= 0.f) return;
  check_rope(D, theta, "rope");
  const RopeTable table(D, theta);   // inverse frequencies once; cos / sin per position
  thread_local std::vector<float> tabs;
  float* tmp = scratch(tabs, size_t(D));
  for (int m = 0; m < rows; ++m) {
    const float* cs = table.row(positions[m], tmp);
    for (int h = 0; h < heads; ++h) rope_apply(x + (size_t(m) * heads + h) * D, D, cs);
  }
}

void attention_append(KVCache& cache, int layer, const float* k, const float* v, const std::vector<int>& slots,
                      int T, const int32_t* positions, float rope_theta) {
  const char* what = "attention";
  check_common(cache, layer, slots, T, what);
  check_rope(cache.head_dim(), rope_theta, what);
  for (int slot : slots) {
    cache.check_append(layer, slot, T);
    check_prefix_whole(cache, slot, cache.layer_length(layer, slot) + T, T, what);
  }
  const int KV = cache.num_kv_heads(), D = cache.head_dim(), N = static_cast<int>(slots.size());
  const int M = N * T;
  const RopeTable* rope = nullptr;
  if (rope_theta > 0.f)   // tabulates this call's positions (up to a bound; farther ones are computed)
    rope = &cache.rope_tables().prepare(D, rope_theta, max_position(positions, size_t(M)) + 1,
                                        2 * cache.capacity() + 64);
  std::vector<int> lens(slots.size());
  for (int i = 0; i < N; ++i) {
    lens[size_t(i)] = cache.layer_length(layer, slots[size_t(i)]);
    cache.prepare_append(layer, slots[size_t(i)], T);   // every block written below is private now
  }
  // Rows write disjoint cache rows (and int8 scales), so they are stored in parallel.
  const int rows_per_task = std::max(1, int(kSerialFloats / (size_t(KV) * D)));
  const int ntasks = (M + rows_per_task - 1) / rows_per_task;
  const int* len = lens.data();
  parallel_for(ntasks, [&](int task, int) {
    thread_local std::vector<float> kbuf, tabs;
    float* kr = scratch(kbuf, size_t(D));
    float* tmp = scratch(tabs, size_t(D));
    const int m1 = std::min(M, (task + 1) * rows_per_task);
    for (int m = task * rows_per_task; m < m1; ++m) {
      const int i = m / T, t = m % T;
      const float* cs = rope ? rope->row(positions[m], tmp) : nullptr;
      for (int g = 0; g < KV; ++g) {
        const float* ks = k + (size_t(m) * KV + g) * D;
        for (int d = 0; d < D; ++d) kr[d] = ks[d];
        if (cs) rope_apply(kr, D, cs);
        cache.store(layer, slots[size_t(i)], len[i] + t, g, kr, v + (size_t(m) * KV + g) * D);
      }
    }
  });
  for (int slot : slots) cache.advance(layer, slot, T);
}

void attention_attend(const KVCache& cache, int layer, const float* q, int H, const std::vector<int>& slots, int T,
                      const int32_t* positions, const AttentionParams& p, float* out) {
  const char* what = "attention";
  check_attend(cache, layer, H, slots, T, p, what);
  for (int slot : slots) {
    const int len = cache.layer_length(layer, slot);
    if (len < T)
      throw std::out_of_range(std::string(what) + ": slot " + str(slot) + " holds " + str(len) +
                              " tokens in layer " + str(layer) + ", fewer than the " + str(T) + " queries");
    check_prefix_whole(cache, slot, len, T, what);
  }
  attend_impl(cache, layer, q, H, slots, T, positions, p, out);
}

void attention(KVCache& cache, int layer, const float* q, const float* k, const float* v, int H,
               const std::vector<int>& slots, int T, const int32_t* positions, const AttentionParams& p, float* out) {
  check_attend(cache, layer, H, slots, T, p, "attention");   // everything checked before any write
  attention_append(cache, layer, k, v, slots, T, positions, p.rope_theta);
  attend_impl(cache, layer, q, H, slots, T, positions, p, out);
}

}  // namespace engine
