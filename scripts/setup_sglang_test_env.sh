#!/usr/bin/env bash
# Build (idempotently) the CPU test venv for tests/test_sglang_*.py:
#   torch (PINS SGLANG_TORCH_CPU, PyPI build, runs on CPU) + numpy + pytest
#   + sglang==SGLANG_VERSION --no-deps (pure-Python wheel) + the light deps its
#   request/scheduler/topk modules import, then applies patches/sglang-<pin>/ to it.
# sgl_kernel (CUDA-only) is NOT installed; the tests stub it in-process.
# Reuses the venv when its marker matches (pins + patch contents); re-installs
# sglang and re-applies the series when the patches changed.
# Env: SGLANG_TEST_VENV (default $MOE_ROUTES_CACHE/sglang-test-venv), PYTHON (python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/pins.sh"
CACHE="${MOE_ROUTES_CACHE:-$HOME/.cache/moe-routes}"
VENV="${SGLANG_TEST_VENV:-$CACHE/sglang-test-venv}"
PY="${PYTHON:-python3}"
DIST="$CACHE/dist"
SERIES="$ROOT/patches/sglang-${SGLANG_VERSION}"
LIGHT_DEPS=(tqdm pybase64 requests ipython pydantic aiohttp orjson pillow starlette torchvision
  transformers pyzmq openai partial_json_parser dill sentencepiece
  compressed-tensors gguf msgspec einops fastapi uvloop setproctitle uvicorn
  jsonschema python-multipart)   # the last two: the OpenAI serving modules import them
# versions of the packages whose API the tests touch come from the SGLang lock (never written here)
LOCKED=(transformers openai jsonschema jsonschema-specifications referencing rpds-py python-multipart)
LOCK="$ROOT/locks/sglang-${SGLANG_VERSION}.txt"
locked_pins() { local n; for n in "${LOCKED[@]}"; do
  grep -E "^${n}==" "$LOCK" || { echo "setup_sglang_test_env: $n not pinned in $LOCK" >&2; exit 1; }; done; }

locked_pins >/dev/null   # fail early, not inside the marker's subshell

marker_of() {
  { echo "sglang=$SGLANG_VERSION torch=$SGLANG_TORCH_CPU deps=${LIGHT_DEPS[*]}"; locked_pins;
    cat "$SERIES/series"; for p in $(grep -v '^#' "$SERIES/series" | grep .); do cat "$SERIES/$p"; done; } | sha256sum | cut -d' ' -f1
}
WANT="$(marker_of)"
MARK="$VENV/.moe-routes-sglang-test-env"
if [[ -f "$MARK" && "$(cat "$MARK")" == "$WANT" ]] && "$VENV/bin/python" -c "import sglang, torch, numpy, pytest" 2>/dev/null; then
  echo "setup_sglang_test_env: reusing $VENV"; exit 0
fi

quiet_pip() { grep -v "^WARNING: Location 'file:" >&2 || true; }
CONS="$(mktemp)"; trap 'rm -f "$CONS"' EXIT
{ printf 'torch==%s\n' "$SGLANG_TORCH_CPU"; locked_pins; } > "$CONS"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONS")
"${PIP[@]}" "torch==$SGLANG_TORCH_CPU" numpy pytest 2>&1 | quiet_pip
"${PIP[@]}" "${LIGHT_DEPS[@]}" 2>&1 | quiet_pip
WHL="$DIST/sglang-${SGLANG_VERSION}-py3-none-any.whl"
SRC="sglang==$SGLANG_VERSION"; [[ -f "$WHL" ]] && SRC="$WHL"
# fresh, unpatched sglang every time the marker changes (patches are applied below)
SP="$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
"$VENV/bin/python" -m pip uninstall -q -y sglang >/dev/null 2>&1 || true
rm -rf "$SP/sglang"                   # also drops files the series added
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$SRC" 2>&1 | quiet_pip
rm -f "$SP/.moe-routes-sglang.json"   # patch state file of the replaced install
PYTHONPATH="$ROOT" "$PY" -m moe_routes patch apply --engine sglang --python "$VENV/bin/python"
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$SGLANG_TORCH_CPU'), torch.__version__"
echo "$WANT" > "$MARK"
echo "setup_sglang_test_env: ready $VENV"
