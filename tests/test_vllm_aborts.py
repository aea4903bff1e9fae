"""Issue 17 item 3: an aborted completion returns the routing of the positions computed so far, as upstream vLLM
0.22+ does (`OutputProcessor.abort_requests` builds the final output from the rows the front-end received:
upstream 0.32.0 `v1/engine/output_processor.py:552-614`, rows = P + G - 1 - start), and the log holds exactly
those positions (item 5: records of positions the caller never got are never written). Through the real patched
engine on CPU: offline (`LLMEngine.abort_request`, which now hands the final outputs back), `AsyncLLM.abort`
(the generator's final output) and HTTP (`POST /pause`, what RL frameworks call at a weight sync, and the token
endpoint's `abort_requests` for the request it names: the in-flight requests end with finish_reason "abort").
Where this series goes beyond upstream: a completion aborted in the middle of a chunked prefill returns the
prompt rows computed so far (upstream: None), since a prefill chunk's rows reach the front-end with the step
that computed them.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
from engine_modules import vllm_pin
from routes_ref import (
    ONE_THREAD_CPU_WORKER,
    PY,
    ROOT,
    RouteLog,
    assert_agrees_with_reference,
    engine_defaults,
    gsm8k_questions,
    reference_routing,
    serve,
)

from moe_routes.routed_experts import from_choice

NUM_LAYERS = 3


def _run(script: str, work: Path, timeout: int = 600) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.py").write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [PY, str(work / "run.py")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)},
    )
    (work / "run.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "result.json").read_text())


def _log_positions(log: RouteLog, key: str) -> list[int]:
    layers = log.meta["layers_logged"]
    got = sorted({p for (k, p, layer) in log.routes if k == key and layer == layers[0]})
    for layer in layers[1:]:
        assert got == sorted({p for (k, p, la) in log.routes if k == key and la == layer}), "layers differ"
    return got


def _check_against_log_and_reference(log, model_dir, key, prompt, tokens, ids, weights, n_pos):
    """The returned rows are positions 0 .. n_pos-1 exactly; so are the log's records of the completion; both
    agree with the HF reference routing of prompt + tokens."""
    assert ids.shape == (n_pos, NUM_LAYERS, 2) and weights.shape == ids.shape
    assert _log_positions(log, key) == list(range(n_pos))
    assert all(c == 1 for (k, _, _), c in log.counts.items() if k == key)
    logged_ids, logged_w = log.per_request(key, n_pos, log.meta["layers_logged"])
    np.testing.assert_array_equal(ids.astype(np.int64), logged_ids)
    np.testing.assert_array_equal(weights, logged_w.astype(np.float32))
    seq = (list(prompt) + list(tokens))[:n_pos]
    ((ref_ids, ref_w),) = reference_routing(model_dir, [seq], [0, 1, 2])
    np.testing.assert_array_equal(np.sort(ids.astype(np.int64), -1), np.sort(ref_ids, -1))
    order, ref_order = np.argsort(ids, -1), np.argsort(ref_ids, -1)
    np.testing.assert_allclose(
        np.take_along_axis(weights, order, -1), np.take_along_axis(ref_w, ref_order, -1), atol=1e-4
    )


def test_offline_abort_returns_the_rows_so_far_and_the_log_holds_exactly_them(models, tmp_path):
    """LLMEngine.abort_request (the offline engine's abort) now returns the aborted requests' final outputs. Three
    completions are aborted: after some decode steps (P+G-1 rows), in the middle of a chunked prefill (the
    prompt rows of the chunks computed so far), and before any forward (None)."""
    from transformers import AutoTokenizer

    model = models["qwen2_moe"]
    tok = AutoTokenizer.from_pretrained(model)
    qs = gsm8k_questions(12)
    short = tok(qs[0])["input_ids"]
    long = [t for q in qs[1:12] for t in tok(q)["input_ids"]][:400]
    script = f"""
    import json, os
    import numpy as np
    os.environ["VLLM_LOG_MOE"] = {str(tmp_path / "log.jsonl")!r}
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers import moe_routes

    def main():
        llm = LLM(model={str(model)!r}, dtype="float32", enforce_eager=True, seed=1234, max_model_len=2048,
                  enable_return_routed_experts=True, enable_return_routed_expert_weights=True,
                  enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=8, **{engine_defaults()!r})
        eng = llm.llm_engine
        sp = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0.0)
        eng.add_request("decoding", {{"prompt_token_ids": {short!r}}}, sp)
        got = {{}}
        for _ in range(3):  # the short prompt's prefill, then decode steps
            eng.step()
        eng.add_request("prefilling", {{"prompt_token_ids": {long!r}}}, sp)
        for _ in range(3):  # a few 64-token chunks of the long prompt, beside the short one's decode
            eng.step()
        eng.add_request("waiting", {{"prompt_token_ids": {short!r}}}, sp)
        outs = eng.abort_request(["decoding", "prefilling", "waiting"])
        stats = moe_routes.flush_engine(eng)
        arrays = {{}}
        for o in outs:
            c = o.outputs[0]
            got[o.request_id] = {{"finish_reason": c.finish_reason, "prompt": list(o.prompt_token_ids),
                                  "tokens": list(c.token_ids), "none": c.routed_experts is None}}
            if c.routed_experts is not None:
                arrays["ids/" + o.request_id] = c.routed_experts
                arrays["w/" + o.request_id] = c.routed_expert_weights
        np.savez("arrays.npz", **arrays)
        json.dump({{"outputs": got, "stats": stats}}, open("result.json", "w"))

    if __name__ == "__main__":
        main()
    """
    result = _run(script, tmp_path)
    outs = result["outputs"]
    assert set(outs) == {"decoding", "prefilling", "waiting"}
    assert all(o["finish_reason"] == "abort" for o in outs.values())
    log = RouteLog(tmp_path / "log.jsonl")
    arrays = np.load(tmp_path / "arrays.npz")
    d = outs["decoding"]
    assert len(d["tokens"]) >= 1, "the scenario did not decode before the abort"
    n_dec = len(d["prompt"]) + len(d["tokens"]) - 1
    _check_against_log_and_reference(
        log, model, "decoding", d["prompt"], d["tokens"], arrays["ids/decoding"], arrays["w/decoding"], n_dec
    )
    p = outs["prefilling"]
    assert p["tokens"] == [] and not p["none"], "aborted in the middle of its prefill: the prompt rows so far"
    n_pre = len(arrays["ids/prefilling"])
    assert 0 < n_pre < len(long), n_pre
    _check_against_log_and_reference(
        log, model, "prefilling", p["prompt"], [], arrays["ids/prefilling"], arrays["w/prefilling"], n_pre
    )
    assert outs["waiting"]["none"] and not _log_positions(log, "waiting")
    assert not log.gaps and not log.errors


def test_async_llm_abort_gives_the_generator_a_final_output_with_the_rows_so_far(models, tmp_path):
    model = models["qwen2_moe"]
    prompts = gsm8k_questions(3)
    script = f"""
    import asyncio, json, os
    import numpy as np
    os.environ["VLLM_LOG_MOE"] = {str(tmp_path / "log.jsonl")!r}
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.model_executor.layers import moe_routes

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model={str(model)!r}, dtype="float32", enforce_eager=True, seed=1234, max_model_len=2048,
            enable_return_routed_experts=True, enable_return_routed_expert_weights=True, **{engine_defaults()!r}))
        sp = SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0.0)
        finals, seen = {{}}, {{}}

        async def consume(i, prompt):
            async for out in engine.generate(prompt, sp, request_id=f"r{{i}}"):
                seen[i] = seen.get(i, 0) + 1
                if i == 0 and seen[i] == 6:
                    await engine.abort("r0")  # the caller's own abort, as at a weight sync
                finals[i] = out
                if i == 1 and seen[i] == 4:
                    break  # the caller stops reading: generate() aborts it; nobody receives it

        await asyncio.gather(*(consume(i, p) for i, p in enumerate({prompts[:2]!r})))
        await asyncio.sleep(0.5)
        stats = moe_routes.flush_engine(engine)
        o = finals[0]
        c = o.outputs[0]
        np.savez("arrays.npz", ids=c.routed_experts, w=c.routed_expert_weights)
        json.dump({{"finish_reason": c.finish_reason, "finished": o.finished, "prompt": list(o.prompt_token_ids),
                    "tokens": list(c.token_ids), "stats": stats}}, open("result.json", "w"))
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
    """
    result = _run(script, tmp_path)
    assert result["finished"] and result["finish_reason"] == "abort" and len(result["tokens"]) >= 5
    arrays = np.load(tmp_path / "arrays.npz")
    log = RouteLog(tmp_path / "log.jsonl")
    n_pos = len(result["prompt"]) + len(result["tokens"]) - 1
    _check_against_log_and_reference(
        log, models["qwen2_moe"], "r0", result["prompt"], result["tokens"], arrays["ids"], arrays["w"], n_pos
    )


def _generated_tokens(root: str) -> float:
    """The server's vllm:generation_tokens_total (Prometheus /metrics, both pins): tokens generated so far."""
    import httpx

    lines = httpx.get(root + "/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:generation_tokens_total"))


