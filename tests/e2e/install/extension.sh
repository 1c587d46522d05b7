#!/usr/bin/env bash
# extension.sh NAME WEBUI — offline install of another WebUI extension the e2e suite runs beside AutoLoRA
# (tests/e2e/test_agent_scheduler.py, tests/e2e/test_adetailer.py), for the WebUI whose launch.py is in WEBUI.
#
# NAME:
#   agent-scheduler  ArtVentureX/sd-webui-agent-scheduler @ a3375332 (2025-01-13, head of main): its install.py
#                    pip-installs sqlalchemy. It does not load on gradio-4 WebUIs (Forge: pydantic 2).
#   agent-scheduler-forge  supersonic13/sd-webui-agent-scheduler @ 35deaeaf (2024-10-04, head of main), the fork
#                    Forge users run (pydantic 2 and gradio 4 ports of the same code); sqlalchemy too
#   adetailer        Bing-su/adetailer @ 36189cbe (v25.3.0, 2025-03-10, head of main): its install.py pip-installs
#                    ultralytics>=8.3.75, mediapipe>=0.10.13,<=0.10.15, rich>=13.0.0
# What: a git clone of the extension from the mirror $MIRROR/<owner>+<repo>/repo at the pinned commit, then what its
#   install.py would pip-install when the WebUI starts (the suite starts WebUIs with --skip-prepare-environment, which
#   skips extension installers), into the WebUI's venv. Every pip call takes -c a constraints file: torch==2.13.0 and
#   every package already in the venv at its version, so pip only adds packages.
#   One exception, adetailer: mediapipe 0.10.13-0.10.15 require protobuf>=4.25.3,<5, the WebUIs pin protobuf==3.20.0
#   (requirements_versions.txt). Installing ADetailer upgrades protobuf, and the WebUI's launcher puts its pin back at
#   its next start (launch_utils.prepare_environment: requirements_met() fails, pip install -r
#   requirements_versions.txt), so a user's WebUI runs ADetailer with mediapipe beside protobuf 3.20.0. This script
#   does the same, then checks that mediapipe's face model (shipped in its wheel) finds the face in scikit-image's
#   astronaut (scikit-image is a WebUI requirement).
# Writes: the clone, at $INTO (default WEBUI/../e2e-extensions/<repo name>), and packages into the venv. Not into
#   WEBUI/extensions: the suite links the clone in for its own server only, so other runs on this WebUI do not load it.
#   Point the suite at it with the variable this script prints (AUTOLORA_E2E_AGENT_SCHEDULER, AUTOLORA_E2E_ADETAILER);
#   a copy installed in WEBUI/extensions is found without it.
# Env: MIRROR (default: the .mirror folder next to this repository), PYTHON (the WebUI's Python; default WEBUI/venv/bin/
#   python, else WEBUI/../venv/bin/python), INTO.
# Idempotent: a clone at the pinned commit is kept; met requirements are not installed again.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 agent-scheduler|agent-scheduler-forge|adetailer WEBUI" >&2; exit 2; }
NAME=$1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$2"
WEBUI=$DEST
log() { echo "[extension.sh $NAME $(date +%H:%M:%S)] $*"; }
[ -f "$WEBUI/launch.py" ] || { echo "no launch.py in $WEBUI" >&2; exit 1; }

case "$NAME" in
  agent-scheduler)
    SLUG=ArtVentureX+sd-webui-agent-scheduler; COMMIT=a33753321b914c6122df96d1dc0b5117d38af680
    FOLDER=sd-webui-agent-scheduler; VAR=AUTOLORA_E2E_AGENT_SCHEDULER
    REQS=("sqlalchemy"); UNPIN=() ;;
  agent-scheduler-forge)
    SLUG=supersonic13+sd-webui-agent-scheduler; COMMIT=35deaeaf7fc33d8ad86eb08c37c5a0b8026ce8cf
    FOLDER=sd-webui-agent-scheduler; VAR=AUTOLORA_E2E_AGENT_SCHEDULER
    REQS=("sqlalchemy"); UNPIN=() ;;
  adetailer)
    SLUG=Bing-su+adetailer; COMMIT=36189cbea735b85fd01e98ac42002b8ce6f0e41d
    FOLDER=adetailer; VAR=AUTOLORA_E2E_ADETAILER
    REQS=("ultralytics>=8.3.75" "mediapipe>=0.10.13,<=0.10.15" "rich>=13.0.0"); UNPIN=(protobuf) ;;
  *) echo "unknown extension $NAME (agent-scheduler, agent-scheduler-forge, adetailer)" >&2; exit 2 ;;
