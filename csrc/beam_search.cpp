// Beam search, step for step like transformers 5.23 GenerationMixin._beam_search: see
// beam_search.h. Names in comments refer to the HF code (running_beam_scores, beam_scores,
// is_sent_finished, is_early_stop_heuristic_unsatisfied, ...).
#include "beam_search.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "sampling.h"
#include "vec4.h"

namespace engine {

namespace {

constexpr float kMask = -1.0e9f;   // HF's "very large negative value"

// One continuation: a beam and a token, with its accumulated score. Order: score descending,
// then beam * vocab + token ascending (the scan visits candidates in that order).
struct BeamCand {
  float score;
  int32_t beam;
  int32_t token;
};

// Inserts c into top[0..count), kept sorted and capped at k. Ties keep the earlier entry first.
inline void push_top(BeamCand* top, int& count, int k, const BeamCand& c) {
  if (count == k) {
    if (!(c.score > top[k - 1].score)) return;
    --count;
  }
  int p = count;
  while (p > 0 && top[p - 1].score < c.score) {
    top[p] = top[p - 1];
    --p;
  }
  top[p] = c;
  ++count;
}

// Indices 0..n-1 ordered by score descending, then index ascending (insertion sort: n is tiny).
void order_by_score(const float* score, int n, int* order) {
  for (int i = 0; i < n; ++i) {
    int p = i;
    while (p > 0 && score[order[p - 1]] < score[i]) {
      order[p] = order[p - 1];
      --p;
    }
    order[p] = i;
  }
}

// The state of one sequence's search (HF's per-batch-item slices).
struct BeamSeq {
  int limit = 0;                    // max generated tokens (max_new_tokens or the cache capacity)
  int t = 0;                        // tokens generated so far by the running beams
  bool done = false;
  bool improvable = true;           // is_early_stop_heuristic_unsatisfied
  std::vector<const float*> rows;   // [nb] logits each running beam continues from
  std::vector<int32_t> run, run_next;        // [nb, limit] running beams' tokens
  std::vector<float> run_score, run_score_next;   // [nb] running_beam_scores
  std::vector<int> parent;                   // [nb] source beam of each new running beam
  std::vector<int32_t> fin, fin_next;        // [nb, limit] finished hypotheses (`sequences`)
  std::vector<int> fin_len, fin_len_next;    // [nb]
  std::vector<float> fin_score, fin_score_next;   // [nb] beam_scores (-1e9: empty)
  std::vector<uint8_t> fin_done, fin_done_next;   // [nb] is_sent_finished
};

// Per-step scratch shared by all sequences.
struct BeamScratch {
  std::vector<BeamCand> top;       // [K] top-K continuations
  std::vector<uint8_t> hit;        // [K] next_token_hits_stopping_criteria
  std::vector<float> running;      // [K] topk log-probs with -1e9 on hits
  std::vector<float> merged;       // [nb + K] finished scores, then candidate scores
  std::vector<uint8_t> merged_done;
  std::vector<int> order;          // [nb + K]
};

// log(sum(exp(x - max))), accumulated in double.
float log_sum_exp_shifted(const float* x, int n, float max) {
  return static_cast<float>(std::log(sum_exp_shifted(x, n, max, 1.0f)));
}

// Adds v[i] = ((x[i] - sub) - log_sum) + offset for every token i of beam j to the top-K list,
// in token order (HF: log_softmax, then + running score). Four lanes are compared against the
// current K-th score at once; the rare lane that beats it is inserted one by one.
void scan_row(const float* x, int vocab, float sub, float log_sum, float offset, int beam,
              BeamCand* top, int k, int& count) {
  int i = 0;
  for (; i < vocab && count < k; ++i)
    push_top(top, count, k, BeamCand{((x[i] - sub) - log_sum) + offset, beam, i});
  for (; i + 4 <= vocab; i += 4) {
    const f32x4 v = ((load4(x + i) - sub) - log_sum) + offset;
    if (!any4(v > top[k - 1].score)) continue;
    for (int l = 0; l < 4; ++l)
      if (v[l] > top[k - 1].score) push_top(top, count, k, BeamCand{v[l], beam, i + l});
  }
  for (; i < vocab; ++i) {
    const float v = ((x[i] - sub) - log_sum) + offset;
    if (v > top[k - 1].score) push_top(top, count, k, BeamCand{v, beam, i});
  }
}

// Adds beam j's continuations (log_softmax(row) [+ penalty] + running score) to the top-K list.
void scan_beam(const BeamSeq& s, int j, const SequenceInput& in, int vocab, float penalty,
               BeamScratch& w, SamplerScratch& sampler, int k, int& count) {
  const float* row = s.rows[j];
  const float vmax = max_value(row, vocab);
  const float log_sum = log_sum_exp_shifted(row, vocab, vmax);
  if (penalty == 1.0f) {
    scan_row(row, vocab, vmax, log_sum, s.run_score[j], j, w.top.data(), k, count);
    return;
  }
  float* lp = sampler.row.data();
  for (int i = 0; i < vocab; ++i) lp[i] = (row[i] - vmax) - log_sum;
  const TokenSpan prompt{in.prompt_tokens.data(), static_cast<int>(in.prompt_tokens.size())};
  const TokenSpan generated{s.run.data() + static_cast<size_t>(j) * s.limit, s.t};
  apply_repetition_penalty(lp, vocab, prompt, generated, penalty, sampler);
  scan_row(lp, vocab, 0.0f, 0.0f, s.run_score[j], j, w.top.data(), k, count);   // x - 0 - 0 == x
}

// One beam step of one sequence, from the current rows to the next running beams (HF c-g).
void beam_step(BeamSeq& s, const SequenceInput& in, int vocab, const GenerateOptions& o,
               const std::vector<uint8_t>& kinds, int k, BeamScratch& w, SamplerScratch& sampler) {
  const int nb = o.num_beams;
  const int L = s.limit;
  // c. top-K continuations over all beams.
  int count = 0;
  for (int j = 0; j < nb; ++j) scan_beam(s, j, in, vocab, o.repetition_penalty, w, sampler, k, count);
  const BeamCand* top = w.top.data();

  // d. which candidates end here: an eos / stop token, or the length limit.
  const bool at_limit = s.t + 1 >= s.limit;
  for (int c = 0; c < count; ++c) w.hit[c] = at_limit || kinds[top[c].token] != 0;

  // e. the best num_beams candidates that did not end become the running beams.
  for (int c = 0; c < count; ++c) w.running[c] = w.hit[c] ? top[c].score + kMask : top[c].score;
  int* order = w.order.data();
  order_by_score(w.running.data(), count, order);
  for (int j = 0; j < nb; ++j) {
    const BeamCand& c = top[order[j]];
    int32_t* dst = s.run_next.data() + static_cast<size_t>(j) * L;
    const int32_t* src = s.run.data() + static_cast<size_t>(c.beam) * L;
    std::copy(src, src + s.t, dst);
    dst[s.t] = c.token;
    s.run_score_next[j] = w.running[order[j]];
    s.parent[j] = c.beam;
  }

  // f. candidates ranked < num_beams that ended compete with the finished hypotheses.
  const float denom = static_cast<float>(std::pow(static_cast<double>(s.t + 1), o.length_penalty));
  bool all_finished = true;
  for (int j = 0; j < nb; ++j) all_finished = all_finished && s.fin_done[j];
  const bool full = all_finished && o.early_stopping == EarlyStopping::True;
  for (int j = 0; j < nb; ++j) {
    w.merged[j] = s.fin_score[j];
    w.merged_done[j] = s.fin_done[j];
  }
  for (int c = 0; c < count; ++c) {
    const bool finished_now = w.hit[c] && c < nb;
    float v = top[c].score / denom;
    if (full) v += kMask;
    if (!s.improvable) v += kMask;
    if (!finished_now) v += kMask;
    w.merged[nb + c] = v;
    w.merged_done[nb + c] = finished_now;
  }
  order_by_score(w.merged.data(), nb + count, order);
  for (int j = 0; j < nb; ++j) {
    const int m = order[j];
    int32_t* dst = s.fin_next.data() + static_cast<size_t>(j) * L;
    if (m < nb) {
      std::copy(s.fin.data() + static_cast<size_t>(m) * L,
                s.fin.data() + static_cast<size_t>(m) * L + s.fin_len[m], dst);
      s.fin_len_next[j] = s.fin_len[m];
    } else {
      const BeamCand& c = top[m - nb];
      const int32_t* src = s.run.data() + static_cast<size_t>(c.beam) * L;
      std::copy(src, src + s.t, dst);
      dst[s.t] = c.token;
      s.fin_len_next[j] = s.t + 1;
    }
    s.fin_score_next[j] = w.merged[m];
    s.fin_done_next[j] = w.merged_done[m];
  }
  s.run.swap(s.run_next);
  s.run_score.swap(s.run_score_next);
  s.fin.swap(s.fin_next);
  s.fin_len.swap(s.fin_len_next);
  s.fin_score.swap(s.fin_score_next);
  s.fin_done.swap(s.fin_done_next);
  s.t += 1;

  // g. can a running beam still beat the worst finished hypothesis?
  const int best_len =
      (o.early_stopping == EarlyStopping::Never && o.length_penalty > 0.0f) ? s.limit : s.t;
  const float best_possible =
      s.run_score[0] / static_cast<float>(std::pow(static_cast<double>(best_len), o.length_penalty));
  float min_finished = s.fin_score[0];
  for (int j = 1; j < nb; ++j) min_finished = std::min(min_finished, s.fin_score[j]);
  bool beatable = false;
  all_finished = true;
  for (int j = 0; j < nb; ++j) {
    const float worst = s.fin_done[j] ? min_finished : kMask;
    beatable = beatable || best_possible > worst;
    all_finished = all_finished && s.fin_done[j];
  }
  s.improvable = s.improvable && beatable;
  s.done = !s.improvable || (all_finished && o.early_stopping == EarlyStopping::True) ||
           s.t >= s.limit;
}

SequenceResult best_hypothesis(const BeamSeq& s, const std::vector<uint8_t>& kinds) {
  SequenceResult r;
  r.tokens.assign(s.fin.begin(), s.fin.begin() + s.fin_len[0]);
  const uint8_t kind = r.tokens.empty() ? 0 : kinds[r.tokens.back()];
  r.finish_reason = kind == 1 ? FinishReason::Eos : kind == 2 ? FinishReason::Stop : FinishReason::Length;
  r.has_score = true;
  r.score = s.fin_score[0];
  return r;
}

class BeamState final : public DecodeState {
 public:
  BeamState(const std::vector<SequenceInput>& inputs, int vocab, const GenerateOptions& o,
            SlotOps& cache)
      : DecodeState(inputs, vocab, o), cache_(cache), seqs_(batch_), results_(batch_),
        live_(batch_, 1), src_for_dst_(cache.num_slots()) {
    const int nb = o.num_beams;
    int n_end_ids = 0;
    for (uint8_t kind : kinds_) n_end_ids += kind != 0;
    k_ = std::max(2, 1 + n_end_ids) * nb;   // beams_to_keep
    w_.top.resize(k_);
    w_.hit.resize(k_);
    w_.running.resize(k_);
    w_.merged.resize(nb + k_);
    w_.merged_done.resize(nb + k_);
    w_.order.resize(nb + k_);
    for (int b = 0; b < batch_; ++b) {
      BeamSeq& s = seqs_[b];
      s.limit = max_tokens_for(inputs_[b], o, cache.capacity());
      const size_t cells = static_cast<size_t>(nb) * s.limit;
      s.rows.assign(nb, inputs_[b].first_logits);   // every beam starts from the prefill logits
      s.run.assign(cells, 0);
      s.run_next.assign(cells, 0);
      s.fin.assign(cells, 0);
      s.fin_next.assign(cells, 0);
      s.run_score.assign(nb, kMask);
      s.run_score[0] = 0.0f;                        // only beam 0 may start (HF)
      s.run_score_next.assign(nb, 0.0f);
      s.parent.assign(nb, 0);
      s.fin_len.assign(nb, 0);
      s.fin_len_next.assign(nb, 0);
      s.fin_score.assign(nb, kMask);
      s.fin_score_next.assign(nb, kMask);
      s.fin_done.assign(nb, 0);
      s.fin_done_next.assign(nb, 0);
      for (int j = 1; j < nb; ++j) cache.copy_slot(inputs_[b].slots[0], inputs_[b].slots[j]);
    }
  }

