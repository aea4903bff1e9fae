"""In-process tests of the front-end half of the patched module (vllm/model_executor/layers/moe_routes.py): the
request checks (`check_request`, `http_request`, `prompt_start_of`), the choice fields (`add_choice_fields`) and
the base64 encoding (`_npy_base64`, `encode_choice_routes`), on the protocol models of the vLLM pin under test.

Upstream references are to the clean vLLM 0.32.0 tree: `utils/serial_utils.py:67-71` (numpy2base64: pybase64 of
the .npy bytes), `v1/engine/input_processor.py:454-463` (the range check for every request),
`completion/protocol.py:679` and `chat_completion/protocol.py:131` (`routed_experts: str | None = None`)."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
import types

import numpy as np
import pytest
from engine_modules import vllm_pin
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatMessage,
    DeltaMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
)

if vllm_pin() == "0.15.1":
    from vllm.entrypoints.serve.disagg.protocol import GenerateRequest, GenerateResponse, GenerateResponseChoice
else:  # /inference/v1/generate moved (and its token-mode models were renamed) in vLLM 0.32.0
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensChoice as GenerateResponseChoice
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateTokensResponse as GenerateResponse
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.layers import moe_routes as mr
from vllm.outputs import CompletionOutput
from vllm.sampling_params import BeamSearchParams, SamplingParams

RANGE_MSG = "routed_experts_prompt_start must be between 0 and the prompt length ({}), inclusive."


def _upstream_numpy2base64(array: np.ndarray) -> str:
    """vLLM 0.32.0 vllm/utils/serial_utils.py:67-71, verbatim."""
    import pybase64

    with io.BytesIO() as buffer:
        np.save(buffer, array, allow_pickle=False)
        return pybase64.b64encode(buffer.getbuffer()).decode("ascii")


def _arrays(t: int, layers: int = 61, k: int = 8, experts: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if experts <= 256 else np.uint16
    return rng.integers(0, experts, (t, layers, k)).astype(dtype), rng.random((t, layers, k), dtype=np.float32)


def _output(t: int, **kw) -> CompletionOutput:
    ids, w = _arrays(t, **kw)
    out = CompletionOutput(index=0, text="", token_ids=[1], cumulative_logprob=None, logprobs=None)
    out.routed_experts, out.routed_expert_weights = ids, w
    return out


# ---------------------------------------------------------------------------------------------------
# base64
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "array",
    [
        _arrays(7)[0],
        _arrays(7, experts=300)[0],  # uint16 above 256 experts
        _arrays(7)[1],
        np.zeros((0, 3, 2), np.uint8),  # start == P with one token
        _arrays(4096)[1],  # DeepSeek-V3 shape, 8 MB
    ],
    ids=["uint8", "uint16", "float32", "empty", "large"],
)
def test_npy_base64_is_byte_identical_to_upstream(array):
    assert mr._npy_base64(array) == _upstream_numpy2base64(array)
    assert mr._npy_base64(array) == base64.b64encode(_npy_bytes(array)).decode()


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_npy_base64_uses_pybase64_and_falls_back_to_the_stdlib(monkeypatch):
    calls = []
    import pybase64

    spy = types.SimpleNamespace(b64encode_as_string=lambda b: calls.append(len(b)) or pybase64.b64encode_as_string(b))
    ids = _arrays(3)[0]
    want = base64.b64encode(_npy_bytes(ids)).decode()
    monkeypatch.setattr(mr, "_B64ENCODE", None)
    monkeypatch.setitem(sys.modules, "pybase64", spy)
    assert mr._npy_base64(ids) == want and calls == [len(_npy_bytes(ids))]
    monkeypatch.setattr(mr, "_B64ENCODE", None)
    monkeypatch.setitem(sys.modules, "pybase64", None)  # import pybase64 -> ImportError
    assert mr._npy_base64(ids) == want and len(calls) == 1


def test_npy_base64_of_arrays_np_save_writes_otherwise():
    """Fortran-ordered and strided arrays take np.save itself: still upstream's bytes."""
    a = _arrays(5, layers=3, k=2)[1]
    for arr in (np.asfortranarray(a), a[::2], a[:, 1:]):
        assert mr._npy_base64(arr) == _upstream_numpy2base64(arr)


def _spy_to_thread(monkeypatch):
    calls = []
    real = asyncio.to_thread

    async def to_thread(fn, *args, **kwargs):
        calls.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    return calls


