"""Generate answers to the first N GSM8K test questions with MoE routing capture on and off, and time both.

Writes, into --out-dir:
  moe_routes.jsonl   routing of one measured run (schemas/moe_routes.schema.json)
  timing.json        per-mode runs, medians, the log/no-log throughput ratio, token identity, provenance
  generations.jsonl  prompt, generated text and token ids per request (log-mode run)

Both modes run in one invocation: two engines live side by side (one started with VLLM_LOG_MOE, one
without; each engine process reads the variable when it starts), each gets a warm-up run, then the
measured runs alternate (log, no-log, no-log, log, ...) and medians are reported.

Examples:
  # GPU box, defaults: Qwen/Qwen1.5-MoE-A2.7B-Chat, 25 prompts, 256 new tokens, 3 repeats
  python run_generate.py                  # or: moe-routes generate
  # offline, local prompts and a local model directory
  python run_generate.py --model /path/to/model --prompts-file ../shared/data/gsm8k/test.jsonl
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


def series_info(engine: str) -> dict:
    from moe_routes.patching.engines import series_dir
    from moe_routes.patching.series import load_patches

    d = series_dir(engine)
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
def start_vllm(args, log_path: str | None):
    from vllm import LLM

    if log_path:
        os.environ["VLLM_LOG_MOE"] = log_path
    else:
        os.environ.pop("VLLM_LOG_MOE", None)
    kwargs = dict(
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
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    os.environ.pop("VLLM_LOG_MOE", None)
    return llm, time.perf_counter() - t0


def run_vllm(args, questions: list[str], out_dir: Path) -> dict:
    from tqdm import tqdm
    from vllm import SamplingParams

    if "VLLM_LOG_MOE" in os.environ:
        raise SystemExit("run_generate: unset VLLM_LOG_MOE; run_generate.py sets it for the logging engine itself")
    scratch = out_dir / "moe_routes.all_runs.jsonl"
    if scratch.exists():
        scratch.unlink()
    engines, startup = {}, {}
    for mode in ("log", "nolog"):
        print(f"run_generate: starting the {mode} engine ...", flush=True)
        engines[mode], startup[mode] = start_vllm(args, str(scratch) if mode == "log" else None)
    tokenizer = engines["log"].get_tokenizer()
    prompts = build_prompts(questions, tokenizer, not args.no_chat_template)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)

    def one(mode):
        t0 = time.perf_counter()
        outs = engines[mode].generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        return outs, run_stats(
            wall, sum(len(o.prompt_token_ids) for o in outs), sum(len(o.outputs[0].token_ids) for o in outs)
        )

    warmup, runs, outputs = measure_alternating(
        one, args.repeats, lambda order: tqdm(order, desc="measured runs (alternating log / no-log)", unit="run")
    )
    identical = all_identical(
        {m: [[list(o.outputs[0].token_ids) for o in outs] for outs in outputs[m]] for m in outputs}
    )

    # keep the routing of the first measured log run; the scratch file holds warm-up and repeats too
    keep = {o.request_id for o in outputs["log"][0]}
    random_weights = is_random_weight_model(args.model)
    n_records = 0
    with open(scratch) as src, open(out_dir / "moe_routes.jsonl", "w") as dst:
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
    if not args.keep_all_runs_log:
        scratch.unlink()
    with open(out_dir / "generations.jsonl", "w") as f:
        for q, o in zip(questions, outputs["log"][0], strict=True):
            f.write(
                json.dumps(
                    {
                        "req_id": o.request_id,
                        "question": q,
                        "prompt_tokens": len(o.prompt_token_ids),
                        "text": o.outputs[0].text,
                        "token_ids": list(o.outputs[0].token_ids),
                    }
                )
                + "\n"
            )
    import torch
    import vllm

    for llm in engines.values():
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
    return {
        "engine": "vllm",
        "engine_version": vllm.__version__,
        "torch_version": torch.__version__,
        "startup_s": startup,
        "warmup": warmup,
        "runs": runs,
        "tokens_identical": identical,
        "route_records": n_records,
        "routed_request_ids": sorted(keep, key=lambda x: int(x) if x.isdigit() else 0),
    }


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
            "environment from requirements-sglang-lock.txt and apply patches/sglang-* with "
            "moe-routes patch apply --engine sglang --python <venv>/bin/python"
        ) from None
    from transformers import AutoConfig, AutoTokenizer

    from moe_routes.sglang_routing import decode_expert_routing, to_jsonl_records

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
    n_records = 0
    with open(out_dir / "moe_routes.jsonl", "w") as f:
        decoded = [decode_expert_routing(o["meta_info"]["expert_routing"]) for o in first]
        series = series_info("sglang")
        meta = {
            "type": "meta",
            "schema_version": schema_version(),
            "engine": "sglang",
            "engine_version": sglang.__version__,
            "sglang_version": sglang.__version__,
            "torch_version": __import__("torch").__version__,
            "model_id": args.model,
            "device": device_info(),
            "seed": args.seed,
            "num_experts": int(decoded[0]["num_experts"]),
            "top_k": int(decoded[0]["top_k"]),
            "num_hidden_layers": int(getattr(hf_config, "num_hidden_layers", max(decoded[0]["layers"]) + 1)),
            "moe_layers": [int(x) for x in decoded[0]["layers"]],
            "layers_logged": [int(x) for x in decoded[0]["layers"]],
            "id_kind": "logical",
            "routing_source": "kernel",
            "patch_series": series["series"],
            "kernel_routed_scaling_factor": kernel_scaling_factor(decoded[0]),
            "config_routed_scaling_factor": decoded[0]["routed_scaling_factor"],
            "patches": series["patches"],
            "writer": {"pid": os.getpid(), "host": socket.gethostname()},
            "created_unix": time.time(),
        }
        f.write(json.dumps(meta, separators=(",", ":")) + "\n")
        for i, (o, dec) in enumerate(zip(first, decoded, strict=True)):
            for rec in to_jsonl_records(str(o["meta_info"].get("id", i)), dec):
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
                n_records += 1
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
    return {"modes": modes, "throughput_ratio_log_over_nolog": ratio}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF id or local directory (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=25)
    p.add_argument("--prompts-file", help="local JSONL with a 'question' field (offline use)")
    p.add_argument("--dataset", default="openai/gsm8k")
    p.add_argument("--dataset-config", default="main")
    p.add_argument("--no-chat-template", action="store_true", help="send the raw question text")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeats", type=int, default=3, help="measured runs per mode (default: %(default)s)")
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
        "--keep-all-runs-log", action="store_true", help="keep moe_routes.all_runs.jsonl (warm-up and every repeat)"
    )
    a = p.parse_args(argv)
    if a.repeats < 1 or a.num_prompts < 1 or a.max_tokens < 1:
        p.error("--repeats, --num-prompts and --max-tokens must be >= 1")
    return a


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
        "model": args.model,
        "device": device_info(),
        "num_prompts": len(questions),
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "repeats": args.repeats,
        "engine_startup_s": result["startup_s"],
        "warmup": result["warmup"],
        **summary,
        "tokens_identical_across_modes": result["tokens_identical"],
        "route_records": result["route_records"],
        "random_weights": is_random_weight_model(args.model),
        "provenance": {
            "git": git_info(),
            **series_info(args.engine),
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
    )
    print(f"startup: log {result['startup_s']['log']:.1f} s, no-log {result['startup_s']['nolog']:.1f} s")
    for mode in ("nolog", "log"):
        print(
            f"{mode:>6}: median {m[mode]['median_wall_s']:.3f} s, {m[mode]['median_tokens_per_s']:.1f} tok/s "
            f"({m[mode]['median_generated_tokens_per_s']:.1f} generated tok/s); runs "
            + ", ".join(f"{r['wall_s']:.3f}" for r in m[mode]["runs"])
        )
    print(f"throughput ratio log/no-log: {summary['throughput_ratio_log_over_nolog']:.3f}")
    print(f"generated tokens identical across modes and repeats: {result['tokens_identical']}")
    print(f"route records: {result['route_records']}")
    for name in ("moe_routes.jsonl", "timing.json", "generations.jsonl"):
        print(f"  {out_dir / name}")
    if not result["tokens_identical"]:
        print("WARNING: generated tokens differ between runs; see timing.json (tokens_identical_across_modes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
