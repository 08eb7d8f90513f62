// pybind11 glue for the attention area: KVCache, attention(), thread count.
// Inputs are validated here (dtype, contiguity, shapes) with messages that say what to pass;
// the C++ core validates the rest. The GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "kv_cache.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// float32, C-contiguous, rank 3 [rows, heads, D] or 4 [N, T, heads, D]; returns rows.
py::ssize_t check_rows(const py::array& a, const char* name, py::ssize_t heads, py::ssize_t D) {
  if (!a.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument(std::string(name) + " must be float32, got " + std::string(py::str(a.dtype())) +
                                "; convert with .astype(np.float32)");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be C-contiguous; pass np.ascontiguousarray(" + name + ")");
  if (a.ndim() != 3 && a.ndim() != 4)
    throw std::invalid_argument(std::string(name) + " must have shape [rows, heads, head_dim] or [slots, tokens, "
                                "heads, head_dim], got " + shape_str(a));
  const py::ssize_t h = a.shape(a.ndim() - 2), d = a.shape(a.ndim() - 1);
  if ((heads > 0 && h != heads) || d != D)
    throw std::invalid_argument(std::string(name) + " has shape " + shape_str(a) + " but needs [..., " +
                                (heads > 0 ? std::to_string(heads) : std::string("heads")) + ", " +
                                std::to_string(D) + "] (heads, head_dim of the cache)");
  return a.ndim() == 3 ? a.shape(0) : a.shape(0) * a.shape(1);
}

std::vector<int32_t> to_positions(const py::object& obj, py::ssize_t rows) {
  const py::array a = py::module_::import("numpy").attr("asarray")(obj);
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw std::invalid_argument("positions must be an integer array, got dtype " + std::string(py::str(a.dtype())));
  if (a.size() != rows)
    throw std::invalid_argument("positions has " + std::to_string(a.size()) + " entries but there are " +
                                std::to_string(rows) + " query rows (len(slots) * tokens); pass one position per row");
  auto p = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  std::vector<int32_t> out(static_cast<size_t>(rows));
  const int64_t* src = p.data();
  for (py::ssize_t i = 0; i < rows; ++i) {
    if (src[i] < -(int64_t(1) << 30) || src[i] > (int64_t(1) << 30))
      throw std::invalid_argument("positions[" + std::to_string(i) + "] = " + std::to_string(src[i]) + " is out of range");
    out[static_cast<size_t>(i)] = static_cast<int32_t>(src[i]);
  }
  return out;
}

py::array_t<float> attention_py(engine::KVCache& cache, int layer, const py::array& q, const py::array& k,
                                const py::array& v, const std::vector<int>& slots, const py::object& positions,
                                float scale, std::optional<float> softcap, std::optional<int> window,
                                float rope_theta) {
  const py::ssize_t D = cache.head_dim(), KV = cache.num_kv_heads();
  const py::ssize_t M = check_rows(q, "q", -1, D);
  const py::ssize_t H = q.shape(q.ndim() - 2);
  if (check_rows(k, "k", KV, D) != M || check_rows(v, "v", KV, D) != M)
    throw std::invalid_argument("q, k and v must have the same number of token rows: q " + shape_str(q) + ", k " +
                                shape_str(k) + ", v " + shape_str(v));
  if (slots.empty()) throw std::invalid_argument("slots is empty; pass the cache slot of each sequence");
  const py::ssize_t N = static_cast<py::ssize_t>(slots.size());
  if (M % N != 0 || (q.ndim() == 4 && q.shape(0) != N))
    throw std::invalid_argument("q has " + std::to_string(M) + " token rows, not a multiple of len(slots) = " +
                                std::to_string(N) + "; rows are slot-major: [len(slots) * tokens, heads, head_dim]");
  const std::vector<int32_t> pos = to_positions(positions, M);
  engine::AttentionParams p;
  p.scale = scale;
  p.softcap = softcap.value_or(0.f);
  p.window = window.value_or(0);
  p.rope_theta = rope_theta;
  py::array_t<float> out(q.ndim() == 3 ? std::vector<py::ssize_t>{M, H * D}
                                       : std::vector<py::ssize_t>{q.shape(0), q.shape(1), H * D});
  const float* qp = static_cast<const float*>(q.data());
  const float* kp = static_cast<const float*>(k.data());
  const float* vp = static_cast<const float*>(v.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    engine::attention(cache, layer, qp, kp, vp, static_cast<int>(H), slots, static_cast<int>(M / N), pos.data(),
                      p, op);
  }
  return out;
}

}  // namespace

