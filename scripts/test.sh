#!/usr/bin/env bash
# Sets up .venv if needed and runs the whole test suite (about 20 to 25 minutes on 2 CPU cores): what CI runs.
# --quick first: the fast tests only (pytest -m "not slow"; the slow ones are named in tests/conftest.py),
# for iterating on one file. Any other options go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [[ "${1:-}" == "--quick" ]]; then
    shift
    exec .venv/bin/python -m pytest -q -m "not slow" tests "$@"
fi
exec .venv/bin/python -m pytest -q tests "$@"