def test_large_arrays_are_encoded_in_a_worker_thread_and_reused(monkeypatch):
    """encode_choice_routes (awaited by the serving code before it builds the choices) hands arrays above the
    threshold to asyncio.to_thread and caches the strings on the CompletionOutput; add_choice_fields then only
    reads them. Small arrays stay on the event loop (a thread hop costs more than encoding them)."""
    calls = _spy_to_thread(monkeypatch)
    big = _output(4096)  # DeepSeek-V3 shape: 2 MB of ids, 8 MB of weights
    small = _output(2, layers=3, k=2)
    assert big.routed_experts.nbytes > mr._B64_OFF_LOOP_BYTES >= small.routed_experts.nbytes * 4
    request_output = types.SimpleNamespace(outputs=[big, small])
    asyncio.run(mr.encode_choice_routes(request_output))
    assert len(calls) == 1  # the big output, ids and weights in one hop; not the small one
    encoded = []
    monkeypatch.setattr(mr, "_npy_base64", lambda a: encoded.append(a.shape) or _upstream_numpy2base64(a))
    choice = CompletionResponseChoice(index=0, text="")
    mr.add_choice_fields(choice, big, CompletionRequest(model="m", prompt="p"))
    assert not encoded, "the cached strings were encoded again on the event loop"
    assert choice.routed_experts == _upstream_numpy2base64(big.routed_experts)
    assert choice.model_extra["routed_expert_weights"] == _upstream_numpy2base64(big.routed_expert_weights)
    mr.add_choice_fields(CompletionResponseChoice(index=1, text=""), small, CompletionRequest(model="m", prompt="p"))
    assert len(encoded) == 2  # small: ids and weights inline
    # a list of RequestOutputs (the completions endpoint's batch) and a bare CompletionOutput both work
    other = _output(4096, seed=1)
    asyncio.run(mr.encode_choice_routes([types.SimpleNamespace(outputs=[other])]))
    asyncio.run(mr.encode_choice_routes(_output(4096, seed=2)))
    assert len(calls) == 3


def test_a_replaced_array_is_not_served_from_a_stale_cache(monkeypatch):
    _spy_to_thread(monkeypatch)
    out = _output(4096)
    asyncio.run(mr.encode_choice_routes(out))
    out.routed_experts, out.routed_expert_weights = _arrays(4096, seed=5)
    choice = CompletionResponseChoice(index=0, text="")
    mr.add_choice_fields(choice, out, CompletionRequest(model="m", prompt="p"))
    assert choice.routed_experts == _upstream_numpy2base64(out.routed_experts)


def test_outputs_without_routing_are_not_encoded(monkeypatch):
    calls = _spy_to_thread(monkeypatch)
    out = CompletionOutput(index=0, text="", token_ids=[1], cumulative_logprob=None, logprobs=None)
    asyncio.run(mr.encode_choice_routes([types.SimpleNamespace(outputs=[out]), None]))
    assert not calls


# ---------------------------------------------------------------------------------------------------
# choice fields: the declared upstream field where upstream declares it, our extensions as extra fields
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: CompletionResponseChoice(index=0, text=""),
        lambda: ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content="")),
        lambda: GenerateResponseChoice(index=0, token_ids=[1]),
    ],
    ids=["completion", "chat", "generate"],
)
def test_non_streamed_choices_declare_routed_experts_null_by_default(make):
    choice = make()
    assert choice.model_dump()["routed_experts"] is None  # present and null, as upstream's model_dump()
    out = CompletionOutput(index=0, text="", token_ids=[1], cumulative_logprob=None, logprobs=None)
    mr.add_choice_fields(choice, out, CompletionRequest(model="m", prompt="p"))
    dumped = choice.model_dump()
    assert dumped["routed_experts"] is None
    assert "routed_expert_weights" not in dumped and "routed_experts_prompt_start" not in dumped


