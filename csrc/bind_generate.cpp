// pybind11 glue for the generate area (placeholder until that area lands).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_generate(py::module_& m) { (void)m; }
