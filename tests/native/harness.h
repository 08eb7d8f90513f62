// A tiny assertion harness for the standalone native tests (no external test framework).
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace nt {

struct TestCase {
  const char* name;
  std::function<void()> fn;
};
std::vector<TestCase>& registry();
extern int g_failures;   // failed checks in the current test

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

}  // namespace nt

#define NT_CAT2(a, b) a##b
#define NT_CAT(a, b) NT_CAT2(a, b)
#define TEST(name)                                                      \
  static void name();                                                   \
  static nt::Register NT_CAT(reg_, name)(#name, name);                  \
  static void name()

#define CHECK(cond)                                                                      \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::printf("  FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);                    \
      ++nt::g_failures;                                                                  \
    }                                                                                    \
  } while (0)

#define CHECK_MSG(cond, ...)                                                             \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::printf("  FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);                    \
      std::printf(__VA_ARGS__);                                                          \
      std::printf("\n");                                                                 \
      ++nt::g_failures;                                                                  \
    }                                                                                    \
  } while (0)

// Passes if `expr` throws an exception of type `type` (anything else fails).
#define CHECK_THROWS(type, expr)                                                         \
  do {                                                                                   \
    bool nt_ok = false;                                                                  \
    try {                                                                                \
      expr;                                                                              \
    } catch (const type&) {                                                              \
      nt_ok = true;                                                                      \
    } catch (...) {                                                                      \
    }                                                                                    \
    if (!nt_ok) {                                                                        \
      std::printf("  FAILED %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #type); \
      ++nt::g_failures;                                                                  \
    }                                                                                    \
  } while (0)
