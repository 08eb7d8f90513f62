// The serving core's native pieces: DecodeState stepped by hand and interleaved with other
// states (each must give exactly generate()'s results on its own), and per-owner thread pools.
// Filter with `native_tests decode_state` / `thread_pool`.
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "generate.h"
#include "harness.h"
#include "sampling.h"
#include "thread_pool.h"

using engine::GenerateOptions;
using engine::SequenceInput;
using engine::SequenceResult;

namespace {

// Cache double: the token history of every slot (what copy_slot / reorder must move).
struct Histories final : engine::SlotOps {
  Histories(int slots, int cap) : cap_(cap), hist(slots) {}
  int capacity() const override { return cap_; }
  int num_slots() const override { return static_cast<int>(hist.size()); }
  void copy_slot(int src, int dst) override { hist[dst] = hist[src]; }
  void reorder(const std::vector<int>& src_for_dst) override {
    std::vector<std::vector<int32_t>> next = hist;
    for (size_t d = 0; d < src_for_dst.size(); ++d) next[d] = hist[src_for_dst[d]];
    hist.swap(next);
  }
  int cap_;
  std::vector<std::vector<int32_t>> hist;
};

// Pseudo-random logits of a history (length and last two tokens); eos (1) gets a bonus.
void logits_of(const std::vector<int32_t>& seq, int vocab, float* out) {
  const uint64_t n = seq.size();
  const uint64_t key = n * 1000003ULL + uint64_t(seq.back()) * 7919ULL + (n > 1 ? uint64_t(seq[n - 2]) : 0);
  engine::Rng r;
  engine::rng_seed(r, key);
  for (int v = 0; v < vocab; ++v) out[v] = static_cast<float>(engine::rng_uniform(r) * 6.0 - 3.0);
  out[1] += 0.8f;
}

// Feeds tokens into their slots' histories; returns the logits of each row.
struct HistoryStep final : engine::StepModel {
  HistoryStep(Histories& h, int v) : hist(h), vocab(v) {}
  const float* step(const int32_t* tokens, const int32_t* positions, const int32_t* slots, int n) override {
    out.assign(static_cast<size_t>(n) * vocab, 0.f);
    for (int i = 0; i < n; ++i) {
      std::vector<int32_t>& h = hist.hist[slots[i]];
      if (positions[i] != static_cast<int>(h.size())) throw std::logic_error("position != slot length");
      h.push_back(tokens[i]);
      logits_of(h, vocab, out.data() + static_cast<size_t>(i) * vocab);
    }
    return out.data();
  }
  Histories& hist;
  int vocab;
  std::vector<float> out;
};

// One request: prompts, options, its own cache double, its inputs.
struct Job {
  Job(std::vector<std::vector<int32_t>> p, GenerateOptions o, int vocab, int capacity = 40)
      : prompts(std::move(p)), opts(o), cache(static_cast<int>(prompts.size()) * o.num_beams, capacity),
        first(prompts.size(), std::vector<float>(vocab)) {
    std::vector<int> prefill;
    for (size_t b = 0; b < prompts.size(); ++b) prefill.push_back(static_cast<int>(b) * o.num_beams);
    const auto slots = engine::default_beam_slots(prefill, o.num_beams, cache.num_slots());
    inputs.resize(prompts.size());
    for (size_t b = 0; b < prompts.size(); ++b) {
      cache.hist[prefill[b]] = prompts[b];
      logits_of(prompts[b], vocab, first[b].data());
      inputs[b].first_logits = first[b].data();
      inputs[b].prompt_tokens = prompts[b];
      inputs[b].prompt_length = static_cast<int>(prompts[b].size());
      inputs[b].slots = slots[b];
    }
  }
  std::vector<std::vector<int32_t>> prompts;
  GenerateOptions opts;
  Histories cache;
  std::vector<std::vector<float>> first;
  std::vector<SequenceInput> inputs;
};

std::vector<Job> make_jobs(int vocab) {
  std::vector<Job> jobs;
  GenerateOptions greedy;
  greedy.max_new_tokens = 9;
  jobs.emplace_back(std::vector<std::vector<int32_t>>{{2, 5, 6}, {2, 7}}, greedy, vocab);
  GenerateOptions sample;
  sample.max_new_tokens = 14;
  sample.do_sample = true;
  sample.top_p = 0.9f;
  sample.temperature = 1.3f;
  sample.seed = 11;
  sample.eos_token_ids = {};
  jobs.emplace_back(std::vector<std::vector<int32_t>>{{2, 9}}, sample, vocab);
  GenerateOptions beams;
  beams.max_new_tokens = 7;
  beams.num_beams = 3;
  beams.length_penalty = 0.7f;
  beams.repetition_penalty = 1.2f;
  jobs.emplace_back(std::vector<std::vector<int32_t>>{{2, 3, 4, 8}}, beams, vocab);
  GenerateOptions stop = greedy;
  stop.max_new_tokens = 20;
  stop.stop_token_ids = {5, 6, 7, 8, 9, 10, 11, 12};
  stop.eos_token_ids = {};
  jobs.emplace_back(std::vector<std::vector<int32_t>>{{2}}, stop, vocab, 12);
  return jobs;
}

bool same(const std::vector<SequenceResult>& a, const std::vector<SequenceResult>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].tokens != b[i].tokens || a[i].finish_reason != b[i].finish_reason ||
        a[i].has_score != b[i].has_score || a[i].score != b[i].score)
      return false;
  return true;
}

}  // namespace

