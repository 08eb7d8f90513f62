// pybind11 glue for the generation loop: _native.generate() and _native.last_generate_stats()
// (the last call of the calling thread: no state is shared between threads).
//
// The loop (generate.h) runs with the GIL released. It takes the GIL only to call the Python step
// function, the stream callback and the cache's Python methods. A Python exception raised in any
// of them (KeyboardInterrupt included) unwinds the C++ loop and leaves generate() as the same
// Python exception; a Ctrl-C that arrives while a C-level step_fn runs is picked up right after it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bind_util.h"
#include "generate.h"
#include "kv_cache.h"

namespace py = pybind11;

namespace {

using Clock = std::chrono::steady_clock;
using engine_bind::FloatArray;
using engine_bind::type_name;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// step_fn(tokens: int32[n], positions: int32[n], slots: int32[n]) -> float32 [n, vocab].
class PyStepModel final : public engine::StepModel {
 public:
  PyStepModel(py::object fn, int vocab) : fn_(std::move(fn)), vocab_(vocab) {}

  const float* step(const int32_t* tokens, const int32_t* positions, const int32_t* slots,
                    int n) override {
    py::gil_scoped_acquire gil;
    py::array_t<int32_t> tok(n, tokens), pos(n, positions), slot(n, slots);   // copies
    const auto t0 = Clock::now();
    py::object out = fn_(tok, pos, slot);
    fn_seconds += seconds_since(t0);
    if (out.is_none())
      throw py::type_error("step_fn must return a float32 array of logits [n, vocab]; it returned None");
    FloatArray logits = FloatArray::ensure(out);
    if (!logits)
      throw py::type_error("step_fn must return a float32 array of logits [n, vocab]; it returned a " +
                           type_name(out));
    if (logits.ndim() != 2 || logits.shape(0) != n || logits.shape(1) != vocab_) {
      std::string shape = "(";
      for (py::ssize_t d = 0; d < logits.ndim(); ++d)
        shape += (d ? ", " : "") + std::to_string(logits.shape(d));
      throw py::value_error("step_fn returned logits of shape " + shape + ") for " +
                            std::to_string(n) + " tokens; expected (" + std::to_string(n) + ", " +
                            std::to_string(vocab_) + "): one row of the full vocabulary per " +
                            "token, in the order given");
    }
    last_ = std::move(logits);   // keeps the data alive until the next call
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    return last_.data();
  }

  double fn_seconds = 0.0;

 private:
  py::object fn_;
  int vocab_;
  FloatArray last_;
};

// Any other Python object with capacity / num_slots (methods or attributes), copy_slot(src, dst) and
// reorder(src_for_dst: list[int]), e.g. _native.KVCache or a test double.
class PySlotOps final : public engine::SlotOps {
 public:
  explicit PySlotOps(py::object cache) : cache_(std::move(cache)) {
    for (const char* name : {"capacity", "num_slots", "copy_slot", "reorder"})
      if (!py::hasattr(cache_, name))
        throw py::type_error(std::string("cache must be a KVCache (capacity, num_slots, copy_slot, "
                                         "reorder); the given ") + type_name(cache_) +
                             " has no '" + name + "'");
    capacity_ = read_int("capacity");
    num_slots_ = read_int("num_slots");
  }
  int capacity() const override { return capacity_; }
  int num_slots() const override { return num_slots_; }
  void copy_slot(int src, int dst) override {
    py::gil_scoped_acquire gil;
    cache_.attr("copy_slot")(src, dst);
  }
  void reorder(const std::vector<int>& src_for_dst) override {
    py::gil_scoped_acquire gil;
    cache_.attr("reorder")(py::cast(src_for_dst));
  }