ABORT_ATTEMPTS = 8


def _abort_while_decoding(root: str, request, interrupt, aborted, resume=None, attempts: int = ABORT_ATTEMPTS):
    """request(attempt) (a blocking HTTP call, its own request id per attempt) runs in a thread; once the server
    has generated 32 tokens (decoding is under way), interrupt(attempt) (an abort endpoint's call, which must
    answer 200); then waits for the response and, when it was not aborted, tries again (resume() first, if
    given). Returns (attempt, response) of the first aborted one.

    Why attempts: on 2 cores vLLM 0.32.0's API server can stay unresponsive for the whole decode of the tiny
    model (measured: /metrics answered after 4.2 s, when 1500 tokens were done, with the routing features off
    too): its output handler never waits while the engine's outputs keep arriving, so the abort may only be
    handled after the request has finished (finish_reason "length"). A worker on one thread
    (ONE_THREAD_CPU_WORKER) leaves the server a core, which makes that rare but not impossible."""
    for attempt in range(attempts):
        result: dict = {}
        before = _generated_tokens(root)  # the counter is the server's total: earlier attempts included
        thread = threading.Thread(target=lambda result=result, attempt=attempt: result.update(r=request(attempt)))
        thread.start()
        deadline = time.time() + 120
        while time.time() < deadline and _generated_tokens(root) < before + 32:
            time.sleep(0.1)
        r = interrupt(attempt)
        assert r.status_code == 200, r.text
        thread.join(300)
        if resume is not None:
            resume()
        if aborted(result["r"]):
            return attempt, result["r"]
    raise AssertionError(f"the abort reached the server after the request had finished in all {attempts} attempts")


