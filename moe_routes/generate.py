"""Generate answers to the first N GSM8K test questions with MoE routing capture on and off, and time both.

Writes, into --out-dir:
  moe_routes.jsonl   routing of one measured run (schemas/moe_routes.schema.json)
  timing.json        per-mode runs, medians, the log/no-log throughput ratio, token identity, provenance
  generations.jsonl  prompt, generated text and token ids per request (log-mode run)

Both modes run in one invocation: two engines live side by side (one with routing capture on, one without),
each gets a warm-up run, then the measured runs alternate (log, no-log, no-log, log, ...) and medians are
reported. In timing.json "log" means routing on and "nolog" routing off, whatever the source of the routing
(--routing-source, vLLM only):
  log      the engine writes the routing log: VLLM_LOG_MOE on one engine (each engine process reads the
           variable when it starts); the default
  offline  routing returned per completion: LLM(enable_return_routed_experts=True,
           enable_return_routed_expert_weights=True), CompletionOutput.routed_experts / routed_expert_weights
  offline-weights  the weights' share of that: ids and weights returned vs ids only (routing off = the ids-only
           engine); the records come from the engine that returns both
  http     routing returned per choice by two local OpenAI servers that run_generate starts itself
           (python -m vllm.entrypoints.openai.api_server, one with --enable-return-routed-experts
           --enable-return-routed-expert-weights); prompts go to /v1/completions through the openai client,
           concurrently; server output goes to vllm_server_{log,nolog}.log in --out-dir
offline and http write moe_routes.jsonl in the log's schema from the returned arrays (MoE layers only, see
moe_routes/routed_experts.py).

Examples:
  # GPU box, defaults: Qwen/Qwen1.5-MoE-A2.7B-Chat, 25 prompts, 256 new tokens, 3 repeats
  python run_generate.py                  # or: moe-routes generate
  # offline, local prompts and a local model directory
  python run_generate.py --model /path/to/model --prompts-file ../shared/data/gsm8k/test.jsonl
  # routing returned by vllm.LLM (enable_return_routed_experts) instead of the log
  python run_generate.py --routing-source offline --model /path/to/model --prompts-file ../shared/data/gsm8k/test.jsonl
  # routing returned over HTTP by two local vLLM OpenAI servers (needs the openai package)
  python run_generate.py --routing-source http --server-timeout 1200 --prompts-file ../shared/data/gsm8k/test.jsonl
  # SGLang (patched with patches/sglang-*/): routing returned per request, written in the same schema
  python run_generate.py --engine sglang --model Qwen/Qwen1.5-MoE-A2.7B-Chat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moe_routes import REPO_ROOT as ROOT
from moe_routes import vllm_args
from moe_routes.prompts import PromptsFileError, read_questions
from moe_routes.schema import schema_version

DEFAULT_MODEL = "Qwen/Qwen1.5-MoE-A2.7B-Chat"


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def load_questions(args) -> list[str]:
    if args.prompts_file:
        try:
            out = read_questions(args.prompts_file, args.num_prompts)
        except PromptsFileError as exc:
            raise SystemExit(f"run_generate: --prompts-file {exc}") from None
    else:
        try:
            import datasets
        except ImportError:
            raise SystemExit(
                "run_generate: the 'datasets' package is needed to load openai/gsm8k; install it or pass --prompts-file"
            ) from None
        try:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split="test")
        except Exception as exc:
            raise SystemExit(
                f"run_generate: could not load {args.dataset} ({exc.__class__.__name__}: {exc}); "
                "without network access pass --prompts-file ../shared/data/gsm8k/test.jsonl"
            ) from None
        out = [row["question"] for row in ds.select(range(min(args.num_prompts, len(ds))))]
    if len(out) < args.num_prompts:
        raise SystemExit(f"run_generate: asked for {args.num_prompts} prompts, found {len(out)}")
    return out


def build_prompts(questions: list[str], tokenizer, use_chat_template: bool) -> list[str]:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions
        ]
    return list(questions)


# ------------------------------------------------------------------------------------------------
# provenance
# ------------------------------------------------------------------------------------------------
def git_info() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def series_info(engine: str, engine_version: str) -> dict:
    """The series of the pin the installed engine is (its version without a local label, e.g. 0.32.0+cpu)."""
    from moe_routes.patching.engines import check_pin, series_dir
    from moe_routes.patching.errors import PatchError
    from moe_routes.patching.series import load_patches

    try:
        d = series_dir(engine, check_pin(engine, engine_version.split("+")[0]))
    except PatchError as exc:  # an engine this repository has no series for: say so, do not fail the run
        return {"series": f"none ({exc})", "patches": []}
    return {"series": d.name, "patches": [{"name": p.name, "sha256": p.sha256} for p in load_patches(d)]}


def device_info() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:
        pass
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} logical cores)"


def run_stats(wall: float, prompt_tokens: int, generated_tokens: int) -> dict:
    return {
        "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "tokens_per_s": (prompt_tokens + generated_tokens) / wall,
        "generated_tokens_per_s": generated_tokens / wall,
    }


def measure_alternating(one, repeats: int, progress=None) -> tuple[dict, dict, dict]:
    """A warm-up per mode, then `repeats` measured runs per mode in alternating order (log, no-log,
    no-log, log, ...), so that drift on the machine hits both modes alike. one(mode) -> (outputs, stats).
    Returns warm-up stats, measured stats and outputs per mode."""
    warmup = {mode: one(mode)[1] for mode in ("log", "nolog")}
    order = []
    for r in range(repeats):
        order += ["log", "nolog"] if r % 2 == 0 else ["nolog", "log"]
    runs, outputs = {"log": [], "nolog": []}, {"log": [], "nolog": []}
    for mode in progress(order) if progress else order:
        outs, stats = one(mode)
        runs[mode].append(stats)
        outputs[mode].append(outs)
    return warmup, runs, outputs


def engine_start_order(round_index: int) -> tuple[str, str]:
    """Which engine (or server) a round starts first: the log one in round 1, the no-log one in round 2, and so
    on. The engine started first is not a neutral choice: with two identical engines (vLLM 0.32.0's CPU build,
    2-core box, A/A runs of run_generate on an unpatched vLLM) the one started first ran 5-10 % slower in 7 of 8
    sessions, and the one started second faster in 3 of 3 sessions with the order swapped; one round books that
    as logging overhead (or gain). --rounds 2 measures both orders and pools their runs."""
    return ("log", "nolog") if round_index % 2 == 0 else ("nolog", "log")


def merge_rounds(rounds: list[dict]) -> dict:
    """rounds: per round {"start_order", "startup_s", "warmup", "runs", "outputs"} (runs/outputs per mode) ->
    what main() and timing.json take: round 1's start-up and warm-up (as with one round), every round's runs
    (each tagged with its "round", 1-based) and outputs, and "rounds" (start order, start-up, warm-up per
    round)."""
    runs, outputs = {"log": [], "nolog": []}, {"log": [], "nolog": []}
    for i, rd in enumerate(rounds, 1):
        for mode in runs:
            runs[mode] += [{**st, "round": i} for st in rd["runs"][mode]]
            outputs[mode] += rd["outputs"][mode]
    detail = [
        {"round": i, "start_order": list(rd["start_order"]), "startup_s": rd["startup_s"], "warmup": rd["warmup"]}
        for i, rd in enumerate(rounds, 1)
    ]
    return {
        "startup": rounds[0]["startup_s"],
        "warmup": rounds[0]["warmup"],
        "runs": runs,
        "outputs": outputs,
        "rounds": detail,
    }


def all_identical(token_lists: dict) -> bool:
    """token_lists[mode][run] = per-request token ids; True when every run of every mode matches."""
    first = token_lists["log"][0]
    return all(t == first for runs in token_lists.values() for t in runs)


def is_random_weight_model(model: str) -> bool:
    """Models built by `moe-routes tiny-model` carry a tinymoe.json marker: their routing means nothing."""
    return (Path(model) / "tinymoe.json").exists()


# ------------------------------------------------------------------------------------------------
# vLLM
# ------------------------------------------------------------------------------------------------
ROUTING_SOURCES = ("log", "offline", "offline-weights", "http")
# What the modes "log" / "nolog" of timing.json mean for each routing source ("routing on" / "routing off").
MODE_MEANING = {
    "log": {
        "log": "VLLM_LOG_MOE set: the engine writes the routing log",
        "nolog": "the same engine without VLLM_LOG_MOE",
    },
    "offline": {
        "log": "LLM(enable_return_routed_experts=True, enable_return_routed_expert_weights=True): routing returned "
        "on every CompletionOutput",
        "nolog": "the same LLM without them",
    },
    "offline-weights": {
        "log": "LLM(enable_return_routed_experts=True, enable_return_routed_expert_weights=True): ids and weights "
        "returned on every CompletionOutput",
        "nolog": "LLM(enable_return_routed_experts=True): ids only",
    },
    "http": {
        "log": "vLLM OpenAI server with --enable-return-routed-experts --enable-return-routed-expert-weights: "
        "routing returned base64 .npy on every choice of /v1/completions",
        "nolog": "the same server without them",
    },
    "sglang": {
        "log": "sglang.Engine(enable_return_expert_routing=True), return_expert_routing=True per request",
        "nolog": "the same engine without them",
    },
}
ROUTED_EXPERTS_ENGINE_ARGS = {"enable_return_routed_experts": True, "enable_return_routed_expert_weights": True}
# LLM kwargs of the offline sources' engines, per mode (the log source's engines differ by VLLM_LOG_MOE only)
OFFLINE_ENGINE_ARGS = {
    "offline": {"log": ROUTED_EXPERTS_ENGINE_ARGS, "nolog": {}},
    "offline-weights": {"log": ROUTED_EXPERTS_ENGINE_ARGS, "nolog": {"enable_return_routed_experts": True}},
}
HTTP_MAX_CONCURRENCY = 256


def vllm_engine_kwargs(args) -> dict:
    """The engine arguments every vLLM engine of a run gets (LLM kwargs; the http source passes them as CLI flags
    with server_cli_args): what the installed vLLM pin needs on this device (moe_routes/vllm_args.py, e.g. 0.32.0's
    block_size and gpu_memory_utilization on CPU), then the run's arguments, which win."""
    kwargs = vllm_args.installed_engine_defaults()
    kwargs.update(
        model=args.model,
        seed=args.seed,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        trust_remote_code=args.trust_remote_code,
    )
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs


