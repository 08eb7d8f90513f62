// Helpers shared by the pybind11 glue (bind_*.cpp): argument parsing with messages that say what
// to pass.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "generate.h"

namespace engine_bind {

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

inline std::string type_name(const py::handle& obj) {
  return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

// obj as a C-contiguous numpy array of `dtype` whose shape matches `shape` (-1: any extent), else
// std::invalid_argument "<who><name> must be <what>, got ..." (ValueError in Python).
inline py::array checked_array(const py::handle& obj, const std::string& who, const std::string& name,
                               const py::dtype& dtype, const char* what, const std::vector<py::ssize_t>& shape) {
  if (!py::isinstance<py::array>(obj))
    throw std::invalid_argument(who + name + " must be a numpy array (" + what + "), got " + type_name(obj));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(dtype))
    throw std::invalid_argument(who + name + " must be " + what + ", got dtype " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(who + name + " must be C-contiguous; pass np.ascontiguousarray(" + name + ")");
  bool ok = a.ndim() == py::ssize_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
  if (!ok) {
    std::string got = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
    throw std::invalid_argument(who + name + " must be " + what + ", got shape " + got + ")");
  }
  return a;
}

inline std::vector<int32_t> token_ids(const py::object& value, const char* name) {
  if (value.is_none()) return {};
  if (py::isinstance<py::int_>(value)) return {value.cast<int32_t>()};
  try {
    return value.cast<std::vector<int32_t>>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(name) + " must be an int, a list of ints or None; got a " +
                         type_name(value));
  }
}

inline engine::EarlyStopping parse_early_stopping(const py::object& value) {
  if (py::isinstance<py::bool_>(value))
    return value.cast<bool>() ? engine::EarlyStopping::True : engine::EarlyStopping::False;
  if (py::isinstance<py::str>(value) && value.cast<std::string>() == "never")
    return engine::EarlyStopping::Never;
  throw py::value_error("early_stopping must be True, False or \"never\" (as in transformers); got " +
                        py::repr(value).cast<std::string>());
}

// The decode options of generate() / Decoder(), checked for what pybind11 cannot check.
inline engine::GenerateOptions make_options(int max_new_tokens, bool do_sample, float temperature,
                                            int top_k, float top_p, float repetition_penalty,
                                            int64_t seed, int num_beams, float length_penalty,
                                            const py::object& early_stopping,
                                            const py::object& eos_token_ids,
                                            const py::object& stop_token_ids) {
  if (seed < 0) throw py::value_error("seed must be >= 0, got " + std::to_string(seed));
  if (num_beams < 1) throw py::value_error("num_beams must be >= 1, got " + std::to_string(num_beams));
  engine::GenerateOptions o;
  o.max_new_tokens = max_new_tokens;
  o.do_sample = do_sample;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  o.repetition_penalty = repetition_penalty;
  o.seed = static_cast<uint64_t>(seed);
  o.num_beams = num_beams;
  o.length_penalty = length_penalty;
  o.early_stopping = parse_early_stopping(early_stopping);
  o.eos_token_ids = token_ids(eos_token_ids, "eos_token_ids");
  o.stop_token_ids = token_ids(stop_token_ids, "stop_token_ids");
  return o;
}

// One SequenceInput per row of first_logits (which must outlive the inputs), with its slots:
// one per sequence (beams take the lowest unlisted slots) or num_beams per sequence.
inline std::vector<engine::SequenceInput> make_inputs(const FloatArray& first_logits,
                                                      std::vector<std::vector<int32_t>> prompt_tokens,
                                                      const std::vector<int>& prompt_lengths,
                                                      const std::vector<int>& slots, int num_beams,
                                                      int num_slots) {
  if (first_logits.ndim() != 2)
    throw py::value_error("first_logits must be a 2-D array [batch, vocab]; got " +
                          std::to_string(first_logits.ndim()) + " dimensions");
  const size_t batch = static_cast<size_t>(first_logits.shape(0));
  const size_t vocab = static_cast<size_t>(first_logits.shape(1));
  if (prompt_tokens.size() != batch || prompt_lengths.size() != batch)
    throw py::value_error("first_logits has " + std::to_string(batch) + " rows, prompt_tokens " +
                          std::to_string(prompt_tokens.size()) + " entries and prompt_lengths " +
                          std::to_string(prompt_lengths.size()) + "; give one per sequence");
  std::vector<std::vector<int>> beam_slots;
  if (slots.size() == batch * static_cast<size_t>(num_beams)) {
    for (size_t b = 0; b < batch; ++b)
      beam_slots.emplace_back(slots.begin() + b * num_beams, slots.begin() + (b + 1) * num_beams);
  } else if (slots.size() == batch) {
    beam_slots = engine::default_beam_slots(slots, num_beams, num_slots);
  } else {
    throw py::value_error("slots has " + std::to_string(slots.size()) + " entries; give one per "
                          "sequence (" + std::to_string(batch) + "), or num_beams per sequence (" +
                          std::to_string(batch * num_beams) + ")");
  }
  std::vector<engine::SequenceInput> inputs(batch);
  for (size_t b = 0; b < batch; ++b) {
    inputs[b].first_logits = first_logits.data() + b * vocab;
    inputs[b].prompt_tokens = std::move(prompt_tokens[b]);
    inputs[b].prompt_length = prompt_lengths[b];
    inputs[b].slots = std::move(beam_slots[b]);
  }
  return inputs;
}

inline py::dict result_dict(const engine::SequenceResult& r) {
  py::dict d;
  d["tokens"] = py::cast(r.tokens);
  d["finish_reason"] = engine::finish_reason_name(r.finish_reason);
  d["score"] = r.has_score ? py::object(py::float_(r.score)) : py::object(py::none());
  return d;
}

}  // namespace engine_bind
