// RoPE cos/sin tables (half-split / rotate_half, PALIGEMMA.md), computed once per position instead
// of once per row, layer and tensor.
//
// Row p of a table for (head_dim D, theta) is [cos(a_0..a_{D/2-1}) | sin(a_0..a_{D/2-1})] with
// a_i = float(p) * inv_freq_i, inv_freq_i = 1 / float(theta^(2i/D)) (fp32 as transformers; cos/sin
// evaluated in double and rounded to fp32): exactly rope_row(), so tabulated and computed rows are
// bit-identical.
//
// Ownership: the KV cache holds one RopeTables (its head_dim is fixed); attention() grows it before
// its parallel part and the kernels only read it. No process-global state; like the cache, not
// thread-safe while growing.
#pragma once
#include <cstdint>
#include <vector>

namespace engine {

// cos | sin of one position: out [D] (D even, theta > 0).
void rope_row(int D, float theta, int32_t pos, float* out);
// RoPE of one head vector x [D] with a row cs = [cos | sin] (rope_row / RopeTable::row).
void rope_apply(float* x, int D, const float* cs);

class RopeTable {
 public:
  RopeTable(int D, float theta);
  int head_dim() const { return D_; }
  float theta() const { return theta_; }
  int size() const { return n_; }   // positions [0, size()) are tabulated
  // Tabulates positions [size(), n) (no-op when n <= size()).
  void grow(int n);
  // [D] cos | sin of pos: the table's row when 0 <= pos < size(), else computed into tmp [D].
  const float* row(int32_t pos, float* tmp) const;

 private:
  int D_;
  float theta_;
  int n_ = 0;
  std::vector<float> inv_freq_;   // [D/2]
  std::vector<float> rows_;       // [n, D]
};

// The tables of one owner (a KV cache): one per theta, at most kMaxThetas (a model uses one or two;
// past that the oldest table is replaced).
class RopeTables {
 public:
  static constexpr int kMaxThetas = 4;
  RopeTables() { tables_.reserve(kMaxThetas); }   // references stay valid (no reallocation)
  // The table for (D, theta) holding at least positions [0, min(need, max_rows)); grown
  // geometrically (decode adds one position per step) up to max_rows. The reference is valid until
  // a prepare() for a fifth theta replaces that table.
  const RopeTable& prepare(int D, float theta, int need, int max_rows);
  // The table for (D, theta) or nullptr (read-only users such as attention_attend).
  const RopeTable* find(int D, float theta) const;

 private:
  std::vector<RopeTable> tables_;
  int next_ = 0;   // the slot replaced once kMaxThetas tables exist
};

}  // namespace engine