def server_cli_args(kwargs: dict) -> list[str]:
    """LLM kwargs -> the engine's command-line flags (`--max-model-len 2048`, `--enforce-eager`); False and None
    are left out (the defaults)."""
    out = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


def start_vllm(args, log_path: str | None, routed_experts: dict | None = None):
    """routed_experts: the per-request return's LLM kwargs (OFFLINE_ENGINE_ARGS), if any."""
    from vllm import LLM

    if log_path:
        os.environ["VLLM_LOG_MOE"] = log_path
    else:
        os.environ.pop("VLLM_LOG_MOE", None)
    kwargs = vllm_engine_kwargs(args)
    kwargs.update(routed_experts or {})
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    os.environ.pop("VLLM_LOG_MOE", None)
    return llm, time.perf_counter() - t0


def routes_meta(args, *, engine: str, engine_version: str, source: str, **fields) -> dict:
    """The meta record of a moe_routes.jsonl that run_generate writes from routing returned per request (SGLang,
    vLLM's offline and http sources); the engine log writes its own. fields: num_experts, top_k,
    num_hidden_layers, moe_layers, kernel_routed_scaling_factor, config_routed_scaling_factor."""
    series = series_info(engine, engine_version)
    meta = {
        "type": "meta",
        "schema_version": schema_version(),
        "engine": engine,
        "engine_version": engine_version,
        f"{engine}_version": engine_version,
        "torch_version": __import__("torch").__version__,
        "model_id": args.model,
        "device": device_info(),
        "seed": args.seed,
        "num_experts": int(fields["num_experts"]),
        "top_k": int(fields["top_k"]),
        "num_hidden_layers": int(fields["num_hidden_layers"]),
        "moe_layers": [int(x) for x in fields["moe_layers"]],
        "layers_logged": [int(x) for x in fields["moe_layers"]],
        "id_kind": "logical",
        "routing_source": "kernel",
        "returned_via": source,
        "patch_series": series["series"],
        "kernel_routed_scaling_factor": fields["kernel_routed_scaling_factor"],
        "config_routed_scaling_factor": fields["config_routed_scaling_factor"],
        "patches": series["patches"],
        "writer": {"pid": os.getpid(), "host": socket.gethostname()},
        "created_unix": time.time(),
    }
    if is_random_weight_model(args.model):
        meta["random_weights"] = True
    return meta


