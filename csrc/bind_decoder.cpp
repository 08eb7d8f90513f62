// pybind11 glue for the native decoder (decoder_layer.h) and its per-row int8 linear layer
// (linear_int8.h). Arrays are checked here with messages that say what to pass; the GIL is
// released while the kernels run. A DecoderBoundary keeps the arrays it was built from alive
// (they are usually memory maps of the engine's packed-weights cache) and never copies them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_linear.h"
#include "bind_util.h"
#include "decoder_layer.h"
#include "linear_int8.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

using engine_bind::Linear;
using engine_bind::make_linear;

py::array checked(const py::handle& obj, const std::string& name, const py::dtype& dtype, const char* what,
                  const std::vector<py::ssize_t>& shape) {
  return engine_bind::checked_array(obj, "", name, dtype, what, shape);
}

py::tuple pack_py(const py::array& wt) {
  if (wt.ndim() != 2) throw std::invalid_argument("pack_linear_int8: wt must be int8 [K, O] (W transposed)");
  checked(wt, "wt", py::dtype::of<int8_t>(), "int8 [K, O] (W transposed)", {-1, -1});
  const int K = int(wt.shape(0)), O = int(wt.shape(1));
  engine::PackedLinear shape;
  shape.K = K;
  shape.O = O;
  py::array_t<int8_t> codes({py::ssize_t(shape.o32() / 32), py::ssize_t(shape.k4() / 4), py::ssize_t(32), py::ssize_t(4)});
  py::array_t<int32_t> colsum({py::ssize_t(shape.o32())});
  const int8_t* src = static_cast<const int8_t*>(wt.data());
  int max_code = 0;
  {
    py::gil_scoped_release release;
    max_code = engine::pack_linear_int8(src, K, O, codes.mutable_data(), colsum.mutable_data());
  }
  // max |code| is 128 exactly when a code is -128 (the packing pass finds it; no second pass)
  if (max_code > 127) throw std::invalid_argument("pack_linear_int8: codes must lie in [-127, 127]; found -128");
  return py::make_tuple(codes, colsum, max_code);
}

py::tuple pack_int4_py(const py::array& nbits, const py::handle& scales, int K, int group) {
  if (K < 1 || group < 4 || group % 4 != 0 || K % group != 0)
    throw std::invalid_argument("pack_linear_int4: needs a group size that is a multiple of 4 and divides K, got K=" +
                                std::to_string(K) + " group=" + std::to_string(group));
  if (nbits.ndim() < 2) throw std::invalid_argument("pack_linear_int4: nbits must be uint8 [O, K/2] (MatMulNBits B)");
  const py::ssize_t O = nbits.shape(0);
  if (O < 1 || nbits.size() != O * (K / 2))
    throw std::invalid_argument("pack_linear_int4: nbits must hold K/2 = " + std::to_string(K / 2) + " bytes per output row");
  py::array b = checked(nbits.attr("reshape")(O, K / 2), "nbits", py::dtype::of<uint8_t>(), "uint8 [O, K/2]", {O, K / 2});
  py::array s = checked(scales, "scales", py::dtype::of<float>(), "float32 [O, K/group]", {O, K / group});
  engine::PackedLinear shape;
  shape.K = K;
  shape.O = int(O);
  const py::ssize_t P = shape.o32() / 32, G = K / group;
  py::array_t<uint8_t> codes4({P, py::ssize_t(K / 4), py::ssize_t(64)});
  py::array_t<int32_t> gcorr({P, G, py::ssize_t(32)});
  py::array_t<float> gscale({P, G, py::ssize_t(32)});
  {
    py::gil_scoped_release release;
    engine::pack_linear_int4(static_cast<const uint8_t*>(b.data()), static_cast<const float*>(s.data()), K, int(O), group,
                             codes4.mutable_data(), gscale.mutable_data(), gcorr.mutable_data());
  }
  return py::make_tuple("int4", codes4, gcorr, gscale, group, int(O));
}

py::array_t<float> linear_py(const py::handle& x, const py::handle& codes, const py::handle& colsum,
                             const py::handle& colscale, int K, engine::ThreadPool* pool, int max_code) {
  py::array xa = checked(x, "x", py::dtype::of<float>(), "float32 [rows, K]", {-1, K});
  if (!py::isinstance<py::array>(colscale)) throw std::invalid_argument("colscale must be a numpy array");
  const int O = int(py::reinterpret_borrow<py::array>(colscale).shape(0));
  Linear l = make_linear(codes, colsum, colscale, K, O, max_code, "linear_int8");
  const int M = int(xa.shape(0));
  py::array_t<float> y({py::ssize_t(M), py::ssize_t(O)});
  const float* xp = static_cast<const float*>(xa.data());
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    engine::PoolScope scope(pool);
    engine::linear_int8(xp, M, l.view, yp, O);
  }
  return y;
}

