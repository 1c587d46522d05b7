# common.sh — sourced by the host installers here: `source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"`.
# Checks the DEST argument and sets REPO (this repository), SHARED (../shared/webui next to it, or $SHARED),
# MIRROR (the .mirror folder next to it, or $MIRROR; exported), MAKE_SDXL (default 1) and DEST (absolute, made).
[ $# -ge 1 ] || { echo "usage: $0 DEST" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
SHARED=${SHARED:-$REPO/../shared/webui}
[ -d "$SHARED" ] && SHARED=$(cd "$SHARED" && pwd)
MIRROR=${MIRROR:-$REPO/../.mirror}
[ -d "$MIRROR" ] && MIRROR=$(cd "$MIRROR" && pwd)
export MIRROR
MAKE_SDXL=${MAKE_SDXL:-1}
mkdir -p "$1"
DEST=$(cd "$1" && pwd)
