// native_tests: attention kernels vs the scalar reference and KV cache bookkeeping, without
// Python, so it runs under ASan/UBSan (run_sanitizers.sh) and qemu-aarch64 (run_aarch64_qemu.sh).
// Usage: native_tests [substring-filter]
#include <cstdio>
#include <cstring>
#include <exception>

#include "cpu_features.h"
#include "harness.h"

namespace nt {
std::vector<TestCase>& registry() {
  static std::vector<TestCase> r;
  return r;
}
int g_failures = 0;
}  // namespace nt

int main(int argc, char** argv) {
  const auto& f = engine::cpu_features();
  std::printf("arch: %s; best SIMD level: %s; active: %s\n", f.arch.c_str(), engine::simd_name(f.best),
              engine::simd_name(engine::active_simd()));
  int failed = 0, run = 0;
  for (const auto& t : nt::registry()) {
    if (argc > 1 && std::strstr(t.name, argv[1]) == nullptr) continue;
    nt::g_failures = 0;
    ++run;
    try {
      t.fn();
    } catch (const std::exception& e) {
      std::printf("  FAILED: unexpected exception: %s\n", e.what());
      ++nt::g_failures;
    }
    std::printf("%s %s\n", nt::g_failures ? "FAIL" : "ok  ", t.name);
    if (nt::g_failures) ++failed;
  }
  std::printf("%d/%d tests passed\n", run - failed, run);
  return failed == 0 && run > 0 ? 0 : 1;
}
