// Memory read bandwidth: a multi-threaded streaming sum over a large buffer.
//
// The physical limit of a decode step is the time to stream the weights once from memory, so
// the benchmark (engine/bench) compares every system's tokens/s to bandwidth / bytes-per-token.
// This measures that bandwidth the simple way: each thread sums its own contiguous share of a
// buffer much larger than the caches (four independent 64-bit accumulators: the compiler
// vectorizes them, and integer sums never depend on the summation order), the best of several
// passes counts. The buffer is filled by the same threads before timing (first touch), so its
// pages are resident and spread as the reading threads will find them.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace engine {

namespace {

uint64_t sum_words(const uint64_t* p, size_t n) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += p[i];
    a1 += p[i + 1];
    a2 += p[i + 2];
    a3 += p[i + 3];
  }
  for (; i < n; ++i) a0 += p[i];
  return a0 + a1 + a2 + a3;
}

// Runs fn(t, begin, end) on threads t = 0 .. threads-1 over [0, n) in equal contiguous shares.
template <typename Fn>
void parallel_shares(size_t n, int threads, Fn fn) {
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  const size_t share = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const size_t begin = std::min(n, share * t), end = std::min(n, begin + share);
    pool.emplace_back([=] { fn(t, begin, end); });
  }
  for (std::thread& th : pool) th.join();
}

}  // namespace

// Best read bandwidth in GB/s (1e9 bytes per second) over `repeats` passes of `threads` threads
// summing a `bytes`-byte buffer. Throws std::invalid_argument on bad arguments and
// std::bad_alloc when the buffer cannot be allocated.
double memory_read_bandwidth(size_t bytes, int threads, int repeats) {
  if (bytes < (size_t{1} << 20))
    throw std::invalid_argument("bytes must be at least 1 MiB (1048576); use a buffer much larger "
                                "than the last-level cache, e.g. 1 GiB; got " + std::to_string(bytes));
  if (threads < 1 || threads > 1024)
    throw std::invalid_argument("threads must be in [1, 1024], got " + std::to_string(threads));
  if (repeats < 1 || repeats > 1000)
    throw std::invalid_argument("repeats must be in [1, 1000], got " + std::to_string(repeats));

  const size_t n = bytes / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buffer(new uint64_t[n]);
  uint64_t* data = buffer.get();
  parallel_shares(n, threads, [data](int, size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) data[i] = i;
  });

  std::vector<uint64_t> sums(static_cast<size_t>(threads));
  double best_seconds = 0.0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    parallel_shares(n, threads, [&sums, data](int t, size_t begin, size_t end) {
      sums[static_cast<size_t>(t)] = sum_words(data + begin, end - begin);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r == 0 || seconds < best_seconds) best_seconds = seconds;
  }
  // The sums feed a check the compiler cannot drop: sum of 0..n-1.
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  const uint64_t expected = n % 2 == 0 ? (n / 2) * (n - 1) : n * ((n - 1) / 2);
  if (total != expected) throw std::runtime_error("memory_read_bandwidth: wrong checksum (memory error?)");
  return static_cast<double>(n * sizeof(uint64_t)) / best_seconds / 1e9;
}

}  // namespace engine
