#!/usr/bin/env bash
# reforge.sh DEST — offline install of Stable Diffusion WebUI reForge for the e2e suite (AUTOLORA_REFORGE=DEST/webui).
#
# What: Panchovix/stable-diffusion-webui-reForge branch main @ 3b56b268ad91 (2026-03-11), cloned from the bare
#   mirror $MIRROR/Panchovix+stable-diffusion-webui-reForge/repo, plus repositories/ from the mirrors
#   AUTOMATIC1111+stable-diffusion-webui-assets, Stability-AI+stablediffusion (reForge's pin f16630a9 of the
#   joypaul162 copy is not mirrored -> Stability-AI cf1d67a6, A1111's pin), Stability-AI+generative-models,
#   crowsonkb+k-diffusion, salesforce+BLIP, openai+CLIP. The install itself is the tested
#   ../shared/webui/install-reforge.sh (see REFORGE.md there).
# Writes (all under DEST):
#   webui/                      the tree (launch.py), webui/config.json (offline-safe preview settings)
#   venv/                       Python 3.11 venv, torch 2.13.0+cpu held by DEST/constraints_torch.txt
#   hf_home/                    HF cache with only openai/clip-vit-large-patch14's tokenizer + config (copied from
#                               reForge's ldm_patched/modules/sd1_tokenizer, sd1_clip_config.json); the A1111-style
#                               checkpoint maker needs it; launch-reforge.sh exports HF_HOME=DEST/hf_home if present
#   webui/models/Stable-diffusion/rand_sd15.safetensors, rand_sdxl.safetensors   random-weight checkpoints
#   webui/models/Lora/rand_lora_sd15.safetensors, rand_lora_sdxl.safetensors     random kohya LoRAs
#   (made by ../shared/webui/make_random_checkpoint.py + make_random_lora.py, which build the model from the
#   ldm/sgm trees in webui/repositories as REFORGE.md does; byte-reproducible)
# Env: MIRROR (default: the .mirror folder next to this repository), SHARED (default ../shared/webui next to
#   this repository), MAKE_SDXL=0 to skip the SDXL pair (6.5 GB, ~80 s, ~14 GB peak RAM), PYTHON, REFORGE_REF.
# Idempotent: the shared installer skips what is done; models are skipped when present (written to a temp
# folder and moved into place, so an interrupted run never leaves a half-written file under the final name).
# Launch flags on CPU: --skip-prepare-environment --skip-torch-cuda-test --skip-python-version-check
#   --skip-version-check --always-cpu --api --nowebui --server-name 127.0.0.1 --port N
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
WEBUI=$DEST/webui
PY=$DEST/venv/bin/python
log() { echo "[reforge.sh $(date +%H:%M:%S)] $*"; }

[ -f "$SHARED/install-reforge.sh" ] || { echo "missing $SHARED/install-reforge.sh (set SHARED)" >&2; exit 1; }
[ -d "$MIRROR/Panchovix+stable-diffusion-webui-reForge/repo" ] || { echo "missing mirror under $MIRROR (set MIRROR)" >&2; exit 1; }

log "install: $SHARED/install-reforge.sh -> $DEST"
DEST=$DEST bash "$SHARED/install-reforge.sh"

# ---------------------------------------------------------------- HF cache for the checkpoint maker
# make_random_checkpoint.py builds ldm's / sgm's FrozenCLIPEmbedder, which calls
# CLIPTokenizer/CLIPTextConfig.from_pretrained("openai/clip-vit-large-patch14"): tokenizer files + config.json
# only (no weights). reForge ships exactly those files in ldm_patched/modules/ (REFORGE.md step 2).
HFREPO=$DEST/hf_home/hub/models--openai--clip-vit-large-patch14
SNAP=$HFREPO/snapshots/0000000000000000000000000000000000000000
mkdir -p "$SNAP" "$HFREPO/refs"
printf 0000000000000000000000000000000000000000 > "$HFREPO/refs/main"
for f in "$WEBUI"/ldm_patched/modules/sd1_tokenizer/*; do
  [ -s "$SNAP/$(basename "$f")" ] || cp "$f" "$SNAP/"
done
[ -s "$SNAP/config.json" ] || cp "$WEBUI/ldm_patched/modules/sd1_clip_config.json" "$SNAP/config.json"

# ---------------------------------------------------------------- random models
TMP=""
trap '[ -n "$TMP" ] && rm -rf "$TMP"' EXIT
make_pair() { # arch ckpt-name lora-name
  local arch=$1 ck=$WEBUI/models/Stable-diffusion/$2 lo=$WEBUI/models/Lora/$3
  if [ -s "$ck" ]; then log "ok: $2 present"; else
    log "making random $arch checkpoint $2"
    HF_HOME=$DEST/hf_home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      "$PY" "$SHARED/make_random_checkpoint.py" --webui-dir "$WEBUI" --arch "$arch" --out "$TMP/$2"
    mv "$TMP/$2" "$ck"
  fi
  if [ -s "$lo" ]; then log "ok: $3 present"; else
    log "making random LoRA $3 for $2"
    # shapes come from the checkpoint; its file name goes into the LoRA metadata (ss_sd_model_name)
    "$PY" "$SHARED/make_random_lora.py" --ckpt "$ck" --out "$TMP/$3" --seed 1
    mv "$TMP/$3" "$lo"
  fi
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
log "done: AUTOLORA_REFORGE=$WEBUI"