def check_returned_per_mode(source: str, outputs: dict) -> None:
    """Each engine of an offline source returned what MODE_MEANING says (its kwargs: OFFLINE_ENGINE_ARGS): else
    the ratio would compare something else without a word. outputs[mode][run] = RequestOutputs."""
    for mode, kwargs in OFFLINE_ENGINE_ARGS[source].items():
        flags = ("enable_return_routed_experts", "enable_return_routed_expert_weights")
        want = tuple(bool(kwargs.get(k)) for k in flags)
        for o in outputs[mode][0]:
            c = o.outputs[0]
            got = tuple(getattr(c, k, None) is not None for k in ("routed_experts", "routed_expert_weights"))
            if got != want:
                raise SystemExit(
                    f"run_generate: --routing-source {source}: the {mode} engine ({MODE_MEANING[source][mode]}) "
                    f"returned ids: {got[0]}, weights: {got[1]} for request {o.request_id}"
                )


def check_routing_layout(hf_config, source: str) -> None:
    """Before any measured run: the returned arrays can only be written as route records when
    moe_layer_indices knows the model."""
    from moe_routes.routed_experts import routing_layout

    try:
        layout = routing_layout(hf_config)
    except ValueError as exc:
        raise SystemExit(f"run_generate: --routing-source {source}: {exc}") from None
    if layout["num_experts"] is None:
        raise SystemExit(f"run_generate: --routing-source {source}: the model config names no routed expert count")


def write_returned_routes(args, out_path: Path, hf_config, items: list[dict], *, engine_version: str, source: str):
    """moe_routes.jsonl from routing returned per completion (vLLM offline / http). items: {"req_id",
    "routed" (RoutedExperts), "num_tokens" (prompt + generated), "num_cached_tokens"}. Only the MoE layers are
    written (moe_layer_indices, cross-checked against the arrays: dense rows all zero, MoE rows weighted)."""
    from moe_routes.records import iter_route_records, write_routes
    from moe_routes.routed_experts import check_layer_layout, moe_rows, routing_layout

    layout = routing_layout(hf_config)
    num_layers, moe_layers = layout["num_hidden_layers"], layout["moe_layers"]
    num_experts, top_k = layout["num_experts"], layout["top_k"]
    if num_experts is None:
        raise ValueError(f"{args.model}: the config names no routed expert count (num_experts / n_routed_experts)")
    for it in items:
        routed = it["routed"]
        where = f"request {it['req_id']}"
        try:
            if routed.weights is None:
                raise ValueError("no routed_expert_weights (the engine was started without them)")
            routed.check(num_tokens=it["num_tokens"], num_layers=num_layers, top_k=top_k, num_experts=num_experts)
            check_layer_layout(routed, moe_layers)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    meta = routes_meta(
        args,
        engine="vllm",
        engine_version=engine_version,
        source=source,
        num_experts=num_experts,
        top_k=items[0]["routed"].top_k if items else top_k,
        num_hidden_layers=num_layers,
        moe_layers=moe_layers,
        # the returned weights are what the kernel applied; whether the kernel or the model applied the config's
        # routed_scaling_factor is a property of the model code the arrays do not carry (the engine log says it)
        kernel_routed_scaling_factor=None,
        config_routed_scaling_factor=layout["routed_scaling_factor"],
    )

    def records():
        for it in items:
            r = it["routed"]
            yield from iter_route_records(
                it["req_id"],
                moe_rows(r.ids, moe_layers),
                moe_rows(r.weights, moe_layers),
                moe_layers,
                token_start=r.prompt_start,
                num_cached_tokens=it["num_cached_tokens"],
            )

    with open(out_path, "w") as f:
        return write_routes(f, meta, records())


