#!/usr/bin/env bash
# moe-routes main job: environment -> patch -> verify -> run_generate.py -> plot_hist.py -> artifacts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
source scripts/pins.sh

usage() {
  cat <<EOF
Usage: ./test.sh [options]

Runs the first GSM8K test questions through an MoE model with and without routing capture and leaves
moe_routes.jsonl, timing.json, generations.jsonl, expert_hist.png, expert_heatmap.png and
expert_stats.json in --out-dir.

  --device auto|gpu|cpu  auto (default): gpu when nvidia-smi sees a GPU, else cpu
  --vllm VERSION         which pinned vLLM (environment, lock file and patch series): $VLLM_VERSIONS
                         (PINS VLLM_VERSIONS; default: the newest, $VLLM_DEFAULT)
  --model M              default: $GPU_DEFAULT_MODEL on gpu, $CPU_DEFAULT_MODEL on cpu;
                         offline cpu: a tiny random-weight MoE built locally
  --offline              no Hugging Face access: local model (or the tiny random one) and --prompts-file
  --prompts-file F       JSONL with a 'question' field (e.g. ../shared/data/gsm8k/test.jsonl)
  --num-prompts N        default 25
  --max-tokens N         default 256 (gpu) / 64 (cpu) / 512 with --ignore-eos (the tiny random model)
  --repeats N            measured runs per mode and round, default 3
  --rounds N             default 2: both engines started afresh each round, round 2 in the other order
  --enforce-eager        no CUDA graphs / torch.compile
  --out-dir DIR          default ./out
  -h, --help             this text

Examples:
  ./test.sh                                   # GPU box with network: the full job; on CPU with no
                                              #   reachable hub it takes the offline path, loudly
  ./test.sh --offline --prompts-file ../shared/data/gsm8k/test.jsonl   # no GPU, no network
  ./test.sh --vllm 0.15.1 ...                 # an older pin
EOF
}

GPU_DEFAULT_MODEL="Qwen/Qwen1.5-MoE-A2.7B-Chat"
CPU_DEFAULT_MODEL="ibm-granite/granite-3.1-1b-a400m-instruct"
DEVICE=auto; VLLM=$VLLM_DEFAULT; MODEL=""; OFFLINE=0; PROMPTS=""; NUM_PROMPTS=25; MAX_TOKENS=""; REPEATS=3; ROUNDS=2
EAGER=""; OUT="$ROOT/out"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --vllm) VLLM=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --prompts-file) PROMPTS=$2; shift 2 ;;
    --num-prompts) NUM_PROMPTS=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --enforce-eager) EAGER=--enforce-eager; shift ;;
    --out-dir) OUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "test.sh: unknown option $1 (see ./test.sh --help)" >&2; exit 2 ;;
  esac
done
die() { echo "test.sh: $*" >&2; exit 1; }
say() { echo "== test.sh: $*"; }
vllm_pin_or_die "$VLLM"
CACHE=${MOE_ROUTES_CACHE:-$HOME/.cache/moe-routes}
mkdir -p "$CACHE" "$OUT"
OUT=$(cd "$OUT" && pwd)

# ---- what machine is this -------------------------------------------------------------------------
has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then has_gpu=1; fi
case "$DEVICE" in
  auto) [ $has_gpu = 1 ] && DEVICE=gpu || DEVICE=cpu ;;
  gpu) [ $has_gpu = 1 ] || die "--device gpu, but nvidia-smi finds no GPU (is the NVIDIA driver installed?)" ;;
  cpu) ;;
  *) die "--device must be auto, gpu or cpu" ;;
esac
if [ "$DEVICE" = gpu ]; then
  drv=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)
  min_drv=$(vllm_fact "$VLLM" MIN_NVIDIA_DRIVER)
  [ "${drv%%.*}" -ge "$min_drv" ] || die "NVIDIA driver $drv is too old: vLLM $VLLM's torch $(vllm_fact "$VLLM" TORCH_GPU) (CUDA $(vllm_fact "$VLLM" CUDA)) needs >= $min_drv"
  need_gb=40
else
  need_gb=12
fi
free_gb=$(df -Pk "$CACHE" | awk 'NR==2 {print int($4/1048576)}')
[ "$free_gb" -ge "$need_gb" ] || [ -n "${MOE_ROUTES_SKIP_DISK_CHECK:-}" ] || \
  die "only ${free_gb} GB free under $CACHE; the $DEVICE environment and model need about ${need_gb} GB"
# A newcomer's first run must not die an hour in on a missing network: ask the hub once, now.
SHARED_PROMPTS="$(cd "$ROOT/.." && pwd)/shared/data/gsm8k/test.jsonl"
hub_reachable() {
  [ -z "${HF_HUB_OFFLINE:-}" ] || [ "${HF_HUB_OFFLINE}" = 0 ] || return 1
  curl -fsS -m 8 -o /dev/null "${HF_ENDPOINT:-https://huggingface.co}/api/models?limit=1" 2>/dev/null
}
if [ $OFFLINE = 0 ] && ! { [ -n "$MODEL" ] && [ -d "$MODEL" ]; } && ! hub_reachable; then
  if [ "$DEVICE" = cpu ] && [ -z "$MODEL" ] && [ -f "${PROMPTS:-$SHARED_PROMPTS}" ]; then
    PROMPTS=${PROMPTS:-$SHARED_PROMPTS}; OFFLINE=1
    cat >&2 <<EOF