// Every state advanced in one shared loop (rows of all live states concatenated, states joining
// at different steps) equals generate() on that request alone.
TEST(decode_state_interleaved_equals_alone) {
  const int V = 32;
  std::vector<std::vector<SequenceResult>> alone;
  for (Job& j : make_jobs(V)) {
    HistoryStep model(j.cache, V);
    alone.push_back(engine::generate(model, j.cache, j.inputs, V, j.opts, {}, nullptr));
  }
  std::vector<Job> jobs = make_jobs(V);
  std::vector<std::unique_ptr<engine::DecodeState>> states(jobs.size());
  std::vector<std::vector<int32_t>> streamed(jobs.size());
  engine::SamplerScratch scratch;
  std::vector<float> logits;
  int steps = 0;
  for (size_t joined = 0;; ++steps) {
    if (joined < jobs.size() && steps % 2 == 0) {   // a new request joins every other step
      states[joined] = engine::start_decode(jobs[joined].inputs, V, jobs[joined].opts, jobs[joined].cache);
      ++joined;
    }
    // Advance every live state from its rows of the shared logits (new states: first logits).
    size_t offset = 0;
    bool any = false;
    for (size_t i = 0; i < joined; ++i) {
      engine::DecodeState& st = *states[i];
      if (st.done()) continue;
      const bool fed = st.started();
      const int n = st.rows();
      st.advance(fed ? logits.data() + offset * V : nullptr, scratch);
      if (fed) offset += static_cast<size_t>(n);
      for (const engine::AcceptedToken& a : st.accepted())
        if (jobs[i].opts.num_beams == 1 && a.sequence == 0) streamed[i].push_back(a.token);
      any = any || !st.done();
    }
    if (!any && joined == jobs.size()) break;
    // One shared "graph call" for the next rows of every live state.
    std::vector<float> next;
    for (size_t i = 0; i < joined; ++i) {
      engine::DecodeState& st = *states[i];
      if (st.done()) continue;
      HistoryStep model(jobs[i].cache, V);
      const float* out = model.step(st.tokens().data(), st.positions().data(), st.slots().data(), st.rows());
      next.insert(next.end(), out, out + static_cast<size_t>(st.rows()) * V);
    }
    logits.swap(next);
    CHECK(steps < 200);
    if (steps >= 200) break;
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    CHECK_MSG(same(states[i]->results(), alone[i]), "job %zu differs from its lone run", i);
    if (jobs[i].opts.num_beams == 1) CHECK(streamed[i] == alone[i][0].tokens);
  }
  CHECK(alone[2][0].has_score && !alone[0][0].has_score);
  CHECK_MSG(alone[3][0].finish_reason == engine::FinishReason::Stop, "job 3 ended with %s after %zu tokens",
            engine::finish_reason_name(alone[3][0].finish_reason), alone[3][0].tokens.size());
}

