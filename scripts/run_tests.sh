#!/usr/bin/env bash
# The test command (README, CI): build or reuse the environments, apply the patch series, run pytest.
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
if [ $fast_only = 1 ]; then
  exec "$DEV_PY" -m pytest -ra "$@" tests
fi
# Fetch the clean pinned releases into the cache (first run only) and check both series against them
# before anything else: the tests and ./test.sh --offline then find them there.
python3 -m moe_routes verify >&2
PY=$(scripts/setup_cpu_env.sh | tail -n 1)
scripts/setup_sglang_test_env.sh >&2
export MOE_ROUTES_TEST_PYTHON="$PY"
exec "$PY" -m pytest -ra "$@" tests
