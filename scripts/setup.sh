#!/usr/bin/env bash
# Creates .venv and installs Souverain with its test tools. Idempotent: re-runs only when
# pyproject.toml changed. torch is pinned to the CPU build 2.13.0 in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3.11
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.souverain-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
fi
# Mistral's SDK dropped its fine-tuning client after 1.x: the fine-tuning test drives 1.12.4, kept apart
# from the venv's current SDK and put on PYTHONPATH only for that test's client process.
if [ ! -d .venv/mistralai1/mistralai ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --target .venv/mistralai1 mistralai==1.12.4
fi
# Our C++ kernels (souverain/kernels/cpu.cpp), built once per machine into the user cache (about half a
# minute). Without a C++ compiler this says so, and the PyTorch ops serve instead (slower).
.venv/bin/python -m souverain.kernels
