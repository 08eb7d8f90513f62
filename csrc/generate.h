// The decode loop: greedy / sampling (sampling.h) or beam search (beam_search.h) over a batch of
// sequences whose prefill is done. The matrix work stays outside: the loop calls a StepModel
// (the graph runner) with the tokens to feed, and moves beams in the KV cache through SlotOps.
//
// Per sequence b the caller provides: the logits of its last prompt position, its prompt token
// ids (for the repetition penalty), its prompt length (= the position of the first generated
// token) and its cache slot(s). Generated token i (0-based) is fed at position
// prompt_length + i, so a sequence holds at most `capacity` tokens in all: it generates at most
// min(max_new_tokens, capacity - prompt_length) tokens, then ends with FinishReason::Length.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "kv_cache.h"
#include "sampling.h"

namespace engine {

// The graph runner as the loop sees it: embeds tokens[i], runs the layers at positions[i] into
// cache slot slots[i], and returns the logits of every token, [n, vocab] row-major float32.
// The pointer must stay valid until the next call. Exceptions propagate out of generate().
class StepModel {
 public:
  virtual ~StepModel() = default;
  virtual const float* step(const int32_t* tokens, const int32_t* positions, const int32_t* slots,
                            int n) = 0;
};

// The KV-cache operations the loop needs; engine::KVCache provides them.
class SlotOps {
 public:
  virtual ~SlotOps() = default;
  virtual int capacity() const = 0;    // positions per slot
  virtual int num_slots() const = 0;
  virtual void copy_slot(int src, int dst) = 0;                      // dst := src (cheap, CoW)
  virtual void reorder(const std::vector<int>& src_for_dst) = 0;     // [num_slots], all at once
};

// engine::KVCache as the loop's SlotOps.
class KVCacheSlots final : public SlotOps {
 public:
  explicit KVCacheSlots(KVCache& cache) : cache_(cache) {}
  int capacity() const override { return cache_.capacity(); }
  int num_slots() const override { return cache_.num_slots(); }
  void copy_slot(int src, int dst) override { cache_.copy_slot(src, dst); }
  void reorder(const std::vector<int>& src_for_dst) override { cache_.reorder(src_for_dst); }