def write_generations(out_dir: Path, questions: list[str], rows: list[dict]) -> None:
    """generations.jsonl; rows: {"req_id", "prompt_tokens", "text", "token_ids"} in question order."""
    with open(out_dir / "generations.jsonl", "w") as f:
        for q, r in zip(questions, rows, strict=True):
            rec = {"req_id": r["req_id"], "question": q, "prompt_tokens": r["prompt_tokens"]}
            rec.update(text=r["text"], token_ids=r["token_ids"])
            f.write(json.dumps(rec) + "\n")


def keep_first_run_routes(scratch: Path, keep: set[str], out_path: Path, random_weights: bool) -> int:
    """The log source: copy the meta records and the routing of the requests in `keep` out of the log of every
    run; returns the number of records kept."""
    n_records = 0
    with open(scratch) as src, open(out_path, "w") as dst:
        for line in src:
            if line.startswith('{"type":"meta"'):
                if random_weights:
                    meta = json.loads(line)
                    meta["random_weights"] = True
                    line = json.dumps(meta, separators=(",", ":")) + "\n"
                dst.write(line)
                continue
            # route lines start '{"type":"route","req_id":"ID"' (the writer's fixed layout); gaps go via json
            if line.startswith('{"type":"route","req_id":"'):
                rid = line[26 : line.index('"', 26)]
            else:
                rid = json.loads(line)["req_id"]
            if rid in keep:
                dst.write(line)
                n_records += 1
    return n_records


def vllm_result(merged: dict, identical, n_records, routed_request_ids) -> dict:
    """What run_vllm / run_vllm_http hand to main() for timing.json (merged: merge_rounds)."""
    import torch
    import vllm

    return {
        "engine": "vllm",
        "engine_version": vllm.__version__,
        "torch_version": torch.__version__,
        "startup_s": merged["startup"],
        "warmup": merged["warmup"],
        "runs": merged["runs"],
        "rounds": merged["rounds"],
        "tokens_identical": identical,
        "route_records": n_records,
        "routed_request_ids": routed_request_ids,
    }


# a module every vLLM series adds (patches/shared/vllm/files/): present once the installed vLLM is patched
PATCHED_VLLM_MODULE = "vllm.model_executor.layers.moe_routes_log"


def require_patched_vllm(source: str) -> None:
    """Before any engine starts: the log and the per-request weights exist only in a patched vLLM (an unpatched one
    would run both modes and then find no log, or refuse enable_return_routed_expert_weights)."""
    import importlib.util

    import vllm

    try:
        patched = importlib.util.find_spec(PATCHED_VLLM_MODULE) is not None
    except (ImportError, ValueError):
        patched = False
    if not patched:
        raise SystemExit(
            f"run_generate: --routing-source {source} needs the moe-routes series applied to this vLLM "
            f"({vllm.__version__}, {Path(vllm.__file__).parent}), which has no {PATCHED_VLLM_MODULE}: "
            f"python -m moe_routes patch status --engine vllm --python {sys.executable}"
        )


