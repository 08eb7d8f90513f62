// A packed per-row int8 matrix (linear_int8.h) handed over from Python: the arrays are kept alive
// and viewed, never copied. Shared by the decoder and vision tower bindings.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "bind_util.h"
#include "linear_int8.h"

namespace engine_bind {

struct Linear {
  py::array codes, colsum, colscale;
  engine::PackedLinear view;
};

// max_code: max |code| as pack_linear_int8 returned it (-1: measured here, reading the codes once).
inline Linear make_linear(const py::handle& codes, const py::handle& colsum, const py::handle& colscale, int K,
                          int O, int max_code, const std::string& name) {
  if (K < 1 || O < 1 || K > (1 << 20) || O > (1 << 24))
    throw std::invalid_argument(name + ": K and O must be positive, got K=" + std::to_string(K) + " O=" + std::to_string(O));
  Linear l;
  l.view.K = K;
  l.view.O = O;
  const py::ssize_t O32 = l.view.o32(), K4 = l.view.k4();
  l.codes = checked_array(codes, "", name + " codes", py::dtype::of<int8_t>(),
                          "int8 [O32/32, K4/4, 32, 4] from pack_linear_int8", {O32 / 32, K4 / 4, 32, 4});
  l.colsum = checked_array(colsum, "", name + " colsum", py::dtype::of<int32_t>(), "int32 [O32] from pack_linear_int8",
                           {O32});
  l.colscale = checked_array(colscale, "", name + " colscale", py::dtype::of<float>(), "float32 [O] = scales / 127", {O});
  l.view.codes = static_cast<const int8_t*>(l.codes.data());
  l.view.colsum = static_cast<const int32_t*>(l.colsum.data());
  l.view.colscale = static_cast<const float*>(l.colscale.data());
  if (max_code < 0) {
    const int8_t* c = l.view.codes;
    max_code = 0;
    for (py::ssize_t i = 0; i < l.codes.size(); ++i) max_code = std::max(max_code, std::abs(int(c[i])));
  }
  if (max_code > 127)
    throw std::invalid_argument(name + ": max_code must be max |code| <= 127 (pack_linear_int8 returns it), got " +
                                std::to_string(max_code));
  l.view.max_code = max_code;
  return l;
}

}  // namespace engine_bind
