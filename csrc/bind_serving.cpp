// pybind11 glue for the serving core (engine/serving): the step kernels that let one scheduler
// thread drive many requests at once with a constant number of Python -> C++ calls per step.
//
//   ThreadPool(n)         a model's own attention threads (no process-wide thread count)
//   Decoder(cache, ...)   one request's decode state (generate.h DecodeState) over its own cache
//   decode_rows(decoders)  the next rows of every decoder and their AttentionPlan, one call
//   select_step(decoders, logits)   token selection for every row of every decoder, one call
//   AttentionPlan         which rows of a batched graph call belong to which cache and slots
//   attention_plan(plan, layer, q, k, v, ...)   one layer's attention for all of them, one call
//
// Every call validates its arguments with the GIL held, then releases it for the work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "bind_util.h"
#include "generate.h"
#include "kv_cache.h"
#include "sampling.h"
#include "thread_pool.h"

namespace py = pybind11;
using engine_bind::FloatArray;
using Int32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

namespace {

Int32Array to_array(const std::vector<int32_t>& v) {
  Int32Array a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// One request's decode: its DecodeState plus the cache it reorders (kept alive here).
struct Decoder {
  py::object cache_obj;
  engine::KVCache* cache = nullptr;
  std::unique_ptr<engine::KVCacheSlots> slot_ops;
  std::unique_ptr<engine::DecodeState> state;
  engine::SamplerScratch scratch;   // for advance() on its own (select_step shares one)
};

std::unique_ptr<Decoder> make_decoder(py::object cache, FloatArray first_logits,
                                      std::vector<std::vector<int32_t>> prompt_tokens,
                                      std::vector<int> prompt_lengths, std::vector<int> slots,
                                      int max_new_tokens, bool do_sample, float temperature, int top_k,
                                      float top_p, float repetition_penalty, int64_t seed, int num_beams,
                                      float length_penalty, py::object early_stopping,
                                      py::object eos_token_ids, py::object stop_token_ids) {
  if (!py::isinstance<engine::KVCache>(cache))
    throw py::type_error("cache must be a _native.KVCache, got a " + engine_bind::type_name(cache));
  auto d = std::make_unique<Decoder>();
  d->cache_obj = cache;
  d->cache = &cache.cast<engine::KVCache&>();
  d->slot_ops = std::make_unique<engine::KVCacheSlots>(*d->cache);
  const engine::GenerateOptions o = engine_bind::make_options(
      max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, num_beams,
      length_penalty, early_stopping, eos_token_ids, stop_token_ids);
  const std::vector<engine::SequenceInput> inputs = engine_bind::make_inputs(
      first_logits, std::move(prompt_tokens), prompt_lengths, slots, num_beams, d->cache->num_slots());
  d->state = engine::start_decode(inputs, static_cast<int>(first_logits.shape(1)), o, *d->slot_ops);
  return d;
}

// Rows of one batched attention call that belong to one cache: `slots` with `tokens` rows each
// (slot-major), starting at row `row0` of the call.
struct Group {
  py::object cache_obj;
  engine::KVCache* cache;
  std::vector<int> slots;
  int tokens;
  int row0;
};

struct AttentionPlan {
  std::vector<Group> groups;
  std::vector<int32_t> positions;   // one per row, in row order
  int rows() const { return static_cast<int>(positions.size()); }

  void add(py::object cache_obj, engine::KVCache* cache, std::vector<int> slots,
           const int32_t* pos, size_t n) {
    if (slots.empty()) throw std::invalid_argument("AttentionPlan.add: slots is empty");
    if (n == 0 || n % slots.size() != 0)
      throw std::invalid_argument("AttentionPlan.add: " + std::to_string(n) + " positions for " +
                                  std::to_string(slots.size()) + " slots; give tokens_per_slot * "
                                  "len(slots) positions, slot-major");
    for (int s : slots) cache->check_slot(s, "AttentionPlan.add");
    const int tokens = static_cast<int>(n / slots.size());
    const int row0 = rows();
    groups.push_back(Group{std::move(cache_obj), cache, std::move(slots), tokens, row0});
    positions.insert(positions.end(), pos, pos + n);
  }
};

// The rows that decode_rows() gathers: what to feed next, and where it goes.
struct StepRows {
  Int32Array tokens, positions;   // [n]: the rows to feed next, decoder after decoder
  Int32Array rows;                // [decoders]: rows of each decoder
  std::shared_ptr<AttentionPlan> plan;   // one group per decoder with rows
};

// What select_step() chose.
struct Selection {
  Int32Array accepted;            // [decoders]: tokens each accepted in this step
  Int32Array accepted_tokens;     // [sum(accepted)], decoder after decoder
  Int32Array accepted_sequences;  // [sum(accepted)]: the sequence (batch item) of each
  py::array_t<bool> done;         // [decoders]
};

std::vector<Decoder*> as_decoders(const py::list& decoder_list, const char* what) {
  const size_t S = decoder_list.size();
  std::vector<Decoder*> decoders(S);
  for (size_t i = 0; i < S; ++i) {
    decoders[i] = decoder_list[i].cast<Decoder*>();
    for (size_t j = 0; j < i; ++j)
      if (decoders[i] == decoders[j])
        throw std::invalid_argument(std::string(what) + ": decoder " + std::to_string(i) + " is listed twice");
  }
  return decoders;
}

StepRows decode_rows(const py::list& decoder_list) {
  const std::vector<Decoder*> decoders = as_decoders(decoder_list, "decode_rows");
  StepRows out;
  std::vector<int32_t> tokens, positions;
  out.rows = Int32Array(static_cast<py::ssize_t>(decoders.size()));
  out.plan = std::make_shared<AttentionPlan>();
  for (size_t i = 0; i < decoders.size(); ++i) {
    Decoder* d = decoders[i];
    const engine::DecodeState& st = *d->state;
    if (!st.started())
      throw std::invalid_argument("decode_rows: decoder " + std::to_string(i) + " has not started; its "
                                  "first tokens come from select_step");
    tokens.insert(tokens.end(), st.tokens().begin(), st.tokens().end());
    positions.insert(positions.end(), st.positions().begin(), st.positions().end());
    out.rows.mutable_data()[i] = st.rows();
    if (st.rows() > 0) {
      std::vector<int> slots(st.slots().begin(), st.slots().end());
      out.plan->add(d->cache_obj, d->cache, std::move(slots), st.positions().data(), st.positions().size());
    }
  }
  out.tokens = to_array(tokens);
  out.positions = to_array(positions);
  return out;
}

Selection select_step(const py::list& decoder_list, const py::object& logits_obj) {
  const std::vector<Decoder*> decoders = as_decoders(decoder_list, "select_step");
  const size_t S = decoders.size();
  size_t expected = 0;
  int vocab = -1;
  for (size_t i = 0; i < S; ++i) {
    const engine::DecodeState& st = *decoders[i]->state;
    if (st.done())
      throw std::invalid_argument("select_step: decoder " + std::to_string(i) + " is done; pass "
                                  "only decoders whose done is False");
    if (st.started()) expected += static_cast<size_t>(st.rows());
    if (vocab >= 0 && st.vocab() != vocab)
      throw std::invalid_argument("select_step: the decoders have different vocabularies");
    vocab = st.vocab();
  }
  const float* logits = nullptr;
  FloatArray arr;
  if (expected > 0) {
    if (!logits_obj.is_none()) arr = FloatArray::ensure(logits_obj);
    if (!arr || arr.ndim() != 2 || static_cast<size_t>(arr.shape(0)) != expected ||
        arr.shape(1) != vocab)
      throw std::invalid_argument("select_step: logits must be float32 [" + std::to_string(expected) +
                                  ", " + std::to_string(vocab) + "]: one row per row fed, decoder "
                                  "after decoder, in the order decode_rows gave them");
    logits = arr.data();
  }
  thread_local engine::SamplerScratch scratch;   // the calling thread's (the scheduler's)
  {
    py::gil_scoped_release release;
    size_t offset = 0;
    for (Decoder* d : decoders) {
      engine::DecodeState& st = *d->state;
      if (!st.started()) {
        st.advance(nullptr, scratch);
      } else {
        const size_t n = static_cast<size_t>(st.rows());
        st.advance(logits + offset * static_cast<size_t>(vocab), scratch);
        offset += n;
      }
    }
  }
  Selection out;
  std::vector<int32_t> acc_tokens, acc_seqs;
  out.accepted = Int32Array(static_cast<py::ssize_t>(S));
  out.done = py::array_t<bool>(static_cast<py::ssize_t>(S));
  for (size_t i = 0; i < S; ++i) {
    const engine::DecodeState& st = *decoders[i]->state;
    out.accepted.mutable_data()[i] = static_cast<int32_t>(st.accepted().size());
    for (const engine::AcceptedToken& a : st.accepted()) {
      acc_tokens.push_back(a.token);
      acc_seqs.push_back(a.sequence);
    }
    out.done.mutable_data()[i] = st.done();
  }
  out.accepted_tokens = to_array(acc_tokens);
  out.accepted_sequences = to_array(acc_seqs);
  return out;
}

// q, k, v: float32 C-contiguous [rows, heads, head_dim]; returns rows.
py::ssize_t check_qkv(const py::array& a, const char* name, py::ssize_t heads, py::ssize_t D) {
  if (!a.dtype().is(py::dtype::of<float>()) || !(a.flags() & py::array::c_style) || a.ndim() != 3)
    throw std::invalid_argument(std::string(name) + " must be a float32 C-contiguous array [rows, heads, "
                                "head_dim]");
  if ((heads > 0 && a.shape(1) != heads) || a.shape(2) != D)
    throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.shape(1)) + " heads of " +
                                std::to_string(a.shape(2)) + " values; the plan's caches need " +
                                (heads > 0 ? std::to_string(heads) + " heads of " : std::string("heads of ")) +
                                std::to_string(D));
  return a.shape(0);
}