py::list linear_many_py(const py::handle& x, const py::list& linears, int K, engine::ThreadPool* pool) {
  py::array xa = checked(x, "x", py::dtype::of<float>(), "float32 [rows, K]", {-1, K});
  if (linears.size() < 1 || linears.size() > 16)
    throw std::invalid_argument("linear_int8_many: pass 1 to 16 matrices");
  std::vector<Linear> ls;
  for (const py::handle item : linears) ls.push_back(engine_bind::linear_from_tuple(item, K, -1, "linear_int8_many: each matrix"));
  const int M = int(xa.shape(0)), n = int(ls.size());
  std::vector<py::array_t<float>> ys;
  std::vector<const engine::PackedLinear*> ws;
  std::vector<float*> yp;
  std::vector<int64_t> ld;
  for (const Linear& l : ls) {
    ys.emplace_back(std::vector<py::ssize_t>{py::ssize_t(M), py::ssize_t(l.view.O)});
    ws.push_back(&l.view);
    yp.push_back(ys.back().mutable_data());
    ld.push_back(l.view.O);
  }
  const float* xp = static_cast<const float*>(xa.data());
  {
    py::gil_scoped_release release;
    engine::PoolScope scope(pool);
    engine::linear_int8_many(xp, M, n, ws.data(), yp.data(), ld.data());
  }
  py::list out;
  for (auto& y : ys) out.append(y);
  return out;
}

// The temporaries one forward pass shares across its boundaries (decoder_layer.h); the mutex makes
// a scratch shared by mistake between threads safe (the calls then take turns).
struct Scratch {
  engine::DecoderScratch buffers;
  std::mutex busy;
};

// One decoder boundary's weights (views into arrays it keeps alive) and its run().
class Boundary {
 public:
  Boundary(const py::dict& linears, const py::dict& norms, int hidden_size, int mlp_width, int heads, int kv_heads,
           int head_dim, float eps, bool gemma2, bool has_end, bool has_start) {
    if (!has_end && !has_start) throw std::invalid_argument("DecoderBoundary: needs has_end, has_start or both");
    if (hidden_size < 1 || mlp_width < 1 || heads < 1 || kv_heads < 1 || head_dim < 1)
      throw std::invalid_argument("DecoderBoundary: sizes must be positive");
    auto& b = b_;
    b.has_end = has_end;
    b.has_start = has_start;
    b.gemma2 = gemma2;
    b.D = hidden_size;
    b.F = mlp_width;
    b.attn_width = b.q_width = heads * head_dim;
    b.kv_width = kv_heads * head_dim;
    b.eps = eps;
    heads_ = heads;
    kv_heads_ = kv_heads;
    head_dim_ = head_dim;
    auto lin = [&](const char* key, int K, int O) -> engine::PackedLinear {
      if (!linears.contains(key))
        throw std::invalid_argument(std::string("DecoderBoundary: linears needs '") + key + "': (codes, colsum, colscale, max_code)");
      keep_.push_back(engine_bind::linear_from_tuple(linears[key], K, O, std::string("DecoderBoundary: linears['") + key + "']"));
      return keep_.back().view;
    };
    auto norm = [&](const char* key) -> const float* {
      if (!norms.contains(key)) throw std::invalid_argument(std::string("DecoderBoundary: norms needs '") + key + "' (1 + w, float32 [D])");
      norm_keep_.push_back(checked(norms[key], std::string("norms['") + key + "']", py::dtype::of<float>(), "float32 [D] (1 + w)", {b.D}));
      return static_cast<const float*>(norm_keep_.back().data());
    };
    keep_.reserve(7);
    if (has_end) {
      b.o = lin("o", b.attn_width, b.D);
      b.gate = lin("gate", b.D, b.F);
      b.up = lin("up", b.D, b.F);
      b.down = lin("down", b.F, b.D);
      b.post_attention = norm("post_attention");
      if (gemma2) {
        b.pre_feedforward = norm("pre_feedforward");
        b.post_feedforward = norm("post_feedforward");
      }
    }
    if (has_start) {
      b.q = lin("q", b.D, b.q_width);
      b.k = lin("k", b.D, b.kv_width);
      b.v = lin("v", b.D, b.kv_width);
      b.input = norm("input");
    }
  }