def test_generate_choice_fields_and_start(monkeypatch):
    out = _output(5, layers=3, k=2)
    req = GenerateRequest.model_validate(
        {"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2, "routed_experts_prompt_start": "2"}}
    )
    assert req.sampling_params.routed_experts_prompt_start == 2  # lax int inside sampling_params, as upstream
    choice = GenerateResponseChoice(index=0, token_ids=[1])
    mr.add_choice_fields(choice, out, req)
    dumped = GenerateResponse(choices=[choice]).model_dump()["choices"][0]
    assert dumped["routed_experts"] == _upstream_numpy2base64(out.routed_experts)
    assert dumped["routed_expert_weights"] == _upstream_numpy2base64(out.routed_expert_weights)
    assert dumped["routed_experts_prompt_start"] == 2
    xreq = GenerateRequest.model_validate(
        {"token_ids": [1, 2, 3], "sampling_params": {"extra_args": {"routed_experts_prompt_start": 1}}}
    )
    assert (
        mr.prompt_start_of(xreq) == 1
        and mr.prompt_start_of(GenerateRequest.model_validate({"token_ids": [1], "sampling_params": {}})) is None
    )


def test_stream_choices_keep_the_fields_as_extras_on_the_final_chunk():
    out = _output(5, layers=3, k=2)
    req = CompletionRequest(model="m", prompt="p", vllm_xargs={"routed_experts_prompt_start": 3})
    for choice in (
        CompletionResponseStreamChoice(index=0, text="", finish_reason="length"),
        ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(), finish_reason="length"),
    ):
        mr.add_choice_fields(choice, out, req)
        assert choice.model_extra["routed_experts"] == _upstream_numpy2base64(out.routed_experts)
        assert choice.model_extra["routed_experts_prompt_start"] == 3


# ---------------------------------------------------------------------------------------------------
# request checks
# ---------------------------------------------------------------------------------------------------
def _model_config(returns: bool):
    mc = types.SimpleNamespace()
    object.__setattr__(mc, mr._RETURN_ATTR, mr.ReturnSettings() if returns else None)
    return mc


@pytest.mark.parametrize("returns", [False, True], ids=["flag-off", "flag-on"])
def test_range_check_runs_for_every_request_with_upstreams_message(returns):
    mc = _model_config(returns)
    sp = SamplingParams(routed_experts_prompt_start=4)
    mr.check_request(sp, 4, mc)  # inclusive, and accepted with the flag off (the engine then returns None)
    assert sp.routed_experts_prompt_start == 4
    for bad in (5, -1):
        with pytest.raises(VLLMValidationError) as exc:
            mr.check_request(SamplingParams(routed_experts_prompt_start=bad), 4, mc)
        assert str(exc.value) == RANGE_MSG.format(4) + f" (parameter=routed_experts_prompt_start, value={bad})"
    xs = SamplingParams(extra_args={"routed_experts_prompt_start": 3})
    mr.check_request(xs, 4, mc)
    assert xs.routed_experts_prompt_start == 3
    with pytest.raises(VLLMValidationError, match="between 0 and the prompt length"):
        mr.check_request(SamplingParams(extra_args={"routed_experts_prompt_start": 9}), 4, mc)


def test_extension_rules_stay_strict():
    """Where upstream has no equivalent: a vllm_xargs start must be a JSON integer, and field and vllm_xargs
    must agree."""
    mc = _model_config(True)
    with pytest.raises(VLLMValidationError, match="must be an integer"):
        mr.check_request(SamplingParams(extra_args={"routed_experts_prompt_start": "3"}), 9, mc)
    with pytest.raises(VLLMValidationError, match="given twice"):
        mr.check_request(
            SamplingParams(routed_experts_prompt_start=2, extra_args={"routed_experts_prompt_start": 3}), 9, mc
        )
    req = CompletionRequest(
        model="m", prompt="p", routed_experts_prompt_start=2, vllm_xargs={"routed_experts_prompt_start": 3}
    )
    with pytest.raises(VLLMValidationError, match="given twice"):
        mr.http_request(req, SamplingParams())


def test_http_request_passes_the_field_and_ignores_it_for_beam_search():
    for cls in (CompletionRequest, ChatCompletionRequest):
        body = {"model": "m", "routed_experts_prompt_start": "5"}
        body.update({"prompt": "p"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]})
        req = cls.model_validate(body)
        assert req.routed_experts_prompt_start == 5  # lax int, as upstream 0.30+
        sp = SamplingParams()
        mr.http_request(req, sp)
        assert sp.routed_experts_prompt_start == 5
        mr.http_request(req, BeamSearchParams(beam_width=2, max_tokens=3))  # no error: ignored, as upstream
    for bad in (None, 5.5, -1):
        with pytest.raises(ValueError, match="routed_experts_prompt_start"):
            CompletionRequest.model_validate({"model": "m", "prompt": "p", "routed_experts_prompt_start": bad})