def run_vllm(args, questions: list[str], out_dir: Path) -> dict:
    if "VLLM_LOG_MOE" in os.environ:
        raise SystemExit("run_generate: unset VLLM_LOG_MOE; run_generate.py sets it for the logging engine itself")
    if args.routing_source == "http":
        return run_vllm_http(args, questions, out_dir)
    require_patched_vllm(args.routing_source)
    from tqdm import tqdm
    from vllm import SamplingParams

    source = args.routing_source
    rounds, first, n_records = [], None, 0
    for r in range(args.rounds):
        # the log engine of round 1 writes moe_routes.all_runs.jsonl, later rounds their own file
        scratch = out_dir / ("moe_routes.all_runs.jsonl" if r == 0 else f"moe_routes.all_runs.round{r + 1}.jsonl")
        if source == "log" and scratch.exists():
            scratch.unlink()
        order = engine_start_order(r)
        engines, startup = {}, {}
        for mode in order:
            print(
                f"run_generate: round {r + 1}/{args.rounds}: starting the {mode} engine ({MODE_MEANING[source][mode]})"
                " ...",
                flush=True,
            )
            engines[mode], startup[mode] = start_vllm(
                args,
                str(scratch) if (source == "log" and mode == "log") else None,
                routed_experts=OFFLINE_ENGINE_ARGS.get(source, {}).get(mode),
            )
        if r == 0:
            hf_config = engines["log"].llm_engine.model_config.hf_config
            if source in OFFLINE_ENGINE_ARGS:
                check_routing_layout(hf_config, source)
            prompts = build_prompts(questions, engines["log"].get_tokenizer(), not args.no_chat_template)
            sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)

        def one(mode, engines=engines, prompts=prompts, sp=sp):
            t0 = time.perf_counter()
            outs = engines[mode].generate(prompts, sp, use_tqdm=False)
            wall = time.perf_counter() - t0
            return outs, run_stats(
                wall, sum(len(o.prompt_token_ids) for o in outs), sum(len(o.outputs[0].token_ids) for o in outs)
            )

        desc = f"round {r + 1}/{args.rounds}: measured runs (alternating log / no-log)"
        warmup, runs, outputs = measure_alternating(
            one, args.repeats, lambda order, desc=desc: tqdm(order, desc=desc, unit="run")
        )
        rounds.append({"start_order": order, "startup_s": startup, "warmup": warmup, "runs": runs, "outputs": outputs})
        if r == 0:
            first = outputs["log"][0]
            if source in OFFLINE_ENGINE_ARGS:
                check_returned_per_mode(source, outputs)
            n_records = _vllm_offline_artifacts(args, questions, out_dir, first, scratch, hf_config)
        for llm in engines.values():
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        llm = None  # with engines.clear(): the next round's engines size their KV caches from the memory free
        engines.clear()
        if source == "log" and not args.keep_all_runs_log and scratch.exists():
            scratch.unlink()
    merged = merge_rounds(rounds)
    identical = all_identical(
        {m: [[list(o.outputs[0].token_ids) for o in outs] for outs in merged["outputs"][m]] for m in ("log", "nolog")}
    )
    keep = {o.request_id for o in first}
    return vllm_result(merged, identical, n_records, sorted(keep, key=lambda x: int(x) if x.isdigit() else 0))


def _vllm_offline_artifacts(args, questions, out_dir: Path, first, scratch: Path, hf_config) -> int:
    """moe_routes.jsonl and generations.jsonl from the first measured log-mode run (RequestOutputs `first`) of
    round 1; returns the number of route records written."""
    import vllm

    keep = {o.request_id for o in first}
    if args.routing_source == "log":
        # keep the routing of the first measured log run; the scratch file holds warm-up and repeats too
        n_records = keep_first_run_routes(
            scratch, keep, out_dir / "moe_routes.jsonl", is_random_weight_model(args.model)
        )
    else:
        from moe_routes.routed_experts import RoutedExperts

        try:
            items = [
                {
                    "req_id": o.request_id,
                    "routed": RoutedExperts.from_completion_output(o.outputs[0]),
                    "num_tokens": len(o.prompt_token_ids) + len(o.outputs[0].token_ids),
                    "num_cached_tokens": o.num_cached_tokens or 0,
                }
                for o in first
            ]
            n_records = write_returned_routes(
                args, out_dir / "moe_routes.jsonl", hf_config, items, engine_version=vllm.__version__, source="offline"
            )
        except ValueError as exc:
            raise SystemExit(f"run_generate: --routing-source {args.routing_source}: {exc}") from None
    write_generations(
        out_dir,
        questions,
        [
            {
                "req_id": o.request_id,
                "prompt_tokens": len(o.prompt_token_ids),
                "text": o.outputs[0].text,
                "token_ids": list(o.outputs[0].token_ids),
            }
            for o in first
        ],
    )
    return n_records


