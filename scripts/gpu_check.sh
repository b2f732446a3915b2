#!/usr/bin/env bash
# The one-command GPU check: the real default model on every visible GPU for a fixed number of
# steps, with step time, MFU, memory, compiled graphs, artifact bytes and evaluation speed
# printed and written to gpu_check_out/gpu_check.json. --cpu-tiny runs the same pipeline on the
# CPU with a tiny model (the test suite does, so the script cannot rot). Options: see
# scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=${PYTHON:-python3}; fi
exec "$python" scripts/gpu_check.py "$@"
