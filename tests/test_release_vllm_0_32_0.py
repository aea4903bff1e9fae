"""vLLM 0.32.0's half of the engine glue (moe_routes_release.py), on the real classes of the patched release:
capture at BaseRouter._select_experts (the CPU router, eager and compiled; logical ids before the EPLB mapping;
the weights the kernel gets; fused shared-expert columns dropped), this DP rank's rows, the router's recomputation
for monolithic kernels, the takeover of enable_return_routed_experts from the AuxOutput connector, the KV-cache
group that keys the routing store. Collected only in the 0.32.0 pin's run (tests/conftest.py); the shared glue's
tests are in test_moe_routes_unit.py, the engine's behaviour end to end in the test_vllm_* modules."""

from __future__ import annotations

import pickle
import types

import pytest
import torch
from vllm.model_executor.layers import moe_routes as mr
from vllm.model_executor.layers import moe_routes_log as ml

rel = mr._release


def _capture_state(monkeypatch, k=2, n_rows=1, max_tokens=64):
    """The capture state of the engine whose step runs, logging on (weights captured)."""
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
    monkeypatch.setattr(mr, "ENABLED", True)  # what an engine that captures sets; the hooks check it
    return state


def _cpu_router(k=2, experts=8, slot=0, dp=False):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    router = CPURouter(top_k=k, global_num_experts=experts, renormalize=True)
    router._moe_routes_slot, router._moe_routes_dp = slot, dp
    return router


@pytest.mark.parametrize("compiled", [False, True])
def test_the_cpu_routers_select_experts_is_captured_before_the_eplb_mapping(monkeypatch, compiled):
    """The hook sits in BaseRouter._select_experts, where upstream's capture_fn is called: ids before the EPLB
    replica mapping (here a stand-in that shifts every id, so that pre- and post-mapping ids differ), weights as
    the kernel gets them. Under torch.compile (the CPU runner lets Dynamo trace the router) the opaque op must
    survive."""
    k, experts = 2, 8
    state = _capture_state(monkeypatch, k=k, n_rows=2)
    router = _cpu_router(k, experts, slot=1)
    monkeypatch.setattr(router, "_apply_eplb_mapping", lambda ids: ids + 100)

    def route(hidden, logits):
        w, ids = router.select_experts(hidden_states=hidden, router_logits=logits)
        return w * 2.0, ids

    fn = torch.compile(route, fullgraph=True, backend="inductor") if compiled else route
    logits = torch.randn(11, experts)
    w, physical = fn(torch.randn(11, 16), logits)
    want_w, want_ids = torch.topk(torch.softmax(logits, dim=-1), k)
    want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    assert torch.equal(physical.long(), want_ids + 100), "the kernel must get the mapped ids"
    assert torch.equal(state.ids_buf[:11, 1].long(), want_ids), "captured ids must be logical (before the mapping)"
    assert torch.allclose(state.w_buf[:11, 1], want_w) and torch.allclose(w, want_w * 2)
    assert (state.ids_buf[:, 0] == state.unwritten).all(), "another layer's row was written"


def test_a_router_without_a_row_and_fused_shared_expert_columns(monkeypatch):
    """A router built outside a registered MoERunner (the CPU kernels' throw-away ones) captures nothing; columns
    appended for fused shared experts (ids >= the routed experts) are not captured."""
    state = _capture_state(monkeypatch, k=2)
    ids = torch.tensor([[1, 2, 8], [3, 4, 8]], dtype=torch.int32)  # third column: a fused shared expert
    w = torch.rand(2, 3)
    assert rel.record(types.SimpleNamespace(), ids, w) is w
    assert (state.ids_buf == state.unwritten).all()
    assert torch.equal(rel.record(_cpu_router(), ids, w), w)
    assert state.ids_buf[:2, 0].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_this_dp_ranks_rows_by_row_count(monkeypatch, rank):
    """Under DP the router sees every rank's tokens (naive dispatch, rank order, num_tokens_across_dp_cpu) or only
    this rank's (modular all2all kernels); upstream's capturer tells them apart by the row count, so does this."""
    import vllm.distributed
    import vllm.forward_context

    sizes = [5, 3, 7]
    state = _capture_state(monkeypatch)
    dp = types.SimpleNamespace(num_tokens_across_dp_cpu=torch.tensor(sizes))
    monkeypatch.setattr(vllm.forward_context, "get_forward_context", lambda: types.SimpleNamespace(dp_metadata=dp))
    monkeypatch.setattr(vllm.distributed, "get_dp_group", lambda: types.SimpleNamespace(rank_in_group=rank))
    router = _cpu_router(dp=True)
    ids = torch.arange(sum(sizes) * 2, dtype=torch.int32).reshape(-1, 2) % 8
    w = torch.rand(sum(sizes), 2)
    assert torch.equal(rel.record(router, ids, w), w), "the kernel must still get every rank's weights"
    start, n = sum(sizes[:rank]), sizes[rank]
    assert torch.equal(state.ids_buf[:n, 0].long(), ids[start : start + n].long())
    assert torch.equal(state.w_buf[:n, 0], w[start : start + n])
    rel.record(router, ids[:n], w[:n])  # this rank's tokens only
    assert torch.equal(state.ids_buf[:n, 0].long(), ids[:n].long())
    with pytest.raises(RuntimeError, match="DP ranks hold"):
        rel.record(router, ids[:4], w[:4])