esac
GIT=$MIRROR/$SLUG/repo
[ -d "$GIT" ] || { echo "missing mirror $GIT (set MIRROR)" >&2; exit 1; }
INTO=${INTO:-$(dirname "$WEBUI")/e2e-extensions/$FOLDER}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in "$WEBUI/venv/bin/python" "$(dirname "$WEBUI")/venv/bin/python"; do [ -x "$c" ] && { PY=$c; break; }; done
fi
[ -n "$PY" ] && [ -x "$PY" ] || { echo "no WebUI venv found (set PYTHON)" >&2; exit 1; }

# ---------------------------------------------------------------- 1. the clone
if [ "$(git -C "$INTO" rev-parse HEAD 2>/dev/null)" != "$COMMIT" ]; then
  git --git-dir="$GIT" cat-file -e "$COMMIT^{commit}" || { echo "commit $COMMIT not in $GIT" >&2; exit 1; }
  log "cloning $GIT @ ${COMMIT:0:8} -> $INTO"
  rm -rf "$INTO"
  mkdir -p "$(dirname "$INTO")"
  git clone -q --no-checkout "$GIT" "$INTO"
  git -C "$INTO" -c advice.detachedHead=false checkout -q "$COMMIT"
fi
log "clone: $(git -C "$INTO" log -1 --format='%h %ci %s')"

# ---------------------------------------------------------------- 2. its requirements
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip freeze --all 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==[^ ]+$' > "$TMP/before.txt"
CONSTRAINTS=$TMP/constraints.txt
{
  echo "torch==2.13.0"
  skip="torch${UNPIN[*]:+ ${UNPIN[*]}}"
  while IFS= read -r line; do
    name=${line%%==*}
    case " $skip " in *" ${name,,} "*) continue ;; esac
    echo "$line"
  done < "$TMP/before.txt"
} > "$CONSTRAINTS"
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")
# Requirements met already: no pip call (for ADetailer a pip call would upgrade protobuf again, then put it back).
if "$PY" - "${REQS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
for req in map(Requirement, sys.argv[1:]):
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
then
  log "requirements met already: ${REQS[*]}"
  UNPIN=()
else
  log "pip install ${REQS[*]} (constraints: torch==2.13.0 and the venv's $(wc -l < "$TMP/before.txt") packages as they are)"
  "${PIP[@]}" "${REQS[@]}"
fi

for name in ${UNPIN[@]+"${UNPIN[@]}"}; do  # put back what the WebUI's launcher puts back (see above)
  pin=$(grep -i "^$name==" "$TMP/before.txt" || true)
  if [ -n "$pin" ]; then
    log "pip install $pin (the WebUI's own pin, as its launcher restores it)"
    "${PIP[@]}" "$pin" 2>&1 | grep -v "dependency resolver\|requires protobuf\|^$" || true
  fi
done

# Nothing that was installed changed: pip only added packages.
"$PY" -m pip freeze --all 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==[^ ]+$' > "$TMP/after.txt"
changed=$(comm -23 <(sort "$TMP/before.txt") <(sort "$TMP/after.txt"))
[ -z "$changed" ] || { echo "pip changed installed packages: $changed" >&2; exit 1; }
log "added: $(comm -13 <(sort "$TMP/before.txt") <(sort "$TMP/after.txt") | tr '\n' ' ')"

# ---------------------------------------------------------------- 3. checks
case "$NAME" in
  agent-scheduler*)
    "$PY" -c "import sqlalchemy; print('sqlalchemy', sqlalchemy.__version__)" ;;
  adetailer)
    # What ADetailer imports when it loads, and its offline detector on a face photo.
    "$PY" - <<'EOF'
import google.protobuf, huggingface_hub, rich, torch, torchvision.transforms.functional  # noqa: F401
import mediapipe as mp
from skimage import data
with mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.3) as detector:
    faces = detector.process(data.astronaut()).detections or []
assert len(faces) == 1, f"mediapipe found {len(faces)} faces in the astronaut"
print("torch", torch.__version__, "protobuf", google.protobuf.__version__, "mediapipe", mp.__version__,
      "- the astronaut's face found, score", round(faces[0].score[0], 2))
EOF
    ;;
esac
log "done: $VAR=$INTO"
