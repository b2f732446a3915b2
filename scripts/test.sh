#!/usr/bin/env bash
# Sets up .venv if needed and runs the whole test suite (8 to 15 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q tests "$@"
