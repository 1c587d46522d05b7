#!/usr/bin/env bash
# forge-classic.sh DEST — offline install of Forge Classic for the e2e suite (AUTOLORA_FORGE_CLASSIC=DEST/webui).
#
# What: "Forge Classic" = branch `classic` of Haoming02/sd-webui-forge-classic (the gradio-3 / ldm_patched Forge
#   of early 2024 kept alive, forge_version "classic"), pinned at 1f95d7170189 (2025-02-21 "lint", head of
#   `classic` in the mirror), cloned from the bare mirror $MIRROR/Haoming02+sd-webui-forge-classic/repo.
#   Replicates offline what its modules/launch_utils.py prepare_environment() does (details at each step):
#     repositories/stable-diffusion-webui-assets  AUTOMATIC1111+stable-diffusion-webui-assets @ 6f7db241
#     repositories/stable-diffusion-stability-ai  Stability-AI+stablediffusion                @ cf1d67a6
#     repositories/generative-models              Stability-AI+generative-models              @ 45c443b3
#     (k-diffusion is commented out upstream: Classic vendors it in ldm_patched/k_diffusion; no BLIP clone)
#     openai CLIP @ d50d76da from the openai+CLIP mirror; requirements.txt relaxed (see step 3)
#   A commit missing from a mirror falls back to that mirror's HEAD with a WARNING (none was missing when
#   this was written). Same approach as ../shared/webui/install-reforge.sh / install-forge.sh.
# Writes (all under DEST):
#   webui/                      the tree (git clone, branch classic), webui/repositories/*, webui/config.json
#   venv/                       Python 3.11 venv: torch==2.13.0 (CPU) + torchvision==0.28.0 (patched to import)
#   constraints_torch.txt, requirements_classic_cpu.txt, .requirements.sha, checkout-*.err (install records)
#   hf_home/                    HF cache with only openai/clip-vit-large-patch14's tokenizer + config (from the
#                               tree's ldm_patched/modules/sd1_tokenizer, sd1_clip_config.json), for the maker
#   webui/models/Stable-diffusion/rand_sd15.safetensors, rand_sdxl.safetensors   random-weight checkpoints
#   webui/models/Lora/rand_lora_sd15.safetensors, rand_lora_sdxl.safetensors     random kohya LoRAs
#   Models come from ../shared/webui/make_random_checkpoint.py + make_random_lora.py (A1111/ldm layout built
#   from the ldm/sgm trees in repositories/). forge_random_checkpoint.py does NOT fit Classic: it imports
#   Forge 2's backend/ and huggingface_guess, which this tree does not have. Classic loads ldm-layout single
#   files through ldm_patched (modules_forge/forge_loader.py: model_detection on "model.diffusion_model.").
#   (Files forge_random_checkpoint.py made with a Forge/Neo tree load in Classic too: checked once with SD1.5.)
# Env: MIRROR (default: the .mirror folder next to this repository), SHARED (default ../shared/webui next to
#   this repository), MAKE_SDXL=0 to skip the SDXL pair (6.5 GB, ~80 s, ~14 GB peak RAM), PYTHON (3.11: the
#   only CPU torch wheel here is cp311; Classic says "tested with 3.10"), CLASSIC_COMMIT, and upstream's
#   ASSETS_COMMIT_HASH / STABLE_DIFFUSION_COMMIT_HASH / STABLE_DIFFUSION_XL_COMMIT_HASH.
# Idempotent: every step checks what is already there; models are written to a temp folder and moved.
# Launch (API only, CPU), from DEST/webui (add --ckpt to pick the checkpoint loaded first):
#   HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False ../venv/bin/python launch.py \
#     --skip-prepare-environment --skip-torch-cuda-test --skip-python-version-check --skip-version-check \
#     --always-cpu --api --nowebui --server-name 127.0.0.1 --port N
#   (--always-cpu: ldm_patched/modules/args_parser.py; A1111's --use-cpu/--no-half are not needed)
#   Verified 2026-12-02 with SD1.5 only: API up in 17 s, txt2img 64x64 4 steps ±<lora:rand_lora_sd15:1> differ
#   (LoRA: 192 UNet + 72 CLIP keys, 0 skipped), repeats byte-identical, ~6.3 GB RSS. SDXL not run in Classic.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
WEBUI=$DEST/webui
VENV=$DEST/venv
log() { echo "[forge-classic.sh $(date +%H:%M:%S)] $*"; }

