#!/usr/bin/env bash
# The declared dependency floors hold (issue 16 item 4): in a separate venv with exactly the floor
# versions of onnxruntime, openvino, onnx and numpy (FLOOR_PINS, keep them equal to the ">="
# bounds in pyproject.toml), export, load and compare greedy tokens with the numpy reference
# (tests/compat/floor_smoke.py), and load the artifacts the current versions exported, so an
# exporter that stamps an ONNX IR version the oldest onnxruntime cannot read fails here.
#
# Needs the engine built in place (engine/_native*.so, made by `pip install -e .`), run after the
# README's test command. The whole torch-free part of the suite (277 tests) also passed with
# these floors when they were chosen; CI runs the graph and compatibility tests. The venv is kept (keyed by the pins and the Python version) under
# $FLOOR_VENV_ROOT (default ~/.cache/paligemma-edge-ci), and pip's download cache is used, so a
# second run installs nothing. Measured on the 2-core dev machine: about 1.5 min cold
# (downloads ~150 MB), well under a minute warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

FLOOR_PINS="onnxruntime==1.23.0 openvino==2025.0.0 onnx==1.15.0 numpy==1.23.5 ml_dtypes==0.3.1"
OTHER_DEPS="sentencepiece pillow tqdm pytest"
PYTHON=${PYTHON:-python}

start=$(date +%s)
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(printf '%s %s %s' "$pyver" "$FLOOR_PINS" "$OTHER_DEPS" | sha256sum | cut -c1-12)
venv="${FLOOR_VENV_ROOT:-$HOME/.cache/paligemma-edge-ci}/floor-venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "floor versions: creating $venv ($FLOOR_PINS, python $pyver)"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $FLOOR_PINS $OTHER_DEPS
  touch "$venv/.complete"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "floor versions: exporting and checking with the current versions"
"$PYTHON" tests/compat/floor_smoke.py "$work/current"
echo "floor versions: exporting and checking with the floors, and loading the current versions' artifacts"
PYTHONPATH= "$venv/bin/python" tests/compat/floor_smoke.py "$work/floor" --load-also "$work/current"
# Every graph against its numpy twin (all weight formats, MatMulNBits at accuracy_level 0 and 4:
# 1.22 fails the exact level 0 with 8 bits) and the too-new-IR error, with the floors.
echo "floor versions: graph and compatibility tests with the floors"
PYTHONPATH= "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_runtime_compat.py \
  tests/test_export_onnx.py -k "not wide"
echo "floor versions: passed in $(( $(date +%s) - start )) s"
