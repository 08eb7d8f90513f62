#!/usr/bin/env bash
# The Python extension (engine._native) under sanitizers, driven by the Python tests:
#   1. builds engine._native with AddressSanitizer + UBSan (gcc, -O1 -g, asserts on) into a
#      temporary copy of the Python sources (the checkout's own extension is never touched);
#   2. runs the native-facing Python tests against it (attention and the KV cache, the native
#      decode loop, the serving core's native steps, the scheduler on a tiny synthetic model),
#      CPython started with LD_PRELOAD=libasan and PYTHONMALLOC=malloc, leaks off (CPython and
#      the runtimes keep memory to the end on purpose);
#   3. LeakSanitizer over load -> generate -> close repeated (tests/native/leak_loop.py): every
#      leak whose allocation stack passes through our extension fails the run; leaks of
#      CPython, numpy, onnxruntime and OpenVINO alone are not ours and are only counted.
# Exits non-zero on a build error, a test failure, any ASan/UBSan report, or a leak of ours.
# Usage: tests/native/run_python_sanitizers.sh [work-dir]   (default: a fresh temp dir, removed
# after). Needs the runtime dependencies installed (pip install -e ".[test]"), gcc's libasan.
# Environment: SAN_PYTEST_K (default "not openvino": the serving tests on one backend, the
# scheduler's native calls are the same on both; the leak run covers both backends),
# SAN_PYTEST_ARGS extra pytest arguments, SAN_LEAK_ROUNDS (default 3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -ge 1 ]]; then
  WORK="$1"; CLEANUP=0; mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/engine-pysanitize.XXXXXX)"; CLEANUP=1
fi
trap '[[ $CLEANUP == 1 ]] && rm -rf "$WORK"' EXIT
PY="${PYTHON:-python}"
t0=$SECONDS

# ---- 1. the sanitized extension in a copy of the sources
SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
tar -C "$ROOT" --exclude='__pycache__' --exclude='*.so' -cf - engine export tests pyproject.toml \
  | tar -C "$SRC" -xf -
LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBSTDCXX="$(g++ -print-file-name=libstdc++.so)"
if [[ ! -e "$LIBASAN" ]]; then
  echo "run_python_sanitizers: gcc's libasan.so is missing (apt-get install libasan8 / gcc)" >&2
  exit 1
fi
# libasan must come first in the process; libstdc++ is preloaded too, or ASan's __cxa_throw
# interceptor finds no real __cxa_throw (python does not link libstdc++) and the first C++
# exception aborts.
PRELOAD="$LIBASAN $LIBSTDCXX"
PYEXE="$("$PY" -c 'import sys; print(sys.executable)')"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g -O1" \
  -DENGINE_SANITIZE=ON -DENGINE_PYTHON=ON -DENGINE_NATIVE_TESTS=OFF \
  -DCMAKE_CXX_COMPILER=g++ \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$SRC/engine" \
  -DPython_EXECUTABLE="$PYEXE" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$WORK/build" --parallel "$(nproc 2>/dev/null || echo 2)"
echo "run_python_sanitizers: built in $((SECONDS - t0)) s"

# ---- the sanitizer environment
cd "$SRC"
export PYTHONPATH="$SRC" PYTHONMALLOC=malloc PYTHONDONTWRITEBYTECODE=1
export PALIGEMMA_EDGE_CACHE="$WORK/cache"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# oneTBB (OpenVINO) dlopens its helpers with RTLD_DEEPBIND, which ASan refuses; this turns it off.
export TBB_ENABLE_SANITIZERS=1
ASAN_BASE="abort_on_error=1:strict_string_checks=1:detect_odr_violation=0:allocator_may_return_null=1"
# The extension that Python imports must be the sanitized copy, not the checkout's.
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="detect_leaks=0:$ASAN_BASE" "$PYEXE" -c '
import engine._native as n, sys
assert n.__file__.startswith(sys.argv[1]), n.__file__
' "$SRC"

# ---- 2. the native-facing Python tests under ASan + UBSan
# Reports go to files: pytest captures fd 2, and an aborted process would take them along.
t1=$SECONDS
rm -rf "$WORK/asan" && mkdir -p "$WORK/asan"
status=0
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS="detect_leaks=0:$ASAN_BASE:log_path=$WORK/asan/report" \
  UBSAN_OPTIONS="$UBSAN_OPTIONS:log_path=$WORK/asan/report" \
  "$PYEXE" -m pytest -q -p no:cacheprovider -x \
    tests/test_native_attention.py tests/test_native_generate.py tests/test_serving_native.py \
    tests/test_native_vision.py::test_small_tower_against_numpy tests/test_native_vision.py::test_tower_bad_input_errors \
    tests/test_native_int4.py::test_pack_layout tests/test_native_int4.py::test_int4_linear_equals_numpy_bit_for_bit \
    tests/test_native_int4.py::test_int4_and_int8_matrices_in_one_call tests/test_native_int4.py::test_int4_bad_input_errors \
    tests/test_native_decoder.py::test_full_range_codes_equal_numpy_bit_for_bit \
    tests/test_serving.py -k "${SAN_PYTEST_K:-not openvino}" ${SAN_PYTEST_ARGS:-} || status=$?
if [[ $status != 0 ]] || grep -qs -e "ERROR: AddressSanitizer" -e "runtime error:" "$WORK"/asan/report.*; then
  cat "$WORK"/asan/report.* 2>/dev/null || true
  echo "run_python_sanitizers: the native-facing tests failed under ASan/UBSan (status $status, reports above)" >&2
  exit 1
fi
echo "run_python_sanitizers: ASan/UBSan tests in $((SECONDS - t1)) s"

# ---- 3. LeakSanitizer over load / generate / close, repeated
t2=$SECONDS
rm -rf "$WORK/lsan" && mkdir -p "$WORK/lsan"
LD_PRELOAD="$PRELOAD" \
  ASAN_OPTIONS="detect_leaks=1:$ASAN_BASE" \
  LSAN_OPTIONS="exitcode=0:log_path=$WORK/lsan/report:suppressions=$ROOT/tests/native/lsan.supp:print_suppressions=0" \
  "$PYEXE" "$ROOT/tests/native/leak_loop.py" --rounds "${SAN_LEAK_ROUNDS:-3}" --work "$WORK/leak"
"$PYEXE" "$ROOT/tests/native/lsan_report.py" "$WORK"/lsan/report.*
echo "run_python_sanitizers: leak check in $((SECONDS - t2)) s; clean, $((SECONDS - t0)) s in all"
