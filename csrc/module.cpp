// pybind11 module entry: each area registers its own bindings from a bind_*.cpp file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_features.h"

namespace py = pybind11;

// Defined in bind_*.cpp; add one line here per area.
void bind_attention(py::module_& m);
void bind_generate(py::module_& m);
void bind_bench(py::module_& m);
void bind_serving(py::module_& m);
void bind_matmul(py::module_& m);
void bind_decoder(py::module_& m);
void bind_vision(py::module_& m);

PYBIND11_MODULE(_native, m) {
  m.doc() = "PaliGemma engine native core";

  m.def("cpu_features", [] {
    const auto& f = engine::cpu_features();
    py::dict d;
    d["arch"] = f.arch;
    d["avx2"] = f.avx2;
    d["avx512"] = f.avx512;
    d["avx512_vnni"] = f.avx512_vnni;
    d["amx"] = f.amx;
    d["neon"] = f.neon;
    d["neon_dot"] = f.neon_dot;
    d["best"] = engine::simd_name(f.best);
    d["simd"] = engine::simd_name(engine::active_simd());
    return d;
  }, "Detected CPU features, the best SIMD level, and the level kernels use now ('simd').");

  m.def("set_simd_level", [](const std::string& name) {
    engine::set_simd_level(engine::parse_simd_level(name));
  }, py::arg("level"), "Force the kernels' SIMD level: 'scalar', 'avx2', 'avx512', 'amx' or 'neon'.");
  m.def("simd_level", [] { return std::string(engine::simd_name(engine::active_simd())); });

  bind_attention(m);
  bind_generate(m);
  bind_bench(m);
  bind_serving(m);
  bind_matmul(m);
  bind_decoder(m);
  bind_vision(m);
}
