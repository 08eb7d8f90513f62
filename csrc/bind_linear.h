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
  py::array codes, colsum, colscale;   // int4: codes4, gcorr, gscale
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

// An int4 matrix from pack_linear_int4 (linear_int8.h, "int4 matrices").
inline Linear make_linear_int4(const py::handle& codes4, const py::handle& gcorr, const py::handle& gscale, int K,
                               int O, int group, const std::string& name) {
  if (K < 1 || O < 1 || K > (1 << 20) || O > (1 << 24))
    throw std::invalid_argument(name + ": K and O must be positive, got K=" + std::to_string(K) + " O=" + std::to_string(O));
  if (group < 4 || group % 4 != 0 || K % group != 0)
    throw std::invalid_argument(name + ": the int4 group size must be a multiple of 4 that divides K=" +
                                std::to_string(K) + ", got " + std::to_string(group));
  Linear l;
  l.view.K = K;
  l.view.O = O;
  l.view.group = group;
  const py::ssize_t P = l.view.o32() / 32, G = K / group;
  l.codes = checked_array(codes4, "", name + " codes4", py::dtype::of<uint8_t>(),
                          "uint8 [O32/32, K/4, 64] from pack_linear_int4", {P, K / 4, 64});
  l.colsum = checked_array(gcorr, "", name + " gcorr", py::dtype::of<int32_t>(),
                           "int32 [O32/32, K/group, 32] from pack_linear_int4", {P, G, 32});
  l.colscale = checked_array(gscale, "", name + " gscale", py::dtype::of<float>(),
                             "float32 [O32/32, K/group, 32] from pack_linear_int4", {P, G, 32});
  l.view.codes4 = static_cast<const uint8_t*>(l.codes.data());
  l.view.gcorr = static_cast<const int32_t*>(l.colsum.data());
  l.view.gscale = static_cast<const float*>(l.colscale.data());
  return l;
}

// A matrix as Python passes it: (codes, colsum, colscale, max_code) for per-row int8 (O: the length
// of colscale), or ("int4", codes4, gcorr, gscale, group, O). O_expected < 0: any O.
inline Linear linear_from_tuple(const py::handle& item, int K, int O_expected, const std::string& name) {
  const std::string forms = name + " must be (codes, colsum, colscale, max_code) or (\"int4\", codes4, gcorr, gscale, group, O)";
  if (!py::isinstance<py::tuple>(item)) throw std::invalid_argument(forms);
  py::tuple t = item.cast<py::tuple>();
  const bool int4 = t.size() == 6 && py::isinstance<py::str>(t[0]) && t[0].cast<std::string>() == "int4";
  if (!int4 && (t.size() != 4 || !py::isinstance<py::array>(t[2]))) throw std::invalid_argument(forms);
  const int O = int4 ? t[5].cast<int>() : int(py::reinterpret_borrow<py::array>(t[2]).shape(0));
  if (O_expected >= 0 && O != O_expected)
    throw std::invalid_argument(name + ": expected " + std::to_string(O_expected) + " output features, got " + std::to_string(O));
  return int4 ? make_linear_int4(t[1], t[2], t[3], K, O, t[4].cast<int>(), name)
              : make_linear(t[0], t[1], t[2], K, O, t[3].cast<int>(), name);
}

}  // namespace engine_bind
