#!/usr/bin/env bash
# The demo without a WebUI: AutoLoRA on the shipped tiny model and its two LoRAs. Builds .venv on
# the first run (a few minutes), then samples (about a minute on two CPU cores), prints a table per
# LoRA and writes them with the image grid under demo/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/venv.sh
mkdir -p demo/out
.venv/bin/python -m demo --grid demo/out/grid.png "$@" | tee demo/out/tables.txt
echo "wrote demo/out/grid.png and demo/out/tables.txt"