  py::dict run(const py::handle& hidden, const py::object& attn, engine::ThreadPool* pool, Scratch* scratch) const {
    const auto& b = b_;
    py::array h = checked(hidden, "hidden", py::dtype::of<float>(), "float32 [rows, hidden_size]", {-1, b.D});
    const py::ssize_t T = h.shape(0);
    if (T < 1) throw std::invalid_argument("hidden must have at least one row");
    py::array a;
    if (b.has_end) {
      if (attn.is_none()) throw std::invalid_argument("this boundary finishes a layer: pass attn [rows, heads * head_dim]");
      a = checked(attn, "attn", py::dtype::of<float>(), "float32 [rows, heads * head_dim]", {T, b.attn_width});
    }
    py::dict out;
    engine::BoundaryOutputs o;
    py::array_t<float> hidden_out, q, k, v;
    if (b.has_end) {
      hidden_out = py::array_t<float>({T, py::ssize_t(b.D)});
      o.hidden_out = hidden_out.mutable_data();
      out["hidden_out"] = hidden_out;
    }
    if (b.has_start) {
      q = py::array_t<float>({T, py::ssize_t(heads_), py::ssize_t(head_dim_)});
      k = py::array_t<float>({T, py::ssize_t(kv_heads_), py::ssize_t(head_dim_)});
      v = py::array_t<float>({T, py::ssize_t(kv_heads_), py::ssize_t(head_dim_)});
      o.q = q.mutable_data();
      o.k = k.mutable_data();
      o.v = v.mutable_data();
      out["q"] = q;
      out["k"] = k;
      out["v"] = v;
    }
    const float* hp = static_cast<const float*>(h.data());
    const float* ap = b.has_end ? static_cast<const float*>(a.data()) : nullptr;
    {
      py::gil_scoped_release release;
      engine::PoolScope scope(pool);
      if (scratch == nullptr) {
        engine::DecoderScratch local;
        engine::run_decoder_boundary(b, hp, ap, int(T), o, local);
      } else {
        std::lock_guard<std::mutex> lock(scratch->busy);
        engine::run_decoder_boundary(b, hp, ap, int(T), o, scratch->buffers);
      }
    }
    return out;
  }

 private:
  engine::DecoderBoundary b_;
  int heads_ = 0, kv_heads_ = 0, head_dim_ = 0;
  std::vector<Linear> keep_;
  std::vector<py::array> norm_keep_;
};

}  // namespace

