# SPDX-License-Identifier: Apache-2.0
"""vLLM 0.32.0's half of the moe-routes engine glue: what depends on this release's classes. Routing is captured at
upstream's own capture point, ``BaseRouter._select_experts`` (logical ids before the EPLB mapping, and the weights
the kernel gets; every router, the CPU one included, is a ``BaseRouter``); ``MoERunner`` registers each layer and
stamps its row on its router; monolithic kernels, which route inside themselves, get the router's recomputation.
Both model runners hand their batch over: Model Runner V2 (``v1/worker/gpu``, the GPU default) and V1
(``GPUModelRunner``; ``CPUModelRunner``, the CPU build's, subclasses it). ``enable_return_routed_experts`` lives in
``AuxOutputConfig``; this series serves it (``take_over_return_flag``), which turns upstream's AuxOutput connector
off through ``serves_return`` while the flag stays True.

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
    refusal,
)

__all__ = [
    "RUNNER_OUTPUT_FIELD",
    "upstream_return_asked",
    "serves_return",
    "take_over_return_flag",
    "validate_engine_config",
    "register_layer",
    "record",
    "record_router",
    "this_dp_rank_rows",
    "on_kv_cache_ready",
    "on_kv_cache_ready_v2",
    "on_forward",
    "on_forward_v2",
]

# The ModelRunnerOutput field this series adds for a step's rows.
RUNNER_OUTPUT_FIELD = "moe_routes"
# Attribute of the AuxOutputConfig: the ReturnSettings of the per-request return this series serves.
_SERVED_ATTR = "_moe_routes_return"


def upstream_return_asked(model_config: Any) -> bool:
    """A config built without EngineArgs.create_engine_config: the flag is AuxOutputConfig's, which this series
    takes over only there; such an engine runs upstream's AuxOutput connector."""
    return False


# ----------------------------------------------------------------------------------------------------
# Front-end validation (EngineArgs.create_engine_config).
# ----------------------------------------------------------------------------------------------------
def serves_return(aux_output_config: Any) -> bool:
    """AuxOutputConfig.enabled: False while this series serves enable_return_routed_experts, so that
    VllmConfig's AuxOutput verifier (V2 and prefix caching only), the scheduler's and the V2 worker's AuxOutput
    connectors stay off; the flag itself stays True for everyone who asks whether the feature is on."""
    return getattr(aux_output_config, _SERVED_ATTR, None) is not None


def take_over_return_flag(engine_args: Any) -> None:
    """EngineArgs.create_engine_config, before the VllmConfig is built (its __post_init__ runs the AuxOutput
    verifier): with --enable-return-routed-experts this series returns the routing, from the capture the log
    uses, on every runner (V2, V1, the CPU build), with or without prefix caching, with weights on request."""
    aux = engine_args.aux_output_config
    weights = bool(getattr(engine_args, "enable_return_routed_expert_weights", False))
    if aux.enable_return_routed_experts:
        object.__setattr__(aux, _SERVED_ATTR, ReturnSettings(weights=weights))
    elif weights:
        raise MoeRoutesConfigError(
            f"{WEIGHTS_FLAG} (enable_return_routed_expert_weights=True) needs {RETURN_FLAG} "
            "(enable_return_routed_experts=True): weights are returned beside the expert ids"
        )


def validate_engine_config(vllm_config: Any, engine_args: Any = None) -> None:
    settings = read_settings()
    returns = getattr(getattr(vllm_config, "aux_output_config", None), _SERVED_ATTR, None)
    if vllm_config.model_config is not None:
        object.__setattr__(vllm_config.model_config, core._RETURN_ATTR, returns)
    core.check_engine_config(vllm_config, settings, returns, [])


# ----------------------------------------------------------------------------------------------------
# MoERunner registration (end of __init__), the router's capture point, monolithic kernels.
# ----------------------------------------------------------------------------------------------------
def register_layer(runner: torch.nn.Module) -> None:
    """MoERunner.__init__, at its end: the layer's row goes on its router, where the routing is computed."""
    try:
        layer_id = int(runner.layer_id)
    except Exception:
        layer_id = None
    cfg = runner.moe_config
    slot = core.register_moe_module(runner, layer_id, int(cfg.experts_per_token), int(cfg.num_logical_experts))
    runner.router._moe_routes_slot = slot
    # under DP the router may see every rank's tokens (naive dispatch): this_dp_rank_rows finds this rank's
    runner.router._moe_routes_dp = int(cfg.dp_size) > 1