  std::vector<SequenceResult> results() const override {
    std::vector<SequenceResult> out = results_;
    for (int b = 0; b < batch_; ++b)
      if (live_[b]) out[b] = SequenceResult{};   // still searching: no result yet
    return out;
  }

 private:
  void select(const float* logits, bool first, SamplerScratch& scratch) override {
    const int nb = options_.num_beams;
    if (!first)
      for (size_t r = 0; r < seq_of_row_.size(); r += nb) {
        BeamSeq& s = seqs_[seq_of_row_[r]];
        for (int j = 0; j < nb; ++j) s.rows[j] = logits + (r + j) * static_cast<size_t>(vocab_);
      }
    if (options_.repetition_penalty != 1.0f) scratch.reserve(vocab_);
    for (size_t i = 0; i < src_for_dst_.size(); ++i) src_for_dst_[i] = static_cast<int>(i);
    bool moved = false;
    tokens_.clear();
    positions_.clear();
    slots_.clear();
    seq_of_row_.clear();
    for (int b = 0; b < batch_; ++b) {
      if (!live_[b]) continue;
      BeamSeq& s = seqs_[b];
      const SequenceInput& in = inputs_[b];
      beam_step(s, in, vocab_, options_, kinds_, k_, w_, scratch);
      if (s.done) {
        live_[b] = 0;
        results_[b] = best_hypothesis(s, kinds_);
        for (int32_t token : results_[b].tokens) accepted_.push_back({b, token});
        continue;
      }
      for (int j = 0; j < nb; ++j) {
        const int dst = in.slots[j], src = in.slots[s.parent[j]];
        src_for_dst_[dst] = src;
        moved = moved || src != dst;
        tokens_.push_back(s.run[static_cast<size_t>(j) * s.limit + s.t - 1]);
        positions_.push_back(in.prompt_length + s.t - 1);
        slots_.push_back(dst);
        seq_of_row_.push_back(b);
      }
    }
    if (moved) cache_.reorder(src_for_dst_);
  }

  SlotOps& cache_;
  int k_ = 0;
  BeamScratch w_;
  std::vector<BeamSeq> seqs_;
  std::vector<SequenceResult> results_;
  std::vector<uint8_t> live_;
  std::vector<int> src_for_dst_;
  std::vector<int> seq_of_row_;   // sequence of each row fed last
};

}  // namespace

std::unique_ptr<DecodeState> make_beam_state(const std::vector<SequenceInput>& inputs, int vocab,
                                             const GenerateOptions& options, SlotOps& cache) {
  return std::make_unique<BeamState>(inputs, vocab, options, cache);
}

}  // namespace engine
