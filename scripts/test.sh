#!/usr/bin/env bash
# The test suite: set up, lint and type-check, then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/setup.sh
.venv/bin/ruff check souverain tests bench
.venv/bin/mypy souverain
exec .venv/bin/python -m pytest -q "$@"
