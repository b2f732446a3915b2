#!/usr/bin/env bash
# Creates .venv with requirements.txt, once; later calls reuse it while requirements.txt is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setup: creating .venv and installing requirements.txt (a minute or two)"
"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
echo "$want" > "$stamp"
.venv/bin/python -c "import torch, numpy, zstandard, sentencepiece; print('setup: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
