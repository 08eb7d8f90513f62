#!/usr/bin/env bash
# Cross-compiles engine_core + native_tests for aarch64 (no Python) and runs them under
# qemu-aarch64, checking that the NEON kernels are the active level and pass the NEON-vs-scalar
# comparisons. Installs its own Debian packages when missing (needs root or sudo):
#   g++-aarch64-linux-gnu, and qemu-user (or qemu-user-static).
# Usage: tests/native/run_aarch64_qemu.sh [build-dir]   (default: a fresh temp dir, removed after)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -ge 1 ]]; then
  BUILD="$1"; CLEANUP=0
else
  BUILD="$(mktemp -d /tmp/engine-aarch64.XXXXXX)"; CLEANUP=1
fi
trap '[[ $CLEANUP == 1 ]] && rm -rf "$BUILD"' EXIT

find_qemu() { command -v qemu-aarch64 || command -v qemu-aarch64-static || true; }

# --- toolchain and emulator ---
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || [[ -z "$(find_qemu)" ]]; then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu >/dev/null
  if [[ -z "$(find_qemu)" ]]; then
    $SUDO apt-get install -y -qq --no-install-recommends qemu-user >/dev/null 2>&1 ||
      $SUDO apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
  fi
fi
QEMU="$(find_qemu)"
[[ -n "$QEMU" ]] || { echo "error: qemu-aarch64 not found after installing qemu-user" >&2; exit 1; }

# --- cross build ---
TOOLCHAIN="$BUILD/aarch64-toolchain.cmake"
mkdir -p "$BUILD"
cat > "$TOOLCHAIN" <<'TC'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
TC
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
  -DENGINE_PYTHON=OFF -DENGINE_NATIVE_TESTS=ON >/dev/null
cmake --build "$BUILD" --parallel "$(nproc 2>/dev/null || echo 2)"
file "$BUILD/native_tests" 2>/dev/null | grep -q "aarch64" || {
  command -v file >/dev/null 2>&1 && { echo "error: native_tests is not an aarch64 binary" >&2; exit 1; }; }

# --- run under emulation ---
LOG="$BUILD/native_tests.log"
set +e
"$QEMU" -L /usr/aarch64-linux-gnu "$BUILD/native_tests" 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
[[ $STATUS -eq 0 ]] || { echo "error: native_tests failed under qemu-aarch64 (exit $STATUS)" >&2; exit 1; }
grep -q "^arch: aarch64; best SIMD level: neon; active: neon" "$LOG" ||
  { echo "error: the NEON path is not the active SIMD level under qemu-aarch64" >&2; exit 1; }
grep -q "comparing 1 fast level(s) with scalar" "$LOG" ||
  { echo "error: the NEON-vs-scalar comparison did not run" >&2; exit 1; }
echo "aarch64 (qemu): native_tests passed with NEON active"
