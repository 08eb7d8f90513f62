// pybind11 glue for the native vision tower (vision_tower.h). A VisionTower keeps the arrays it was
// built from alive (memory maps of the engine's packed-weights cache) and never copies them; the
// GIL is released while it runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <deque>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_linear.h"
#include "bind_util.h"
#include "cpu_features.h"
#include "thread_pool.h"
#include "decoder_layer.h"
#include "vision_tower.h"

namespace py = pybind11;

namespace {

constexpr const char* kLinearTuple = "(codes, colsum, colscale, max_code, bias)";
constexpr const char* kLayerKeys = "q, k, v, o, fc1, fc2 (linears) and ln1_w, ln1_b, ln2_w, ln2_b (float32 [D])";

class Tower {
 public:
  Tower(const py::tuple& patch, const py::handle& position, const py::list& layers, const py::tuple& post,
        const py::tuple& projector, int image_size, int patch_size, int channels, int hidden_size, int mlp_width,
        int heads, int out_dim, float eps, const std::string& attn_dtype) {
    auto& t = t_;
    if (image_size < 1 || patch_size < 1 || image_size % patch_size || channels < 1)
      throw std::invalid_argument("VisionTower: image_size must be a positive multiple of patch_size, channels >= 1");
    if (heads < 1 || hidden_size < 1 || hidden_size % heads || mlp_width < 1 || out_dim < 1)
      throw std::invalid_argument("VisionTower: hidden_size must be a positive multiple of heads; widths positive");
    t.image_size = image_size;
    t.patch_size = patch_size;
    t.channels = channels;
    t.D = hidden_size;
    t.F = mlp_width;
    t.heads = heads;
    t.head_dim = hidden_size / heads;
    t.out_dim = out_dim;
    t.eps = eps;
    if (attn_dtype == "auto")   // AMX-BF16 attention tiles read f16 caches; fp32 elsewhere
      t.attn_dtype = engine::active_simd() == engine::SimdLevel::Amx ? engine::KVDtype::F16 : engine::KVDtype::F32;
    else
      t.attn_dtype = engine::parse_kv_dtype(attn_dtype);
    const int D = t.D, P = t.tokens();
    t.patch = linear(patch, channels * patch_size * patch_size, D, "patch");
    t.position = vec(position, "position", "float32 [tokens, hidden_size]", {P, D});
    t.layers.resize(layers.size());
    for (size_t i = 0; i < layers.size(); ++i) {
      if (!py::isinstance<py::dict>(layers[i]))
        throw std::invalid_argument(std::string("VisionTower: layers[i] must be a dict of ") + kLayerKeys);
      const py::dict d = layers[i].cast<py::dict>();
      const std::string at = "layers[" + std::to_string(i) + "]";
      auto lin = [&](const char* key, int K, int O) {
        if (!d.contains(key)) throw std::invalid_argument("VisionTower: " + at + " needs '" + key + "': " + kLinearTuple);
        return linear(d[key], K, O, at + "['" + key + "']");
      };
      auto norm = [&](const char* key) {
        if (!d.contains(key)) throw std::invalid_argument("VisionTower: " + at + " needs '" + key + "': float32 [D]");
        return vec(d[key], at + "['" + key + "']", "float32 [hidden_size]", {D});
      };
      engine::VisionLayer& l = t.layers[i];
      l.q = lin("q", D, D);
      l.k = lin("k", D, D);
      l.v = lin("v", D, D);
      l.o = lin("o", D, D);
      l.fc1 = lin("fc1", D, t.F);
      const int fc2_k = fc2_rows(d, at);
      if (i == 0) t.mlp_stride = fc2_k;
      else if (fc2_k != t.mlp_stride)
        throw std::invalid_argument("VisionTower: every layer's fc2 needs the same padding as layers[0]'s");
      l.fc2 = lin("fc2", fc2_k, D);
      l.ln1_w = norm("ln1_w");
      l.ln1_b = norm("ln1_b");
      l.ln2_w = norm("ln2_w");
      l.ln2_b = norm("ln2_b");
    }
    if (post.size() != 2) throw std::invalid_argument("VisionTower: post must be (weight, bias), float32 [hidden_size] each");
    if (t.layers.empty()) t.mlp_stride = t.F;
    t.post_w = vec(post[0], "post weight", "float32 [hidden_size]", {D});
    t.post_b = vec(post[1], "post bias", "float32 [hidden_size]", {D});
    t.projector = linear(projector, D, out_dim, "projector");
  }

  py::array_t<float> run(const py::handle& pixels, engine::ThreadPool* pool) const {
    const auto& t = t_;
    py::array px = engine_bind::checked_array(pixels, "", "pixel_values", py::dtype::of<float>(),
                                              "float32 [images, channels, image_size, image_size]",
                                              {-1, t.channels, t.image_size, t.image_size});
    const int N = int(px.shape(0));
    if (N < 1) throw std::invalid_argument("pixel_values must hold at least one image");
    py::array_t<float> out({py::ssize_t(N), py::ssize_t(t.tokens()), py::ssize_t(t.out_dim)});
    const float* pp = static_cast<const float*>(px.data());
    float* op = out.mutable_data();
    {
      py::gil_scoped_release release;
      engine::PoolScope scope(pool);
      engine::run_vision_tower(t, pp, N, op);
    }
    return out;
  }

  std::string attn_dtype() const { return engine::kv_dtype_name(t_.attn_dtype); }
  int layers() const { return int(t_.layers.size()); }
  int mlp_stride() const { return t_.mlp_stride; }

