#!/usr/bin/env bash
# The whole Python package on aarch64 under qemu-user: an arm64 Debian 12 userland (python3.11
# from Debian's arm64 packages, unpacked; no chroot, no binfmt), the package built from source
# with the aarch64 cross toolchain into a wheel, the aarch64 wheels of its dependencies from PyPI
# at the host's versions. Then, under qemu-aarch64:
#   1. `python -m engine demo` on the default model, and platform.machine();
#   2. pytest: the native kernels, NEON vs scalar vs numpy (tests/test_native_attention.py,
#      tests/test_serving_native.py; CI: a bounded subset);
#   3. tests/arm/arm_checks.py: a tiny synthetic model exported, loaded and decoded greedily in
#      both backends against the numpy reference; the default model's greedy tokens on 6 fixed
#      prompts in both backends (NEON, and scalar attention) against the tokens this script makes
#      on the host first (x86); int8 / int4 weights in each runtime (OpenVINO compiled precisions,
#      resident memory per format).
# The last line summarises: architecture, SIMD level, backends, tokens equal or not.
#
# qemu: Debian 12's qemu-user 7.2 crashes (SIGSEGV) while loading onnxruntime's extension, so
# the script takes the static qemu-aarch64 10.0 from bookworm-backports (unpacked, not installed).
# Needs: root or sudo only if g++-aarch64-linux-gnu is missing; apt-get, dpkg-deb, pip, and the
# package installed on the host (pip install -e .) for the x86 tokens.
# Usage: tests/arm/run_python_qemu.sh [--full]   (default: the CI subset; --full: every check)
# Downloads and builds are cached under $ENGINE_ARM_CACHE (default .cache/arm-qemu in the repo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODE=ci
[[ "${1:-}" == "--full" ]] && MODE=full
CACHE="${ENGINE_ARM_CACHE:-$ROOT/.cache/arm-qemu}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
RUN="$CACHE/run"                          # this run's outputs (recreated every time)
rm -rf "$RUN"; mkdir -p "$RUN"
START=$SECONDS
log() { printf '=== arm [%4ds] %s\n' $((SECONDS - START)) "$*"; }
HOST_PY="${PYTHON:-python3}"

# ------------------------------------------------------------------------- host tools
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu >/dev/null
fi
"$HOST_PY" -c "import engine" 2>/dev/null || {
  echo "error: the package is not importable on the host ($HOST_PY): install it first" \
       "(pip install -e .); its x86 tokens are the reference" >&2; exit 1; }

# A private apt (own lists, cache and empty dpkg status) per architecture: it only downloads;
# nothing is installed on the host and the host's apt configuration is untouched.
apt_private() {   # apt_private DIR ARCH SOURCE-LINES... ; prints the apt-get options
  local dir=$1 arch=$2; shift 2
  mkdir -p "$dir/lists/partial" "$dir/archives/partial"
  [[ -f "$dir/status" ]] || : > "$dir/status"
  printf '%s\n' "$@" > "$dir/sources.list"
  echo "-o Dir::State=$dir -o Dir::State::Lists=$dir/lists -o Dir::State::status=$dir/status" \
       "-o Dir::Cache=$dir -o Dir::Cache::archives=$dir/archives -o Dir::Etc::SourceList=$dir/sources.list" \
       "-o Dir::Etc::SourceParts=/dev/null -o Dir::Etc::Preferences=/dev/null" \
       "-o Dir::Etc::PreferencesParts=/dev/null -o APT::Architecture=$arch -o APT::Architectures::=$arch" \
       "-o APT::Sandbox::User=root -o Debug::NoLocking=1 -qq"
}
KEY="signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

