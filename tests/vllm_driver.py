#!/usr/bin/env python3
"""Run the (patched) vLLM engine on a JSON spec and dump what the caller saw, for the tests.

vLLM's V1 engine core is a spawned process, so tests drive it from a separate interpreter. One driver
process runs several engines one after another (each `run` gets its own environment, which the engine
core process inherits at spawn), which saves the interpreter start-up per engine.

  python tests/vllm_driver.py --spec spec.json --out result.json

spec = {"model": DIR, "pin": "0.32.0", "engine_defaults": {...LLM kwargs},
        "runs": [{"env": {...}, "llm": {...LLM kwargs}, "sampling": {...},
        "prompts": ["text" | [token ids], ...]  |  "batches": [[prompt, ...], [prompt, ...]],
        "file_size_limit": BYTES, "save_routes": "FILE.npz",
        "gpu_defaults": {"async_scheduling": true, "fork": true, "record": "FILE.jsonl"},
        "upstream_return": true}]}

"pin" (tests/engine_modules.py vllm_pin()) must be the release of the vLLM this interpreter imports: a venv of
another pin stops the driver before any run. "engine_defaults" (moe_routes/vllm_args.py engine_defaults: the
pin's CPU kwargs, e.g. 0.32.0's block_size and gpu_memory_utilization) go under every run's "llm" kwargs.
The environment of a run is set after `from vllm import LLM` (as users do), and vLLM's environment cache
is cleared after each run, so each run reads its own. "file_size_limit" lowers
RLIMIT_FSIZE while the engine starts and runs (its processes inherit it; CPython ignores SIGXFSZ, so a
write past the limit fails with EFBIG like one on a full disk), and restores it before results are
written. "gpu_defaults" runs the engine the way a GPU box does by default (async scheduling, engine core
started by fork; tests/gpu_defaults.py): installed before the engine is built and removed after it is
shut down, so a forked engine core inherits it and the driver's later engines do not; the result's
"gpu_defaults_marker" is the marker the engine core's record must show. Every completion of every
request is reported ("completion_index" = CompletionOutput.index when the request has n > 1; its
finish_reason and stop_reason too).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import traceback

import gpu_defaults  # tests/ (this script's directory) is on sys.path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: moe_routes
from moe_routes.vllm_args import release, routed_experts_flag  # noqa: E402

_IN_PROCESS_ENGINE_RAN = False


def check_pin(pin: str | None) -> None:
    import vllm

    if pin is not None and release(vllm.__version__) != pin:
        raise SystemExit(
            f"vllm_driver: the tests run for vLLM pin {pin} (MOE_ROUTES_VLLM_PIN, else the default pin) but "
            f"{sys.executable} has vLLM {vllm.__version__}: set MOE_ROUTES_VLLM_PIN and MOE_ROUTES_TEST_PYTHON "
            "to one pin's venv (docs/developing.md)"
        )


def run_one(model: str, run: dict, engine_defaults: dict | None = None) -> dict:
    global _IN_PROCESS_ENGINE_RAN
    from vllm import LLM, SamplingParams

    env = dict(run.get("env", {}))
    if run.get("report_flag"):
        env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # _flags sends a function to the engine core
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    llm = upstream_return = None
    gpu = run.get("gpu_defaults")
    fsize = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        if gpu is not None:
            if gpu.get("fork", True) and _IN_PROCESS_ENGINE_RAN:
                # libgomp is not fork-safe: once this process has run OpenMP work (an in-process engine
                # core's forward), a forked child that runs OpenMP again can hang or segfault in libgomp
                # (seen: "segfault ... in libgomp.so.1" in EngineCore, and the caller waiting forever)
                raise RuntimeError("gpu_defaults: fork after an in-process engine ran in this driver; run it first")
            gpu_defaults.install(**gpu)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            _IN_PROCESS_ENGINE_RAN = True
        if run.get("file_size_limit"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(run["file_size_limit"]), fsize[1]))
        t0 = time.time()
        kwargs = dict(model=model, dtype="float32", seed=1234, max_model_len=2048, **(engine_defaults or {}))
        kwargs.update(run.get("llm", {}))
        if run.get("upstream_return"):
            upstream_return = _leave_the_return_flag_to_upstream()
        llm = LLM(**kwargs)
        startup = time.time() - t0
        sp = SamplingParams(**{"temperature": 0.0, "ignore_eos": True, "max_tokens": 16, **run.get("sampling", {})})
        # "batches": generate() calls made one after another on the same engine (later ones can hit the
        # prefix cache filled by earlier ones); otherwise one call with all prompts.
        batches = run.get("batches") or [run["prompts"]]
        outs = []
        t0 = time.time()
        for batch in batches:
            prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in batch]
            outs.extend(llm.generate(prompts, sp, use_tqdm=False))
        gen = time.time() - t0
        stats = None
        if os.environ.get("VLLM_LOG_MOE", "").strip() not in ("", "0"):
            from vllm.model_executor.layers import moe_routes

            stats = moe_routes.flush_engine(llm.llm_engine)
        multi = sp.n > 1
        if run.get("save_routes"):
            _save_routes(run["save_routes"], outs, multi)
        flags = _flags(llm) if run.get("report_flag") else None
        return {
            "enable_return_routed_experts": flags,
            "ok": True,
            "startup_s": startup,
            "generate_s": gen,
            "writer_stats": stats,
            "gpu_defaults_marker": gpu_defaults.PARENT_MARKER if gpu is not None else None,
            "outputs": [
                {
                    "request_id": o.request_id,
                    "completion_index": c.index if multi else None,
                    "prompt_token_ids": list(o.prompt_token_ids),
                    "token_ids": list(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for o in outs
                for c in o.outputs
            ],
        }
    except Exception as exc:  # the tests assert on the message
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        if upstream_return is not None:
            upstream_return()
        resource.setrlimit(resource.RLIMIT_FSIZE, fsize)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            gc.collect()
        if gpu is not None:
            gpu_defaults.uninstall()
        # An in-process engine core turns vLLM's environment cache on in this process (EngineCore.__init__ ->
        # envs.enable_envs_cache()): without this, every later run of the driver would keep that run's
        # VLLM_ENABLE_V1_MULTIPROCESSING=0 (and VLLM_WORKER_MULTIPROC_METHOD) whatever its own "env" says.
        from vllm import envs

        envs.disable_envs_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_flag(worker) -> bool:
    return routed_experts_flag(worker.model_runner.vllm_config)


def _flags(llm) -> dict:
    """enable_return_routed_experts where RL frameworks read it (0.15.1: ModelConfig, 0.32.0: AuxOutputConfig;
    moe_routes.vllm_args.routed_experts_flag): the front-end's config, and the engine core's worker, through
    collective_rpc with the function itself (a "report_flag" run sets VLLM_ALLOW_INSECURE_SERIALIZATION=1 so
    that the function reaches a spawned engine core; 0.32.0's multiprocess executor cloudpickles whatever is
    not a method name, so cloudpickled bytes, which 0.15.1's WorkerWrapperBase.execute_method took, would arrive
    as bytes, and 0.32.0 workers have no execute_method)."""
    workers = llm.llm_engine.collective_rpc(_worker_flag)
    return {"front_end": routed_experts_flag(llm.llm_engine.vllm_config), "workers": workers}


def _leave_the_return_flag_to_upstream():
    """ "upstream_return": vLLM 0.32.0's own AuxOutput connector serves enable_return_routed_experts for this run
    (Model Runner V2 only), the series' takeover is skipped (the log still captures), so that the tests can check
    upstream's ids against the log and the HF reference. Returns the undo."""
    from vllm.model_executor.layers import moe_routes

    take_over = moe_routes.take_over_return_flag
    moe_routes.take_over_return_flag = lambda engine_args: None

    def undo() -> None:
        moe_routes.take_over_return_flag = take_over

    return undo


def _save_routes(path: str, outs, multi: bool) -> None:
    """CompletionOutput.routed_experts / .routed_expert_weights of every completion, keyed like the tests'
    output_key ("ids/<request_id>[#<index>]"); "none/<key>" marks a completion that returned None."""
    import numpy as np

    arrays = {}
    for o in outs:
        for c in o.outputs:
            key = f"{o.request_id}#{c.index}" if multi else o.request_id
            if c.routed_experts is None:
                arrays[f"none/{key}"] = np.zeros(0)
                continue
            arrays[f"ids/{key}"] = c.routed_experts
            if c.routed_expert_weights is not None:
                arrays[f"weights/{key}"] = c.routed_expert_weights
    np.savez(path, **arrays)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    spec = json.load(open(a.spec))
    check_pin(spec.get("pin"))
    results = []
    for run in spec["runs"]:
        results.append(run_one(spec["model"], run, spec.get("engine_defaults")))
        with open(a.out, "w") as f:  # partial results survive a crash of a later run
            json.dump({"runs": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