 private:
  KVCache& cache_;
};

// HF `early_stopping`: False = stop when the best running beam cannot beat the worst finished one
// at the current length (heuristic); True = stop once num_beams hypotheses are finished;
// Never = the heuristic, but assuming the best length (max length if length_penalty > 0).
enum class EarlyStopping { False, True, Never };

enum class FinishReason { Eos, Stop, Length };
const char* finish_reason_name(FinishReason reason);   // "eos", "stop", "length"

struct GenerateOptions {
  int max_new_tokens = 20;            // >= 1
  bool do_sample = false;
  float temperature = 1.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;                  // sequence b samples from its own stream seeded with seed + b
  int num_beams = 1;                  // > 1: beam search (do_sample must be false)
  float length_penalty = 1.0f;        // beam score = sum log p / generated_length ** length_penalty
  EarlyStopping early_stopping = EarlyStopping::False;
  std::vector<int32_t> eos_token_ids{1};   // end a sequence, FinishReason::Eos, token kept
  std::vector<int32_t> stop_token_ids;     // end a sequence, FinishReason::Stop, token kept
};

// One sequence whose prefill is done.
struct SequenceInput {
  const float* first_logits = nullptr;   // [vocab] logits of the last prompt position
  std::vector<int32_t> prompt_tokens;    // for the repetition penalty (ids >= vocab are ignored)
  int prompt_length = 0;                 // next position; 1 <= prompt_length < capacity
  std::vector<int> slots;                // num_beams distinct slots; slots[0] holds the prefill
};

struct SequenceResult {
  std::vector<int32_t> tokens;   // generated tokens only, the eos / stop token included
  FinishReason finish_reason = FinishReason::Length;
  bool has_score = false;        // beam search only
  float score = 0.0f;            // beam search: HF `sequences_scores` (length-penalized)
};

// Where the time went in one generate() call.
struct GenerateStats {
  int steps = 0;                 // StepModel::step calls
  int64_t tokens_stepped = 0;    // tokens fed to step in all
  int64_t tokens_streamed = 0;
  double total_s = 0.0;          // the whole call
  double step_s = 0.0;           // inside StepModel::step
  double stream_s = 0.0;         // inside the stream callback
};

// Called once per accepted token (greedy / sampling, as soon as it is chosen), or, for beam
// search, with the final tokens of a sequence as soon as its result is fixed.
using StreamFn = std::function<void(int sequence, int32_t token)>;

// Throws std::invalid_argument, naming the argument and what to do, for any inconsistent input.
void validate_generate(const std::vector<SequenceInput>& inputs, int vocab,
                       const GenerateOptions& options, const SlotOps& cache);

// Beam slots when the caller gives one slot per sequence: sequence b keeps prefill_slots[b] and
// takes num_beams - 1 more slots from those not listed, lowest first. Throws if too few.
std::vector<std::vector<int>> default_beam_slots(const std::vector<int>& prefill_slots,
                                                 int num_beams, int num_slots);

// Runs the loop to the end; one result per input. `stream` may be empty; `stats` may be null.
// It drives a DecodeState (below) with `model`, so its results are those of stepping one by hand.
std::vector<SequenceResult> generate(StepModel& model, SlotOps& cache,
                                     const std::vector<SequenceInput>& inputs, int vocab,
                                     const GenerateOptions& options, const StreamFn& stream,
                                     GenerateStats* stats);

// ---- The loop one step at a time (the serving scheduler runs many of these side by side).
//
//     state = start_decode(inputs, vocab, options, cache);    // validates, copies first_logits
//     state->advance(nullptr, scratch);                       // tokens from the first logits
//     while (!state->done()) {
//       logits = <run state->tokens() at state->positions() into state->slots()>;
//       state->advance(logits, scratch);                      // [rows, vocab] of those rows
//     }
//     state->results();
//
// A state owns everything it changes except the cache, which beam search reorders through
// `cache` (it must outlive the state). States are independent: any number may be advanced in
// any interleaving, each giving exactly the results of generate() on its own.

// A token accepted by the last advance(): greedy / sampling as soon as it is chosen, beams
// their final tokens once the sequence's result is fixed (the order generate() streams them).
struct AcceptedToken {
  int sequence;
  int32_t token;
};

class DecodeState {
 public:
  virtual ~DecodeState() = default;
  // First call: chooses from the inputs' first logits (`logits` is ignored and may be null).
  // Later calls: `logits` are [rows(), vocab], row i for the row tokens()[i] fed since.
  // Chooses the next token of every live sequence (beams: moves them in the cache), then sets
  // the rows to feed next; none when every sequence has ended.
  void advance(const float* logits, SamplerScratch& scratch);
  bool started() const { return started_; }
  bool done() const { return started_ && tokens_.empty(); }
  int rows() const { return static_cast<int>(tokens_.size()); }
  int batch() const { return batch_; }
  int vocab() const { return vocab_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::vector<int32_t>& positions() const { return positions_; }
  const std::vector<int32_t>& slots() const { return slots_; }
  const std::vector<AcceptedToken>& accepted() const { return accepted_; }   // of the last advance
  // One result per sequence once done(). Before that: greedy / sampling the tokens so far, beams
  // the sequences already finished (others empty), each with FinishReason::Length.
  virtual std::vector<SequenceResult> results() const = 0;

 protected:
  DecodeState(const std::vector<SequenceInput>& inputs, int vocab, const GenerateOptions& options);
  // Select from rows_[...] (already pointing at this step's logits) and fill the next rows.
  virtual void select(const float* logits, bool first, SamplerScratch& scratch) = 0;

  int batch_, vocab_;
  GenerateOptions options_;
  std::vector<SequenceInput> inputs_;    // first_logits point into first_logits_
  std::vector<float> first_logits_;      // [batch, vocab] copy
  std::vector<uint8_t> kinds_;           // token_kinds(options_, vocab_)
  std::vector<int32_t> tokens_, positions_, slots_;
  std::vector<AcceptedToken> accepted_;
  bool started_ = false;
};

// Validates like generate() (std::invalid_argument) and starts a greedy / sampling or beam state.
std::unique_ptr<DecodeState> start_decode(const std::vector<SequenceInput>& inputs, int vocab,
                                          const GenerateOptions& options, SlotOps& cache);

// ---- Shared by the greedy and beam loops.

// Per-token role: 0 = ordinary, 1 = eos, 2 = stop. Built once per call.
std::vector<uint8_t> token_kinds(const GenerateOptions& options, int vocab);

// The number of tokens sequence `input` may generate (>= 1 after validation).
int max_tokens_for(const SequenceInput& input, const GenerateOptions& options, int capacity);

// model.step(...) with its time and counts added to stats.
const float* timed_step(StepModel& model, const int32_t* tokens, const int32_t* positions,
                        const int32_t* slots, int n, GenerateStats& stats);

// stream(sequence, token) if set, with its time added to stats.
void timed_stream(const StreamFn& stream, int sequence, int32_t token, GenerateStats& stats);

}  // namespace engine
