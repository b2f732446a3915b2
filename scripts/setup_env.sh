#!/usr/bin/env bash
# Creates .venv once; later calls reuse it while requirements.txt and this script are unchanged.
# A torch already installed for $PYTHON (default python3) and recent enough is used as it is, never
# replaced: on the challenge's image that is torch 2.9.1 with CUDA, and a rented node's torch matches
# its driver. Only where there is none is TORCH_CPU_FALLBACK installed (its CPU build where the index serves it).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
TORCH_CPU_FALLBACK=2.13.0  # on a CPU-only machine this release installs its CPU build
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
# a python inside the .venv about to be rebuilt would vanish with it: use the interpreter it was made from
python=$("$python" -c 'import os, sys; inside = os.path.realpath(sys.prefix) == os.path.realpath(".venv"); print(getattr(sys, "_base_executable", sys.executable) if inside else sys.executable)')
oldest=$(sed -n 's/^torch>=\([0-9.]*\).*/\1/p' requirements.txt)
# "version site-packages cuda" of the torch $python already has, if it is at least the oldest supported
node_torch=$("$python" - "$oldest" <<'PY' 2>/dev/null || true
import os, re, sys
import torch
have = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__).groups())
need = tuple(int(x) for x in sys.argv[1].split("."))
if have >= need:
    print(torch.__version__, os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))), torch.version.cuda or "none")
PY
)
echo "setup: creating .venv (a minute or two)"
"$python" -m venv --clear .venv  # --clear: a torch left by an earlier setup would hide the one found above
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -n "$node_torch" ]; then
  read -r version where cuda <<< "$node_torch"
  echo "setup: using the installed torch $version (cuda $cuda) from $where; not replaced"
  echo "$where" > "$site/_installed_torch.pth"  # the venv sees that torch (and what sits beside it)
else
  echo "setup: no torch >= $oldest for $python; installing torch $TORCH_CPU_FALLBACK (pip's index decides the build:"\
    "the CPU one where a CPU-only index serves it, PyPI's default Linux wheel is the CUDA one)"
  .venv/bin/python -m pip install --quiet "torch==$TORCH_CPU_FALLBACK"
fi
grep -v '^torch' requirements.txt > .venv/requirements-without-torch.txt  # torch is settled above: never replaced
.venv/bin/python -m pip install --quiet -r .venv/requirements-without-torch.txt
echo "$want" > "$stamp"
.venv/bin/python -c "import torch, numpy, zstandard, sentencepiece; print('setup: torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