def test_http_pause_returns_the_aborted_completions_rows(models, tmp_path):
    """POST /pause (vLLM's RL endpoint, aborting: 0.15.1 wait_for_inflight_requests=false, 0.32.0 mode=abort)
    aborts the in-flight requests: a non-streamed completion comes back with finish_reason "abort" and the
    routing of the positions it carries, equal to the log's records, which hold exactly those positions."""
    import httpx

    model = models["qwen2_moe"]
    log_path = tmp_path / "log.jsonl"
    flags = ("--enable-return-routed-experts", "--enable-return-routed-expert-weights")
    # 0.32.0 serves /pause (vllm/entrypoints/rl/online/api_router.py) only with VLLM_SERVER_DEV_MODE=1
    # (launchers/api_server/routers.py:40-47), as RL frameworks run it, and names the abort `mode=abort`
    # (its default); 0.15.1 takes wait_for_inflight_requests=false. Each ignores the other's query parameter.
    env = {"VLLM_LOG_MOE": str(log_path), "VLLM_SERVER_DEV_MODE": "1", **ONE_THREAD_CPU_WORKER}
    with serve(model, tmp_path / "srv", env=env, args=flags) as client:
        root = str(client.base_url).rstrip("/").removesuffix("/v1")

        def complete(attempt):
            return client.completions.create(
                model=str(model),
                prompt=gsm8k_questions(1)[0],
                max_tokens=1500,
                temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )

        pause = {"wait_for_inflight_requests": "false", "mode": "abort"}
        _, response = _abort_while_decoding(
            root,
            complete,
            lambda attempt: httpx.post(root + "/pause", params=pause, timeout=120),
            lambda response: response.choices[0].finish_reason == "abort",
            resume=lambda: httpx.post(root + "/resume", timeout=60),
        )
    choice = response.choices[0]
    prompt, tokens = list(choice.prompt_token_ids), list(choice.token_ids)
    assert 0 < len(tokens) < 1500
    routes = from_choice(choice)
    n_pos = len(prompt) + len(tokens) - 1
    log = RouteLog(log_path)
    _check_against_log_and_reference(log, model, response.id, prompt, tokens, routes.ids, routes.weights, n_pos)
    assert_agrees_with_reference(
        log, model, [{"request_id": response.id, "prompt_token_ids": prompt, "token_ids": tokens}]
    )


