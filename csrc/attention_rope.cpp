#include "attention_rope.h"

#include <algorithm>
#include <cmath>

namespace engine {
namespace {

// As transformers: inv_freq in fp32 (1 / theta^(2i/D), the power in double).
float inv_freq(int D, float theta, int i) {
  const float e = static_cast<float>(2 * i) / static_cast<float>(D);
  return 1.0f / static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(e)));
}

// cos | sin of the fp32 angles float(pos) * inv[i]: out [2 * half].
void row_from_inv(const float* inv, int half, int32_t pos, float* out) {
  for (int i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv[i];
    out[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    out[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

}  // namespace

void rope_row(int D, float theta, int32_t pos, float* out) {
  const int half = D / 2;
  for (int i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq(D, theta, i);
    out[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    out[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

void rope_apply(float* x, int D, const float* cs) {
  const int half = D / 2;
  const float* c = cs;
  const float* s = cs + half;
  for (int i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c[i] - x2 * s[i];
    x[i + half] = x2 * c[i] + x1 * s[i];
  }
}

RopeTable::RopeTable(int D, float theta) : D_(D), theta_(theta), inv_freq_(size_t(D / 2)) {
  for (int i = 0; i < D / 2; ++i) inv_freq_[size_t(i)] = inv_freq(D, theta, i);
}

void RopeTable::grow(int n) {
  if (n <= n_) return;
  rows_.resize(size_t(n) * D_);
  for (int p = n_; p < n; ++p) row_from_inv(inv_freq_.data(), D_ / 2, p, rows_.data() + size_t(p) * D_);
  n_ = n;
}

const float* RopeTable::row(int32_t pos, float* tmp) const {
  if (pos >= 0 && pos < n_) return rows_.data() + size_t(pos) * D_;
  row_from_inv(inv_freq_.data(), D_ / 2, pos, tmp);
  return tmp;
}

const RopeTable& RopeTables::prepare(int D, float theta, int need, int max_rows) {
  RopeTable* t = nullptr;
  for (auto& x : tables_)
    if (x.head_dim() == D && x.theta() == theta) t = &x;
  if (t == nullptr) {
    if (static_cast<int>(tables_.size()) < kMaxThetas) {
      tables_.emplace_back(D, theta);
      t = &tables_.back();
    } else {
      tables_[size_t(next_)] = RopeTable(D, theta);
      t = &tables_[size_t(next_)];
      next_ = (next_ + 1) % kMaxThetas;
    }
  }
  need = std::min(need, max_rows);
  if (need > t->size()) t->grow(std::min(max_rows, std::max(need, 2 * t->size())));
  return *t;
}

const RopeTable* RopeTables::find(int D, float theta) const {
  for (const auto& x : tables_)
    if (x.head_dim() == D && x.theta() == theta) return &x;
  return nullptr;
}

}  // namespace engine
