#!/usr/bin/env bash
# Builds (or refreshes) .venv for the tests and the demo: the pinned torch, any build of it (the
# small CPU wheel, or the CUDA one PyPI gives by default; both run everything here on a CPU), and
# the pinned test requirements. Every pip call passes -c constraints.txt, which pins torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AUTOLORA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q -c constraints.txt"
$PIP torch==2.13.0
$PIP -r requirements-test.txt
# k-diffusion without its dependencies (torchvision, wandb, clip): see demo/ksampling.py.
$PIP --no-deps k-diffusion==0.1.1.post1
"$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
