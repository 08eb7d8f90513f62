// The decode loop for greedy decoding and sampling, input validation, and the dispatch to beam
// search. See generate.h.
#include "generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "beam_search.h"
#include "sampling.h"

namespace engine {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::string num(double v) {
  std::string s = std::to_string(v);
  while (s.size() > 1 && s.back() == '0') s.pop_back();   // 0.500000 -> 0.5
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

void check_ids(const std::vector<int32_t>& ids, const char* name, int vocab) {
  for (int32_t id : ids)
    if (id < 0 || id >= vocab)
      fail(std::string(name) + " contains " + std::to_string(id) + ", outside the vocabulary [0, " +
           std::to_string(vocab) + "); pass ids of the tokenizer that produced the logits");
}

// Greedy decoding or sampling (num_beams == 1): every live sequence takes one token per step;
// finished sequences are no longer fed to the model.
class SampleState final : public DecodeState {
 public:
  SampleState(const std::vector<SequenceInput>& inputs, int vocab, const GenerateOptions& o,
              int capacity)
      : DecodeState(inputs, vocab, o), results_(batch_), rngs_(batch_), limit_(batch_),
        rows_(batch_), live_(batch_, 1) {
    params_.do_sample = o.do_sample;
    params_.temperature = o.temperature;
    params_.top_k = o.top_k;
    params_.top_p = o.top_p;
    params_.repetition_penalty = o.repetition_penalty;
    for (int b = 0; b < batch_; ++b) {
      rng_seed(rngs_[b], o.seed + static_cast<uint64_t>(b));
      limit_[b] = max_tokens_for(inputs_[b], o, capacity);
      rows_[b] = inputs_[b].first_logits;
      results_[b].tokens.reserve(limit_[b]);
    }
  }

  std::vector<SequenceResult> results() const override { return results_; }

 private:
  void select(const float* logits, bool first, SamplerScratch& scratch) override {
    if (!first)
      for (size_t r = 0; r < seq_of_row_.size(); ++r)
        rows_[seq_of_row_[r]] = logits + r * static_cast<size_t>(vocab_);
    scratch.reserve(vocab_);
    tokens_.clear();
    positions_.clear();
    slots_.clear();
    seq_of_row_.clear();
    for (int b = 0; b < batch_; ++b) {
      if (!live_[b]) continue;
      const SequenceInput& in = inputs_[b];
      std::vector<int32_t>& out = results_[b].tokens;
      const TokenSpan prompt{in.prompt_tokens.data(), static_cast<int>(in.prompt_tokens.size())};
      const TokenSpan generated{out.data(), static_cast<int>(out.size())};
      const int32_t token = select_token(rows_[b], vocab_, params_, prompt, generated, rngs_[b], scratch);
      out.push_back(token);
      accepted_.push_back({b, token});
      if (kinds_[token] != 0 || static_cast<int>(out.size()) == limit_[b]) {
        live_[b] = 0;
        results_[b].finish_reason = kinds_[token] == 1   ? FinishReason::Eos
                                    : kinds_[token] == 2 ? FinishReason::Stop
                                                         : FinishReason::Length;
        continue;
      }
      tokens_.push_back(token);
      positions_.push_back(in.prompt_length + static_cast<int>(out.size()) - 1);
      slots_.push_back(in.slots[0]);
      seq_of_row_.push_back(b);
    }
  }

  SamplingParams params_;
  std::vector<SequenceResult> results_;
  std::vector<Rng> rngs_;
  std::vector<int> limit_;
  std::vector<const float*> rows_;   // the logits each live sequence chooses from next
  std::vector<uint8_t> live_;
  std::vector<int> seq_of_row_;      // sequence of each row fed last
};

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::Eos: return "eos";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
  }
  return "length";
}

std::vector<uint8_t> token_kinds(const GenerateOptions& options, int vocab) {
  std::vector<uint8_t> kinds(static_cast<size_t>(vocab), 0);
  for (int32_t id : options.stop_token_ids) kinds[id] = 2;
  for (int32_t id : options.eos_token_ids) kinds[id] = 1;   // eos wins over stop
  return kinds;
}

int max_tokens_for(const SequenceInput& input, const GenerateOptions& options, int capacity) {
  return std::min(options.max_new_tokens, capacity - input.prompt_length);
}

