#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace engine {

namespace {
thread_local int t_thread = -1;                  // id of the pool thread running a task here
thread_local ThreadPool* t_pool = nullptr;       // the PoolScope's pool on this thread, if any

void check_size(int n, const char* what) {
  if (n < 1 || n > 1024)
    throw std::invalid_argument(std::string(what) + ": n must be in [1, 1024], got " + std::to_string(n));
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or `spin_us` microseconds passed; true when done() held. After the first few
// microseconds each round yields the core, so threads beyond the cores (two models' pools at once,
// more threads than cores) still get to run instead of waiting out a busy spinner's time slice.
template <typename Done>
bool spin_until(int spin_us, Done done) {
  if (spin_us <= 0) return done();
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
  for (int i = 0;; ++i) {
    if (done()) return true;
    if (i < 256) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
    if ((i & 15) == 15 && std::chrono::steady_clock::now() >= until) return done();
  }
}
}  // namespace

struct ThreadPool::Impl {
  Impl(int n, int spin) : n_threads(n), spin_us(spin), pid(getpid()) {
    for (int i = 1; i < n; ++i) workers.emplace_back([this, i] { worker_loop(i); });
  }
  ~Impl() {
    {
      std::lock_guard<std::mutex> lk(m);
      stop.store(true);
    }
    wake.notify_all();
    for (auto& t : workers) t.join();
  }

  void run(int n_tasks, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serial(run_mutex);   // one parallel_for at a time per pool
    if (n_threads == 1 || n_tasks == 1 || pid != getpid()) {
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
    {
      std::lock_guard<std::mutex> lk(m);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next.store(0);
      busy.store(static_cast<int>(workers.size()));
      error = nullptr;
      generation.fetch_add(1, std::memory_order_release);   // publishes the fields above to spinners
    }
    wake.notify_all();
    work(0);   // the caller is thread 0
    if (!spin_until(spin_us, [this] { return busy.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(m);
      done.wait(lk, [this] { return busy.load() == 0; });
    }
    fn_ = nullptr;
    if (error) std::rethrow_exception(error);
  }

  void work(int thread) {
    t_thread = thread;
    for (;;) {
      int task = next.fetch_add(1);
      if (task >= n_tasks_) break;
      try {
        (*fn_)(task, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lk(m);
        if (!error) error = std::current_exception();
        next.store(n_tasks_);   // stop handing out tasks
      }
    }
    t_thread = -1;
  }

  // Between calls a worker spins for spin_us before it sleeps: a decode step issues a call every
  // few tens of microseconds, and waking a sleeping thread costs about that much on a VM.
  void worker_loop(int thread) {
    long seen = 0;
    for (;;) {
      auto ready = [&] { return stop.load() || generation.load(std::memory_order_acquire) != seen; };
      if (!spin_until(spin_us, ready)) {
        std::unique_lock<std::mutex> lk(m);
        wake.wait(lk, ready);
      }
      if (stop.load()) return;
      seen = generation.load(std::memory_order_acquire);
      work(thread);
      if (busy.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(m);   // the caller may be checking busy under m before it sleeps
        done.notify_one();
      }
    }
  }

  const int n_threads;
  const int spin_us;               // how long idle workers and the waiting caller spin before sleeping
  const pid_t pid;                 // the process whose threads these are
  std::vector<std::thread> workers;
  std::mutex run_mutex;            // serializes run()
  std::mutex m;
  std::condition_variable wake, done;
  const std::function<void(int, int)>* fn_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<int> next{0};
  std::atomic<int> busy{0};
  std::atomic<long> generation{0};
  std::atomic<bool> stop{false};
  std::exception_ptr error;
};

ThreadPool::ThreadPool(int num_threads, int spin_us) {
  check_size(num_threads, "ThreadPool");
  if (spin_us < 0 || spin_us > 100000)
    throw std::invalid_argument("ThreadPool: spin_us must be in [0, 100000], got " + std::to_string(spin_us));
  impl_ = std::make_unique<Impl>(num_threads, spin_us);
}
ThreadPool::~ThreadPool() {
  // A forked child inherits the object but not its threads: leak the state on purpose rather
  // than join threads that do not exist here.
  if (impl_ && impl_->pid != getpid()) (void)impl_.release();
}
int ThreadPool::num_threads() const { return impl_->n_threads; }
int ThreadPool::spin_us() const { return impl_->spin_us; }
void ThreadPool::run(int n_tasks, const std::function<void(int, int)>& fn) {
  if (n_tasks > 0) impl_->run(n_tasks, fn);
}

PoolScope::PoolScope(ThreadPool* pool) : previous_(t_pool) { t_pool = pool; }
PoolScope::~PoolScope() { t_pool = previous_; }

namespace {

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// The default pool, for callers outside any PoolScope.
std::mutex g_default_mutex;                      // guards g_default (creation and resizing)
std::shared_ptr<ThreadPool> g_default;           // created lazily, by the process g_default_pid
pid_t g_default_pid = 0;
std::atomic<int> g_default_threads{default_threads()};

std::shared_ptr<ThreadPool> default_pool() {
  std::lock_guard<std::mutex> lk(g_default_mutex);
  // A forked child drops the parent's pool (~ThreadPool does not join threads that do not exist).
  if (g_default && g_default_pid != getpid()) g_default.reset();
  if (!g_default) {
    g_default = std::make_shared<ThreadPool>(g_default_threads.load(), 0);
    g_default_pid = getpid();
  }
  return g_default;
}

}  // namespace

void parallel_for(int n_tasks, const std::function<void(int, int)>& fn) {
  if (n_tasks <= 0) return;
  if (t_thread >= 0) {   // nested: run inline, on this thread, under its own id
    const int self = t_thread;
    for (int i = 0; i < n_tasks; ++i) fn(i, self);
    return;
  }
  if (t_pool != nullptr) {
    t_pool->run(n_tasks, fn);
    return;
  }
  std::shared_ptr<ThreadPool> pool = default_pool();   // kept alive through a concurrent resize
  pool->run(n_tasks, fn);
}

int get_num_threads() { return t_pool != nullptr ? t_pool->num_threads() : g_default_threads.load(); }

void set_num_threads(int n) {
  check_size(n, "set_num_threads");
  if (t_thread >= 0) throw std::logic_error("set_num_threads cannot be called from inside a parallel task");
  std::lock_guard<std::mutex> lk(g_default_mutex);
  g_default_threads.store(n);
  if (g_default && g_default->num_threads() == n && g_default_pid == getpid()) return;
  g_default.reset();   // created with the new size on the next parallel_for
}

}  // namespace engine
