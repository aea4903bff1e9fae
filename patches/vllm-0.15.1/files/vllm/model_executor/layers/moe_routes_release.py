# SPDX-License-Identifier: Apache-2.0
"""vLLM 0.15.1's half of the moe-routes engine glue: what depends on this release's classes. ``FusedMoE`` layers
register and capture (the kernel's routing, EPLB physical ids mapped back to logical ones; the CPU kernels record
themselves), the V1 ``GPUModelRunner`` (and ``CPUModelRunner``, its subclass) hands its batch over, and the
``ModelConfig`` carries ``enable_return_routed_experts``, which this series serves instead of vLLM's own capturer.

Upstream files never import this module: they call ``moe_routes``, which re-exports ``__all__`` from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.model_executor.layers import moe_routes as core
from vllm.model_executor.layers.moe_routes import (
    RETURN_FLAG,
    WEIGHTS_FLAG,
    MoeLayer,
    MoeRoutesConfigError,
    ReturnSettings,
    read_settings,
)

__all__ = [
    "RUNNER_OUTPUT_FIELD",
    "upstream_return_asked",
    "upstream_capture",
    "validate_engine_config",
    "register_layer",
    "record",
    "record_router",
    "this_dp_rank_rows",
    "on_kv_cache_ready",
    "on_forward",
]

# The ModelRunnerOutput field that carries a step's rows to the scheduler: vLLM's own, which this series serves.
RUNNER_OUTPUT_FIELD = "routed_experts"
# Attribute of the ModelConfig that carries the per-request return (enable_return_routed_experts).
_RETURN_ATTR = core._RETURN_ATTR


def upstream_return_asked(model_config: Any) -> bool:
    return bool(getattr(model_config, "enable_return_routed_experts", False))


def upstream_capture(model_config: Any) -> bool:
    """Where vLLM 0.15.1 reads enable_return_routed_experts for its own RoutedExpertsCapturer/Reader: never. That
    capturer is bound before it exists (it returns zeros; fixed in 0.16 by PR #33013), allocates on cuda only and
    reads rows only when the engine core sees the stop; this series serves the flag instead, which stays True in
    the ModelConfig for everyone who asks whether the feature is on."""
    return False


# ----------------------------------------------------------------------------------------------------
# Front-end validation (EngineArgs.create_engine_config).
# ----------------------------------------------------------------------------------------------------
def validate_engine_config(vllm_config: Any, engine_args: Any = None) -> None:
    settings = read_settings()
    returns = _take_over_return_flag(vllm_config.model_config, engine_args)
    unsupported = []
    from vllm import envs

    if (settings is not None or returns is not None) and envs.VLLM_USE_V2_MODEL_RUNNER:
        unsupported.append("the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1 has no routing hook)")
    core.check_engine_config(vllm_config, settings, returns, unsupported)


def _take_over_return_flag(model_config: Any, engine_args: Any) -> ReturnSettings | None:
    """enable_return_routed_experts is served by this series, from the capture the log uses; the ModelConfig flag
    stays as given (RL frameworks read it to know the feature is on) and upstream's own capturer stays off through
    upstream_capture(). The request, with the weights flag, lives on in the ModelConfig's _moe_routes_return."""
    weights = bool(getattr(engine_args, "enable_return_routed_expert_weights", False))
    returns = None
    if model_config is not None and model_config.enable_return_routed_experts:
        returns = ReturnSettings(weights=weights)
    elif weights:
        raise MoeRoutesConfigError(
            f"{WEIGHTS_FLAG} (enable_return_routed_expert_weights=True) needs {RETURN_FLAG} "
            "(enable_return_routed_experts=True): weights are returned beside the expert ids"
        )
    if model_config is not None:
        object.__setattr__(model_config, _RETURN_ATTR, returns)
    return returns


# ----------------------------------------------------------------------------------------------------
# FusedMoE: registration (end of __init__) and capture (its forward paths).
# ----------------------------------------------------------------------------------------------------
def register_layer(layer: torch.nn.Module) -> None:
    """FusedMoE.__init__, at its end."""
    try:
        layer_id = int(layer.layer_id)
    except Exception:
        layer_id = None
    core.register_moe_module(layer, layer_id, int(layer.top_k), int(layer.logical_num_experts))


def _gathers_dp_ranks(layer: torch.nn.Module) -> bool:
    """True when the router input holds every DP rank's tokens: FusedMoE.forward_impl's naive dispatch
    (do_naive_dispatch_combine), i.e. DP without a modular all2all kernel and without DP chunking. The chunked
    path and modular kernels route this rank's tokens only."""
    if layer.dp_size <= 1 or layer.use_dp_chunking:
        return False
    from vllm.model_executor.layers.fused_moe.fused_moe_modular_method import FusedMoEModularMethod

    return not isinstance(layer.quant_method, FusedMoEModularMethod)


def this_dp_rank_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This DP rank's rows of a routing result computed on the all-gathered batch. Naive dispatch concatenates the
    ranks' (padded) batches in rank order, sized by dp_metadata.num_tokens_across_dp_cpu; the sizes are host
    values, so no device sync."""
    from vllm.distributed import get_dp_group
    from vllm.forward_context import get_forward_context

    sizes = [int(v) for v in get_forward_context().dp_metadata.num_tokens_across_dp_cpu.tolist()]
    rank = get_dp_group().rank_in_group
    if sum(sizes) != topk_ids.shape[0]:
        raise RuntimeError(
            f"moe_routes: routing for {topk_ids.shape[0]} tokens, but the DP ranks hold "
            f"{sizes} tokens; cannot find DP rank {rank}'s rows (a moe_routes bug, please report it)"
        )
    start = sum(sizes[:rank])
    return topk_ids[start : start + sizes[rank]], topk_weights[start : start + sizes[rank]]


def _logical_ids(layer: torch.nn.Module, physical_ids: torch.Tensor) -> torch.Tensor:
    """EPLB: the router maps each logical expert to one of its physical replicas. Invert the layer's current
    logical_to_physical_map ([logical, replica] -> physical, -1 padded); device ops only, so this is captured into
    CUDA graphs and follows in-place EPLB rearrangements."""
    l2p = layer.eplb_state.logical_to_physical_map
    n_physical = int(layer.global_num_experts)
    max_replicas = n_physical - int(layer.logical_num_experts) + 1
    l2p = l2p[:, :max_replicas].long()
    logical = torch.arange(l2p.shape[0], device=l2p.device, dtype=torch.int32)
    inverse = torch.zeros(n_physical + 1, device=l2p.device, dtype=torch.int32)  # slot n_physical: padding
    inverse.scatter_(0, torch.where(l2p < 0, n_physical, l2p).flatten(), logical[:, None].expand_as(l2p).flatten())
    return inverse[physical_ids.long()]


def record(
    layer: torch.nn.Module, topk_ids: torch.Tensor, topk_weights: torch.Tensor, row_offset: int = 0
) -> torch.Tensor:
    """Capture the routing a kernel is about to use. Returns the weights to pass on to the kernel."""
    if layer._moe_routes_slot < 0:
        return topk_weights
    if layer.enable_eplb:
        topk_ids = _logical_ids(layer, topk_ids)
    return core.capture(layer._moe_routes_slot, topk_ids, topk_weights, row_offset, _gathers_dp_ranks(layer))


def record_router(
    layer: torch.nn.Module, hidden_states: torch.Tensor, router_logits: torch.Tensor, row_offset: int = 0
) -> None:
    """Monolithic kernels that route internally (FlashInfer TRT-LLM, MXFP4, XPU): log the router's result for the
    same inputs; the meta record says routing_source='router', and the per-request return needs the opt-in
    VLLM_MOE_ROUTES_ALLOW_RECOMPUTED=1 (check_recomputed_routing). The CPU kernel records itself."""
    if layer._moe_routes_slot < 0 or _kernel_records_itself(layer):
        return
    # _compute_routing is select_experts without the EPLB replica mapping and its expert-load accounting, which
    # must count the kernel's own call only: its ids are already logical.
    topk_weights, topk_ids = layer.router._compute_routing(hidden_states, router_logits, None)
    core.capture(layer._moe_routes_slot, topk_ids, topk_weights, row_offset, _gathers_dp_ranks(layer))


def _kernel_records_itself(layer: torch.nn.Module) -> bool:
    cached = getattr(layer, "_moe_routes_kernel_records", None)
    if cached is None:
        from vllm.model_executor.layers.fused_moe.cpu_fused_moe import CPUFusedMOE, SGLFusedMOE

        cached = isinstance(getattr(layer.quant_method, "cpu_fused_moe", None), (CPUFusedMOE, SGLFusedMOE))
        layer._moe_routes_kernel_records = cached
    return cached


def _routing_source(layer: torch.nn.Module) -> str:
    """'kernel': ids/weights the expert kernel received; 'router': a monolithic kernel routes internally and we
    capture the router's result for the same inputs; 'simulated': a RoutingSimulatorRouter."""
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulatorRouter

    monolithic = layer.quant_method.is_monolithic
    if isinstance(layer.router, RoutingSimulatorRouter) and not monolithic:
        return "simulated"
    if monolithic and not _kernel_records_itself(layer):
        return "router"
    return "kernel"


def _moe_layer(layer: torch.nn.Module) -> MoeLayer:
    return MoeLayer(
        layer_id=layer._moe_routes_layer_id,
        slot=layer._moe_routes_slot,
        name=layer.layer_name,
        top_k=int(layer.top_k),
        num_experts=int(layer.logical_num_experts),
        num_physical_experts=int(layer.global_num_experts),
        scoring_func=str(layer.scoring_func),
        renormalize=bool(layer.renormalize),
        kernel_routed_scaling_factor=float(getattr(layer, "routed_scaling_factor", 1.0)),
        expert_parallel=bool(layer.use_ep),
        eplb=bool(layer.enable_eplb),
        sequence_parallel=bool(getattr(layer, "is_sequence_parallel", False)),
        source=_routing_source(layer) if layer._moe_routes_slot >= 0 else "kernel",
    )


# ----------------------------------------------------------------------------------------------------
# GPUModelRunner (V1; CPUModelRunner inherits it).
# ----------------------------------------------------------------------------------------------------
def _routing_store_group(kv_cache_config: Any) -> tuple[int, int]:
    """(group index, manager block size) of the KV-cache group whose slots identify a token for the prefix-cache
    routing store: a full-attention group keeps every block of a request (a sliding-window group swaps blocks that
    left the window for the null block, a Mamba group has no per-token slots). (-1, 0) when there is none:
    prefix-cache hits then become gap records."""
    from vllm.v1.kv_cache_interface import (
        AttentionSpec,
        CrossAttentionSpec,
        EncoderOnlyAttentionSpec,
        FullAttentionSpec,
        UniformTypeKVCacheSpecs,
    )

    def kind(spec: Any) -> int:  # 0: full attention, 1: other per-token attention, 9: unusable
        if isinstance(spec, UniformTypeKVCacheSpecs):
            return min((kind(s) for s in spec.kv_cache_specs.values()), default=9)
        if isinstance(spec, (CrossAttentionSpec, EncoderOnlyAttentionSpec)):
            return 9
        if isinstance(spec, FullAttentionSpec):
            return 0
        return 1 if isinstance(spec, AttentionSpec) else 9  # sliding window, chunked local / Mamba

    ranked = sorted((kind(g.kv_cache_spec), i) for i, g in enumerate(kv_cache_config.kv_cache_groups))
    if not ranked or ranked[0][0] == 9:
        return -1, 0
    g = ranked[0][1]
    return g, int(kv_cache_config.kv_cache_groups[g].kv_cache_spec.block_size)


def on_kv_cache_ready(runner: Any) -> None:
    """GPUModelRunner.initialize_kv_cache: the capture state, the KV-slot store and the meta record."""
    moe_modules = [m for m in runner.model.modules() if hasattr(m, "_moe_routes_layer_id")]
    kv_group, block_size = _routing_store_group(runner.kv_cache_config)
    async_scheduling = bool(getattr(runner, "use_async_scheduling", False))
    core.start_engine(
        runner,
        [_moe_layer(m) for m in moe_modules],
        device=runner.device,
        max_tokens=max(int(runner.max_num_tokens), max(getattr(runner, "cudagraph_batch_sizes", None) or [0])),
        kv_cache_config=runner.kv_cache_config,
        kv_group=kv_group,
        block_size=block_size,
        async_scheduling=async_scheduling,
        deferred_output=async_scheduling,
    )


def on_forward(
    runner: Any, scheduler_output: Any, num_tokens: int, req_ids: list[str], num_scheduled_tokens: np.ndarray
) -> None:
    """GPUModelRunner.execute_model, right after the model forward of a scheduled batch: batch row b's tokens are
    positions num_computed_tokens_cpu[b] .., as _prepare_inputs computed them."""
    if core._engine_state(runner) is None or not num_tokens:
        return
    first = runner.input_batch.num_computed_tokens_cpu[: len(req_ids)]
    core.forward_done(runner, req_ids, num_scheduled_tokens, first, num_tokens)
