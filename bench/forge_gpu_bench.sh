#!/usr/bin/env bash
# AutoLoRA's whole-image benchmark in a real Forge on the lent GPU machine, offline, in ONE call:
# carried wheels -> Forge tree -> random SD1.5/SDXL checkpoints + rank-32 full-coverage LoRAs ->
# this extension linked into Forge -> Forge API-only on 127.0.0.1 -> bench/webui_bench.py per case
# -> in OUTDIR: forge.log, bench.log, bench-<case>.json (rewritten after every round, so a run cut
# short keeps its data), unet-profile.txt, step-ops.json and pyspy.txt; with the caller's run.log
# that is 9 files, one over the device's limit of 8, so a run sets at most one of UNET_STEP_CASES /
# PYSPY_CASES. Before Forge starts, bench/unet_step.py times one UNet step per strategy (no WebUI).
#
# Follows ../shared/webui/GPU.md (Forge on the device) step for step; what differs: the extension is
# installed, the LoRAs are rank 32 (issue 8's physics table), and the timing is webui_bench.py's.
#
#   bash bench/forge_gpu_bench.sh CARRY [OUTDIR]
# CARRY (git-ignored, sent with the device tool's `carry`), built here by
#   bash ../shared/webui/make-gpu-carry.sh gpu-carry <the four mirrors>   # wheels/ and src/
#   mkdir -p gpu-carry/tools && cp ../shared/webui/forge_random_checkpoint.py gpu-carry/tools/
# Knobs (env): PYTHON, FORGE_WORK (/tmp/forge-gpu), FORGE_PORT (7861), FORGE_DEVICE_ARGS (CPU rehearsal:
#   "--always-cpu --skip-torch-cuda-test"), SKIP_WHEELS=1 (rehearsal with a venv that has Forge's packages),
#   CASES (which of the case lines below run), STEPS (20), DEADLINE_S (420: no case starts after it),
#   SIZE_SD15 / SIZE_SDXL (512 / 1024), ROUNDS_SCALE (1), LORA_RANK (32),
#   UNET_STEP_CASES ("sd15:512:1 sdxl:1024:1"; empty: skip) and UNET_STEP_ARGS (CPU rehearsal:
#   "--device cpu --dtype fp32 --width-div 10 --threads 1"), UNET_STEP_PROFILE ("sd15": archs profiled),
#   CKPT_ARCHS ("sd15 sdxl"), OPS_CASES (case names to count per-step operators for with step_ops.py;
#   empty: none), OPS_VARIANTS ("plain,floor,batched,dual"), OPS_STEPS ("3,5"),
#   PYSPY_CASES ("case:variant ..." profiled by bench/py_profile.py with py-spy; empty: none), PYSPY_STEPS (30),
#   CKPT_CPUS / UNET_STEP_CPUS (taskset lists; by default, with 8 or more cores, the checkpoints are
#   written on cores 4.. while the UNet step runs on 0-3; CKPT_CPUS= (empty) runs them one after the other).
set -uo pipefail
CARRY=$(cd "${1:?usage: forge_gpu_bench.sh CARRY [OUTDIR]}" && pwd)
OUTDIR=${2:-${OUT:-$PWD/forge-gpu-out}}
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
# Logs this run appends to start empty: an OUTDIR reused from an earlier run would pair that run's
# requests with this run's host log (host_steps.py refuses them).
rm -f "$OUTDIR/bench.log" "$OUTDIR/unet-profile.txt" "$OUTDIR/pyspy.txt"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${FORGE_WORK:-/tmp/forge-gpu}
SITE=$WORK/site
WEBUI=$WORK/webui
PORT=${FORGE_PORT:-7861}
STEPS=${STEPS:-20}
DEADLINE_S=${DEADLINE_S:-420}
S15=${SIZE_SD15:-512}
SXL=${SIZE_SDXL:-1024}
RANK=${LORA_RANK:-32}
T0=$(date +%s)
log() { echo "[forge-gpu-bench +$(( $(date +%s) - T0 ))s] $*"; }

