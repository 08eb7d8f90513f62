// A small persistent thread pool for the attention kernels (and anything else that splits
// independent tasks): the caller plus (n - 1) workers pull task indices from a shared counter.
//
// - parallel_for is serialized by a mutex, so calls from several Python threads (GIL released)
//   are safe; a parallel_for issued from inside a task runs inline on that thread (no deadlock).
// - The first exception thrown by a task is rethrown in the caller after all tasks stopped.
// - Results never depend on the thread count as long as each task writes its own outputs.
#pragma once
#include <functional>

namespace engine {

// Runs fn(task, thread) for task in [0, n_tasks) on the global pool; thread is in
// [0, num_threads()) and identifies the executing thread (for per-thread scratch).
void parallel_for(int n_tasks, const std::function<void(int task, int thread)>& fn);

// Threads used by parallel_for (caller included). Default: hardware concurrency.
int get_num_threads();
// Resize the pool (n >= 1); throws std::invalid_argument for n < 1 or n > 1024 and
// std::logic_error inside a task. A forked child process starts a fresh pool on first use.
void set_num_threads(int n);

}  // namespace engine
