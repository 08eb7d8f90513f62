#include "thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace engine {
namespace {

thread_local int t_thread = -1;   // id of the pool thread running a task here, -1 outside tasks

class ThreadPool {
 public:
  explicit ThreadPool(int n) : n_threads_(n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_threads_; }

  void run(int n_tasks, const std::function<void(int, int)>& fn) {
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0);
      busy_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);   // the caller is thread 0
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int thread) {
    t_thread = thread;
    for (;;) {
      int task = next_.fetch_add(1);
      if (task >= n_tasks_) break;
      try {
        (*fn_)(task, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_tasks_);   // stop handing out tasks
      }
    }
    t_thread = -1;
  }

  void worker_loop(int thread) {
    long seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work(thread);
      {
        std::lock_guard<std::mutex> lk(m_);
        if (--busy_ == 0) done_.notify_one();
      }
    }
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)>* fn_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<int> next_{0};
  int busy_ = 0;
  long generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

std::mutex g_pool_mutex;                         // serializes parallel_for and resizing
std::unique_ptr<ThreadPool> g_pool;              // created lazily, by the process g_pool_pid
pid_t g_pool_pid = 0;
std::atomic<int> g_num_threads{default_threads()};

ThreadPool& pool_locked() {
  if (g_pool && g_pool_pid != getpid()) {
    // A forked child inherits the pool object but not its threads: abandon it (its memory is
    // leaked on purpose; destroying it would join threads that do not exist here).
    (void)g_pool.release();
  }
  if (!g_pool) {
    g_pool = std::make_unique<ThreadPool>(g_num_threads.load());
    g_pool_pid = getpid();
  }
  return *g_pool;
}

}  // namespace

void parallel_for(int n_tasks, const std::function<void(int, int)>& fn) {
  if (n_tasks <= 0) return;
  if (t_thread >= 0) {   // nested: run inline, on this thread, under its own id
    const int self = t_thread;
    for (int i = 0; i < n_tasks; ++i) fn(i, self);
    return;
  }
  std::lock_guard<std::mutex> lk(g_pool_mutex);
  ThreadPool& pool = pool_locked();
  if (pool.size() == 1 || n_tasks == 1) {
    t_thread = 0;
    try {
      for (int i = 0; i < n_tasks; ++i) fn(i, 0);
    } catch (...) {
      t_thread = -1;
      throw;
    }
    t_thread = -1;
    return;
  }
  pool.run(n_tasks, fn);
}

int get_num_threads() { return g_num_threads.load(); }

void set_num_threads(int n) {
  if (n < 1 || n > 1024)
    throw std::invalid_argument("set_num_threads: n must be in [1, 1024], got " + std::to_string(n));
  if (t_thread >= 0) throw std::logic_error("set_num_threads cannot be called from inside a parallel task");
  std::lock_guard<std::mutex> lk(g_pool_mutex);
  g_num_threads.store(n);
  if (g_pool && g_pool->size() == n && g_pool_pid == getpid()) return;
  if (g_pool && g_pool_pid != getpid()) (void)g_pool.release();
  g_pool.reset();   // created with the new size on the next parallel_for
}

}  // namespace engine
