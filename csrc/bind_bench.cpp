// pybind11 glue for the benchmark helpers: _native.memory_bandwidth().
#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>

namespace py = pybind11;

namespace engine {
double memory_read_bandwidth(size_t bytes, int threads, int repeats);   // membw.cpp
}  // namespace engine

void bind_bench(py::module_& m) {
  m.def("memory_bandwidth", [](long long bytes, int threads, int repeats) {
          if (bytes < (1LL << 20))
            throw py::value_error("bytes must be at least 1 MiB (1048576), e.g. 1 << 30; got " +
                                  std::to_string(bytes));
          py::gil_scoped_release release;
          return engine::memory_read_bandwidth(static_cast<size_t>(bytes), threads, repeats);
        },
        py::arg("bytes") = 1LL << 30, py::arg("threads") = 1, py::arg("repeats") = 5,
        R"doc(Memory read bandwidth in GB/s (1e9 bytes/s): `threads` threads sum a `bytes`-byte
buffer (allocated and filled first), the best of `repeats` passes. Use a buffer far larger than
the caches (default 1 GiB). ValueError on bytes < 1 MiB, threads outside [1, 1024] or repeats
outside [1, 1000]; MemoryError when the buffer cannot be allocated.)doc");
}
