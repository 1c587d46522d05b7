#!/usr/bin/env bash
# forge.sh DEST — offline install of Stable Diffusion WebUI Forge (main) for the e2e suite (AUTOLORA_FORGE=DEST/webui).
#
# What: the tested ../shared/webui/install-forge.sh (see FORGE.md there: lllyasviel/stable-diffusion-webui-forge
#   main from the mirror $MIRROR/lllyasviel+stable-diffusion-webui-forge/repo, huggingface_guess, the assets and
#   BLIP from their mirrors, torch==2.13.0 CPU), then one pin the SD3 family needs:
#   sentencepiece==0.2.0. open-clip-torch pulls the newest sentencepiece, whose protobuf module needs protobuf
#   >= 5 (`google.protobuf.runtime_version`), while Forge pins protobuf 3.20.0: Forge then fails to load any SD3
#   checkpoint (its T5 tokenizer's conversion imports that module) with "cannot import name 'runtime_version'".
#   0.2.0 works with protobuf 3.20.
# Writes (all under DEST): webui/ (launch.py), venv/. The suite makes its random checkpoints and LoRAs itself
#   (tests/e2e/hosts.py: SD1.5/SDXL by ../shared/webui/forge_random_checkpoint.py written tensor by tensor,
#   SD3 by tests/e2e/makers/forge_sd3_checkpoint.py) into webui/models/*/autolora-e2e/.
# Env: MIRROR (default: the .mirror folder next to this repository), SHARED (default ../shared/webui next to
#   this repository).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
log() { echo "[forge.sh $(date +%H:%M:%S)] $*"; }

[ -f "$SHARED/install-forge.sh" ] || { echo "missing $SHARED/install-forge.sh (set SHARED)" >&2; exit 1; }
log "install: $SHARED/install-forge.sh -> $DEST"
FORGE_HOME=$DEST bash "$SHARED/install-forge.sh"

log "pin sentencepiece==0.2.0 (Forge's protobuf 3.20.0; SD3's T5 tokenizer)"
printf 'torch==2.13.0\n' > "$DEST/constraints_torch.txt"
"$DEST/venv/bin/python" -m pip install -q -c "$DEST/constraints_torch.txt" "sentencepiece==0.2.0"
"$DEST/venv/bin/python" -c "from sentencepiece import sentencepiece_model_pb2"
log "done: AUTOLORA_FORGE=$DEST/webui"
