#!/usr/bin/env bash
# The test command (README, CI): ruff and patch lint, the pure-logic tests, verify, then for every vLLM pin its
# environment (built or reused, its series applied) and the engine tests in it, then the SGLang tests.
#   scripts/run_tests.sh                 # everything: the real patched engines on CPU, every vLLM pin (minutes)
#   scripts/run_tests.sh -m fast         # pure-logic tests only, in the light dev venv, no engine (seconds)
#   scripts/run_tests.sh -k plot -x      # extra arguments go to every pytest run
# A pin that fails does not stop the others; the summary names each run's result and the exit status is 1.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/pins.sh
fast_only=0
prev=""
for arg in "$@"; do
  { [ "$prev" = "-m" ] && [ "$arg" = fast ]; } && fast_only=1
  prev=$arg
done
DEV_PY=$(scripts/setup_dev_env.sh | tail -n 1)
# Style and the generated patches first, in both modes: every Python file (engine sources under files/ and
# shared/ included) ruff-clean and formatted, every committed patch equal to what its sources generate.
RUFF="$(dirname "$DEV_PY")/ruff"
if ! "$RUFF" check . || ! "$RUFF" format --check .; then
  echo "run_tests: ruff found the problems above; fix them ($RUFF check --fix . && $RUFF format .)" >&2
  exit 1
fi
"$DEV_PY" -m moe_routes patch lint >&2
if [ $fast_only = 1 ]; then
  exec "$DEV_PY" -m pytest -ra "$@" tests
fi

results=()
failed=0
# run LABEL COMMAND...: a pytest run; 5 (nothing collected) counts as a pass only when the caller's arguments
# (-k, a path) narrowed the selection
run() {
  local label=$1 rc=0; shift
  echo "==== run_tests: $label" >&2
  "$@" || rc=$?
  if [ $rc = 5 ] && [ "$user_args" = 1 ]; then rc=0; fi
  if [ $rc = 0 ]; then results+=("PASS  $label"); else results+=("FAIL  $label (exit $rc)"); failed=1; fi
}
user_args=0; [ $# -gt 0 ] && user_args=1

# 1. the pure-logic tests (tooling included), once, in the dev venv
run "fast tests (dev venv)" "$DEV_PY" -m pytest -ra -m fast "$@" tests
# 2. fetch the clean releases of every pin into the cache (first run only) and prove every series on them
run "verify (every series, every release layout)" "$DEV_PY" -m moe_routes verify
# 3. every vLLM pin: its venv, its series, the tests (the fast ones again: the log module's tests then import the
#    installed, patched copy; not the tooling's nor SGLang's)
DEFAULT_PY=""
for pin in $VLLM_VERSIONS; do
  if ! PY=$(scripts/setup_cpu_env.sh --vllm "$pin" | tail -n 1); then
    results+=("FAIL  vLLM $pin: environment (scripts/setup_cpu_env.sh --vllm $pin)"); failed=1; continue
  fi
  [ "$pin" = "$VLLM_DEFAULT" ] && DEFAULT_PY=$PY
  run "vLLM $pin engine tests ($PY)" env MOE_ROUTES_VLLM_PIN="$pin" MOE_ROUTES_TEST_PYTHON="$PY" \
    "$PY" -m pytest -ra --ignore=tests/test_patch_tooling.py --ignore-glob='tests/test_sglang_*' "$@" tests
done
# 4. SGLang, once: its own venv (the test drives it); the outer pytest runs in the default pin's venv
if scripts/setup_sglang_test_env.sh >&2 && [ -n "$DEFAULT_PY" ]; then
  run "SGLang tests" "$DEFAULT_PY" -m pytest -ra "$@" tests/test_sglang_*.py
else
  results+=("FAIL  SGLang: environment (scripts/setup_sglang_test_env.sh, or the default vLLM venv)"); failed=1
fi

echo "==== run_tests: summary" >&2
printf '%s\n' "${results[@]}" >&2
exit $failed
