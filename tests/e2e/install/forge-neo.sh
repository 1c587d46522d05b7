#!/usr/bin/env bash
# forge-neo.sh DEST — offline install of "Forge Neo" for the e2e suite (AUTOLORA_FORGE_NEO=DEST/webui).
#
# Which tree (NEO_TREE):
#   2.26 (default)  Neo release 2.26 as users run it today: the folder webui/ of the copy
#                   exo101/sd-webui-forge-neo-v3 @ de2193d (modules_forge/forge_version.py: release "2.26"),
#                   extracted from $MIRROR/exo101+sd-webui-forge-neo-v3/repo by the tested
#                   ../shared/webui/install-forge-neo-226.sh (FORGE-NEO-226.md there: torch==2.13.0 CPU + patched
#                   torchvision 0.28.0, two pip runs, config.json with VERSION_UID so that launch never blocks).
#   2025-10         the October-2025 tree: papaioannou-themistoklis/WebUI-Neo-Forge @ 7862a9646a01 (forge_version
#                   "neo", no release), cloned from $MIRROR/papaioannou-themistoklis+WebUI-Neo-Forge/repo by
#                   ../shared/webui/install-forge-neo.sh (FORGE-NEO.md there). Use another DEST for it.
#   tests/e2e/hosts.py tells the two apart by the installed tree (backend/args.py, forge_version.py) and
#   launches each with its own flags.
# Writes (all under DEST):
#   webui/                      the tree (launch.py), webui/config.json (offline-safe preview settings)
#   venv/                       Python 3.11 venv, torch 2.13.0+cpu held by DEST/constraints_torch.txt
#   webui/models/Stable-diffusion/rand_sd15.safetensors, rand_sdxl.safetensors   random-weight checkpoints
#   webui/models/Lora/rand_lora_sd15.safetensors, rand_lora_sdxl.safetensors     random kohya LoRAs
#   (made by ../shared/webui/forge_random_checkpoint.py with Neo's venv, through tests/e2e/makers/streamed_checkpoint.py,
#   which writes the file tensor by tensor so that SDXL fits 24 GB, and parses Neo 2.x's backend args with
#   --cpu first (2.26 has no --always-cpu); byte-reproducible)
# Env: NEO_TREE (2.26 | 2025-10), MIRROR (default: the .mirror folder next to this repository), SHARED (default
#   ../shared/webui next to this repository), MAKE_SDXL=0 to skip the SDXL pair (6.5 GB; making it peaks at
#   ~10.5 GB: run it while no WebUI runs), PYTHON, NEO_REF (passed to the shared installer: a commit of the
#   tree's mirror), KEEP_BUNDLED_EXTENSIONS (2.26 only, see install-forge-neo-226.sh).
# Idempotent: the shared installers skip what is done; models are skipped when present (written to a temp
# folder and moved into place, so an interrupted run never leaves a half-written file under the final name).
# Launch flags on CPU (tests/e2e/hosts.py passes them):
#   2.26:    --skip-prepare-environment --skip-torch-cuda-test --skip-python-version-check --skip-version-check
#            --cpu --use-pytorch-cross-attention --api --server-name 127.0.0.1 --port N   (no --ckpt: 2.26 reads it
#            as --ckpt-dirs; the checkpoint is selected through POST /sdapi/v1/options)
#   2025-10: ... --always-cpu --attention-pytorch ... --ckpt FILE
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
WEBUI=$DEST/webui
NEO_TREE=${NEO_TREE:-2.26}
log() { echo "[forge-neo.sh $(date +%H:%M:%S)] $*"; }

case "$NEO_TREE" in
  2.26)
    INSTALLER=$SHARED/install-forge-neo-226.sh
    NEO_MIRROR=$MIRROR/exo101+sd-webui-forge-neo-v3/repo ;;
  2025-10)
    INSTALLER=$SHARED/install-forge-neo.sh
    NEO_MIRROR=$MIRROR/papaioannou-themistoklis+WebUI-Neo-Forge/repo ;;
  *) echo "NEO_TREE must be 2.26 or 2025-10, not '$NEO_TREE'" >&2; exit 2 ;;
esac
[ -f "$INSTALLER" ] || { echo "missing $INSTALLER (set SHARED)" >&2; exit 1; }
[ -d "$NEO_MIRROR" ] || { echo "missing mirror $NEO_MIRROR (set MIRROR)" >&2; exit 1; }

# An existing tree must be the one asked for (the shared installers skip the tree step when launch.py exists).
if [ -f "$WEBUI/launch.py" ]; then
  if grep -qs '^release *= *"2\.' "$WEBUI/modules_forge/forge_version.py"; then HAVE=2.26; else HAVE=2025-10; fi
  [ "$HAVE" = "$NEO_TREE" ] || { echo "$WEBUI holds the $HAVE tree, NEO_TREE=$NEO_TREE: use another DEST" >&2; exit 1; }
fi

log "install ($NEO_TREE): $INSTALLER -> $DEST"
DEST=$DEST NEO_GIT_DIR=$NEO_MIRROR bash "$INSTALLER"
if [ "$NEO_TREE" = 2.26 ]; then
  grep -q '^release = "2.26"' "$WEBUI/modules_forge/forge_version.py" \
    || log "WARNING: not release 2.26: $(tr '\n' ' ' < "$WEBUI/modules_forge/forge_version.py")"
fi

# ---------------------------------------------------------------- random models
# forge_random_checkpoint.py imports Neo's backend (backend.nn.unet/vae) and huggingface_guess, which Neo
# vendors in modules_forge/packages (Forge main: repositories/huggingface_guess) -> PYTHONPATH (the maker
# wrapper adds it too). --backend-cpu-flag auto: --cpu on 2.26, the maker's own --always-cpu on 2025-10.
TMP=""
trap '[ -n "$TMP" ] && rm -rf "$TMP"' EXIT
make_pair() { # arch ckpt-name lora-name
  local arch=$1 ck=$WEBUI/models/Stable-diffusion/$2 lo=$WEBUI/models/Lora/$3 args=()
  [ -s "$ck" ] || args+=(--out "$TMP/$2")
  [ -s "$lo" ] || args+=(--lora "$TMP/$3")
  if [ ${#args[@]} -eq 0 ]; then log "ok: $2, $3 present"; return 0; fi
  log "making random $arch: ${args[*]//$TMP\//}"
  (cd "$WEBUI" && PYTHONPATH="$WEBUI/modules_forge/packages" AUTOLORA_MODEL_MAKERS="$SHARED" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
     "$DEST/venv/bin/python" "$REPO/tests/e2e/makers/streamed_checkpoint.py" --backend-cpu-flag auto \
       --forge "$WEBUI" --arch "$arch" "${args[@]}")
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
log "done ($NEO_TREE): AUTOLORA_FORGE_NEO=$WEBUI"
