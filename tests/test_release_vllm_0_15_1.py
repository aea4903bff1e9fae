"""vLLM 0.15.1's half of the engine glue (moe_routes_release.py): FusedMoE capture under data parallelism (this
rank's rows of the gathered batch), EPLB (physical replica ids logged as logical), monolithic kernels (the
router's recomputation), the routing source in the meta record. Collected only in the 0.15.1 pin's run
(tests/conftest.py); the shared glue's tests are in test_moe_routes_unit.py."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers import moe_routes as mr
from vllm.model_executor.layers import moe_routes_log as ml

rel = mr._release


def _capture_state(monkeypatch, k=2, n_rows=1, max_tokens=64):
    """The capture state of the engine whose step runs, logging on."""
    mr._ensure_op()
    state = mr.new_state(
        settings=ml.Settings("/dev/null", None),
        returns=None,
        layers=list(range(n_rows)),
        top_k=k,
        num_experts=8,
        num_hidden_layers=n_rows,
        max_tokens=max_tokens,
        device=torch.device("cpu"),
        meta={"type": "meta"},
    )
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
    assert torch.equal(state.ids_buf[:10, 1].long(), ref_ids.long()) and torch.allclose(out, ref_w * 2)
    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    logits2 = torch.randn(12, experts)
    out2 = compiled(Layer(2), logits2)
    w2, ids2 = select_experts(
        hidden_states=logits2, router_logits=logits2, top_k=k, use_grouped_topk=False, renormalize=True
    )
    assert torch.equal(state.ids_buf[:12, 2].long(), ids2.long()), "the capture op was dropped or mis-traced"
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
    assert torch.equal(state.ids_buf[:n, 0].long(), ids[start : start + n].long())
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
    assert rel._gathers_dp_ranks(_DPLayer())
    assert not any(rel._gathers_dp_ranks(m) for m in (chunked, modular, single))


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
    assert torch.equal(state.ids_buf[:n, 0].long(), logical.long())


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
    assert torch.equal(state.ids_buf[:n, 0].long(), want_ids.long()) and torch.equal(state.w_buf[:n, 0], want_w)
    assert torch.equal(kernel_w, want_w)
    assert torch.equal(rel._logical_ids(layer, physical), want_ids)
    assert int(load.sum()) == n * k, "record_router counted the tokens in EPLB's expert load a second time"

    # the meta record's routing_source: router beside a monolithic kernel, simulated on the modular path
    assert rel._routing_source(layer) == "router"
    sim = types.SimpleNamespace(
        router=RoutingSimulatorRouter(k, n_logical, EplbLayerState()),
        quant_method=types.SimpleNamespace(is_monolithic=False),
    )
    assert rel._routing_source(sim) == "simulated"
    kinds = [types.SimpleNamespace(source=rel._routing_source(m)) for m in (sim, layer)]
    assert mr.routing_source(kinds) == "mixed"