log "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB RAM; $($PY -V 2>&1) at $(command -v "$PY")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. carried wheels first on PYTHONPATH: they shadow the device's too-new transformers/hub/tokenizers
mkdir -p "$WORK"
rm -f "$WORK"/step-ops-*.json  # parts of an earlier run's step-ops.json
if [ "${SKIP_WHEELS:-0}" != 1 ] && [ ! -f "$SITE/.done" ]; then
  log "installing $(ls "$CARRY"/wheels/*.whl | wc -l) wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl \
    || { echo "pip install of the carried wheels failed" >&2; exit 1; }
  touch "$SITE/.done"
fi
[ "${SKIP_WHEELS:-0}" != 1 ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 GRADIO_ANALYTICS_ENABLED=False
export HF_HOME=$WORK/hf PYTHONUNBUFFERED=1

# 2. Forge tree + repositories/ (python's tarfile: no dependency on xz)
if [ ! -f "$WEBUI/launch.py" ]; then
  log "unpacking Forge"
  $PY - "$WORK" "$WEBUI/repositories" "$CARRY"/src/*.tar.* <<'PYEOF' || exit 1
import sys, tarfile
work, repos = sys.argv[1], sys.argv[2]
for t in sys.argv[3:]:
    with tarfile.open(t) as f:
        f.extractall(work if "/forge-" in t else repos, filter="data")
PYEOF
fi
# Offline-safe previews (GPU.md: the default preview downloads a file for SDXL).
$PY - "$WEBUI/config.json" <<'PYEOF'
import json, os, sys
p = sys.argv[1]
cfg = json.load(open(p)) if os.path.exists(p) else {}
cfg.update({"live_previews_enable": False, "show_progress_type": "Approx cheap"})
json.dump(cfg, open(p, "w"), indent=4)
PYEOF
mkdir -p "$WEBUI/models/Stable-diffusion" "$WEBUI/models/Lora" "$WEBUI/extensions"
ln -sfn "$REPO" "$WEBUI/extensions/sd-webui-autolora"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# 3. random checkpoints + kohya LoRAs (CPU, seeded), both at once
cd "$WEBUI" || exit 1
# Checkpoints are CPU work and the UNet step is GPU work: with cores to spare they run at once, each on
# its own cores (taskset), so the step's launch-bound timing does not share cores with the writer.
NCPU=$(nproc)
if [ -z "${CKPT_CPUS+x}" ] && [ "$NCPU" -ge 8 ] && command -v taskset >/dev/null; then
  UNET_STEP_CPUS=${UNET_STEP_CPUS:-0-3}; CKPT_CPUS=4-$((NCPU - 1))
fi
pin() { local cpus=$1; shift; if [ -n "$cpus" ]; then taskset -c "$cpus" "$@"; else "$@"; fi; }
mk() {
  local a=$1
  [ -f "models/Stable-diffusion/rand_$a.safetensors" ] && [ -f "models/Lora/rank${RANK}_$a.safetensors" ] && return 0
  pin "${CKPT_CPUS:-}" $PY "$CARRY/tools/forge_random_checkpoint.py" --forge . --arch "$a" --rank "$RANK" --alpha "$RANK" \
    $([ -f "models/Stable-diffusion/rand_$a.safetensors" ] || echo --out "models/Stable-diffusion/rand_$a.safetensors") \
    --lora "models/Lora/rank${RANK}_$a.safetensors" > "$WORK/ckpt_$a.log" 2>&1
  local rc=$?; sed "s/^/[ckpt $a] /" "$WORK/ckpt_$a.log"; return $rc
}
log "writing random checkpoints${CKPT_CPUS:+ on cpus $CKPT_CPUS, the UNet step at once on cpus ${UNET_STEP_CPUS:-all}}"
pids=(); for a in ${CKPT_ARCHS:-sd15 sdxl}; do mk "$a" & pids+=($!); done
wait_checkpoints() {
  for p in "${pids[@]}"; do wait "$p" || { echo "checkpoint generation failed" >&2; exit 1; }; done
  log "checkpoints done"
}
[ -n "${CKPT_CPUS:-}" ] || wait_checkpoints

# 3b. one guided UNet step per strategy, no WebUI (bench/unet_step.py): our own gap to the floor,
# apart from Forge's per-step work; stdout goes to the caller's run.log, profiles to one file
# (only for the archs in UNET_STEP_PROFILE: a profiled SDXL step per variant costs more than it tells).
for uc in ${UNET_STEP_CASES-sd15:$S15:1 sdxl:$SXL:1}; do
  IFS=: read -r arch size images <<<"$uc"
  case $arch in sd15) cfg=runwayml/stable-diffusion-v1-5 ;; sdxl) cfg=stabilityai/stable-diffusion-xl-base-1.0 ;; *) continue ;; esac
  prof=(); grep -qw -- "$arch" <<<"${UNET_STEP_PROFILE-sd15}" && prof=(--profile "$OUTDIR/unet-profile.txt")
  log "unet step: $arch $size px, $images image(s)"
  # shellcheck disable=SC2086
  pin "${UNET_STEP_CPUS:-}" $PY "$REPO/bench/unet_step.py" --unet-config "$WEBUI/backend/huggingface/$cfg/unet/config.json" \
    --size "$size" --images "$images" --rank "$RANK" "${prof[@]}" ${UNET_STEP_ARGS:-} 2>&1 \
    | grep -v '^USDT:' || log "unet step $arch failed (the WebUI cases still run)"
done
[ -z "${CKPT_CPUS:-}" ] || wait_checkpoints

# 4. Forge, API only. --disable-nan-check: random weights in fp16 may give NaN latents; time is measured.
# AUTOLORA_DIAGNOSTICS=1: the bench resets torch's peak memory before each call (/autolora/v1/reset-peak),
# which exists only with diagnostics on; without it every peak is the process's cumulative one.
# shellcheck disable=SC2086
AUTOLORA_DIAGNOSTICS=1 nohup $PY launch.py --skip-prepare-environment --skip-python-version-check --skip-version-check \
  --api --nowebui --server-name 127.0.0.1 --port "$PORT" --disable-nan-check ${FORGE_DEVICE_ARGS:-} \
  > "$OUTDIR/forge.log" 2>&1 &
FPID=$!
trap 'kill $FPID 2>/dev/null' EXIT
log "Forge pid $FPID, waiting for the API"
$PY - "$PORT" "$FPID" <<'PYEOF' || { echo "Forge did not come up" >&2; tail -60 "$OUTDIR/forge.log" >&2; exit 1; }
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
t0 = time.time()
while time.time() - t0 < 240:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/autolora/v1/params", timeout=2).read()
        print(f"API (with AutoLoRA's routes) up after {time.time() - t0:.1f}s"); sys.exit(0)
    except Exception:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        print("Forge exited"); sys.exit(1)
    time.sleep(1)
sys.exit(1)
PYEOF

# 5. one bench invocation per case, cheapest first; no case starts after DEADLINE_S
# name | checkpoint | LoRA | size | batch | variants | warm-up variants | timed rounds
# Sized for one 10-minute device call (issue 8's targets: SD1.5 1 image, SDXL 1 and 4 images, the 50 %
# interval at SDXL 4, peak memory of the lean mode at each size).
# floor = plain generation of twice the batch: the per-step floor of both branches in one forward.
CASE_LINES="${CASE_LINES:-sd15-${S15}-1|rand_sd15.safetensors|rank${RANK}_sd15|$S15|1|floor,batched,dual,sequential,swap,auto|all|3
sdxl-${SXL}-1|rand_sdxl.safetensors|rank${RANK}_sdxl|$SXL|1|floor,batched,dual,sequential,swap,auto|plain,dual|2
sdxl-${SXL}-4|rand_sdxl.safetensors|rank${RANK}_sdxl|$SXL|4|floor,batched,swap,sequential,auto-interval50|plain,swap|2}"
RC=0
while IFS='|' read -r name ckpt lora size batch variants warm rounds; do
  [ -n "${CASES:-}" ] && ! grep -qw -- "$name" <<<"$CASES" && continue
  if [ $(( $(date +%s) - T0 )) -gt "$DEADLINE_S" ]; then log "deadline: $name not run"; continue; fi
  rounds=$(( rounds * ${ROUNDS_SCALE:-1} )); [ "$rounds" -lt 1 ] && rounds=1
  wv=(); [ "$warm" != all ] && wv=(--warmup-variants "$warm")
  log "case $name: $variants, $rounds rounds"
  $PY "$REPO/bench/webui_bench.py" --url "http://127.0.0.1:$PORT" --case "$name:$ckpt:$lora:$size:$batch" \
    --variants "plain,$variants" --rounds "$rounds" --steps "$STEPS" "${wv[@]}" \
    --json "$OUTDIR/bench-$name.json" 2>&1 | tee -a "$OUTDIR/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || RC=1
done <<<"$CASE_LINES"
if [ -s "$OUTDIR/bench.log" ]; then  # before step_ops' requests add their bars to the host log
  log "per step, from Forge's sampler bar:"
  $PY "$REPO/bench/host_steps.py" --host-log "$OUTDIR/forge.log" --bench-log "$OUTDIR/bench.log" --steps "$STEPS"
fi
# 6. what a step is made of (bench/step_ops.py: Forge's own profiler, two step counts differenced):
# operator calls, kernel launches, GPU kernel time and blocking runtime calls per step.
while IFS='|' read -r name ckpt lora size batch _rest; do
  grep -qw -- "$name" <<<"${OPS_CASES:-}" || continue
  if [ $(( $(date +%s) - T0 )) -gt "$DEADLINE_S" ]; then log "deadline: step ops of $name not run"; continue; fi
  log "step ops $name: ${OPS_VARIANTS:-plain,floor,batched,dual}"
  $PY "$REPO/bench/step_ops.py" --url "http://127.0.0.1:$PORT" --case "$name:$ckpt:$lora:$size:$batch" \
    --variants "${OPS_VARIANTS:-plain,floor,batched,dual}" --steps "${OPS_STEPS:-3,5}" \
    $([ -z "${FORGE_DEVICE_ARGS:-}" ] && echo --cuda) --json "$WORK/step-ops-$name.json" 2>&1 || RC=1
done <<<"$CASE_LINES"
# One file for every case's counts: the device returns at most 8 files.
$PY - "$OUTDIR/step-ops.json" "$WORK"/step-ops-*.json <<'PYEOF' 2>/dev/null
import json, sys
parts = [json.load(open(f)) for f in sys.argv[2:]]
if parts:
    json.dump({p["case"]: p for p in parts}, open(sys.argv[1], "w"), indent=1)
PYEOF
rm -f "$WORK"/step-ops-*.json
# 7. where the sampling thread's wall-clock time goes, by Python function (bench/py_profile.py with
# py-spy, a wheel carried in CARRY/tools): PYSPY_CASES="case:variant ..." (empty: none).
if [ -n "${PYSPY_CASES:-}" ]; then
  SPY_WHL=$(ls "$CARRY"/tools/py_spy-*.whl 2>/dev/null | head -1)
  if [ -z "$SPY_WHL" ]; then log "py-spy: no wheel in $CARRY/tools, skipped"
  else
    [ -x "$WORK/pyspy/bin/py-spy" ] || $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/pyspy" "$SPY_WHL"
    for cv in $PYSPY_CASES; do
      pname=${cv%%:*}; pvariant=${cv#*:}
      if [ $(( $(date +%s) - T0 )) -gt "$DEADLINE_S" ]; then log "deadline: py-spy of $cv not run"; continue; fi
      line=$(grep -- "^$pname|" <<<"$CASE_LINES" | head -1); [ -n "$line" ] || continue
      IFS='|' read -r name ckpt lora size batch _rest <<<"$line"
      log "py-spy $name $pvariant"
      $PY "$REPO/bench/py_profile.py" --url "http://127.0.0.1:$PORT" --case "$name:$ckpt:$lora:$size:$batch" \
        --variant "$pvariant" --pid "$FPID" --py-spy "$WORK/pyspy/bin/py-spy" --steps "${PYSPY_STEPS:-30}" \
        2>&1 | tee -a "$OUTDIR/pyspy.txt"
    done
  fi
fi
kill "$FPID" 2>/dev/null; wait "$FPID" 2>/dev/null
log "done, rc=$RC"
exit $RC
