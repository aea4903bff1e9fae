"""vLLM 0.32.0's Model Runner V2 (the GPU default), run for real on CPU: every @triton.jit kernel of V2 in Triton's
interpreter (tests/cpu_shims/v2_on_cpu.py), the series' V2 hooks (step begin, after the forward, the ModelRunnerOutput,
AsyncOutput.get_output, the KV cache ready) with real data. The log and the per-request arrays against the HF
reference where users break them: prefix-cache hits on blocks filled in the same step, n > 1 with chunked prefill
in a spawned engine core, preemption with recompute, stop strings with a prompt start. And upstream's own
routed experts (its AuxOutput connector, which needs V2 and prefix caching: this series leaves the flag to it in
the "upstream_return" runs) against the log, in the same adversarial cases. Under the GPU's async scheduling
(engine core forked, tests/gpu_defaults.py), TP=2 and DP=2 (tests/cpu_shims/cpu_collectives.py): the log with
each source of the per-request arrays, upstream's connector and the series' own return.

Collected only in the 0.32.0 pin's run (tests/conftest.py). What only a GPU shows (CUDA graphs, the pinned
copies overlapping the next step, real async overlap): APPENDIX section 5.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_defaults import assert_async_engine_core, read_record
from routes_ref import (
    ONE_THREAD_CPU_WORKER,
    ROUTES,
    ReturnedRoutes,
    RouteLog,
    assert_agrees_with_reference,
    dp_outputs,
    drive,
    drive_dp,
    gsm8k_questions,
    output_key,
    returned_equal_to_log,
    shared_prefix_prompts,
)

# V2's kernels run interpreted (~4x a V1 decode step on CPU): small batches, few tokens
UPSTREAM = {"enable_return_routed_experts": True}


@pytest.fixture(scope="module")
def v2_runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("runner_v2")
    prompts = shared_prefix_prompts(models["qwen2_moe"])
    fill, shared, long_prompts = prompts["fill"], prompts["shared"], prompts["long"]
    eager = {"enforce_eager": True}
    same_step = {**eager, "num_gpu_blocks_override": 15, "max_model_len": 1024, "max_num_seqs": 16}
    preempt = {**eager, "num_gpu_blocks_override": 6, "max_model_len": 512, "max_num_seqs": 8}
    inproc = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    runs = [
        # 0: same-step prefix hits (15 KV blocks; in-process, so the second batch is queued whole), log + arrays
        dict(
            env={"VLLM_LOG_MOE": str(work / "same_step.jsonl"), **inproc},
            llm={**same_step, **ROUTES},
            sampling={"max_tokens": 6},
            batches=[fill, shared],
            save_routes=str(work / "same_step.npz"),
        ),
        # 1: n > 1 sampled, chunked prefill (64-token chunks), spawned engine core (the shim reaches it)
        dict(
            env={"VLLM_LOG_MOE": str(work / "n2.jsonl")},
            llm={**eager, **ROUTES, "max_num_batched_tokens": 64, "enable_chunked_prefill": True},
            sampling={"max_tokens": 6, "n": 2, "temperature": 1.0},
            prompts=long_prompts[:2],
            save_routes=str(work / "n2.npz"),
        ),
        # 2: preemption with recompute (6 KV blocks of 128 for 8 growing requests), prefix caching off
        dict(
            env={"VLLM_LOG_MOE": str(work / "preempt.jsonl"), **inproc},
            llm={**preempt, **ROUTES, "enable_prefix_caching": False},
            sampling={"max_tokens": 90},
            prompts=gsm8k_questions(8),
            save_routes=str(work / "preempt.npz"),
        ),
        # 3: stop strings found by the front-end, prompt start 5
        dict(
            env={"VLLM_LOG_MOE": str(work / "stop.jsonl"), **inproc},
            llm={**eager, **ROUTES},
            sampling={"max_tokens": 16, "routed_experts_prompt_start": 5, "stop": ["e", "a"], "ignore_eos": False},
            prompts=gsm8k_questions(4),
            save_routes=str(work / "stop.npz"),
        ),
        # 4, 5: upstream's AuxOutput connector returns the ids (the log captures beside it): same-step prefix
        # hits, and preemption with recompute (prefix caching on, as upstream requires)
        dict(
            env={"VLLM_LOG_MOE": str(work / "up_same_step.jsonl"), **inproc},
            llm={**same_step, **UPSTREAM},
            sampling={"max_tokens": 6},
            batches=[fill, shared],
            save_routes=str(work / "up_same_step.npz"),
            upstream_return=True,
        ),
        dict(
            env={"VLLM_LOG_MOE": str(work / "up_preempt.jsonl"), **inproc},
            llm={**preempt, **UPSTREAM},
            sampling={"max_tokens": 90},
            prompts=gsm8k_questions(8),
            save_routes=str(work / "up_preempt.npz"),
            upstream_return=True,
        ),
        # 6, 7: upstream's ids for n > 1 sampled with chunked prefill in a spawned engine core, and for stop
        # strings with a prompt start
        dict(
            env={"VLLM_LOG_MOE": str(work / "up_n2.jsonl")},
            llm={**eager, **UPSTREAM, "max_num_batched_tokens": 64, "enable_chunked_prefill": True},
            sampling={"max_tokens": 6, "n": 2, "temperature": 1.0},
            prompts=long_prompts[:2],
            save_routes=str(work / "up_n2.npz"),
            upstream_return=True,
        ),
        dict(
            env={"VLLM_LOG_MOE": str(work / "up_stop.jsonl"), **inproc},
            llm={**eager, **UPSTREAM},
            sampling={"max_tokens": 16, "routed_experts_prompt_start": 5, "stop": ["e", "a"], "ignore_eos": False},
            prompts=gsm8k_questions(4),
            save_routes=str(work / "up_stop.npz"),
            upstream_return=True,
        ),
    ]
    results, log = drive(models["qwen2_moe"], runs, work, timeout=1800, runner="v2")
    for r in results:
        assert r["ok"], r.get("traceback")
    assert "Using V2 Model Runner" in log, "the engines did not run Model Runner V2"
    return work, results


def _log_exact(work, name: str, outputs: list[dict], model_dir) -> RouteLog:
    """The log: every position of every completion once per layer, equal to the HF reference (fp32: every entry)."""
    log = RouteLog(work / f"{name}.jsonl")
    log.check_exact_coverage(outputs)
    agreement = assert_agrees_with_reference(log, model_dir, outputs)
    assert agreement["id_agreement"] == 1.0, agreement
    return log


def _check(work, name: str, outputs: list[dict], model_dir, start: int = 0) -> RouteLog:
    """The log: positions 0..P+G-2 once per layer, equal to the HF reference (fp32: every entry); the arrays: P+G-1-
    start rows each, equal to the log record for record."""
    log = _log_exact(work, name, outputs, model_dir)
    routes = ReturnedRoutes(work / f"{name}.npz", log.meta["layers_logged"])
    assert not routes.none and set(routes.ids) == {output_key(o) for o in outputs}
    returned_equal_to_log(routes, log, outputs, start=start)
    return log


def test_v2_same_step_prefix_hits(v2_runs, models):
    work, results = v2_runs
    outputs = results[0]["outputs"]
    log = _check(work, "same_step", outputs, models["qwen2_moe"])
    assert outputs[8]["request_id"] in log.hits_in_the_computing_step(outputs[7]["request_id"]), "no same-step hit"


def test_v2_parallel_sampling_with_chunked_prefill_in_a_spawned_engine_core(v2_runs, models):
    work, results = v2_runs
    outputs = results[1]["outputs"]
    assert len(outputs) == 4 and max(len(o["prompt_token_ids"]) for o in outputs) > 64, "no prompt was chunked"
    _check(work, "n2", outputs, models["qwen2_moe"])


def test_v2_preemption_recompute_each_position_once(v2_runs, models):
    work, results = v2_runs
    outputs = results[2]["outputs"]
    assert results[2]["writer_stats"][0]["recomputed_tokens_skipped"] > 0, "the scenario did not preempt"
    _check(work, "preempt", outputs, models["qwen2_moe"])


def test_v2_stop_strings_and_prompt_start(v2_runs, models):
    work, results = v2_runs
    outputs = results[3]["outputs"]
    assert any(o["finish_reason"] == "stop" and o["stop_reason"] in ("e", "a") for o in outputs), "no stop string"
    _check(work, "stop", outputs, models["qwen2_moe"], start=5)


def _upstream_rows_equal_the_log(log: RouteLog, npz, outputs: list[dict], start: int = 0, key_prefix: str = ""):
    """Upstream's ids: P+G-1-start rows for every completion (never None), each row's top-k ids the set the log
    records for that position and layer (upstream returns no weights)."""
    layers = log.meta["layers_logged"]
    with np.load(npz) as z:
        none = [k for k in z.files if k.startswith("none/")]
        assert not none, f"upstream returned None for {none[:3]}"
        for o in outputs:
            got = z[f"ids/{output_key(o)}"]
            n_pos = len(o["prompt_token_ids"]) + len(o["token_ids"]) - 1
            ids, _ = log.per_request(key_prefix + output_key(o), n_pos, layers)
            assert got.shape == (n_pos - start, 3, 2), (key_prefix + output_key(o), got.shape)
            np.testing.assert_array_equal(np.sort(got[:, layers], -1), np.sort(ids[start:], -1), err_msg=output_key(o))


@pytest.mark.parametrize(
    "run,name,start",
    [(4, "up_same_step", 0), (5, "up_preempt", 0), (6, "up_n2", 0), (7, "up_stop", 5)],
    ids=["same_step_hits", "preemption", "n2_chunked_prefill", "stop_strings_prompt_start"],
)
def test_upstream_routed_experts_equal_the_log_and_the_hf_reference(v2_runs, models, run, name, start):
    work, results = v2_runs
    outputs = results[run]["outputs"]
    log = _log_exact(work, name, outputs, models["qwen2_moe"])
    if name == "up_same_step":
        assert outputs[8]["request_id"] in log.hits_in_the_computing_step(outputs[7]["request_id"]), "no same-step hit"
    if name == "up_preempt":
        assert results[run]["writer_stats"][0]["recomputed_tokens_skipped"] > 0, "the scenario did not preempt"
    if name == "up_n2":
        assert len(outputs) == 4 and max(len(o["prompt_token_ids"]) for o in outputs) > 64, "no prompt was chunked"
    if name == "up_stop":
        assert any(o["finish_reason"] == "stop" and o["stop_reason"] in ("e", "a") for o in outputs), "no stop string"
    _upstream_rows_equal_the_log(log, work / f"{name}.npz", outputs, start)


# ---------------------------------------------------------------------------------------------------
# V2 under the GPU's async scheduling (engine core forked, tests/gpu_defaults.py), TP=2 and DP=2: the log with
# upstream's ids (its connector) and with the series' own return (ids + weights), each source its own engines
# ---------------------------------------------------------------------------------------------------
SOURCES = {"up": {"llm": UPSTREAM, "upstream_return": True}, "ours": {"llm": ROUTES}}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def v2_parallel_runs(request, models, tmp_path_factory):
    source = request.param
    work = tmp_path_factory.mktemp(f"runner_v2_parallel_{source}")
    eager = {"enforce_eager": True, **SOURCES[source]["llm"]}
    upstream = {"upstream_return": True} if SOURCES[source].get("upstream_return") else {}
    stops = {"max_tokens": 12, "stop": ["e", "a"], "ignore_eos": False}
    runs = [
        # 0: async scheduling, the engine core forked (the GPU defaults); stop strings end completions in the
        # front-end while the engine has already scheduled the next step
        dict(
            env={"VLLM_LOG_MOE": str(work / "async.jsonl")},
            llm=eager,
            sampling=stops,
            prompts=gsm8k_questions(6),
            save_routes=str(work / "async.npz"),
            gpu_defaults={"async_scheduling": True, "fork": True, "record": str(work / "async.record.jsonl")},
            **upstream,
        ),
        # 1: TP=2 (multiprocess executor, two V2 workers)
        dict(
            env={"VLLM_LOG_MOE": str(work / "tp2.jsonl"), **ONE_THREAD_CPU_WORKER},
            llm={**eager, "tensor_parallel_size": 2},
            sampling={"max_tokens": 8},
            prompts=gsm8k_questions(4),
            save_routes=str(work / "tp2.npz"),
            **upstream,
        ),
    ]
    results, log = drive(models["qwen2_moe"], runs, work, timeout=1800, runner="v2")
    for r in results:
        assert r["ok"], r.get("traceback")
    # one line per engine (TP: rank 0's worker logs it; rank 1's runs V2's model_runner.py too)
    assert log.count("Using V2 Model Runner") == len(runs), "the engines did not run Model Runner V2"
    # DP=2 (vLLM's offline SPMD mode, uneven ranks): each rank's slice of the gathered batch
    prompts = gsm8k_questions(6)
    ranks = [
        {"prompts": prompts[:4], "sampling": {"max_tokens": 8}},
        {"prompts": prompts[4:], "sampling": {"max_tokens": 4}},
    ]
    dp = drive_dp(
        models["qwen2_moe"],
        [
            dict(
                r,
                llm=eager,
                env={"VLLM_LOG_MOE": str(work / "dp2.jsonl")},
                save_routes=str(work / f"dp2_{i}.npz"),
                **upstream,
            )
            for i, r in enumerate(ranks)
        ],
        work / "dp",
        timeout=1800,
        runner="v2",
    )
    for r in dp:
        assert r["ok"], r.get("traceback")
    assert all("Using V2 Model Runner" in (work / "dp" / f"driver{i}.log").read_text() for i in range(2))
    return source, work, results, dp


def _rows_equal_the_log(source: str, log: RouteLog, npz, outputs: list[dict], key_prefix: str = "") -> None:
    """Upstream's ids, or the series' ids and weights, equal to the log's records, completion by completion."""
    if source == "up":
        _upstream_rows_equal_the_log(log, npz, outputs, key_prefix=key_prefix)
        return
    routes = ReturnedRoutes(npz, log.meta["layers_logged"], key_prefix=key_prefix)
    assert not routes.none and len(routes.ids) == len(outputs)
    returned_equal_to_log(routes, log, [dict(o, request_id=key_prefix + o["request_id"]) for o in outputs])