TEST(decode_state_partial_results_and_misuse) {
  const int V = 32;
  std::vector<Job> jobs = make_jobs(V);
  Job& j = jobs[0];
  engine::SamplerScratch scratch;
  auto st = engine::start_decode(j.inputs, V, j.opts, j.cache);
  CHECK(!st->started() && !st->done() && st->rows() == 0);
  CHECK_THROWS(std::invalid_argument, ({ st->advance(nullptr, scratch); st->advance(nullptr, scratch); }));
  st = engine::start_decode(j.inputs, V, j.opts, j.cache);
  st->advance(nullptr, scratch);
  CHECK(st->rows() == 2 && st->accepted().size() == 2);
  const auto partial = st->results();
  CHECK(partial.size() == 2 && partial[0].tokens.size() == 1 && partial[1].tokens.size() == 1);
  // Beams: nothing before a sequence is finished.
  Job& b = jobs[2];
  auto beam = engine::start_decode(b.inputs, V, b.opts, b.cache);
  beam->advance(nullptr, scratch);
  CHECK(beam->rows() == 3 && beam->accepted().empty() && beam->results()[0].tokens.empty());
  // Validation happens in start_decode, with generate()'s messages.
  GenerateOptions bad = j.opts;
  bad.top_p = 0.f;
  CHECK_THROWS(std::invalid_argument, engine::start_decode(j.inputs, V, bad, j.cache));
}

// ---------------------------------------------------------------- thread pools

TEST(thread_pool_per_owner_and_scope) {
  engine::ThreadPool a(3), b(1);
  CHECK(a.num_threads() == 3 && b.num_threads() == 1);
  const int outside = engine::get_num_threads();
  {
    engine::PoolScope scope(&a);
    CHECK(engine::get_num_threads() == 3);
    {
      engine::PoolScope inner(&b);
      CHECK(engine::get_num_threads() == 1);
    }
    CHECK(engine::get_num_threads() == 3);
  }
  CHECK(engine::get_num_threads() == outside);
  CHECK_THROWS(std::invalid_argument, engine::ThreadPool(0));

  // Two owners' pools used at once from two threads: every task runs exactly once, on a thread
  // id of its own pool; nested parallel_for runs inline.
  std::vector<std::atomic<int>> hits_a(200), hits_b(200);
  std::atomic<int> bad_thread{0};
  auto use = [&](engine::ThreadPool* pool, std::vector<std::atomic<int>>& hits) {
    engine::PoolScope scope(pool);
    for (int round = 0; round < 20; ++round)
      engine::parallel_for(10, [&](int task, int thread) {
        if (thread < 0 || thread >= pool->num_threads()) ++bad_thread;
        engine::parallel_for(1, [&](int, int inner) { if (inner != thread) ++bad_thread; });
        ++hits[round * 10 + task];
      });
  };
  std::thread ta(use, &a, std::ref(hits_a)), tb(use, &b, std::ref(hits_b));
  ta.join();
  tb.join();
  bool once = true;
  for (int i = 0; i < 200; ++i) once = once && hits_a[i] == 1 && hits_b[i] == 1;
  CHECK(once && bad_thread == 0);
  // The first exception of a task comes back to the caller; the pool stays usable.
  {
    engine::PoolScope scope(&a);
    CHECK_THROWS(std::runtime_error, engine::parallel_for(8, [](int task, int) {
      if (task == 5) throw std::runtime_error("task failed on purpose");
    }));
    std::atomic<int> n{0};
    engine::parallel_for(8, [&](int, int) { ++n; });
    CHECK(n == 8);
  }
}

// Spinning workers (spin_us > 0) take calls without sleeping in between: back-to-back calls of
// varied sizes from two threads at once, each task once, for spin budgets from none to one that
// never runs out during the test; a pool destroyed while its workers spin stops promptly.
TEST(thread_pool_spinning) {
  CHECK_THROWS(std::invalid_argument, engine::ThreadPool(2, -1));
  CHECK_THROWS(std::invalid_argument, engine::ThreadPool(2, 100001));
  for (int spin : {0, 1, 200, 100000}) {
    engine::ThreadPool pool(3, spin);
    CHECK(pool.spin_us() == spin);
    std::vector<std::atomic<long>> sums(2);
    auto caller = [&](int who) {
      engine::PoolScope scope(&pool);
      for (int round = 0; round < 3000; ++round) {
        const int n = 1 + round % 7;
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        engine::parallel_for(n, [&](int task, int) { ++hits[static_cast<size_t>(task)]; });
        long ok = 0;
        for (auto& h : hits) ok += h == 1;
        sums[static_cast<size_t>(who)] += ok == n ? 1 : 0;
      }
    };
    std::thread t0(caller, 0), t1(caller, 1);
    t0.join();
    t1.join();
    CHECK(sums[0] == 3000 && sums[1] == 3000);
  }
  const auto t0 = std::chrono::steady_clock::now();
  {
    engine::ThreadPool pool(2, 100000);
    engine::PoolScope scope(&pool);
    engine::parallel_for(2, [](int, int) {});
  }   // the worker is spinning here (up to 100 ms): the destructor must not wait for the budget
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(90));
}