 private:
  // fc2's K as its packed codes give it: the MLP width F, or F rounded up to 64 (zero codes added
  // by the packer so that the AMX kernel takes it; vision_tower.h)
  int fc2_rows(const py::dict& d, const std::string& at) const {
    const int F = t_.F, k4 = (F + 3) / 4 * 4, k64 = (F + 63) / 64 * 64;
    if (!d.contains("fc2") || !py::isinstance<py::tuple>(d["fc2"]) || py::len(d["fc2"]) != 5)
      throw std::invalid_argument("VisionTower: " + at + "['fc2'] must be " + kLinearTuple);
    const py::object codes = d["fc2"].cast<py::tuple>()[0];
    if (!py::isinstance<py::array>(codes) || py::reinterpret_borrow<py::array>(codes).ndim() != 4)
      throw std::invalid_argument("VisionTower: " + at + "['fc2'] codes must be int8 [O32/32, K4/4, 32, 4]");
    const int rows = int(py::reinterpret_borrow<py::array>(codes).shape(1)) * 4;
    if (rows == k4) return F;
    if (rows == k64) return k64;
    throw std::invalid_argument("VisionTower: " + at + "['fc2'] must have K = mlp_width (" + std::to_string(F) +
                                ") or mlp_width rounded up to 64 (" + std::to_string(k64) + "), got " +
                                std::to_string(rows) + " packed rows");
  }

  engine::BiasedLinear linear(const py::handle& obj, int K, int O, const std::string& name) {
    if (!py::isinstance<py::tuple>(obj) || py::len(obj) != 5)
      throw std::invalid_argument("VisionTower: " + name + " must be " + kLinearTuple);
    const py::tuple tup = py::reinterpret_borrow<py::tuple>(obj);
    linears_.push_back(engine_bind::make_linear(tup[0], tup[1], tup[2], K, O, tup[3].cast<int>(), name));
    engine::BiasedLinear l;
    l.w = linears_.back().view;
    l.bias = vec(tup[4], name + " bias", "float32 [O]", {O});
    return l;
  }

  const float* vec(const py::handle& obj, const std::string& name, const char* what, const std::vector<py::ssize_t>& shape) {
    arrays_.push_back(engine_bind::checked_array(obj, "VisionTower: ", name, py::dtype::of<float>(), what, shape));
    return static_cast<const float*>(arrays_.back().data());
  }

  engine::VisionTower t_;
  std::deque<engine_bind::Linear> linears_;   // deque: views stay valid as it grows
  std::deque<py::array> arrays_;
};

}  // namespace

void bind_vision(py::module_& m) {
  py::class_<Tower>(m, "VisionTower", R"doc(
VisionTower(patch, position, layers, post, projector, *, image_size, patch_size, channels, hidden_size,
mlp_width, heads, out_dim, eps, attn_dtype="auto"): the artifact's vision graph (SigLIP + projector)
computed natively (vision_tower.h). Each linear is (codes, colsum, colscale, max_code, bias) with the
first four from pack_linear_int8 / scales / 127 and bias float32 [O]; position float32 [tokens, D];
layers: one dict per encoder layer with q, k, v, o, fc1, fc2 (linears) and ln1_w, ln1_b, ln2_w, ln2_b;
post: the final layer norm (weight, bias). attn_dtype: the attention's cache dtype ("auto": f16 at
the amx SIMD level, for the AMX-BF16 tiles, else f32). The arrays are kept, never copied.)doc")
      .def(py::init<const py::tuple&, const py::handle&, const py::list&, const py::tuple&, const py::tuple&, int, int,
                    int, int, int, int, int, float, const std::string&>(),
           py::arg("patch"), py::arg("position"), py::arg("layers"), py::arg("post"), py::arg("projector"),
           py::kw_only(), py::arg("image_size"), py::arg("patch_size"), py::arg("channels"), py::arg("hidden_size"),
           py::arg("mlp_width"), py::arg("heads"), py::arg("out_dim"), py::arg("eps"), py::arg("attn_dtype") = "auto")
      .def("run", &Tower::run, py::arg("pixel_values"), py::arg("pool") = nullptr,
           "pixel_values float32 [N, C, S, S] -> image features float32 [N, tokens, out_dim], as the vision graph.")
      .def_property_readonly("attn_dtype", &Tower::attn_dtype)
      .def_property_readonly("mlp_stride", [](const Tower& t) { return t.mlp_stride(); })
      .def_property_readonly("num_layers", &Tower::layers);
  m.def("layer_norm_rows", [](const py::handle& x, const py::handle& w, const py::handle& b, float eps) {
    py::array xa = engine_bind::checked_array(x, "", "x", py::dtype::of<float>(), "float32 [rows, D]", {-1, -1});
    const int T = int(xa.shape(0)), D = int(xa.shape(1));
    py::array wa = engine_bind::checked_array(w, "", "w", py::dtype::of<float>(), "float32 [D]", {D});
    py::array ba = engine_bind::checked_array(b, "", "b", py::dtype::of<float>(), "float32 [D]", {D});
    py::array_t<float> y({py::ssize_t(T), py::ssize_t(D)});
    engine::layer_norm_rows(static_cast<const float*>(xa.data()), T, D, static_cast<const float*>(wa.data()),
                            static_cast<const float*>(ba.data()), eps, y.mutable_data());
    return y;
  }, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("eps"),
        "(x - mean) / sqrt(var + eps) * w + b per row (the native vision tower's layer norm).");
  m.def("gelu_tanh", [](const py::handle& x) {
    py::array xa = engine_bind::checked_array(x, "", "x", py::dtype::of<float>(), "float32 [n]", {-1});
    py::array_t<float> y({xa.shape(0)});
    std::copy_n(static_cast<const float*>(xa.data()), xa.shape(0), y.mutable_data());
    engine::gelu_inplace(y.mutable_data(), xa.shape(0));
    return y;
  }, py::arg("x"), "gelu_tanh(x) at the active SIMD level (the native vision tower's MLP).");
}
