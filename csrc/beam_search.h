// Beam search with the exact semantics of transformers 5.23 `generate(num_beams=N,
// do_sample=False)` (GenerationMixin._beam_search and its helpers), one sequence at a time:
//
// - scores: log_softmax(logits), then the repetition penalty on those log-probs (HF applies its
//   logits processors after log_softmax in beam search), plus the beam's running score (float32);
// - each step keeps the top K = max(2, 1 + n_eos) * num_beams candidates over all beams (n_eos =
//   distinct eos + stop ids); candidates that end (eos / stop token, or the length limit) leave
//   the running set (their running score gets -1e9), the best num_beams others continue;
// - only candidates ranked < num_beams may become finished hypotheses, scored
//   sum_logprobs / generated_length ** length_penalty, where generated_length counts the new
//   tokens including the eos (prompt excluded); the best num_beams finished hypotheses are kept;
// - early stopping: the running-vs-finished heuristic (False), all num_beams finished (True), or
//   the heuristic at the maximum length when length_penalty > 0 (Never);
// - the result is the best finished hypothesis and its score (HF `sequences_scores`).
//
// Beams of sequence b live in inputs[b].slots; at the start the prefill slot is copied to the
// others, and after every step SlotOps::reorder makes each beam's slot a copy of its parent's.
// Streaming: nothing while searching; a sequence's final tokens once its result is fixed.
#pragma once
#include <memory>
#include <vector>

#include "generate.h"

namespace engine {

// The search as a DecodeState (generate.h), made by start_decode() after validate_generate() when
// options.num_beams > 1. `cache` must outlive the state.
std::unique_ptr<DecodeState> make_beam_state(const std::vector<SequenceInput>& inputs, int vocab,
                                             const GenerateOptions& options, SlotOps& cache);

}  // namespace engine
