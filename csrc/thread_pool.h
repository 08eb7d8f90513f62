// Persistent thread pools for the attention kernels (and anything else that splits independent
// tasks): the caller plus (n - 1) workers pull task indices from a shared counter.
//
// - A ThreadPool object belongs to its owner (a loaded model owns one, sized by its `threads`),
//   so two models in one process each use their own threads. A PoolScope makes a pool the one
//   that parallel_for and get_num_threads use on the calling thread, for the scope's lifetime.
// - Outside any scope they use the process's default pool (size: set_num_threads, default the
//   hardware concurrency), kept for the standalone kernels and their tests.
// - One pool runs one parallel_for at a time (its own mutex), so calls from several threads are
//   safe; a parallel_for issued from inside a task runs inline on that thread (no deadlock).
// - The first exception thrown by a task is rethrown in the caller after all tasks stopped.
// - Results never depend on the thread count as long as each task writes its own outputs.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>

namespace engine {

class ThreadPool {
 public:
  // 1 <= num_threads <= 1024 and 0 <= spin_us <= 100000, else std::invalid_argument. Idle workers
  // (and a caller waiting for them) spin spin_us microseconds before they sleep.
  explicit ThreadPool(int num_threads, int spin_us = kDefaultSpinUs);
  ~ThreadPool();                          // joins the workers
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  int num_threads() const;
  int spin_us() const;
  static constexpr int kDefaultSpinUs = 200;
  // Runs fn(task, thread) for task in [0, n_tasks); thread in [0, num_threads()). In a forked
  // child (whose pool threads do not exist) it runs every task on the calling thread.
  void run(int n_tasks, const std::function<void(int task, int thread)>& fn);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// While alive, parallel_for / get_num_threads on this thread use `pool` (nullptr: the default).
class PoolScope {
 public:
  explicit PoolScope(ThreadPool* pool);
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  ThreadPool* previous_;
};

// Runs fn(task, thread) for task in [0, n_tasks) on the current pool; thread is in
// [0, get_num_threads()) and identifies the executing thread (for per-thread scratch).
void parallel_for(int n_tasks, const std::function<void(int task, int thread)>& fn);

// Runs fn(begin, end) over [0, n) in chunks of `chunk` on the current pool, inline when there is a
// single chunk (a decode row's few microseconds of work wake no thread).
template <class Fn>
void parallel_chunks(int64_t n, int64_t chunk, Fn fn) {
  const int64_t tasks = (n + chunk - 1) / chunk;
  if (tasks <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  parallel_for(int(tasks), [&](int t, int) { fn(t * chunk, std::min(n, (t + 1) * chunk)); });
}

// Threads of the current pool (caller included).
int get_num_threads();
// Resize the default pool (n >= 1); throws std::invalid_argument for n < 1 or n > 1024 and
// std::logic_error inside a task. A forked child process starts a fresh pool on first use.
void set_num_threads(int n);

}  // namespace engine
