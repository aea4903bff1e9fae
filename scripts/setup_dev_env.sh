#!/usr/bin/env bash
# Build (or reuse) the light development venv from locks/dev.txt: pytest, ruff, numpy,
# matplotlib, jsonschema, pyarrow; no engine. Prints the venv's python path as the last line of stdout.
#
#   scripts/setup_dev_env.sh     # build or reuse
#
# Lives outside the checkout, keyed by the lock and the Python version:
# ${MOE_ROUTES_CACHE:-~/.cache/moe-routes}/venv-dev-<key>.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MOE_ROUTES_CACHE:-$HOME/.cache/moe-routes}
PY=${MOE_ROUTES_PYTHON:-python3}
log() { echo "setup_dev_env: $*" >&2; }

pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$(cat "$ROOT/locks/dev.txt" <(echo "$pyver") | sha256sum | cut -c1-12)
VENV="$CACHE/venv-dev-$key"
if [ ! -f "$VENV/.complete" ]; then
  log "building $VENV"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location 'file:" >&2 || true
  "$VENV/bin/python" -m pip install -q -r "$ROOT/locks/dev.txt" 2>&1 \
    | grep -v "^WARNING: Location 'file:" >&2 || true
  "$VENV/bin/python" -c "import pytest, numpy, matplotlib, jsonschema, pyarrow" && "$VENV/bin/ruff" --version >/dev/null
  touch "$VENV/.complete"
else
  log "reusing $VENV"
fi
echo "$VENV/bin/python"