# ------------------------------------------------------------------------- qemu-aarch64 10.0
QEMU="$CACHE/qemu/qemu-aarch64"
if [[ ! -x "$QEMU" ]]; then
  log "qemu-user from bookworm-backports"
  opts=$(apt_private "$CACHE/apt-amd64" amd64 "deb [arch=amd64 $KEY] $MIRROR bookworm-backports main")
  apt-get $opts update
  rm -rf "$CACHE/qemu"; mkdir -p "$CACHE/qemu/x"
  (cd "$CACHE/qemu" && apt-get $opts download qemu-user/bookworm-backports)
  dpkg-deb -x "$CACHE"/qemu/qemu-user_*.deb "$CACHE/qemu/x"
  mv "$CACHE/qemu/x/usr/bin/qemu-aarch64" "$QEMU"
  rm -rf "$CACHE/qemu/x" "$CACHE"/qemu/*.deb
fi
"$QEMU" --version | head -1

# ------------------------------------------------------------------------- arm64 userland
SYSROOT="$CACHE/rootfs"
if [[ ! -x "$SYSROOT/usr/bin/python3.11" ]]; then
  log "arm64 Debian 12 userland: python3.11 and its libraries (unpacked)"
  opts=$(apt_private "$CACHE/apt-arm64" arm64 \
    "deb [arch=arm64 $KEY] $MIRROR bookworm main" \
    "deb [arch=arm64 $KEY] $MIRROR bookworm-updates main" \
    "deb [arch=arm64 $KEY] $SECURITY bookworm-security main")
  apt-get $opts update
  apt-get $opts install -y --download-only --no-install-recommends \
    python3.11 libpython3.11-dev libstdc++6 libgomp1 >/dev/null
  rm -rf "$SYSROOT.tmp"; mkdir -p "$SYSROOT.tmp"
  for deb in "$CACHE"/apt-arm64/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT.tmp"; done
  rm -rf "$SYSROOT"; mv "$SYSROOT.tmp" "$SYSROOT"
fi
PYVER=$("$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" -c \
  "import sys, platform; print(platform.machine(), '%d.%d.%d' % sys.version_info[:3])")
log "guest python: $PYVER"

# ------------------------------------------------------------------------- aarch64 wheels
# The host's versions of the runtime dependencies (same versions on both sides of the token
# comparison); pytest for the guest test subset.
SITE="$CACHE/site"
REQS=$("$HOST_PY" - <<'PY'
from importlib.metadata import version, PackageNotFoundError
for name in ("numpy", "onnxruntime", "openvino", "onnx", "sentencepiece", "pillow", "ml_dtypes",
             "tqdm", "protobuf", "pytest"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
REQS=$(echo $REQS)
if [[ "$(cat "$SITE/.reqs" 2>/dev/null)" != "$REQS" ]]; then
  log "aarch64 wheels: $REQS"
  PLATFORMS=(--platform manylinux2014_aarch64)
  for v in 17 24 26 27 28 29 30 31 32 33 34 35 36; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
  rm -rf "$SITE"
  "$HOST_PY" -m pip install -q --no-compile --target "$SITE" --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 "${PLATFORMS[@]}" $REQS 2>&1 | grep -v "^WARNING" || true
  [[ -d "$SITE/numpy" && -d "$SITE/onnxruntime" && -d "$SITE/openvino" ]] ||
    { echo "error: the aarch64 wheels did not install into $SITE" >&2; exit 1; }
  echo "$REQS" > "$SITE/.reqs"
fi

# ------------------------------------------------------------------------- the package, cross-built
# pip builds the wheel on the host from a clean copy of the tracked sources; setup.py's CMake step
# takes the aarch64 toolchain (CMAKE_TOOLCHAIN_FILE) and Debian's arm64 Python headers.
log "building the package for aarch64 (cross)"
SRC="$CACHE/src"
rm -rf "$SRC"; mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) |
  tar -xf - -C "$SRC"
TOOLCHAIN="$CACHE/aarch64-python.cmake"
EXT_SUFFIX=".cpython-311-aarch64-linux-gnu.so"
cat > "$TOOLCHAIN" <<TC
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Debian's pyconfig.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>
set(CMAKE_CXX_FLAGS_INIT "-idirafter $SYSROOT/usr/include")
set(Python_INCLUDE_DIR "$SYSROOT/usr/include/python3.11" CACHE PATH "")
set(PYTHON_MODULE_EXTENSION "$EXT_SUFFIX" CACHE INTERNAL "")
set(PYTHON_MODULE_DEBUG_POSTFIX "" CACHE INTERNAL "")
set(PYTHON_IS_DEBUG 0 CACHE INTERNAL "")
TC
PKG="$CACHE/pkg"
rm -rf "$PKG" "$CACHE/dist"
CMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" SETUPTOOLS_EXT_SUFFIX="$EXT_SUFFIX" _PYTHON_HOST_PLATFORM=linux-aarch64 \
  "$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE/dist" "$SRC" > "$RUN/build.log" 2>&1 ||
  { tail -40 "$RUN/build.log" >&2; echo "error: the aarch64 build failed (log: $RUN/build.log)" >&2; exit 1; }
WHEEL=$(ls "$CACHE"/dist/paligemma_edge-*.whl)
"$HOST_PY" -m pip install -q --no-deps --no-compile --target "$PKG" --platform linux_aarch64 \
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "$WHEEL"
file "$PKG/engine/_native$EXT_SUFFIX" | grep -q "ARM aarch64" ||
  { echo "error: $PKG/engine/_native$EXT_SUFFIX is not an aarch64 library" >&2; exit 1; }
log "installed $(basename "$WHEEL") into $PKG"