void bind_decoder(py::module_& m) {
  m.def("pack_linear_int8", &pack_py, py::arg("wt"),
        R"doc(Pack W^T (int8 [K, O], codes in [-127, 127], as the exporter stores per-row int8 matrices) for
linear_int8 / DecoderBoundary: -> (codes int8 [O32/32, K4/4, 32, 4], colsum int32 [O32], max_code =
max |code|), O32 = O rounded up to 32, K4 = K rounded up to 4, codes[p, k4, c, j] = W^T[4 k4 + j, 32 p + c]
(0 outside).)doc");
  m.def("linear_int8", &linear_py, py::arg("x"), py::arg("codes"), py::arg("colsum"), py::arg("colscale"),
        py::arg("K"), py::arg("pool") = nullptr, py::arg("max_code") = -1,
        R"doc(The exported graph's per-row int8 linear layer on packed weights: x float32 [M, K] -> [M, O], O =
len(colscale), colscale = scales / 127 (float32). Each row is quantized to uint8 (max |x| -> 127,
zero point 128, round half to even), the products are exact int32 sums. pool: a ThreadPool.
max_code: pack_linear_int8's third result (-1: read from the codes); it picks the kernel (AVX2 needs <= 64).)doc");
  m.def("linear_int8_many", &linear_many_py, py::arg("x"), py::arg("linears"), py::arg("K"), py::arg("pool") = nullptr,
        R"doc(linear_int8 for several matrices of the same input x float32 [M, K] in one call (one quantization,
one task list; how the decoder runs q/k/v and gate/up): linears = [(codes, colsum, colscale, max_code),
...] -> [y_i float32 [M, O_i]]. The same results as one linear_int8 call per matrix.)doc");
  m.def("linear_int8_kernel", [](int M, int K, int O, int max_code, int group) {
    if (M < 1 || K < 1 || O < 1 || max_code < 0 || max_code > 127 || group < 0)
      throw std::invalid_argument("linear_int8_kernel: needs M, K, O >= 1, 0 <= max_code <= 127 and group >= 0");
    engine::PackedLinear w;
    w.K = K;
    w.O = O;
    w.max_code = max_code;
    w.group = group;
    return std::string(engine::linear_int8_kernel(M, w));
  }, py::arg("M"), py::arg("K"), py::arg("O"), py::arg("max_code") = 63, py::arg("group") = 0,
        "The kernel linear_int8 takes for M rows of a K -> O matrix at the active SIMD level: 'amx', "
        "'avx512_vnni', 'avx512bw' (no VNNI, max_code <= 64), 'avx2' (max_code <= 64; else 'avx2_wide'), "
        "'neon_dot' or 'scalar'; group > 0 "
        "(an int4 matrix): 'avx512_vnni_int4', 'avx2_int4' or 'scalar_int4'.");
  m.def("pack_linear_int4", &pack_int4_py, py::arg("nbits"), py::arg("scales"), py::arg("K"), py::arg("group"),
        R"doc(Pack an int4 matrix as MatMulNBits stores it (nbits uint8 [O, K/2] or [O, K/group, group/2], two
codes 0..15 per byte, low nibble first, zero point 8; scales float32 [O, K/group] already divided by
127) for linear_int8_many / DecoderBoundary: -> ("int4", codes4 uint8 [O32/32, K/4, 64], gcorr int32
[O32/32, K/group, 32], gscale float32 [O32/32, K/group, 32], group, O).)doc");
  m.def("rms_norm_rows", [](const py::handle& x, const py::handle& w1, float eps) {
    py::array xa = checked(x, "x", py::dtype::of<float>(), "float32 [rows, D]", {-1, -1});
    const int T = int(xa.shape(0)), D = int(xa.shape(1));
    py::array wa = checked(w1, "w1", py::dtype::of<float>(), "float32 [D]", {D});
    py::array_t<float> y({py::ssize_t(T), py::ssize_t(D)});
    engine::rms_norm_rows(static_cast<const float*>(xa.data()), T, D, static_cast<const float*>(wa.data()), eps,
                          y.mutable_data());
    return y;
  }, py::arg("x"), py::arg("w1"), py::arg("eps"), "x / sqrt(mean(x^2) + eps) * w1 per row (the native decoder's norm).");
  m.def("gelu_mul", [](const py::handle& g, const py::handle& u) {
    py::array ga = checked(g, "g", py::dtype::of<float>(), "float32 [n]", {-1});
    py::array ua = checked(u, "u", py::dtype::of<float>(), "float32 [n]", {ga.shape(0)});
    py::array_t<float> y({ga.shape(0)});
    std::copy_n(static_cast<const float*>(ga.data()), ga.shape(0), y.mutable_data());
    engine::gelu_mul(y.mutable_data(), static_cast<const float*>(ua.data()), ga.shape(0));
    return y;
  }, py::arg("g"), py::arg("u"), "gelu_tanh(g) * u at the active SIMD level (the native decoder's MLP).");
  py::class_<Boundary>(m, "DecoderBoundary", R"doc(
DecoderBoundary(linears, norms, *, hidden_size, mlp_width, heads, kv_heads, head_dim, eps, gemma2,
has_end, has_start): graph decoder_i computed natively (decoder_layer.h). linears: {"o", "gate", "up",
"down" (has_end), "q", "k", "v" (has_start)} -> (codes, colsum, colscale, max_code) from pack_linear_int8;
norms: {"post_attention", and for Gemma 2 "pre_feedforward", "post_feedforward" (has_end); "input"
(has_start)} -> float32 [D] (1 + w). The arrays are kept, never copied.)doc")
      .def(py::init<const py::dict&, const py::dict&, int, int, int, int, int, float, bool, bool, bool>(),
           py::arg("linears"), py::arg("norms"), py::kw_only(), py::arg("hidden_size"), py::arg("mlp_width"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("gemma2"),
           py::arg("has_end"), py::arg("has_start"))
      .def("run", &Boundary::run, py::arg("hidden"), py::arg("attn") = py::none(), py::arg("pool") = nullptr,
           py::arg("scratch") = nullptr,
           R"doc(hidden float32 [T, D], attn float32 [T, heads * head_dim] (when the boundary finishes a layer)
-> {"hidden_out" [T, D] (has_end), "q" [T, heads, head_dim], "k", "v" [T, kv_heads, head_dim]
(has_start)}, as the graph decoder_i returns them. scratch: a DecoderScratch shared by the boundaries of
one forward pass (its temporaries are then allocated once per pass; None: per call).)doc");
  py::class_<Scratch>(m, "DecoderScratch", R"doc(DecoderScratch(mlp_rows=512): the temporaries of DecoderBoundary.run,
kept across the boundaries of one forward pass. The MLP runs on balanced row blocks of at most
mlp_rows rows (a 448 px prefill's gate and up then hold 344 rows, 13 MB each, not 1,030); the
results do not depend on it. It grows to the largest call it served and is freed with the object;
calls sharing one take turns.)doc")
      .def(py::init([](int mlp_rows) {
             if (mlp_rows < 1) throw std::invalid_argument("DecoderScratch: mlp_rows must be >= 1, got " + std::to_string(mlp_rows));
             auto s = std::make_unique<Scratch>();
             s->buffers.mlp_rows = mlp_rows;
             return s;
           }),
           py::arg("mlp_rows") = engine::kMlpRows)
      .def_property_readonly("mlp_rows", [](const Scratch& s) { return s.buffers.mlp_rows; });
}