 private:
  int read_int(const char* name) {
    py::object value = cache_.attr(name);
    if (PyCallable_Check(value.ptr())) value = value();
    return value.cast<int>();
  }
  py::object cache_;
  int capacity_ = 0, num_slots_ = 0;
};

struct LastStats {
  engine::GenerateStats core;
  double step_fn_s = 0.0;
  bool valid = false;
};
thread_local LastStats t_last_stats;   // this thread's last successful generate()

py::list generate_py(py::object step_fn, py::object cache, FloatArray first_logits,
                     std::vector<std::vector<int32_t>> prompt_tokens,
                     std::vector<int> prompt_lengths, std::vector<int> slots, int max_new_tokens,
                     bool do_sample, float temperature, int top_k, float top_p,
                     float repetition_penalty, int64_t seed, int num_beams, float length_penalty,
                     py::object early_stopping, py::object eos_token_ids,
                     py::object stop_token_ids, py::object stream) {
  if (!PyCallable_Check(step_fn.ptr()))
    throw py::type_error("step_fn must be callable as step_fn(tokens, positions, slots) -> logits");
  if (!stream.is_none() && !PyCallable_Check(stream.ptr()))
    throw py::type_error("stream must be None or callable as stream(sequence_index, token_id)");
  // _native.KVCache is used directly (no GIL needed); any other object through its methods.
  std::unique_ptr<engine::SlotOps> slot_ops_ptr;
  if (py::isinstance<engine::KVCache>(cache))
    slot_ops_ptr = std::make_unique<engine::KVCacheSlots>(cache.cast<engine::KVCache&>());
  else
    slot_ops_ptr = std::make_unique<PySlotOps>(cache);
  engine::SlotOps& slot_ops = *slot_ops_ptr;
  const engine::GenerateOptions o = engine_bind::make_options(
      max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, num_beams,
      length_penalty, early_stopping, eos_token_ids, stop_token_ids);
  const std::vector<engine::SequenceInput> inputs = engine_bind::make_inputs(
      first_logits, std::move(prompt_tokens), prompt_lengths, slots, num_beams, slot_ops.num_slots());
  const int vocab = static_cast<int>(first_logits.shape(1));
  engine::validate_generate(inputs, vocab, o, slot_ops);   // ValueError before any callback

  PyStepModel model(step_fn, vocab);
  engine::StreamFn stream_cb;
  if (!stream.is_none()) {
    stream_cb = [&stream](int sequence, int32_t token) {
      py::gil_scoped_acquire gil;
      stream(sequence, token);
    };
  }
  engine::GenerateStats stats;
  std::vector<engine::SequenceResult> results;
  {
    py::gil_scoped_release release;
    results = engine::generate(model, slot_ops, inputs, vocab, o, stream_cb, &stats);
  }

  t_last_stats.core = stats;
  t_last_stats.step_fn_s = model.fn_seconds;
  t_last_stats.valid = true;

  py::list out;
  for (const engine::SequenceResult& r : results) out.append(engine_bind::result_dict(r));
  return out;
}

py::object last_generate_stats() {
  if (!t_last_stats.valid) return py::none();
  const engine::GenerateStats& s = t_last_stats.core;
  py::dict d;
  d["steps"] = s.steps;
  d["tokens_stepped"] = s.tokens_stepped;
  d["tokens_streamed"] = s.tokens_streamed;
  d["total_s"] = s.total_s;
  d["step_s"] = s.step_s;                   // inside StepModel::step: GIL + arrays + step_fn
  d["step_fn_s"] = t_last_stats.step_fn_s;  // inside the Python step_fn call alone
  d["stream_s"] = s.stream_s;               // inside the stream callback (GIL included)
  d["loop_s"] = s.total_s - t_last_stats.step_fn_s - s.stream_s;   // the loop's own time
  return d;
}

}  // namespace

void bind_generate(py::module_& m) {
  m.def("generate", &generate_py, py::arg("step_fn"), py::arg("cache"), py::arg("first_logits"),
        py::arg("prompt_tokens"), py::arg("prompt_lengths"), py::arg("slots"), py::kw_only(),
        py::arg("max_new_tokens"), py::arg("do_sample") = false, py::arg("temperature") = 1.0f,
        py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("repetition_penalty") = 1.0f,
        py::arg("seed") = 0, py::arg("num_beams") = 1, py::arg("length_penalty") = 1.0f,
        py::arg("early_stopping") = false, py::arg("eos_token_ids") = std::vector<int>{1},
        py::arg("stop_token_ids") = py::none(), py::arg("stream") = py::none(),
        R"doc(Runs the decode loop after prefill; returns one dict per sequence.

step_fn(tokens: int32[n], positions: int32[n], slots: int32[n]) -> float32 [n, vocab]: embeds
the tokens, runs the layers at those positions into those cache slots, returns their logits.
cache: the KVCache (capacity, num_slots, copy_slot, reorder). first_logits: [batch, vocab], the
logits of each prompt's last position. prompt_tokens: the prompt ids (repetition penalty).
prompt_lengths: the next position of each sequence. slots: one cache slot per sequence (the
prefill slot; beams take the lowest unlisted slots) or num_beams per sequence, prefill first.

Sampling: do_sample, temperature, top_k, top_p, repetition_penalty (HF semantics); sequence b
draws from its own RNG stream seeded with seed + b. Beam search: num_beams > 1 with
do_sample=False, length_penalty, early_stopping (True / False / "never"), as transformers 5.23.
eos_token_ids end a sequence with finish_reason "eos", stop_token_ids with "stop" (the token is
kept); reaching max_new_tokens or the cache capacity (prompt + generated <= capacity) gives
"length". stream(sequence, token) is called for each accepted token (beam search: the final
tokens of a sequence once its result is fixed).

Returns [{"tokens": [...], "finish_reason": "eos" | "stop" | "length", "score": float | None}]
(score: the beam score, HF sequences_scores; None without beams).)doc");
  m.def("last_generate_stats", &last_generate_stats,
        "Timing of this thread's last successful generate() call: steps, tokens_stepped, total_s, step_s, "
        "step_fn_s (inside the Python step_fn), stream_s, loop_s (the loop's own time: "
        "total - step_fn - stream). None before the first call.");
}
