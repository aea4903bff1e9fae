#!/usr/bin/env bash
# The test command (README, CI): ruff and patch lint, build or reuse the environments, apply the patch
# series, run pytest.
#   scripts/run_tests.sh                 # everything: the real patched engines on CPU (minutes)
#   scripts/run_tests.sh -m fast         # pure-logic tests only, in the light dev venv, no engine (seconds)
#   scripts/run_tests.sh -k plot -x      # extra arguments go to pytest
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
fast_only=0
prev=""
for arg in "$@"; do
  { [ "$prev" = "-m" ] && [ "$arg" = fast ]; } && fast_only=1
  prev=$arg
done
DEV_PY=$(scripts/setup_dev_env.sh | tail -n 1)
# Style and the generated patches first, in both modes: every Python file (engine sources under files/
# included) ruff-clean and formatted, every committed patch equal to what its sources generate.
RUFF="$(dirname "$DEV_PY")/ruff"
if ! "$RUFF" check . || ! "$RUFF" format --check .; then
  echo "run_tests: ruff found the problems above; fix them ($RUFF check --fix . && $RUFF format .)" >&2
  exit 1
fi
"$DEV_PY" -m moe_routes patch lint >&2
if [ $fast_only = 1 ]; then
  exec "$DEV_PY" -m pytest -ra "$@" tests
fi
# Fetch the clean pinned releases into the cache (first run only) and check both series against them
# before anything else: the tests and ./test.sh --offline then find them there.
"$DEV_PY" -m moe_routes verify >&2
PY=$(scripts/setup_cpu_env.sh | tail -n 1)
scripts/setup_sglang_test_env.sh >&2
export MOE_ROUTES_TEST_PYTHON="$PY"
exec "$PY" -m pytest -ra "$@" tests