CLASSIC_GIT=$MIRROR/Haoming02+sd-webui-forge-classic/repo
ASSETS_GIT=$MIRROR/AUTOMATIC1111+stable-diffusion-webui-assets/repo
SD_GIT=$MIRROR/Stability-AI+stablediffusion/repo
SGM_GIT=$MIRROR/Stability-AI+generative-models/repo
CLIP_GIT=$MIRROR/openai+CLIP/repo

CLASSIC_BRANCH=classic
CLASSIC_COMMIT=${CLASSIC_COMMIT:-1f95d7170189cf93952aca122c1ee2f306a07e4c}   # 2025-02-21, head of `classic`
# Pinned in the tree's modules/launch_utils.py prepare_environment() (env names as upstream):
ASSETS_COMMIT=${ASSETS_COMMIT_HASH:-6f7db241d2f8ba7457bac5ca9753331f0c266917}
SD_COMMIT=${STABLE_DIFFUSION_COMMIT_HASH:-cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf}
SGM_COMMIT=${STABLE_DIFFUSION_XL_COMMIT_HASH:-45c443b316737a4ab6e40413d7794a7f5657c19f}
CLIP_COMMIT=d50d76daa670286dd6cacf3bcd80b5e4823fc8e1     # CLIP_PACKAGE github zip
# torch: upstream TORCH_COMMAND is torch==2.6.0+cu126 torchvision==0.21.0+cu126 (download.pytorch.org).
# Here: the CPU torch 2.13.0 of the machine's pip find-links, and torchvision 0.28.0, the release that pins
# torch==2.13.0 (timm, open-clip, facexlib, spandrel, kornia need torchvision).
TORCH_SPEC=torch==2.13.0
TORCHVISION_SPEC=torchvision==0.28.0

for g in "$CLASSIC_GIT" "$ASSETS_GIT" "$SD_GIT" "$SGM_GIT"; do
  [ -d "$g" ] || { echo "missing mirror $g (set MIRROR)" >&2; exit 1; }
done
for f in make_random_checkpoint.py make_random_lora.py; do
  [ -f "$SHARED/$f" ] || { echo "missing $SHARED/$f (set SHARED)" >&2; exit 1; }
done

# resolve_commit GITDIR COMMIT FALLBACK-REF -> prints the commit to use (warns on stderr when falling back)
resolve_commit() {
  if git --git-dir="$1" cat-file -e "$2^{commit}" 2>/dev/null; then echo "$2"; return; fi
  local fb; fb=$(git --git-dir="$1" rev-parse "$3")
  echo "[forge-classic.sh] WARNING: commit ${2:0:8} not in $1; using $3 = ${fb:0:8} instead" >&2
  echo "$fb"
}

# ---------------------------------------------------------------- 1. the tree
# A real clone (not `git archive`), like a user's checkout. The classic branch checks out completely from the
# mirror (no missing blobs at 1f95d717); errors are still kept in checkout-classic.err and markers checked.
if [ ! -f "$WEBUI/launch.py" ]; then
  C=$(resolve_commit "$CLASSIC_GIT" "$CLASSIC_COMMIT" "$CLASSIC_BRANCH")
  log "cloning Forge Classic @ ${C:0:8} from $CLASSIC_GIT"
  rm -rf "$WEBUI"
  git clone -q --no-checkout "$CLASSIC_GIT" "$WEBUI"
  git -C "$WEBUI" -c advice.detachedHead=false checkout -q -B "$CLASSIC_BRANCH" "$C" 2>"$DEST/checkout-classic.err" || \
    log "checkout reported errors (see $DEST/checkout-classic.err); continuing, markers checked below"
fi
for f in launch.py webui.py modules/launch_utils.py modules_forge/forge_loader.py ldm_patched/modules/sd.py \
         ldm_patched/k_diffusion/sampling.py ldm_patched/modules/sd1_tokenizer/vocab.json \
         configs/v1-inference.yaml requirements.txt extensions-builtin/Lora/networks.py; do
  [ -f "$WEBUI/$f" ] || { echo "missing $WEBUI/$f" >&2; exit 1; }
done
log "tree: $(git -C "$WEBUI" log -1 --format='%h %ci %s')"

