#!/usr/bin/env bash
# Builds engine_core + native_tests in Debug with AddressSanitizer + UBSan (no Python) and runs
# them. Exits non-zero on any build error, test failure or sanitizer report.
# Usage: tests/native/run_sanitizers.sh [build-dir]   (default: a fresh temp dir, removed after)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -ge 1 ]]; then
  BUILD="$1"; CLEANUP=0
else
  BUILD="$(mktemp -d /tmp/engine-sanitize.XXXXXX)"; CLEANUP=1
fi
trap '[[ $CLEANUP == 1 ]] && rm -rf "$BUILD"' EXIT

GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Debug -DENGINE_SANITIZE=ON \
  -DENGINE_PYTHON=OFF -DENGINE_NATIVE_TESTS=ON >/dev/null
cmake --build "$BUILD" --parallel "$(nproc 2>/dev/null || echo 2)"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# Every SIMD level this CPU has is exercised by the tests themselves (set_simd_level); also run
# once with the environment forcing the scalar path as the default.
"$BUILD/native_tests"
ENGINE_SIMD=scalar "$BUILD/native_tests"
echo "sanitizers: clean"