def test_v2_under_async_scheduling_in_a_forked_engine_core(v2_parallel_runs, models):
    source, work, results, _ = v2_parallel_runs
    result = results[0]
    assert_async_engine_core(read_record(work / "async.record.jsonl"), result["gpu_defaults_marker"], fork=True)
    outputs = result["outputs"]
    assert any(o["finish_reason"] == "stop" and o["stop_reason"] in ("e", "a") for o in outputs), "no stop string"
    log = _log_exact(work, "async", outputs, models["qwen2_moe"])
    _rows_equal_the_log(source, log, work / "async.npz", outputs)


def test_v2_under_tensor_parallelism(v2_parallel_runs, models):
    source, work, results, _ = v2_parallel_runs
    outputs = results[1]["outputs"]
    log = _log_exact(work, "tp2", outputs, models["qwen2_moe"])
    assert len(log.metas) == 1 and log.meta["tensor_parallel_size"] == 2
    _rows_equal_the_log(source, log, work / "tp2.npz", outputs)


def test_v2_under_data_parallelism(v2_parallel_runs, models):
    source, work, _, dp = v2_parallel_runs
    outputs = dp_outputs(dp)
    log = _log_exact(work, "dp2", outputs, models["qwen2_moe"])
    assert sorted(m["data_parallel_rank"] for m in log.metas) == [0, 1]
    for rank, r in enumerate(dp):
        _rows_equal_the_log(source, log, work / f"dp2_{rank}.npz", r["outputs"], key_prefix=f"dp{rank}/")