py::array_t<float> attention_plan_py(const AttentionPlan& plan, int layer, const py::array& q,
                                     const py::array& k, const py::array& v, float scale,
                                     std::optional<float> softcap, std::optional<int> window,
                                     float rope_theta, engine::ThreadPool* pool) {
  if (plan.groups.empty()) throw std::invalid_argument("attention_plan: the plan has no rows");
  const engine::KVCache& c0 = *plan.groups[0].cache;
  const py::ssize_t D = c0.head_dim(), KV = c0.num_kv_heads();
  for (const Group& g : plan.groups)
    if (g.cache->head_dim() != D || g.cache->num_kv_heads() != KV)
      throw std::invalid_argument("attention_plan: the plan's caches differ in kv heads / head_dim");
  const py::ssize_t M = check_qkv(q, "q", -1, D);
  const py::ssize_t H = q.shape(1);
  if (M != plan.rows() || check_qkv(k, "k", KV, D) != M || check_qkv(v, "v", KV, D) != M)
    throw std::invalid_argument("attention_plan: q, k and v need the plan's " + std::to_string(plan.rows()) +
                                " rows; got q " + std::to_string(M) + ", k " + std::to_string(k.shape(0)) +
                                ", v " + std::to_string(v.shape(0)));
  engine::AttentionParams p;
  p.scale = scale;
  p.softcap = softcap.value_or(0.f);
  p.window = window.value_or(0);
  p.rope_theta = rope_theta;
  py::array_t<float> out({M, H * D});
  const float* qp = static_cast<const float*>(q.data());
  const float* kp = static_cast<const float*>(k.data());
  const float* vp = static_cast<const float*>(v.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    engine::PoolScope scope(pool);
    for (const Group& g : plan.groups) {
      const size_t r = static_cast<size_t>(g.row0);
      engine::attention(*g.cache, layer, qp + r * H * D, kp + r * KV * D, vp + r * KV * D,
                        static_cast<int>(H), g.slots, g.tokens, plan.positions.data() + r, p,
                        op + r * H * D);
    }
  }
  return out;
}

}  // namespace

