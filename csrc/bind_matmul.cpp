// pybind11 glue for the int8 LM-head product (matmul_int8.h). Inputs are checked here with
// messages that say what to pass; the GIL is released while the kernel runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bind_util.h"
#include "matmul_int8.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

void check(const py::array& a, const char* name, const py::dtype& dtype, const char* what, int ndim) {
  engine_bind::checked_array(a, "matmul_int8: ", name, dtype, what, std::vector<py::ssize_t>(size_t(ndim), -1));
}

py::array_t<float> matmul_int8_py(const py::array& x, const py::array& codes, const py::array& scales,
                                  engine::ThreadPool* pool) {
  check(x, "x", py::dtype::of<float>(), "float32 [rows, K]", 2);
  check(codes, "codes", py::dtype::of<int8_t>(), "int8 [V, K]", 2);
  check(scales, "scales", py::dtype::of<float>(), "float32 [V]", 1);
  const py::ssize_t M = x.shape(0), K = x.shape(1), V = codes.shape(0);
  if (codes.shape(1) != K)
    throw std::invalid_argument("matmul_int8: x has " + std::to_string(K) + " columns but codes has " +
                                std::to_string(codes.shape(1)) + "; both need the hidden size K");
  if (scales.shape(0) != V)
    throw std::invalid_argument("matmul_int8: scales has " + std::to_string(scales.shape(0)) +
                                " entries, codes has " + std::to_string(V) + " rows; pass one scale per row");
  if (K < 1 || K > 65536) throw std::invalid_argument("matmul_int8: K must be in [1, 65536], got " + std::to_string(K));
  if (M > 4096) throw std::invalid_argument("matmul_int8: at most 4096 rows per call, got " + std::to_string(M));
  py::array_t<float> out({M, V});
  const float* xp = static_cast<const float*>(x.data());
  const int8_t* cp = static_cast<const int8_t*>(codes.data());
  const float* sp = static_cast<const float*>(scales.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    engine::PoolScope scope(pool);
    engine::matmul_int8(xp, int(M), int(K), cp, sp, int64_t(V), op);
  }
  return out;
}

}  // namespace

void bind_matmul(py::module_& m) {
  m.def("matmul_int8", &matmul_int8_py, py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("pool") = nullptr,
        R"doc(LM head over an int8 table: x float32 [M, K], codes int8 [V, K] in [-127, 127] (a memory map
is fine), scales float32 [V] -> float32 [M, V]. Each row of x is quantized to int8 (max |x| -> 127,
round half to even), the products are exact int32 sums, times scales[v] * max|x[m]| / 127.
Rows never interact. pool: a ThreadPool (None: the default pool); the SIMD level of simd_level().)doc");
}