# ---------------------------------------------------------------- 2. repositories/ (launch_utils git_clone)
# modules/paths.py asserts repositories/stable-diffusion-stability-ai exists and puts ldm/ and sgm/ on sys.path
# (the A1111 configs are instantiated with ldm/sgm classes; forge_loader then swaps in ldm_patched models).
clone_at() { # gitdir dest commit must-exist-file
  local src=$1 dest=$2 commit=$3 must=$4 name
  name=$(basename "$dest")
  commit=$(resolve_commit "$src" "$commit" HEAD)
  if [ -d "$dest/.git" ] && [ "$(git -C "$dest" rev-parse HEAD 2>/dev/null)" = "$commit" ] && [ -e "$dest/$must" ]; then
    log "ok: repositories/$name @ ${commit:0:8}"; return 0
  fi
  log "cloning $src @ ${commit:0:8} -> repositories/$name"
  rm -rf "$dest"
  git clone -q --no-checkout "$src" "$dest"
  # `|| true`: the stablediffusion mirror lacks a few README sample PNGs; code files are all written.
  git -C "$dest" -c advice.detachedHead=false checkout -q -f "$commit" 2>"$DEST/checkout-$name.err" || true
  [ -e "$dest/$must" ] || { echo "missing $dest/$must after checkout (see $DEST/checkout-$name.err)" >&2; exit 1; }
}
mkdir -p "$WEBUI/repositories"
clone_at "$ASSETS_GIT" "$WEBUI/repositories/stable-diffusion-webui-assets" "$ASSETS_COMMIT" .
clone_at "$SD_GIT"     "$WEBUI/repositories/stable-diffusion-stability-ai" "$SD_COMMIT" ldm/models/diffusion/ddpm.py
clone_at "$SGM_GIT"    "$WEBUI/repositories/generative-models" "$SGM_COMMIT" sgm/__init__.py

# ---------------------------------------------------------------- 3. venv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
PIP="$PY -m pip"
# Constraints on EVERY pip call, so no requirement can swap in a CUDA torch from PyPI.
CONSTRAINTS=$DEST/constraints_torch.txt
printf '%s\n%s\n' "$TORCH_SPEC" "$TORCHVISION_SPEC" > "$CONSTRAINTS"
if ! $PY -c "import importlib.metadata as m,sys; sys.exit(0 if m.version('torch').startswith('2.13.0') else 1)" 2>/dev/null \
   || ! $PIP show -q torchvision >/dev/null 2>&1; then
  log "installing $TORCH_SPEC $TORCHVISION_SPEC"
  $PIP install -q -c "$CONSTRAINTS" "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi

# Classic's requirements.txt (all `==` pins, gradio 3.41.2, transformers 4.30.2, ...), relaxed where it cannot
# work offline / with torch 2.13:
#  - `torch` (unpinned) dropped: installed above, held by the constraints file.
#  - + setuptools>=77.0.3,<80: Classic does not pin setuptools, but torch 2.13 requires setuptools>=77.0.3, so pip
#    would take the newest one, which no longer ships pkg_resources; lightning_fabric (pytorch_lightning==1.9.4,
#    imported at startup), modules/textual_inversion/autocrop.py and openai CLIP's setup.py import it.
#  - open_clip: launch_utils first pip-installs open_clip from a github zip (bb6e834e) when `open_clip` is
#    missing, then requirements.txt's open-clip-torch==2.20.0 replaces it (requirements_met() compares versions).
#    The end state is open-clip-torch 2.20.0 from PyPI, installed here directly; the github zip is skipped.
#  - nothing else changed (no URL lines in this requirements.txt).
REQ_OUT=$DEST/requirements_classic_cpu.txt
sed -e '/^torch[[:space:]]*$/d' "$WEBUI/requirements.txt" > "$REQ_OUT"
sed -i -e '$a\' "$REQ_OUT"      # make sure the file ends with a newline before appending
grep -qi '^setuptools' "$REQ_OUT" || echo 'setuptools>=77.0.3,<80' >> "$REQ_OUT"
if grep -q '^https\?://\|^git+' "$REQ_OUT"; then echo "URL requirement left in $REQ_OUT" >&2; exit 1; fi

