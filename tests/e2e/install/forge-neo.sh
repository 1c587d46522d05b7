#!/usr/bin/env bash
# forge-neo.sh DEST — offline install of "Forge Neo" for the e2e suite (AUTOLORA_FORGE_NEO=DEST/webui).
#
# What: Haoming02's sd-webui-forge-classic branch `neo` is not fetchable here, so the tree is the Linux copy
#   papaioannou-themistoklis/WebUI-Neo-Forge @ 7862a9646a01 (2025-10-05, forge_version "neo"), cloned from the
#   bare mirror $MIRROR/papaioannou-themistoklis+WebUI-Neo-Forge/repo (+ openai CLIP @ d50d76da from
#   $MIRROR/openai+CLIP/repo). The install itself is the tested ../shared/webui/install-forge-neo.sh
#   (see FORGE-NEO.md there: torch==2.13.0 CPU + patched torchvision 0.28.0, relaxed requirements, config.json).
# Writes (all under DEST):
#   webui/                      the tree (launch.py), webui/config.json (offline-safe preview settings)
#   venv/                       Python 3.11 venv, torch 2.13.0+cpu held by DEST/constraints_torch.txt
#   webui/models/Stable-diffusion/rand_sd15.safetensors, rand_sdxl.safetensors   random-weight checkpoints
#   webui/models/Lora/rand_lora_sd15.safetensors, rand_lora_sdxl.safetensors     random kohya LoRAs
#   (made by ../shared/webui/forge_random_checkpoint.py with Neo's venv, through tests/e2e/makers/streamed_checkpoint.py,
#   which writes the file tensor by tensor so that SDXL fits 24 GB; byte-reproducible)
# Env: MIRROR (default: the .mirror folder next to this repository), SHARED (default ../shared/webui next to
#   this repository), MAKE_SDXL=0 to skip the SDXL pair (6.5 GB), PYTHON, NEO_REF.
# Idempotent: the shared installer skips what is done; models are skipped when present (written to a temp
# folder and moved into place, so an interrupted run never leaves a half-written file under the final name).
# Launch flags on CPU: --skip-prepare-environment --skip-torch-cuda-test --skip-python-version-check
#   --skip-version-check --always-cpu --attention-pytorch --api --nowebui --server-name 127.0.0.1 --port N
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
WEBUI=$DEST/webui
log() { echo "[forge-neo.sh $(date +%H:%M:%S)] $*"; }

[ -f "$SHARED/install-forge-neo.sh" ] || { echo "missing $SHARED/install-forge-neo.sh (set SHARED)" >&2; exit 1; }
[ -d "$MIRROR/papaioannou-themistoklis+WebUI-Neo-Forge/repo" ] || { echo "missing mirror under $MIRROR (set MIRROR)" >&2; exit 1; }

log "install: $SHARED/install-forge-neo.sh -> $DEST"
DEST=$DEST bash "$SHARED/install-forge-neo.sh"

# ---------------------------------------------------------------- random models
# forge_random_checkpoint.py imports Neo's backend (backend.nn.unet/vae) and huggingface_guess, which Neo
# vendors in modules_forge/packages (Forge main: repositories/huggingface_guess) -> PYTHONPATH.
TMP=""
trap '[ -n "$TMP" ] && rm -rf "$TMP"' EXIT
make_pair() { # arch ckpt-name lora-name
  local arch=$1 ck=$WEBUI/models/Stable-diffusion/$2 lo=$WEBUI/models/Lora/$3 args=()
  [ -s "$ck" ] || args+=(--out "$TMP/$2")
  [ -s "$lo" ] || args+=(--lora "$TMP/$3")
  if [ ${#args[@]} -eq 0 ]; then log "ok: $2, $3 present"; return 0; fi
  log "making random $arch: ${args[*]//$TMP\//}"
  (cd "$WEBUI" && PYTHONPATH="$WEBUI/modules_forge/packages" AUTOLORA_MODEL_MAKERS="$SHARED" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
     "$DEST/venv/bin/python" "$REPO/tests/e2e/makers/streamed_checkpoint.py" --forge "$WEBUI" --arch "$arch" "${args[@]}")
  [ -s "$ck" ] || mv "$TMP/$2" "$ck"
  [ -s "$lo" ] || mv "$TMP/$3" "$lo"
}
mkdir -p "$WEBUI/models/Stable-diffusion" "$WEBUI/models/Lora"
TMP=$(mktemp -d "$WEBUI/models/.tmp-random-models.XXXXXX")
make_pair sd15 rand_sd15.safetensors rand_lora_sd15.safetensors
if [ "$MAKE_SDXL" = 1 ]; then
  make_pair sdxl rand_sdxl.safetensors rand_lora_sdxl.safetensors
else
  log "MAKE_SDXL=0: no SDXL checkpoint/LoRA"
fi
ls -l "$WEBUI/models/Stable-diffusion"/rand_*.safetensors "$WEBUI/models/Lora"/rand_lora_*.safetensors
log "done: AUTOLORA_FORGE_NEO=$WEBUI"
