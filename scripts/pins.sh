# Sourced by the scripts (not run): PINS as shell variables, the vLLM pins and their facts.
#   source "$ROOT/scripts/pins.sh"
#   vllm_pin_or_die "${VLLM:-$VLLM_DEFAULT}"      # a listed pin, else an error naming them
#   vllm_fact 0.15.1 TORCH_CPU                     # 2.10.0 (PINS key VLLM_0_15_1_TORCH_CPU)
#   vllm_lock 0.15.1 cpu                           # $ROOT/locks/vllm-0.15.1-cpu.txt
# Values are quoted on the way in: VLLM_VERSIONS lists several pins separated by spaces.
# shellcheck disable=SC1090,SC1091
source <(grep -E '^[A-Z][A-Z0-9_]*=' "$ROOT/PINS" | sed -E "s/^([A-Z][A-Z0-9_]*)=(.*)$/\1='\2'/")
# oldest first: the last is the newest, the default everywhere
VLLM_DEFAULT=${VLLM_VERSIONS##* }

vllm_fact() {  # PIN FACT
  local key="VLLM_${1//[^A-Za-z0-9]/_}_$2"
  if [ -z "${!key:-}" ]; then echo "PINS has no $key (vLLM $1's $2)" >&2; return 1; fi
  echo "${!key}"
}

vllm_pin_or_die() {  # PIN
  case " $VLLM_VERSIONS " in
    *" $1 "*) ;;
    *) echo "vLLM $1 is not pinned: PINS VLLM_VERSIONS=\"$VLLM_VERSIONS\" (the default is the last)" >&2; exit 2 ;;
  esac
}

vllm_lock() {  # PIN cpu|gpu
  echo "$ROOT/locks/vllm-$1-$2.txt"
}