def test_a_simulated_router_is_captured_and_named(monkeypatch):
    """VLLM_MOE_ROUTING_SIMULATION_STRATEGY gives every MoE layer a RoutingSimulatorRouter (router_factory.py:120),
    whose ids the kernel gets: captured as any router's, and the meta's routing_source says "simulated". Not end to
    end on CPU: the simulated int64 ids crash vLLM 0.32.0's own CPU kernel, unpatched too ("expected scalar type
    Int but found Long", torch.ops._C.cpu_fused_moe), see test_vllm_routes.test_layer_selection_and_bad_values."""
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulatorRouter

    monkeypatch.setenv("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", "uniform_random")
    state = _capture_state(monkeypatch, k=2)
    router = RoutingSimulatorRouter(top_k=2, global_num_experts=8)
    router._moe_routes_slot, router._moe_routes_dp = 0, False
    logits = torch.randn(7, 8)
    w, ids = router.select_experts(hidden_states=torch.randn(7, 16), router_logits=logits)
    assert not torch.equal(ids.long(), torch.topk(logits, 2).indices), "the simulator did not run"
    assert torch.equal(state.ids_buf[:7, 0].long(), ids.long()) and torch.equal(state.w_buf[:7, 0], w.float())
    assert rel._routing_source(types.SimpleNamespace(is_monolithic=False, router=router)) == "simulated"
    assert rel._routing_source(types.SimpleNamespace(is_monolithic=False, router=_cpu_router())) == "kernel"


def test_monolithic_kernels_get_the_routers_recomputation_without_counting_eplb_load(monkeypatch):
    """A monolithic kernel routes inside itself; record_router captures the router's _compute_routing for the same
    inputs: no EPLB mapping, no expert-load accounting, no upstream capture_fn call."""
    k, experts, n = 2, 8, 9
    state = _capture_state(monkeypatch, k=k)
    router = _cpu_router(k, experts)
    called = []
    router.set_capture_fn(called.append)
    monkeypatch.setattr(router, "_apply_eplb_mapping", lambda ids: pytest.fail("EPLB mapping applied twice"))
    runner = types.SimpleNamespace(router=router)
    hidden, logits = torch.randn(n, 16), torch.randn(n, experts)
    rel.record_router(runner, hidden, logits)
    want_w, want_ids = torch.topk(torch.softmax(logits, dim=-1), k)
    assert torch.equal(state.ids_buf[:n, 0].long(), want_ids)
    assert torch.allclose(state.w_buf[:n, 0], want_w / want_w.sum(-1, keepdim=True))
    assert called == [], "upstream's capture_fn is the kernel's business"


def test_the_return_flag_is_taken_over_from_the_aux_output_connector(monkeypatch, tmp_path):
    """Upstream's AuxOutput connector refuses the CPU build (it needs Model Runner V2) and needs prefix caching;
    this series serves enable_return_routed_experts itself: the flag stays True for anyone who reads it, the
    connector's switch (AuxOutputConfig.enabled) is off, and the takeover survives the pickling that carries the
    config into a spawned engine core. The weights flag needs the ids flag."""
    from vllm.config.aux_output import AuxOutputConfig

    engine_args = types.SimpleNamespace(
        aux_output_config=AuxOutputConfig(enable_return_routed_experts=True), enable_return_routed_expert_weights=True
    )
    rel.take_over_return_flag(engine_args)
    aux = engine_args.aux_output_config
    assert aux.enable_return_routed_experts and not aux.enabled
    assert pickle.loads(pickle.dumps(aux)).enabled is False
    assert getattr(pickle.loads(pickle.dumps(aux)), rel._SERVED_ATTR) == mr.ReturnSettings(weights=True)
    plain = AuxOutputConfig(enable_return_routed_experts=True)
    assert plain.enabled, "a config built without EngineArgs keeps upstream's connector"
    with pytest.raises(ml.MoeRoutesConfigError, match="--enable-return-routed-expert-weights .* needs"):
        rel.take_over_return_flag(
            types.SimpleNamespace(aux_output_config=AuxOutputConfig(), enable_return_routed_expert_weights=True)
        )


def test_the_routing_store_keys_by_a_full_attention_group():
    """The KV-cache group whose slots identify a token: full attention (or MLA), never sliding window or Mamba."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, SlidingWindowSpec

    full = FullAttentionSpec(block_size=64, num_kv_heads=2, head_size=8, dtype=torch.float32)
    swa = SlidingWindowSpec(block_size=32, num_kv_heads=2, head_size=8, dtype=torch.float32, sliding_window=128)
    cfg = types.SimpleNamespace(
        kv_cache_groups=[KVCacheGroupSpec(["a"], swa), KVCacheGroupSpec(["b"], full)], num_blocks=10
    )
    assert rel._routing_store_group(cfg) == (1, 64)
    cfg.kv_cache_groups = [KVCacheGroupSpec(["a"], swa)]
    assert rel._routing_store_group(cfg) == (-1, 0)
