#!/usr/bin/env bash
# The whole pipeline in one command, CPU only: set up .venv, prepare the built-in corpus, train a
# small model, evaluate it with the correction table and with the legal methods (score-first TTT,
# causal hints), compare with zstd, xz and n-gram models.
# About 12 minutes on 2 cores, plus the first .venv setup (under a minute from local wheels).
# Options go to scripts/demo.py: --quick (a 90 s training run), --train-seconds N.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_STARTED_AT=$(date +%s.%N)
export DEMO_STARTED_AT
echo "demo_stage stage:0/6 # python environment (scripts/setup_env.sh)"
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