######################################################################################################
test.sh: NOTE: the model hub (${HF_ENDPOINT:-https://huggingface.co}) is not reachable from this machine.
Taking the OFFLINE path: a tiny RANDOM-weight MoE built locally, prompts from $PROMPTS.
Its routing statistics mean nothing; it checks the pipeline end to end. For the real model, run with
network access (or HF_ENDPOINT set to a mirror); to choose this path explicitly: ./test.sh --offline --prompts-file F
######################################################################################################
EOF
  else
    die "the model hub (${HF_ENDPOINT:-https://huggingface.co}) is not reachable and ${MODEL:-the default model} is not a local directory. Run with network access, or offline: ./test.sh --offline --prompts-file $SHARED_PROMPTS [--model LOCAL_MODEL_DIR]"
  fi
fi
if [ $OFFLINE = 1 ] && [ -z "$PROMPTS" ]; then
  die "--offline needs --prompts-file (a JSONL with a 'question' field, e.g. ../shared/data/gsm8k/test.jsonl)"
fi
[ -z "$PROMPTS" ] || [ -f "$PROMPTS" ] || die "--prompts-file $PROMPTS does not exist"
say "vLLM $VLLM, device: $DEVICE, offline: $OFFLINE, artifacts: $OUT"

# ---- environment + patches ------------------------------------------------------------------------
if [ "$DEVICE" = gpu ]; then
  LOCK=$(vllm_lock "$VLLM" gpu)
  key=$(cat "$LOCK" | sha256sum | cut -c1-12)
  VENV="$CACHE/venv-gpu-$key"
  if [ ! -f "$VENV/.complete" ]; then
    say "creating $VENV from $LOCK"
    rm -rf "$VENV"; python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$LOCK"
    touch "$VENV/.complete"
  fi
  PY="$VENV/bin/python"
  scripts/ensure_vllm_patched.sh "$PY" vllm "$VLLM"
else
  PY=$(scripts/setup_cpu_env.sh --vllm "$VLLM" | tail -n 1)
fi
say "verifying the vLLM $VLLM series: installed copy, then the clean pinned release"
"$PY" -m moe_routes patch status --engine vllm --pin "$VLLM" --python "$PY"
if [ $OFFLINE = 1 ]; then "$PY" -m moe_routes verify --engine vllm --pin "$VLLM" --offline || \
    die "the clean vLLM $VLLM releases are not cached under $CACHE/dist; run once with network"
else "$PY" -m moe_routes verify --engine vllm --pin "$VLLM"; fi

# ---- model + prompts ------------------------------------------------------------------------------
DTYPE=auto; TINY=0
if [ -z "$MODEL" ]; then
  if [ "$DEVICE" = gpu ]; then MODEL=$GPU_DEFAULT_MODEL
  elif [ $OFFLINE = 1 ]; then
    MODEL="$OUT/tiny-random-moe"
    say "offline CPU run: building a tiny random-weight Qwen2-MoE in $MODEL"
    "$PY" -m moe_routes tiny-model --arch qwen2_moe --out "$MODEL" --prompts-file "$PROMPTS" >/dev/null
    DTYPE=float32; TINY=1
    echo "NOTE: this model has RANDOM weights: its routing statistics mean nothing; the run checks the pipeline."
  else MODEL=$CPU_DEFAULT_MODEL; DTYPE=bfloat16; fi
fi
# Timed work: the tiny random model runs 25 x 64 tokens in ~0.2 s on CPU, too short for a ratio that means
# anything; 512 tokens (--ignore-eos: random weights end at random, every run does the same work) take ~2 s a
# run on a 2-core VM. Two rounds (run_generate --rounds): the engine started first can be the slower one
# (moe_routes/generate.py engine_start_order), so each order is measured once and the runs pooled.
if [ -z "$MAX_TOKENS" ]; then
  if [ "$DEVICE" = gpu ]; then MAX_TOKENS=256; elif [ $TINY = 1 ]; then MAX_TOKENS=512; else MAX_TOKENS=64; fi
fi
GEN_ARGS=(--model "$MODEL" --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" --repeats "$REPEATS"
          --rounds "$ROUNDS" --dtype "$DTYPE" --out-dir "$OUT")
[ $TINY = 1 ] && GEN_ARGS+=(--ignore-eos)
[ -n "$PROMPTS" ] && GEN_ARGS+=(--prompts-file "$PROMPTS")
[ -n "$EAGER" ] && GEN_ARGS+=("$EAGER")
[ "$DEVICE" = cpu ] && export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
[ $OFFLINE = 1 ] && export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# ---- run ------------------------------------------------------------------------------------------
say "run_generate.py ${GEN_ARGS[*]}"
"$PY" run_generate.py "${GEN_ARGS[@]}"
say "plot_hist.py"
"$PY" plot_hist.py "$OUT/moe_routes.jsonl" --out-dir "$OUT"
say "done. Artifacts:"
for f in moe_routes.jsonl timing.json generations.jsonl expert_hist.png expert_heatmap.png expert_stats.json; do
  [ -f "$OUT/$f" ] || die "missing artifact $OUT/$f"
  echo "  $OUT/$f"
done
