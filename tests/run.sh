#!/usr/bin/env bash
# The README's test command: the hermetic suite (the e2e suite under tests/e2e skips itself
# unless AUTOLORA_A1111 / AUTOLORA_FORGE point at a WebUI install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
exec "$PY" -m pytest -q tests "$@"