void bind_attention(py::module_& m) {
  py::class_<engine::KVCache>(m, "KVCache", R"doc(
Preallocated paged KV cache: one slot per sequence (batch item or beam), `capacity` tokens each.

KVCache(num_layers, num_kv_heads, head_dim, num_slots, capacity, dtype="f32", block_tokens=32)
dtype: "f32", "f16" or "int8" (per-token-per-head scales). copy_slot / reorder share blocks
(copy-on-write), so forking beams copies no K/V data. Not thread-safe.)doc")
      .def(py::init([](int L, int KV, int D, int S, int C, const std::string& dtype, int B) {
             return new engine::KVCache(L, KV, D, S, C, engine::parse_kv_dtype(dtype), B);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_slots"),
           py::arg("capacity"), py::arg("dtype") = "f32", py::arg("block_tokens") = 32)
      .def_property_readonly("num_layers", &engine::KVCache::num_layers)
      .def_property_readonly("num_kv_heads", &engine::KVCache::num_kv_heads)
      .def_property_readonly("head_dim", &engine::KVCache::head_dim)
      .def_property_readonly("block_tokens", &engine::KVCache::block_tokens)
      .def_property_readonly("dtype", [](const engine::KVCache& c) { return engine::kv_dtype_name(c.dtype()); })
      .def_property_readonly("nbytes", &engine::KVCache::bytes)
      .def("capacity", &engine::KVCache::capacity)
      .def("num_slots", &engine::KVCache::num_slots)
      .def("length", &engine::KVCache::length, py::arg("slot"), "Tokens stored in every layer.")
      .def("layer_length", &engine::KVCache::layer_length, py::arg("layer"), py::arg("slot"))
      .def("set_length", &engine::KVCache::set_length, py::arg("slot"), py::arg("n"), "Truncate to n tokens.")
      .def("prefix_length", &engine::KVCache::prefix_length, py::arg("slot"))
      .def("set_prefix_length", &engine::KVCache::set_prefix_length, py::arg("slot"), py::arg("n"),
           "Tokens [0, n) of the slot form the bidirectional prefix block; set before appending it.")
      .def("copy_slot", &engine::KVCache::copy_slot, py::arg("src"), py::arg("dst"))
      .def("reorder", &engine::KVCache::reorder, py::arg("src_for_dst"),
           "Slot d becomes a copy of slot src_for_dst[d] for every d < len(src_for_dst), all at once.")
      .def("reset", &engine::KVCache::reset)
      .def("blocks_in_use", &engine::KVCache::blocks_in_use, py::arg("layer"))
      .def("read", [](const engine::KVCache& c, int layer, int slot) {
             const py::ssize_t n = c.layer_length(layer, slot);
             py::array_t<float> k({py::ssize_t(c.num_kv_heads()), n, py::ssize_t(c.head_dim())});
             py::array_t<float> v({py::ssize_t(c.num_kv_heads()), n, py::ssize_t(c.head_dim())});
             c.read(layer, slot, k.mutable_data(), v.mutable_data());
             return py::make_tuple(k, v);
           }, py::arg("layer"), py::arg("slot"),
           "Dequantized (rotated) k, v of a slot: two float32 arrays [num_kv_heads, length, head_dim].");

  m.def("attention", &attention_py, py::arg("cache"), py::arg("layer"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("slots"), py::arg("positions"), py::kw_only(), py::arg("scale"), py::arg("softcap") = py::none(),
        py::arg("window") = py::none(), py::arg("rope_theta") = 10000.0f,
        R"doc(
One decoder layer's attention: RoPE q and k at `positions`, append k, v to `cache` (layer `layer`)
for each slot, attend, return out.

q [N*T, H, D] or [N, T, H, D]; k, v [N*T, KV, D] or [N, T, KV, D], float32 C-contiguous, rows
slot-major (N = len(slots)); positions: N*T integers (RoPE positions). Returns [N*T, H*D] or
[N, T, H*D]. scale: 1/sqrt(head_dim) or 1/sqrt(query_pre_attn_scalar); softcap: Gemma 2 logit
softcap (None/0 = off); window: sliding window (None/0 = off; the prefix block is exempt);
rope_theta <= 0 skips RoPE. Uses the SIMD level of simd_level() and get_num_threads() threads.)doc");

  m.def("set_num_threads", &engine::set_num_threads, py::arg("n"),
        "Threads of the process's default pool, used by attention() and the kernels when no pool is "
        "given. A loaded model uses its own ThreadPool (sized by its `threads`) and never this one.");
  m.def("get_num_threads", &engine::get_num_threads, "Threads of the default pool.");
}