void bind_serving(py::module_& m) {
  py::class_<engine::ThreadPool>(m, "ThreadPool", R"doc(
A model's own pool of threads: ThreadPool(num_threads, spin_us=200), num_threads >= 1 (the caller
counts as one). attention_plan(..., pool=pool) and the native decoder run on it; the threads stop
when it is freed. Between calls idle threads spin spin_us microseconds (0..100000) before they
sleep, so back-to-back calls (a decode step's) do not pay a wake-up each.)doc")
      .def(py::init<int, int>(), py::arg("num_threads"), py::arg("spin_us") = engine::ThreadPool::kDefaultSpinUs)
      .def_property_readonly("num_threads", &engine::ThreadPool::num_threads)
      .def_property_readonly("spin_us", &engine::ThreadPool::spin_us);

  py::class_<Decoder>(m, "Decoder", R"doc(
One request's decode, one step at a time (generate() is the same state driven to the end).

Decoder(cache, first_logits, prompt_tokens, prompt_lengths, slots, *, max_new_tokens, ...): the
arguments and options of generate() without step_fn and stream; cache must be a KVCache (beam
search reorders its slots). advance(logits=None) chooses the next tokens: from first_logits on the
first call, then from logits [rows, vocab] of the rows fed since; it returns the accepted tokens
as [(sequence, token)]. tokens / positions / slots: the rows to feed next. results(): one dict
per sequence as generate() returns (before done: the tokens so far; beams still searching: []).)doc")
      .def(py::init(&make_decoder), py::arg("cache"), py::arg("first_logits"), py::arg("prompt_tokens"),
           py::arg("prompt_lengths"), py::arg("slots"), py::kw_only(), py::arg("max_new_tokens"),
           py::arg("do_sample") = false, py::arg("temperature") = 1.0f, py::arg("top_k") = 0,
           py::arg("top_p") = 1.0f, py::arg("repetition_penalty") = 1.0f, py::arg("seed") = 0,
           py::arg("num_beams") = 1, py::arg("length_penalty") = 1.0f, py::arg("early_stopping") = false,
           py::arg("eos_token_ids") = std::vector<int>{1}, py::arg("stop_token_ids") = py::none())
      .def_property_readonly("started", [](const Decoder& d) { return d.state->started(); })
      .def_property_readonly("done", [](const Decoder& d) { return d.state->done(); })
      .def_property_readonly("rows", [](const Decoder& d) { return d.state->rows(); })
      .def_property_readonly("batch", [](const Decoder& d) { return d.state->batch(); })
      .def_property_readonly("tokens", [](const Decoder& d) { return to_array(d.state->tokens()); })
      .def_property_readonly("positions", [](const Decoder& d) { return to_array(d.state->positions()); })
      .def_property_readonly("slots", [](const Decoder& d) { return to_array(d.state->slots()); })
      .def("advance", [](Decoder& d, const py::object& logits) {
             const engine::DecodeState& st = *d.state;
             FloatArray arr;
             const float* ptr = nullptr;
             if (st.started()) {
               if (st.done()) throw std::invalid_argument("advance: the decoder is done");
               if (!logits.is_none()) arr = FloatArray::ensure(logits);
               if (!arr || arr.ndim() != 2 || arr.shape(0) != st.rows() || arr.shape(1) != st.vocab())
                 throw std::invalid_argument("advance: logits must be float32 [" + std::to_string(st.rows()) +
                                             ", " + std::to_string(st.vocab()) + "], one row per row fed");
               ptr = arr.data();
             }
             {
               py::gil_scoped_release release;
               d.state->advance(ptr, d.scratch);
             }
             py::list out;
             for (const engine::AcceptedToken& a : d.state->accepted()) out.append(py::make_tuple(a.sequence, a.token));
             return out;
           }, py::arg("logits") = py::none())
      .def("results", [](const Decoder& d) {
             py::list out;
             for (const engine::SequenceResult& r : d.state->results()) out.append(engine_bind::result_dict(r));
             return out;
           });

  py::class_<AttentionPlan, std::shared_ptr<AttentionPlan>>(m, "AttentionPlan", R"doc(
Which rows of one batched attention call go to which cache: groups added in row order.
add(cache, slots, positions): the next len(positions) rows are tokens_per_slot = len(positions) /
len(slots) tokens of each slot (slot-major) of `cache`, at those RoPE positions.)doc")
      .def(py::init<>())
      .def("add", [](AttentionPlan& plan, py::object cache, std::vector<int> slots, const Int32Array& positions) {
             if (!py::isinstance<engine::KVCache>(cache))
               throw py::type_error("cache must be a _native.KVCache, got a " + engine_bind::type_name(cache));
             engine::KVCache* c = &cache.cast<engine::KVCache&>();
             plan.add(cache, c, std::move(slots), positions.data(), static_cast<size_t>(positions.size()));
           }, py::arg("cache"), py::arg("slots"), py::arg("positions"))
      .def_property_readonly("rows", &AttentionPlan::rows)
      .def_property_readonly("groups", [](const AttentionPlan& p) { return p.groups.size(); });

  py::class_<StepRows>(m, "StepRows", "What decode_rows() returns: the next rows and their attention plan.")
      .def_readonly("tokens", &StepRows::tokens)
      .def_readonly("positions", &StepRows::positions)
      .def_readonly("rows", &StepRows::rows)
      .def_readonly("plan", &StepRows::plan);

  py::class_<Selection>(m, "Selection", "What select_step() returns: the accepted tokens and who is done.")
      .def_readonly("accepted", &Selection::accepted)
      .def_readonly("accepted_tokens", &Selection::accepted_tokens)
      .def_readonly("accepted_sequences", &Selection::accepted_sequences)
      .def_readonly("done", &Selection::done);

  m.def("decode_rows", &decode_rows, py::arg("decoders"), R"doc(
The rows every decoder feeds next, in one call: decoders (started, in list order) -> StepRows with
tokens / positions (int32 [n], decoder after decoder), rows per decoder, and the AttentionPlan of
those rows (one group per decoder with rows, on its own cache and slots).)doc");

  m.def("select_step", &select_step, py::arg("decoders"), py::arg("logits"), R"doc(
One decode step's token selection for many decoders in one call (the GIL is released inside).

decoders: a list of Decoder, none done. A decoder not yet started chooses from its first logits;
a started one from its rows of `logits` (float32 [sum of their rows, vocab], decoder after decoder
in list order, as decode_rows gave them; None when no decoder has started). Returns Selection: the
tokens accepted per decoder (count, then the tokens and their sequences, decoder after decoder)
and done per decoder. Each decoder advances exactly as Decoder.advance would on its own.)doc");

  m.def("attention_plan", &attention_plan_py, py::arg("plan"), py::arg("layer"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::kw_only(), py::arg("scale"), py::arg("softcap") = py::none(),
        py::arg("window") = py::none(), py::arg("rope_theta") = 10000.0f, py::arg("pool") = nullptr,
        R"doc(
attention() for every group of `plan` in one call: q [rows, H, D], k, v [rows, KV, D] (float32,
C-contiguous, rows in plan order) -> out [rows, H*D]. Each group runs exactly as attention() on its
own cache, slots and positions. pool: a ThreadPool (None: the default pool).)doc");
}