def record(router: Any, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """BaseRouter._select_experts, where upstream captures: logical ids (before the EPLB mapping) and the weights
    the kernel gets. Returns the weights to pass on. Routers built outside a registered MoERunner (the CPU
    kernels' own throw-away ones) have no row."""
    slot = getattr(router, "_moe_routes_slot", -1)
    if slot < 0:
        return topk_weights
    return core.capture(slot, topk_ids, topk_weights, 0, router._moe_routes_dp)


def record_router(
    runner: torch.nn.Module, hidden_states: torch.Tensor, router_logits: torch.Tensor, input_ids: Any = None
) -> None:
    """MoERunner, for a monolithic kernel (it routes inside itself: FlashInfer TRT-LLM, MXFP4, the CPU int4
    kernels): the router's result for the same inputs; the meta record says routing_source='router', and the
    per-request return needs the opt-in VLLM_MOE_ROUTES_ALLOW_RECOMPUTED=1 (check_recomputed_routing)."""
    router = runner.router
    slot = getattr(router, "_moe_routes_slot", -1)
    if slot < 0:
        return
    # _compute_routing is select_experts without the EPLB mapping and its expert-load accounting (which must count
    # the kernel's own routing only) and without upstream's capture_fn: its ids are logical.
    topk_weights, topk_ids = router._compute_routing(hidden_states, router_logits, None, input_ids=input_ids)
    core.capture(slot, topk_ids, topk_weights, 0, router._moe_routes_dp)


def this_dp_rank_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This DP rank's rows of a routing result, as upstream's RoutedExpertsCapturer.capture finds them from the
    row count (host values, no device sync): every rank's tokens concatenated in rank order
    (num_tokens_across_dp_cpu, the naive dispatch), this rank's only, or the sequence-parallel shards of every rank
    (local_sizes; refused at start-up). Sizes are read when a CUDA graph is captured and baked into it."""
    from vllm.distributed import get_dp_group
    from vllm.forward_context import get_forward_context

    meta = get_forward_context().dp_metadata
    if meta is None:
        return topk_ids, topk_weights
    sizes = [int(v) for v in meta.num_tokens_across_dp_cpu.tolist()]
    rank = get_dp_group().rank_in_group
    n = topk_ids.shape[0]
    if n == sum(sizes):
        start = sum(sizes[:rank])
        return topk_ids[start : start + sizes[rank]], topk_weights[start : start + sizes[rank]]
    if n == sizes[rank]:
        return topk_ids, topk_weights
    raise RuntimeError(
        f"moe_routes: routing for {n} tokens, but the DP ranks hold {sizes} tokens; cannot find DP rank {rank}'s "
        "rows (a moe_routes bug, please report it)"
    )


def _routing_source(runner: torch.nn.Module) -> str:
    """'kernel': ids/weights the expert kernel received; 'router': a monolithic kernel routes internally and the
    router's result for the same inputs is captured; 'simulated': a RoutingSimulatorRouter."""
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulatorRouter

    if runner.is_monolithic:
        return "router"
    return "simulated" if isinstance(runner.router, RoutingSimulatorRouter) else "kernel"


def _moe_layer(runner: torch.nn.Module) -> MoeLayer:
    cfg = runner.moe_config
    experts = runner.routed_experts
    return MoeLayer(
        layer_id=runner._moe_routes_layer_id,
        slot=runner._moe_routes_slot,
        name=runner.layer_name,
        top_k=int(cfg.experts_per_token),
        num_experts=int(cfg.num_logical_experts),
        num_physical_experts=int(cfg.num_experts),
        scoring_func=str(experts.scoring_func),
        renormalize=bool(experts.renormalize),
        # what the router's weights include: with apply_routed_scale_to_output (DeepSeek-V2/V3, GLM-4.5) the router
        # gets 1.0 and MoERunner scales the output by the config's factor
        kernel_routed_scaling_factor=float(experts.routed_scaling_factor),
        expert_parallel=bool(cfg.use_ep),
        eplb=bool(cfg.moe_parallel_config.enable_eplb),
        sequence_parallel=bool(cfg.is_sequence_parallel),
        source=_routing_source(runner) if runner._moe_routes_slot >= 0 else "kernel",
    )


def _moe_layers(runner: Any) -> list[MoeLayer]:
    """Every registered MoERunner; refuses MoE modules that route outside one (DeepSeek-V4 / Kimi-K3 MegaMoE:
    upstream binds their own capture_fn), whose routing would be missing."""
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsCaptureSource

    layers, outside = [], []
    for module in runner.get_model().modules():
        if hasattr(module, "_moe_routes_layer_id"):
            layers.append(_moe_layer(module))
        elif isinstance(module, RoutedExpertsCaptureSource):
            outside.append(type(module).__name__)
    if outside:
        settings, returns = core.engine_settings(runner.vllm_config), core.return_settings(runner.model_config)
        if settings is not None or returns is not None:
            raise refusal(
                settings, returns, f"does not capture MoE modules that route outside MoERunner ({outside[0]})"
            )
    return layers


def _routing_store_group(kv_cache_config: Any) -> tuple[int, int]:
    """(group index, block size) of the KV-cache group whose slots identify a token for the prefix-cache routing
    store: a full-attention group keeps every block of a request (a sliding-window group swaps blocks that left the
    window for the null block, a Mamba group has no per-token slots). (-1, 0) when there is none: prefix-cache
    hits then become gap records."""
    from vllm.v1.kv_cache_interface import KVCacheSpecKind, get_kv_cache_spec_kind

    full = (KVCacheSpecKind.FULL_ATTENTION, KVCacheSpecKind.MLA_ATTENTION)
    for g, group in enumerate(kv_cache_config.kv_cache_groups):
        if get_kv_cache_spec_kind(group.kv_cache_spec) in full:
            return g, int(group.kv_cache_spec.block_size)
    return -1, 0


def _start(runner: Any, *, async_scheduling: bool, deferred_output: bool) -> None:
    kv_group, block_size = _routing_store_group(runner.kv_cache_config)
    core.start_engine(
        runner,
        _moe_layers(runner),
        device=runner.device,
        max_tokens=core._max_tokens(runner.vllm_config),
        kv_cache_config=runner.kv_cache_config,
        kv_group=kv_group,
        block_size=block_size,
        async_scheduling=async_scheduling,
        deferred_output=deferred_output,
    )


# ----------------------------------------------------------------------------------------------------
# V1 GPUModelRunner (CPUModelRunner inherits it).
# ----------------------------------------------------------------------------------------------------
def on_kv_cache_ready(runner: Any) -> None:
    """GPUModelRunner.initialize_kv_cache, not for the profiling initialisation (a minimal KV cache whose
    CUDA graphs are torn down)."""
    async_scheduling = bool(getattr(runner, "use_async_scheduling", False))
    _start(runner, async_scheduling=async_scheduling, deferred_output=async_scheduling)


def on_forward(
    runner: Any, scheduler_output: Any, num_tokens: int, req_ids: list[str], num_scheduled_tokens: np.ndarray
) -> None:
    """GPUModelRunner.execute_model, right after the model forward of a scheduled batch: batch row b's tokens are
    positions num_computed_tokens_cpu[b] .., as _prepare_inputs computed them (the device positions have no host
    copy in this release)."""
    if core._engine_state(runner) is None or not num_tokens:
        return
    first = runner.input_batch.num_computed_tokens_cpu[: len(req_ids)]
    core.forward_done(runner, req_ids, num_scheduled_tokens, first, num_tokens)


# ----------------------------------------------------------------------------------------------------
# Model Runner V2 (v1/worker/gpu/model_runner.py): it always hands an AsyncOutput over, collected later.
# ----------------------------------------------------------------------------------------------------
def on_kv_cache_ready_v2(runner: Any) -> None:
    """GPUModelRunner (V2).initialize_kv_cache, not for the profiling initialisation."""
    _start(runner, async_scheduling=bool(runner.scheduler_config.async_scheduling), deferred_output=True)


def on_forward_v2(runner: Any, input_batch: Any) -> None:
    """GPUModelRunner (V2).execute_model, right after the forward of a scheduled batch (not a dummy run): the host
    arrays upstream's AuxOutput worker reads too (request order, scheduled tokens, computed tokens per request)."""
    if core._engine_state(runner) is None or not input_batch.num_tokens:
        return
    core.forward_done(
        runner,
        input_batch.req_ids,
        input_batch.num_scheduled_tokens,
        input_batch.num_computed_tokens_np,
        input_batch.num_tokens,
    )