const float* timed_step(StepModel& model, const int32_t* tokens, const int32_t* positions,
                        const int32_t* slots, int n, GenerateStats& stats) {
  const auto t0 = Clock::now();
  const float* logits = model.step(tokens, positions, slots, n);
  stats.step_s += seconds_since(t0);
  stats.steps += 1;
  stats.tokens_stepped += n;
  if (logits == nullptr) throw std::runtime_error("the step function returned no logits");
  return logits;
}

void timed_stream(const StreamFn& stream, int sequence, int32_t token, GenerateStats& stats) {
  if (!stream) return;
  const auto t0 = Clock::now();
  stream(sequence, token);
  stats.stream_s += seconds_since(t0);
  stats.tokens_streamed += 1;
}

void validate_generate(const std::vector<SequenceInput>& inputs, int vocab,
                       const GenerateOptions& o, const SlotOps& cache) {
  if (inputs.empty()) fail("generate needs at least one sequence; got an empty batch");
  if (vocab < 1) fail("the logits have no vocabulary dimension; pass first_logits as [batch, vocab]");
  if (o.max_new_tokens < 1)
    fail("max_new_tokens must be >= 1, got " + std::to_string(o.max_new_tokens));
  if (o.num_beams < 1) fail("num_beams must be >= 1, got " + std::to_string(o.num_beams));
  if (o.num_beams > 1 && o.do_sample)
    fail("beam sampling (num_beams > 1 with do_sample=True) is not supported; use do_sample=False "
         "for beam search, or num_beams=1 to sample");
  if (o.do_sample && !(o.temperature > 0.0f && std::isfinite(o.temperature)))
    fail("temperature must be a finite number > 0 when do_sample=True, got " + num(o.temperature) +
         "; for deterministic output use do_sample=False (greedy)");
  if (o.top_k < 0) fail("top_k must be >= 0 (0 disables it), got " + std::to_string(o.top_k));
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f))
    fail("top_p must be in (0, 1] (1 disables it), got " + num(o.top_p));
  if (!(o.repetition_penalty > 0.0f && std::isfinite(o.repetition_penalty)))
    fail("repetition_penalty must be a finite number > 0 (1 disables it), got " +
         num(o.repetition_penalty));
  if (!std::isfinite(o.length_penalty))
    fail("length_penalty must be a finite number, got " + num(o.length_penalty));
  check_ids(o.eos_token_ids, "eos_token_ids", vocab);
  check_ids(o.stop_token_ids, "stop_token_ids", vocab);

  const int capacity = cache.capacity(), num_slots = cache.num_slots();
  if (capacity < 1 || num_slots < 1)
    fail("the KV cache has capacity " + std::to_string(capacity) + " and " +
         std::to_string(num_slots) + " slots; create it with both >= 1");
  const long long needed = static_cast<long long>(inputs.size()) * o.num_beams;
  if (needed > num_slots)
    fail("num_beams * batch = " + std::to_string(needed) + " cache slots are needed, but the cache "
         "has " + std::to_string(num_slots) + "; create the KVCache with more slots or reduce "
         "num_beams / the batch size");

  std::vector<uint8_t> used(static_cast<size_t>(num_slots), 0);
  for (size_t b = 0; b < inputs.size(); ++b) {
    const SequenceInput& in = inputs[b];
    const std::string seq = "sequence " + std::to_string(b) + ": ";
    if (in.first_logits == nullptr) fail(seq + "first_logits is missing");
    if (in.prompt_length < 1 || in.prompt_length >= capacity)
      fail(seq + "prompt_length " + std::to_string(in.prompt_length) + " must be in [1, capacity) "
           "with cache capacity " + std::to_string(capacity) + "; a longer prompt leaves no room "
           "to generate: create the KVCache with a larger capacity or shorten the prompt");
    for (int32_t id : in.prompt_tokens)
      if (id < 0) fail(seq + "prompt_tokens contains the negative id " + std::to_string(id));
    if (static_cast<int>(in.slots.size()) != o.num_beams)
      fail(seq + "has " + std::to_string(in.slots.size()) + " cache slots but num_beams is " +
           std::to_string(o.num_beams) + "; give one slot per beam");
    for (int slot : in.slots) {
      if (slot < 0 || slot >= num_slots)
        fail(seq + "slot " + std::to_string(slot) + " is outside the cache's slots [0, " +
             std::to_string(num_slots) + ")");
      if (used[slot]) fail(seq + "slot " + std::to_string(slot) + " is used twice; every "
                           "sequence (and every beam) needs its own slot");
      used[slot] = 1;
    }
  }
}