# ------------------------------------------------------------------------------------------------
# vLLM behind its OpenAI server (--routing-source http)
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def server_command(args, port: int, extra: list[str]) -> list[str]:
    """The vLLM OpenAI server of the http source: this interpreter's vLLM, the run's engine arguments."""
    return [
        *vllm_args.vllm_entry_point(sys.executable, "serve"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *server_cli_args(vllm_engine_kwargs(args)),
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens: the cached positions
        "--disable-uvicorn-access-log",
        *extra,
    ]


class VllmServer:
    """One server child (server_command) in its own process group; stop() ends the group: the API server and
    its engine-core processes. Its stdout and stderr go to log_path. Its environment is ours without the
    VLLM_LOG_MOE* variables, plus `env`."""

    def __init__(self, mode: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None):
        self.mode, self.cmd, self.port, self.log_path = mode, cmd, port, log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")} | (env or {})
        self._log = open(log_path, "w")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise SystemExit(
                    f"run_generate: the {self.mode} server exited with code {rc} before answering /health "
                    f"(log {self.log_path}); its output ends with:\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"run_generate: the {self.mode} server (port {self.port}) did not answer /health within "
                    f"{timeout:.0f} s (--server-timeout; log {self.log_path}); its output ends with:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def stop(self, grace: float = 60.0) -> None:
        import signal

        try:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGINT)  # what Ctrl-C does: the server shuts its engine down
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            # whatever is left of the group (an engine core that outlived the server), then reap the server
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        finally:
            self._log.close()


def http_completion_items(responses) -> tuple[list[dict], list[dict]]:
    """Per response (one prompt, one choice): generation rows for generations.jsonl and routing items for
    write_returned_routes (the choice's routing decoded with moe_routes.routed_experts.from_choice)."""
    from moe_routes.routed_experts import from_choice, get_field

    gens, items = [], []
    for resp in responses:
        if len(resp.choices) != 1:
            raise ValueError(f"response {resp.id}: expected one choice, got {len(resp.choices)}")
        choice = resp.choices[0]
        prompt_ids, token_ids = get_field(choice, "prompt_token_ids"), get_field(choice, "token_ids")
        if prompt_ids is None or token_ids is None:
            raise ValueError(f"response {resp.id}: no token ids (the request asks for return_token_ids)")
        details = getattr(resp.usage, "prompt_tokens_details", None)
        cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
        gens.append(
            {
                "req_id": resp.id,
                "prompt_tokens": len(prompt_ids),
                "text": get_field(choice, "text"),
                "token_ids": list(token_ids),
            }
        )
        items.append(
            {
                "req_id": resp.id,
                "routed": from_choice(choice),
                "num_tokens": len(prompt_ids) + len(token_ids),
                "num_cached_tokens": int(cached),
            }
        )
    return gens, items


def http_measure(args, clients: dict, prompts: list[str], label: str = ""):
    """Warm-up and alternating measured runs against the two servers; every prompt is its own request, sent
    concurrently (the server batches them). Returns measure_alternating's (warmup, runs, outputs)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    extra_body = {"return_token_ids": True}
    if args.ignore_eos:
        extra_body["ignore_eos"] = True

    with ThreadPoolExecutor(max_workers=min(len(prompts), HTTP_MAX_CONCURRENCY)) as pool:

        def one(mode):
            client = clients[mode]

            def request(prompt):
                return client.completions.create(
                    model=args.model,
                    prompt=prompt,
                    max_tokens=args.max_tokens,
                    temperature=0.0,
                    seed=args.seed,
                    extra_body=extra_body,
                )

            t0 = time.perf_counter()
            resps = list(pool.map(request, prompts))
            wall = time.perf_counter() - t0
            return resps, run_stats(
                wall, sum(r.usage.prompt_tokens for r in resps), sum(r.usage.completion_tokens for r in resps)
            )

        return measure_alternating(
            one,
            args.repeats,
            lambda order: tqdm(order, desc=f"{label}measured runs (alternating log / no-log)", unit="run"),
        )


def run_vllm_http(args, questions: list[str], out_dir: Path) -> dict:
    try:
        import openai
    except ImportError:
        raise SystemExit("run_generate: --routing-source http needs the 'openai' client package installed") from None
    from transformers import AutoConfig, AutoTokenizer

    from moe_routes.routed_experts import get_field

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    hf_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    check_routing_layout(hf_config, "http")
    prompts = build_prompts(questions, tokenizer, not args.no_chat_template)
    rounds = []
    for r in range(args.rounds):
        order = engine_start_order(r)
        servers, startup = {}, {}
        try:
            # one at a time: each server sizes its KV cache from the memory free when it starts
            for mode in order:
                print(
                    f"run_generate: round {r + 1}/{args.rounds}: starting the {mode} server "
                    f"({MODE_MEANING['http'][mode]}) ...",
                    flush=True,
                )
                t0 = time.perf_counter()
                extra = server_cli_args(ROUTED_EXPERTS_ENGINE_ARGS) if mode == "log" else []
                port = free_port()
                log_name = f"vllm_server_{mode}.log" if r == 0 else f"vllm_server_{mode}.round{r + 1}.log"
                servers[mode] = VllmServer(mode, server_command(args, port, extra), port, out_dir / log_name)
                servers[mode].wait_healthy(args.server_timeout)
                startup[mode] = time.perf_counter() - t0
            clients = {
                mode: openai.OpenAI(base_url=s.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=3600)
                for mode, s in servers.items()
            }
            warmup, runs, outputs = http_measure(args, clients, prompts, f"round {r + 1}/{args.rounds}: ")
        finally:
            for s in servers.values():
                s.stop()
        rounds.append({"start_order": order, "startup_s": startup, "warmup": warmup, "runs": runs, "outputs": outputs})
    merged = merge_rounds(rounds)
    identical = all_identical(
        {
            m: [[list(get_field(r.choices[0], "token_ids")) for r in resps] for resps in merged["outputs"][m]]
            for m in ("log", "nolog")
        }
    )
    import vllm

    try:
        gens, items = http_completion_items(merged["outputs"]["log"][0])
        n_records = write_returned_routes(
            args, out_dir / "moe_routes.jsonl", hf_config, items, engine_version=vllm.__version__, source="http"
        )
    except ValueError as exc:
        raise SystemExit(f"run_generate: --routing-source http: {exc}") from None
    write_generations(out_dir, questions, gens)
    return vllm_result(merged, identical, n_records, [g["req_id"] for g in gens])


# ------------------------------------------------------------------------------------------------
# SGLang
# ------------------------------------------------------------------------------------------------
def _sglang_run(engine, prompts, sampling, log: bool):
    t0 = time.perf_counter()
    outs = engine.generate(prompt=prompts, sampling_params=sampling, return_expert_routing=log)
    wall = time.perf_counter() - t0
    return outs, run_stats(
        wall, sum(o["meta_info"]["prompt_tokens"] for o in outs), sum(o["meta_info"]["completion_tokens"] for o in outs)
    )


def kernel_scaling_factor(decoded: dict) -> float | None:
    """The factor inside SGLang's topk_weights: the payload says whether the top-k kernel applied it; None
    (unknown) when the kernel that applies it is chosen per call (biased grouped top-k without renormalize)."""
    included = decoded["weights_include_routed_scaling_factor"]
    if included is None:
        return None
    return decoded["routed_scaling_factor"] if included else 1.0


def run_sglang(args, questions: list[str], out_dir: Path) -> dict:
    try:
        import sglang
    except ImportError:
        raise SystemExit(
            "run_generate: --engine sglang needs SGLang installed and patched: create its "
            "environment from locks/sglang-<pin>.txt and apply patches/sglang-* with "
            "moe-routes patch apply --engine sglang --python <venv>/bin/python"
        ) from None
    from transformers import AutoConfig, AutoTokenizer

    from moe_routes.records import write_routes
    from moe_routes.sglang_routing import decode_expert_routing, iter_jsonl_records

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    hf_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    prompts = build_prompts(questions, tokenizer, not args.no_chat_template)
    sampling = {"temperature": 0.0, "max_new_tokens": args.max_tokens, "ignore_eos": args.ignore_eos}
    # One engine at a time (APPENDIX "run_generate.py --engine sglang"): SGLang sizes its KV cache from
    # the GPU memory free when the engine starts, so a second engine beside the first one fails to start
    # (or gets a tiny KV cache); alternation therefore happens within each engine's repeats.
    startup, warmup, runs, outputs = {}, {}, {"log": [], "nolog": []}, {"log": [], "nolog": []}
    for mode in ("nolog", "log"):
        print(f"run_generate: starting the {mode} engine ...", flush=True)
        t0 = time.perf_counter()
        kw = {} if args.gpu_memory_utilization is None else {"mem_fraction_static": args.gpu_memory_utilization}
        engine = sglang.Engine(
            model_path=args.model,
            random_seed=args.seed,
            dtype=args.dtype,
            tp_size=args.tensor_parallel_size,
            trust_remote_code=args.trust_remote_code,
            enable_return_expert_routing=(mode == "log"),
            **kw,
        )
        startup[mode] = time.perf_counter() - t0
        warmup[mode] = _sglang_run(engine, prompts, sampling, mode == "log")[1]
        for _ in range(args.repeats):
            outs, stats = _sglang_run(engine, prompts, sampling, mode == "log")
            runs[mode].append(stats)
            outputs[mode].append(outs)
        engine.shutdown()
        del engine  # its GPU memory must be free before the next engine sizes its KV cache
    identical = all_identical({m: [[o.get("output_ids") for o in outs] for outs in outputs[m]] for m in outputs})
    first = outputs["log"][0]
    decoded = [decode_expert_routing(o["meta_info"]["expert_routing"]) for o in first]
    meta = routes_meta(
        args,
        engine="sglang",
        engine_version=sglang.__version__,
        source="offline",
        num_experts=decoded[0]["num_experts"],
        top_k=decoded[0]["top_k"],
        num_hidden_layers=getattr(hf_config, "num_hidden_layers", max(decoded[0]["layers"]) + 1),
        moe_layers=decoded[0]["layers"],
        kernel_routed_scaling_factor=kernel_scaling_factor(decoded[0]),
        config_routed_scaling_factor=decoded[0]["routed_scaling_factor"],
    )
    with open(out_dir / "moe_routes.jsonl", "w") as f:
        n_records = write_routes(
            f,
            meta,
            (
                rec
                for i, (o, dec) in enumerate(zip(first, decoded, strict=True))
                for rec in iter_jsonl_records(str(o["meta_info"].get("id", i)), dec)
            ),
        )
    return {
        "engine": "sglang",
        "engine_version": sglang.__version__,
        "torch_version": __import__("torch").__version__,
        "startup_s": startup,
        "warmup": warmup,
        "runs": runs,
        "tokens_identical": identical,
        "route_records": n_records,
    }


# ------------------------------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    modes = {}
    for mode, runs in result["runs"].items():
        modes[mode] = {
            "runs": runs,
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "median_generated_tokens_per_s": statistics.median(r["generated_tokens_per_s"] for r in runs),
        }
    ratio = modes["log"]["median_tokens_per_s"] / modes["nolog"]["median_tokens_per_s"]
    out = {"modes": modes, "throughput_ratio_log_over_nolog": ratio}
    if any("round" in r for runs in result["runs"].values() for r in runs):
        # each round's own ratio of medians: rounds that started the engines in the other order disagree by the
        # start-order effect (engine_start_order); the headline ratio pools every round's runs
        per_round = []
        for i in sorted({r["round"] for runs in result["runs"].values() for r in runs}):
            med = {
                m: statistics.median(r["tokens_per_s"] for r in result["runs"][m] if r["round"] == i)
                for m in ("log", "nolog")
            }
            per_round.append(med["log"] / med["nolog"])
        out["throughput_ratio_per_round"] = per_round
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    p.add_argument(
        "--routing-source",
        choices=ROUTING_SOURCES,
        help="vLLM: where the routing comes from: the engine's log (default), returned by vllm.LLM (offline) or "
        "by the OpenAI server (http); SGLang: offline only (its default)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id or local directory (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=25)
    p.add_argument("--prompts-file", help="local JSONL with a 'question' field (offline use)")
    p.add_argument("--dataset", default="openai/gsm8k")
    p.add_argument("--dataset-config", default="main")
    p.add_argument("--no-chat-template", action="store_true", help="send the raw question text")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeats", type=int, default=3, help="measured runs per mode and round (default: %(default)s)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="vLLM: start both engines (servers) this many times, round 2 in the other order (the engine started "
        "first can be the slower one, see engine_start_order; an even count gives both orders the same weight); "
        "timing.json pools every round's runs (default: %(default)s)",
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int)
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="vLLM: per engine, two engines run side by side (default on GPU: 0.42); SGLang: "
        "mem_fraction_static of the one engine running at a time (default: SGLang's own)",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out-dir", default=".", help="where the artifacts go (default: current directory)")
    p.add_argument(
        "--keep-all-runs-log",
        action="store_true",
        help="--routing-source log: keep moe_routes.all_runs.jsonl (warm-up and every repeat)",
    )
    p.add_argument(
        "--server-timeout",
        type=float,
        default=900.0,
        help="--routing-source http: seconds each server may take to answer /health (default: %(default)s)",
    )
    a = p.parse_args(argv)
    if a.repeats < 1 or a.num_prompts < 1 or a.max_tokens < 1 or a.rounds < 1:
        p.error("--repeats, --rounds, --num-prompts and --max-tokens must be >= 1")
    if a.engine == "sglang":
        if a.rounds != 1:
            p.error("--rounds is for vLLM (SGLang runs one engine at a time, no-log first)")
        if a.routing_source not in (None, "offline"):
            p.error("--engine sglang returns routing per request from its in-process engine: --routing-source offline")
        a.routing_source = "offline"
    elif a.routing_source is None:
        a.routing_source = "log"
    if a.keep_all_runs_log and a.routing_source != "log":
        p.error("--keep-all-runs-log needs --routing-source log (the other sources write no log of every run)")
    if a.server_timeout <= 0:
        p.error("--server-timeout must be > 0")
    return a


def mode_meaning(engine: str, routing_source: str) -> dict:
    """What "log" and "nolog" mean in timing.json for this engine and routing source."""
    return MODE_MEANING["sglang" if engine == "sglang" else routing_source]


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = load_questions(args)
    if args.engine == "vllm":
        try:
            import torch

            if torch.cuda.is_available() and args.gpu_memory_utilization is None:
                args.gpu_memory_utilization = 0.42
        except ImportError:
            pass
        result = run_vllm(args, questions, out_dir)
    else:
        result = run_sglang(args, questions, out_dir)
    summary = summarize(result)
    timing = {
        "schema": "moe-routes timing v1",
        "engine": result["engine"],
        "engine_version": result["engine_version"],
        "torch_version": result["torch_version"],
        "routing_source": args.routing_source,
        "modes_meaning": mode_meaning(args.engine, args.routing_source),
        "model": args.model,
        "device": device_info(),
        "num_prompts": len(questions),
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "repeats": args.repeats,
        "rounds": result.get("rounds", [{"round": 1, "startup_s": result["startup_s"], "warmup": result["warmup"]}]),
        "engine_startup_s": result["startup_s"],
        "warmup": result["warmup"],
        **summary,
        "tokens_identical_across_modes": result["tokens_identical"],
        "route_records": result["route_records"],
        "random_weights": is_random_weight_model(args.model),
        "provenance": {
            "git": git_info(),
            **series_info(args.engine, result["engine_version"]),
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "args": vars(args),
            "created_unix": time.time(),
        },
    }
    (out_dir / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    m = summary["modes"]
    print("\n=== run_generate summary ===")
    print(f"engine {result['engine']} {result['engine_version']}, torch {result['torch_version']}, {timing['device']}")
    print(
        f"model {args.model}: {len(questions)} prompts x {args.max_tokens} max new tokens, {args.repeats} repeats/mode"
        + (f" in each of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    print(f"routing source {args.routing_source}:")
    for mode, meaning in timing["modes_meaning"].items():
        print(f"  {mode:>5} = {meaning}")
    print(f"startup: log {result['startup_s']['log']:.1f} s, no-log {result['startup_s']['nolog']:.1f} s")
    for mode in ("nolog", "log"):
        print(
            f"{mode:>6}: median {m[mode]['median_wall_s']:.3f} s, {m[mode]['median_tokens_per_s']:.1f} tok/s "
            f"({m[mode]['median_generated_tokens_per_s']:.1f} generated tok/s); runs "
            + ", ".join(f"{r['wall_s']:.3f}" for r in m[mode]["runs"])
        )
    print(
        f"throughput ratio log/no-log (routing on/off, source {args.routing_source}): "
        f"{summary['throughput_ratio_log_over_nolog']:.3f}"
    )
    if "throughput_ratio_per_round" in summary:
        print(
            "  per round (start order): "
            + ", ".join(
                f"{ratio:.3f} ({' first, '.join(rd['start_order'])} second)"
                for ratio, rd in zip(summary["throughput_ratio_per_round"], result["rounds"], strict=True)
            )
        )
    print(f"generated tokens identical across modes and repeats: {result['tokens_identical']}")
    print(f"route records: {result['route_records']}")
    for name in ("moe_routes.jsonl", "timing.json", "generations.jsonl"):
        print(f"  {out_dir / name}")
    if not result["tokens_identical"]:
        print("WARNING: generated tokens differ between runs; see timing.json (tokens_identical_across_modes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