# The token endpoint's abort, which RL frameworks' disaggregated rollouts call with the ids they gave
# /inference/v1/generate: 0.15.1 serves /abort_requests only with --tokens-only
# (vllm/entrypoints/serve/disagg/api_router.py:84-107); 0.32.0 serves /inference/v1/abort_requests
# (vllm/entrypoints/scale_out/token_in_token_out/api_router.py:79-104) with --enable-scale-out
# (scale_out/factories.py:83).
TOKEN_ABORT = (
    (("--tokens-only",), "/abort_requests")
    if vllm_pin() == "0.15.1"
    else (
        ("--enable-scale-out",),
        "/inference/v1/abort_requests",
    )
)


def test_http_abort_requests_returns_the_aborted_rows_on_the_token_endpoint(models, tmp_path):
    """POST abort_requests with the engine's id of a /inference/v1/generate request (generate-tokens-<request_id>)
    ends it with finish_reason "abort" and the routing of the positions its choice carries (base64 .npy, as
    upstream), equal to the log's records, which hold exactly those positions, and to the HF reference."""
    import httpx
    from transformers import AutoTokenizer

    model = models["qwen2_moe"]
    log_path = tmp_path / "log.jsonl"
    args, abort_path = TOKEN_ABORT
    prompt = AutoTokenizer.from_pretrained(model)(gsm8k_questions(1)[0])["input_ids"]
    flags = ("--enable-return-routed-experts", "--enable-return-routed-expert-weights", *args)
    env = {"VLLM_LOG_MOE": str(log_path), **ONE_THREAD_CPU_WORKER}
    with serve(model, tmp_path / "srv", env=env, args=flags) as client:
        root = str(client.base_url).rstrip("/").removesuffix("/v1")
        sampling = {"max_tokens": 1500, "temperature": 0.0, "ignore_eos": True}

        def generate(attempt):
            body = {
                "model": str(model),
                "token_ids": prompt,
                "request_id": f"rollout-{attempt}",
                "sampling_params": sampling,
            }
            return httpx.post(root + "/inference/v1/generate", json=body, timeout=300)

        def abort(attempt):
            return httpx.post(
                root + abort_path, json={"request_ids": [f"generate-tokens-rollout-{attempt}"]}, timeout=60
            )

        def aborted(response):
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["finish_reason"] == "abort"

        attempt, response = _abort_while_decoding(root, generate, abort, aborted)
    (choice,) = response.json()["choices"]
    tokens = choice["token_ids"]
    assert 0 < len(tokens) < 1500
    routes = from_choice(choice)
    n_pos = len(prompt) + len(tokens) - 1
    log = RouteLog(log_path)
    key = f"generate-tokens-rollout-{attempt}"
    _check_against_log_and_reference(log, model, key, prompt, tokens, routes.ids, routes.weights, n_pos)