STAMP=$DEST/.requirements.sha
SHA=$(sha256sum "$REQ_OUT" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$SHA" ]; then
  log "installing Classic requirements"
  $PIP install -q -r "$REQ_OUT" -c "$CONSTRAINTS"
  # openai CLIP @ d50d76da (launch_utils: CLIP_PACKAGE github zip, installed when `clip` is missing). Nothing in
  # this tree imports `clip` (k-diffusion is vendored without its evaluation module), but a user's install has it.
  # Built without isolation: its setup.py imports pkg_resources (the venv's setuptools<80 has it).
  if ! $PY -c 'import importlib.util,sys; sys.exit(0 if importlib.util.find_spec("clip") else 1)'; then
    if [ -d "$CLIP_GIT" ] && git --git-dir="$CLIP_GIT" cat-file -e "$CLIP_COMMIT^{commit}" 2>/dev/null; then
      rm -rf "$DEST/src/CLIP"; mkdir -p "$DEST/src/CLIP"
      git --git-dir="$CLIP_GIT" archive "$CLIP_COMMIT" | tar -x -C "$DEST/src/CLIP"
      $PIP install -q --no-build-isolation -c "$CONSTRAINTS" "$DEST/src/CLIP"
    else
      log "WARNING: openai CLIP @ ${CLIP_COMMIT:0:8} not in $CLIP_GIT; skipped (Classic does not import it)"
    fi
  fi
  echo "$SHA" > "$STAMP"
fi

# Guard: no CUDA torch / nvidia wheels crept in.
$PY - <<'EOF'
import importlib.metadata as m
bad = [d.metadata["Name"] for d in m.distributions() if d.metadata["Name"].lower().startswith(("nvidia-", "cuda-", "triton"))]
assert m.version("torch").startswith("2.13.0"), m.version("torch")
assert not bad, f"CUDA packages crept in: {bad}"
EOF

# torchvision 0.28.0 from PyPI is the CUDA build (+cu130): its _C.so links libtorch_cuda.so, absent in CPU torch,
# so its C++ ops (nms/roi_align/deform_conv; unused by SD generation) cannot load. _meta_registrations.py registers
# fake kernels for torchvision::nms / ::qnms without the _has_ops() guard the other ops have -> "RuntimeError:
# operator torchvision::nms does not exist" on `import torchvision`. Add the guard (same patch as the shared scripts).
TV_META="$($PY -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
if grep -q '^@torch.library.register_fake("torchvision::\(nms\|qnms\)")$' "$TV_META"; then
  log "patching torchvision _meta_registrations.py (nms/qnms guard)"
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' "$TV_META"
fi
$PY -c "import torchvision" || { echo "torchvision still fails to import" >&2; exit 1; }

# ---------------------------------------------------------------- 4. offline-safe settings
# Classic's default live preview is "TAESD" (modules/shared_options.py), which downloads taesd_decoder.pth from
# github at the first generation; "Approx NN" downloads vaeapprox-sdxl.pt for SDXL. Previews off + "Approx cheap"
# (needs no file). Merged into an existing config.json; other keys keep their values.
$PY - "$WEBUI/config.json" <<'PYEOF'
import json, os, sys
p = sys.argv[1]
cfg = json.load(open(p)) if os.path.exists(p) else {}
cfg.update({"live_previews_enable": False, "show_progress_type": "Approx cheap"})
json.dump(cfg, open(p, "w"), indent=4)
PYEOF

# ---------------------------------------------------------------- 5. HF cache for the checkpoint maker
# make_random_checkpoint.py builds ldm's / sgm's FrozenCLIPEmbedder, which calls
# CLIPTokenizer/CLIPTextConfig.from_pretrained("openai/clip-vit-large-patch14"): tokenizer files + config.json
# only (weights are random). The tree ships exactly those files in ldm_patched/modules/ (as reForge does).
# Classic itself does not need this cache at run time (forge_loader stubs those from_pretrained calls).
HFREPO=$DEST/hf_home/hub/models--openai--clip-vit-large-patch14
SNAP=$HFREPO/snapshots/0000000000000000000000000000000000000000
mkdir -p "$SNAP" "$HFREPO/refs"
printf 0000000000000000000000000000000000000000 > "$HFREPO/refs/main"
for f in "$WEBUI"/ldm_patched/modules/sd1_tokenizer/*; do
  [ -s "$SNAP/$(basename "$f")" ] || cp "$f" "$SNAP/"
done
[ -s "$SNAP/config.json" ] || cp "$WEBUI/ldm_patched/modules/sd1_clip_config.json" "$SNAP/config.json"

$PY -c "import torch, torchvision, transformers, diffusers, gradio, open_clip, pytorch_lightning, pydantic, importlib.metadata as m; print('torch', torch.__version__, 'tv', torchvision.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'gradio', gradio.__version__, 'open-clip-torch', m.version('open-clip-torch'), 'pydantic', pydantic.VERSION)"

# ---------------------------------------------------------------- 6. random models
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
log "done: AUTOLORA_FORGE_CLASSIC=$WEBUI"