std::vector<std::vector<int>> default_beam_slots(const std::vector<int>& prefill_slots,
                                                 int num_beams, int num_slots) {
  std::vector<uint8_t> taken(static_cast<size_t>(std::max(num_slots, 0)), 0);
  for (int slot : prefill_slots) {
    if (slot < 0 || slot >= num_slots)
      fail("slot " + std::to_string(slot) + " is outside the cache's slots [0, " +
           std::to_string(num_slots) + ")");
    if (taken[slot]) fail("slot " + std::to_string(slot) + " is listed twice in slots");
    taken[slot] = 1;
  }
  const long long needed = static_cast<long long>(prefill_slots.size()) * num_beams;
  if (needed > num_slots)
    fail("num_beams * batch = " + std::to_string(needed) + " cache slots are needed, but the cache "
         "has " + std::to_string(num_slots) + "; create the KVCache with more slots or reduce "
         "num_beams / the batch size");
  std::vector<std::vector<int>> result(prefill_slots.size());
  int next_free = 0;
  for (size_t b = 0; b < prefill_slots.size(); ++b) {
    result[b].push_back(prefill_slots[b]);
    for (int j = 1; j < num_beams; ++j) {
      while (taken[next_free]) ++next_free;
      taken[next_free] = 1;
      result[b].push_back(next_free);
    }
  }
  return result;
}

DecodeState::DecodeState(const std::vector<SequenceInput>& inputs, int vocab,
                         const GenerateOptions& options)
    : batch_(static_cast<int>(inputs.size())), vocab_(vocab), options_(options), inputs_(inputs),
      first_logits_(inputs.size() * static_cast<size_t>(vocab)), kinds_(token_kinds(options, vocab)) {
  for (int b = 0; b < batch_; ++b) {
    float* dst = first_logits_.data() + static_cast<size_t>(b) * vocab;
    std::copy(inputs[b].first_logits, inputs[b].first_logits + vocab, dst);
    inputs_[b].first_logits = dst;
  }
}

void DecodeState::advance(const float* logits, SamplerScratch& scratch) {
  if (done()) throw std::logic_error("advance() on a finished decode; check done() first");
  if (started_ && logits == nullptr)
    throw std::invalid_argument("advance() needs the logits of the rows fed since the last call");
  const bool first = !started_;
  started_ = true;
  accepted_.clear();
  select(logits, first, scratch);
}

std::unique_ptr<DecodeState> start_decode(const std::vector<SequenceInput>& inputs, int vocab,
                                          const GenerateOptions& options, SlotOps& cache) {
  validate_generate(inputs, vocab, options, cache);
  if (options.num_beams > 1) return make_beam_state(inputs, vocab, options, cache);
  return std::make_unique<SampleState>(inputs, vocab, options, cache.capacity());
}

std::vector<SequenceResult> generate(StepModel& model, SlotOps& cache,
                                     const std::vector<SequenceInput>& inputs, int vocab,
                                     const GenerateOptions& options, const StreamFn& stream,
                                     GenerateStats* stats) {
  GenerateStats local;
  GenerateStats& st = stats != nullptr ? *stats : local;
  st = GenerateStats{};
  const auto t0 = Clock::now();
  std::unique_ptr<DecodeState> state = start_decode(inputs, vocab, options, cache);
  SamplerScratch scratch;
  const float* logits = nullptr;
  for (;;) {
    state->advance(logits, scratch);
    for (const AcceptedToken& a : state->accepted()) timed_stream(stream, a.sequence, a.token, st);
    if (state->done()) break;
    logits = timed_step(model, state->tokens().data(), state->positions().data(),
                        state->slots().data(), state->rows(), st);
  }
  st.total_s = seconds_since(t0);
  return state->results();
}

}  // namespace engine
