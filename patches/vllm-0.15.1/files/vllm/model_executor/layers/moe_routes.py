# SPDX-License-Identifier: Apache-2.0
"""Per-token MoE routing capture, added by the moe-routes patch series: the routing log (``VLLM_LOG_MOE``) and
``enable_return_routed_experts`` (routing returned per request, as vLLM 0.22+ does, plus weights).

Upstream files only call into this module, the engine glue. Its engine-independent half (settings, record
formatting, assembly, the writer process) is ``moe_routes_log``, importable without torch or vLLM. Both sit
outside the ``fused_moe`` package and import nothing beyond what ``import vllm`` already loaded, because the
front-end (``vllm.entrypoints.llm``, ``EngineArgs``, ``InputProcessor``, ``OutputProcessor``) imports them: with
the feature off, importing vLLM costs what it cost before.

Data path, per model step:
  1. ``on_step_begin`` (``GPUModelRunner.execute_model``, before anything else, also for steps that schedule no
     token): forgets finished requests, notes new ones and the KV blocks this step allocates afresh, and fills
     this step's rows of the capture buffers with -1, so that a layer that did not write is detected.
  2. Every captured ``FusedMoE`` layer copies the routing its expert kernel used (``topk_ids``, and
     ``topk_weights`` when the log or the weights return reads them) into its row of static token-major buffers
     ``[max_tokens, rows, top_k]`` on the model's device, allocated while the model is built (so that the KV
     cache is sized without them): a device-side write, recorded into CUDA graphs; under ``torch.compile`` an
     opaque custom op. No host sync inside the forward.
  3. ``on_forward`` (after the forward): one contiguous device-to-host copy into pinned staging (async + event on
     CUDA), and the batch layout (request ids, positions, KV slots).
  4. When the step's ``ModelRunnerOutput`` is built (or, under async scheduling, collected): the capture is
     checked, the KV-slot -> routing store updated, prefix-cache hits read back from it, and the step's rows laid
     out per request (``moe_routes_log.step_rows``).
  5. The scheduler puts each request's rows on its ``EngineCoreOutput`` of the step (``RoutesChunk``; a step that
     gives a request no token, a chunk of a long prefill, gets a rows-only output); the engine core's output
     thread packs a step's chunks into one frame.
  6. The front-end's ``OutputProcessor`` receives them with the tokens: rows of completions it has finished
     (a stop string it found, an abort) are dropped there, exactly as the tokens are. It gathers each
     completion's rows for ``CompletionOutput.routed_experts`` and hands them to the log's writer process.

Dummy, profiling, warm-up and graph-capture forwards write only into the device buffers; rows exist solely for
tokens ``GPUModelRunner.execute_model`` scheduled.
"""

from __future__ import annotations

import json
import os
import queue
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.moe_routes_log import (
    ENV_LAYERS,
    ENV_ON_ERROR,
    ENV_PATH,
    GAP_CAPTURE,
    REQUEST_TAG,
    SCHEMA_VERSION,
    STATE_FILE,
    ChoiceTag,
    Layout,
    LogClient,
    MoeRoutesCaptureError,
    MoeRoutesConfigError,
    Request,
    ReturnedRows,
    RouteAssembler,
    Settings,
    StepJob,
    StepRows,
    bad_env,
    capture_dtype_for,
    client_request,
    footprint,
    id_dtype_for,
    read_settings,
    request_field,
    step_rows,
    unwritten_id,
)

logger = init_logger(__name__)

# Attribute of the VllmConfig that carries the settings the engine was started with.
_CONFIG_ATTR = "_moe_routes_settings"
# Attribute of the ModelConfig that carries the per-request return (enable_return_routed_experts).
_RETURN_ATTR = "_moe_routes_return"
# Attribute of the VllmConfig that carries the capture buffers allocated while the model is built.
_BUFFERS_ATTR = "_moe_routes_buffers"
_UNSET = object()
RETURN_FLAG = "--enable-return-routed-experts"
WEIGHTS_FLAG = "--enable-return-routed-expert-weights"
PROMPT_START = "routed_experts_prompt_start"
# Returning the router's recomputation for kernels that route internally needs this opt-in (see
# check_recomputed_routing).
ENV_ALLOW_RECOMPUTED = "VLLM_MOE_ROUTES_ALLOW_RECOMPUTED"


@dataclass(frozen=True)
class ReturnSettings:
    """enable_return_routed_experts as this series serves it: CompletionOutput.routed_experts (and, with
    enable_return_routed_expert_weights, .routed_expert_weights), from the same capture as the log."""

    weights: bool = False


def return_settings(model_config: Any) -> ReturnSettings | None:
    """The per-request return an engine serves. A config built without EngineArgs.create_engine_config (where
    the flag is validated) still gets ids when it asks for them."""
    got = getattr(model_config, _RETURN_ATTR, _UNSET)
    if got is _UNSET:
        return ReturnSettings() if getattr(model_config, "enable_return_routed_experts", False) else None
    return got


def upstream_capture(model_config: Any) -> bool:
    """Where vLLM 0.15.1 reads enable_return_routed_experts for its own RoutedExpertsCapturer/Reader: never. That
    capturer is bound before it exists (it returns zeros; fixed in 0.16 by PR #33013), allocates on cuda only and
    reads rows only when the engine core sees the stop; this module serves the flag instead, which stays True in
    the ModelConfig for everyone who asks whether the feature is on."""
    return False


# The check every hot-path hook does: True once an engine that captures was configured or built in this
# process. Set at import from the environment (a spawned engine process inherits it) and by
# validate_engine_config / register_layer / the scheduler, which see what an engine actually starts with:
# VLLM_LOG_MOE may be set after `import vllm`, and a forked engine core inherits module state.
ENABLED: bool = os.environ.get(ENV_PATH, "").strip() not in ("", "0")


def _activate() -> None:
    global ENABLED
    _ensure_op()
    ENABLED = True


def engine_settings(vllm_config: Any) -> Settings | None:
    """The settings this engine started with: those validate_engine_config attached to its config (they travel
    with the config into forked, spawned and in-process engine cores), else the environment (a config built
    without EngineArgs.create_engine_config)."""
    settings = getattr(vllm_config, _CONFIG_ATTR, _UNSET) if vllm_config is not None else _UNSET
    return read_settings() if settings is _UNSET else settings


# ----------------------------------------------------------------------------------------------------
# Front-end validation (EngineArgs.create_engine_config): fail engine start-up, never mid-run.
# ----------------------------------------------------------------------------------------------------
def validate_engine_config(vllm_config: Any, engine_args: Any = None) -> None:
    settings = read_settings()
    object.__setattr__(vllm_config, _CONFIG_ATTR, settings)
    model_config = vllm_config.model_config
    returns = _take_over_return_flag(model_config, engine_args)
    if settings is None and returns is None:
        return
    if settings is not None:
        try:  # the real test of "can this work": root passes os.access() checks that open() then fails
            # O_RDWR as the writer opens it: it reads back the file's tail (partial-line repair, full-disk room)
            os.close(os.open(settings.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as exc:
            raise bad_env(ENV_PATH, f"cannot open {settings.path} for reading and appending: {exc}") from None
    parallel = vllm_config.parallel_config
    n_layers = model_config.get_total_num_hidden_layers() if model_config is not None else None
    if settings is not None and settings.layers is not None and n_layers is not None:
        out = [i for i in settings.layers if i >= n_layers]
        if out:
            raise bad_env(
                ENV_LAYERS, f"layer(s) {out} out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})"
            )
    unsupported = []
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
        # GPUModelRunner subclasses of other devices (XPU) would reach the first step with capture buffers this
        # series cannot stage (pinned copies and events are CUDA's).
        unsupported.append(f"the {current_platform.device_name} platform (CUDA, ROCm and CPU are supported)")
    if parallel.pipeline_parallel_size > 1:
        unsupported.append("pipeline parallelism (each stage would own a part of the layers)")
    if vllm_config.speculative_config is not None:
        unsupported.append("speculative decoding (rejected draft tokens would be logged)")
    if getattr(parallel, "enable_dbo", False):
        unsupported.append("dual-batch overlap (two micro-batches share the capture rows)")
    if (
        getattr(parallel, "decode_context_parallel_size", 1) > 1
        or getattr(parallel, "prefill_context_parallel_size", 1) > 1
    ):
        unsupported.append("context parallelism")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        # KV loaded from outside (P/D disaggregation, LMCache, CPU offloading) was never routed here.
        unsupported.append("KV connectors (kv_transfer_config: disaggregated prefill, LMCache, KV offloading)")
    from vllm import envs

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        unsupported.append("the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1 has no routing hook)")
    if returns is not None and getattr(model_config, "runner_type", "generate") != "generate":
        unsupported.append("pooling models (routing is returned with generated completions)")
    if unsupported:
        raise refusal(settings, returns, "does not support " + "; ".join(unsupported) + " in this patch series")
    _activate()


def _take_over_return_flag(model_config: Any, engine_args: Any) -> ReturnSettings | None:
    """enable_return_routed_experts is served by this module, from the capture the log uses; the ModelConfig flag
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


def refusal(settings: Settings | None, returns: ReturnSettings | None, why: str) -> MoeRoutesConfigError:
    """A start-up error naming whichever of the two switches asked for the capture."""
    if returns is None:
        return bad_env(ENV_PATH, f"routing logging {why}; unset VLLM_LOG_MOE or disable the feature")
    asked = f"{RETURN_FLAG} (enable_return_routed_experts=True)"
    if settings is not None:
        asked += f" and {ENV_PATH}={os.environ.get(ENV_PATH, '')!r}"
    remedy = f"drop {RETURN_FLAG}" + (" and unset VLLM_LOG_MOE" if settings is not None else "")
    return MoeRoutesConfigError(f"{asked}: returning routed experts {why}; {remedy}, or disable the feature")


def logs_routing(vllm_config: Any) -> bool:
    """Front-end: was this engine started with routing logging on?"""
    return getattr(vllm_config, _CONFIG_ATTR, None) is not None


# ----------------------------------------------------------------------------------------------------
# Request ids as the caller sees them: the front-end writes the log, so it knows each completion's request id
# (RequestOutput.request_id) and index (CompletionOutput.index). Only the OpenAI completions endpoint, which runs
# prompt i of a response as its own request "<response id>-<i>", tags each prompt with the response id and its
# choices.
# ----------------------------------------------------------------------------------------------------
def tag_choices(
    sampling_params: Any, engine_request_id: str, client_id: str, first_choice: int, num_choices: int
) -> None:
    """OpenAI /v1/completions: the prompt run as `engine_request_id` answers choices [first_choice, first_choice +
    n) of the response `client_id`. The tag rides on this prompt's own SamplingParams (a fresh extra_args dict: the
    request's vllm_xargs dict is shared by its prompts), so concurrent requests with the same client-chosen id
    (X-Request-Id) never see each other's, and nothing is kept anywhere that could be evicted."""
    if not ENABLED or not hasattr(sampling_params, "extra_args"):
        return  # the feature is off, or beam search (BeamSearchParams), which runs its own requests
    tag = ChoiceTag(req_id=str(client_id), first_choice=int(first_choice), num_choices=int(num_choices))
    sampling_params.extra_args = {**(sampling_params.extra_args or {}), REQUEST_TAG: tag}


# ----------------------------------------------------------------------------------------------------
# Layer registry (FusedMoE.__init__) and the capture op (forward paths).
# ----------------------------------------------------------------------------------------------------
def register_layer(layer: torch.nn.Module) -> None:
    """Called at the end of FusedMoE.__init__. Fixes the layer's row in the capture buffers now (the decoder-layer
    index, or its position in VLLM_LOG_MOE_LAYERS), so that torch.compile and CUDA graphs bake a constant row;
    allocates the capture buffers with the first such layer, while the model is built, so that they count as
    model memory when the KV cache is sized. Turns the hot path on before the first forward is traced. Only TP
    rank 0 captures: the other ranks compute the same routing."""
    layer._moe_routes_slot = -1
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    settings = engine_settings(vllm_config)
    returns = return_settings(vllm_config.model_config)
    if settings is None and returns is None:
        return
    _activate()
    try:
        layer_id = int(layer.layer_id)
    except Exception:
        layer._moe_routes_layer_id = None  # reported by on_kv_cache_ready
        return
    layer._moe_routes_layer_id = layer_id
    if returns is not None or settings.layers is None:  # the per-request return needs every MoE layer
        slot = layer_id
    elif layer_id in settings.layers:
        slot = settings.layers.index(layer_id)
    else:
        return
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return
    layer._moe_routes_slot = slot
    if getattr(vllm_config, _BUFFERS_ATTR, None) is None:
        n_rows = len(settings.layers) if returns is None and settings.layers is not None else None
        n_rows = n_rows or int(vllm_config.model_config.get_total_num_hidden_layers())
        bufs = _new_buffers(
            _max_tokens(vllm_config),
            n_rows,
            int(layer.top_k),
            int(layer.logical_num_experts),
            _weights(settings, returns),
        )
        object.__setattr__(vllm_config, _BUFFERS_ATTR, bufs)


def _weights(settings: Settings | None, returns: ReturnSettings | None) -> bool:
    """Weights are captured, staged and stored only when something reads them."""
    return settings is not None or (returns is not None and returns.weights)


def _max_tokens(vllm_config: Any) -> int:
    """Rows of the capture buffers: the most tokens one forward of this engine can hold (a batch, or a padded
    CUDA-graph size)."""
    sizes = getattr(vllm_config.compilation_config, "cudagraph_capture_sizes", None) or []
    return max(int(vllm_config.scheduler_config.max_num_batched_tokens), max(sizes, default=0))


def _new_buffers(
    max_tokens: int, n_rows: int, top_k: int, num_experts: int, weights: bool, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Capture buffers [max_tokens, n_rows, top_k], token-major; on the device the model is being built on (the
    loader's default-device context) unless one is given."""
    dtype = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}[capture_dtype_for(num_experts).name]
    ids = torch.full((max_tokens, n_rows, top_k), unwritten_id(num_experts), dtype=dtype, device=device)
    w = torch.zeros((max_tokens, n_rows, top_k), dtype=torch.float32, device=device) if weights else None
    return ids, w


def _gathers_dp_ranks(layer: torch.nn.Module) -> bool:
    """True when the router input holds every DP rank's tokens: FusedMoE.forward_impl's naive dispatch
    (do_naive_dispatch_combine), i.e. DP without a modular all2all kernel and without DP chunking. The chunked
    path and modular kernels route this rank's tokens only."""
    if layer.dp_size <= 1 or layer.use_dp_chunking:
        return False
    from vllm.model_executor.layers.fused_moe.fused_moe_modular_method import FusedMoEModularMethod

    return not isinstance(layer.quant_method, FusedMoEModularMethod)


def _this_dp_rank_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


# The engine whose buffers a capture writes into: set when its KV cache is ready (so warm-up and CUDA-graph
# capture bake its buffers) and at each of its steps. Several engines may live in one process
# (VLLM_ENABLE_V1_MULTIPROCESSING=0); their steps never interleave within a forward.
_ACTIVE: _State | None = None


def _record_into_buffers(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, row_offset: int, gathered: bool = False
) -> None:
    st = _ACTIVE
    if st is None or slot < 0:
        return  # before KV-cache init (profile run), or an engine / rank that does not capture
    if gathered:
        topk_ids, topk_weights = _this_dp_rank_rows(topk_ids, topk_weights)
    n = topk_ids.shape[0]
    if row_offset + n > st.max_tokens:
        raise RuntimeError(
            f"moe_routes: {row_offset + n} tokens in one MoE call exceed the capture "
            f"buffer ({st.max_tokens}); this is a moe_routes bug, please report it"
        )
    k = st.top_k
    st.ids_buf[row_offset : row_offset + n, slot].copy_(topk_ids[:, :k], non_blocking=True)
    if st.w_buf is not None:
        st.w_buf[row_offset : row_offset + n, slot].copy_(topk_weights[:, :k], non_blocking=True)


def _record_op(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, row_offset: int, gathered: bool
) -> torch.Tensor:
    _record_into_buffers(topk_ids, topk_weights, slot, row_offset, gathered)
    # Returning a fresh tensor that the caller uses keeps the op alive under the compiler's dead-code
    # elimination (an op with no outputs and no mutated inputs is removed).
    return topk_weights.clone()


def _record_fake(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, row_offset: int, gathered: bool
) -> torch.Tensor:
    return torch.empty_like(topk_weights)


_OP_REGISTERED = False


def _ensure_op() -> None:
    global _OP_REGISTERED
    if not _OP_REGISTERED:
        from vllm.utils.torch_utils import direct_register_custom_op

        direct_register_custom_op(
            op_name="moe_routes_record", op_func=_record_op, mutates_args=[], fake_impl=_record_fake
        )
        _OP_REGISTERED = True


def record(
    layer: torch.nn.Module, topk_ids: torch.Tensor, topk_weights: torch.Tensor, row_offset: int = 0
) -> torch.Tensor:
    """Capture the routing a kernel is about to use. Returns the weights to pass on to the kernel."""
    if layer._moe_routes_slot < 0:
        return topk_weights
    if layer.enable_eplb:
        topk_ids = _logical_ids(layer, topk_ids)
    return _capture(layer, topk_ids, topk_weights, row_offset)


def _capture(
    layer: torch.nn.Module, topk_ids: torch.Tensor, topk_weights: torch.Tensor, row_offset: int
) -> torch.Tensor:
    slot, gathered = layer._moe_routes_slot, _gathers_dp_ranks(layer)
    if torch.compiler.is_compiling():
        return torch.ops.vllm.moe_routes_record(topk_ids, topk_weights, slot, row_offset, gathered)
    _record_into_buffers(topk_ids, topk_weights, slot, row_offset, gathered)
    return topk_weights


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
    _capture(layer, topk_ids, topk_weights, row_offset)


def _routing_source(moe_modules: list[torch.nn.Module]) -> str:
    """'kernel': ids/weights the expert kernel received; 'router': a monolithic kernel routes internally and we
    capture the router's result for the same inputs; 'simulated': a RoutingSimulatorRouter."""
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import (
        RoutingSimulatorRouter,
    )

    kinds = set()
    for mod in moe_modules:
        monolithic = mod.quant_method.is_monolithic
        if isinstance(mod.router, RoutingSimulatorRouter) and not monolithic:
            kinds.add("simulated")
        elif monolithic and not _kernel_records_itself(mod):
            kinds.add("router")
        else:
            kinds.add("kernel")
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _kernel_records_itself(layer: torch.nn.Module) -> bool:
    cached = getattr(layer, "_moe_routes_kernel_records", None)
    if cached is None:
        from vllm.model_executor.layers.fused_moe.cpu_fused_moe import CPUFusedMOE, SGLFusedMOE

        cached = isinstance(getattr(layer.quant_method, "cpu_fused_moe", None), (CPUFusedMOE, SGLFusedMOE))
        layer._moe_routes_kernel_records = cached
    return cached


def check_recomputed_routing(source: str, returns: ReturnSettings | None, settings: Settings | None) -> None:
    """A kernel that routes inside itself (gpt-oss MXFP4 with the Triton backend, FlashInfer TRT-LLM FP8/NVFP4)
    never hands its routing out: what is captured is the router's recomputation for the same inputs, which can
    differ from the kernel's own choice at near-ties (other precision, other tie-breaking). A trainer replaying
    routing must not get that silently: the per-request return refuses it at start-up unless the caller opts in.
    The log says it in its meta record (routing_source)."""
    if returns is None or source not in ("router", "mixed"):
        return
    if os.environ.get(ENV_ALLOW_RECOMPUTED, "").strip() in ("1", "true", "yes"):
        logger.warning(
            "moe_routes: routed experts are the router's recomputation for MoE layers whose kernel routes "
            "internally (%s=1); they may differ from the kernel's own choice at near-ties",
            ENV_ALLOW_RECOMPUTED,
        )
        return
    raise refusal(
        settings,
        returns,
        "would return the router's recomputation, not the routing the expert kernel used: this model's MoE "
        "kernel routes internally (e.g. gpt-oss MXFP4 with the Triton backend, FlashInfer TRT-LLM FP8/NVFP4); "
        f"choose an expert backend that takes routing from the router, or set {ENV_ALLOW_RECOMPUTED}=1 to accept "
        "the recomputation",
    )


# ----------------------------------------------------------------------------------------------------
# Engine-side state, created when the KV cache exists (before warm-up and graph capture).
# ----------------------------------------------------------------------------------------------------
def _staging_depth(async_scheduling: bool) -> int:
    """Pinned staging copies: under async scheduling the next step's copy starts before this step's output is
    collected; without it a step is assembled before the next one begins."""
    return 2 if async_scheduling else 1


class _HostStaging:
    """Pinned host buffers the device buffers are copied into, one per step in flight. The copy of the first n
    tokens goes to buffer[:n] of a token-major buffer: a contiguous pinned region, so the device-to-host copy is a
    single async memcpy (a strided or pageable destination makes PyTorch stage through pageable memory and the
    host waits for the whole forward). Weights get a buffer only when something reads them."""

    def __init__(self, ids_like: torch.Tensor, w_like: torch.Tensor | None, depth: int, alloc: Any = None) -> None:
        alloc = alloc or (lambda like: torch.empty(like.shape, dtype=like.dtype, pin_memory=True))
        self.buffers = [(alloc(ids_like), None if w_like is None else alloc(w_like)) for _ in range(depth)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self.free.put(i)

    def destination(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, weights = self.buffers[index]
        return ids[:n], None if weights is None else weights[:n]


@dataclass(kw_only=True)
class _State:
    """One engine's capture state (TP rank 0)."""

    settings: Settings | None  # the log, if on
    returns: ReturnSettings | None  # the per-request return, if on
    layers: list[int]  # decoder layers captured, ascending
    rows: list[int]  # capture-buffer row of each captured layer
    top_k: int
    num_experts: int
    num_hidden_layers: int
    max_tokens: int
    ids_buf: torch.Tensor  # [max_tokens, buffer rows, top_k], token-major
    w_buf: torch.Tensor | None  # float32, when the log or the weights return reads weights
    device: torch.device
    kv_group: int  # KV-cache group whose slots key the routing store (-1: none)
    manager_block_size: int
    kernel_block_size: int
    num_slots: int
    meta: dict[str, Any]  # sent to the front-end once, with the first rows
    dp_rank: int | None = None
    assembler: RouteAssembler | None = None
    requests: dict[str, Request] = field(default_factory=dict)  # engine id -> request
    fresh_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    staging: _HostStaging | None = None
    unshipped: list[StepJob] = field(default_factory=list)  # steps forwarded, not yet in a ModelRunnerOutput
    meta_shipped: bool = False
    capture_errors: int = 0
    row_slice: slice | None = None  # `rows` as a slice when they are consecutive
    unwritten: int = -1  # what the capture buffers hold where no layer wrote this step

    def __post_init__(self) -> None:
        self.unwritten = unwritten_id(self.num_experts)
        if self.rows and self.rows == list(range(self.rows[0], self.rows[0] + len(self.rows))):
            self.row_slice = slice(self.rows[0], self.rows[0] + len(self.rows))


def new_state(
    *,
    settings: Settings | None,
    returns: ReturnSettings | None,
    layers: list[int],
    top_k: int,
    num_experts: int,
    num_hidden_layers: int,
    max_tokens: int,
    device: torch.device,
    meta: dict[str, Any],
    rows: list[int] | None = None,
    buffers: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    kv_group: int = -1,
    block_size: int = 0,
    kernel_block_size: int | None = None,
    num_slots: int = 0,
    dp_rank: int | None = None,
    async_scheduling: bool = True,
) -> _State:
    """The capture state of one engine: buffers (allocated here unless the model build did), pinned staging on
    CUDA, the KV-slot store. on_kv_cache_ready builds it; so does `moe-routes bench steps`."""
    rows = list(range(len(layers))) if rows is None else rows
    weights = _weights(settings, returns)
    if buffers is None:
        buffers = _new_buffers(max_tokens, max(rows) + 1, top_k, num_experts, weights, device)
    ids_buf, w_buf = buffers
    st = _State(
        settings=settings,
        returns=returns,
        layers=layers,
        rows=rows,
        top_k=top_k,
        num_experts=num_experts,
        num_hidden_layers=num_hidden_layers,
        max_tokens=max_tokens,
        ids_buf=ids_buf,
        w_buf=w_buf,
        device=device,
        kv_group=kv_group,
        manager_block_size=block_size,
        kernel_block_size=block_size if kernel_block_size is None else kernel_block_size,
        num_slots=num_slots,
        meta=meta,
        dp_rank=dp_rank,
    )
    st.assembler = RouteAssembler(
        layers=layers,
        top_k=top_k,
        num_experts=num_experts,
        num_slots=num_slots,
        manager_block_size=st.manager_block_size,
        kernel_block_size=st.kernel_block_size,
        weights=weights,
    )
    if device.type == "cuda":
        st.staging = _HostStaging(ids_buf, w_buf, _staging_depth(async_scheduling))
    return st


def _patch_provenance() -> tuple[str, list[dict[str, str]]]:
    """Series name and patch hashes from the state file `moe-routes patch` writes beside the package
    (moe_routes/patching/commit.py)."""
    import vllm

    state = Path(vllm.__file__).resolve().parent.parent / STATE_FILE
    try:
        data = json.loads(state.read_text())
        return data["series"], [{"name": p["name"], "sha256": p["sha256"]} for p in data["patches"]]
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"vllm-{vllm.__version__} (applied without moe-routes patch)",
            [{"name": f"unknown: no {STATE_FILE} beside the vllm package", "sha256": ""}],
        )


def check_layer_modules(
    moe_modules: list[Any], settings: Settings | None = None, returns: ReturnSettings | None = None
) -> None:
    """One FusedMoE per decoder layer, with a known index: records and returned rows are keyed by decoder layer.
    The error names the switch that asked (returns None: the log's VLLM_LOG_MOE)."""
    unindexed = [m.layer_name for m in moe_modules if m._moe_routes_layer_id is None]
    if unindexed:
        if returns is None:
            raise bad_env(ENV_PATH, f"cannot tell the decoder-layer index of MoE module(s) {unindexed[:3]}")
        raise refusal(settings, returns, f"needs the decoder-layer index of MoE module(s) {unindexed[:3]}")
    by_layer: dict[int, list[str]] = {}
    for m in moe_modules:
        by_layer.setdefault(m._moe_routes_layer_id, []).append(m.layer_name)
    shared = {layer: names for layer, names in sorted(by_layer.items()) if len(names) > 1}
    if shared:
        layer, names = next(iter(shared.items()))
        what = (
            f"decoder layer {layer} has {len(names)} MoE modules ({', '.join(names)}), "
            "e.g. experts for different token types"
        )
        if returns is None:
            raise bad_env(
                ENV_PATH,
                f"{what}; the log keys routing by decoder layer and cannot tell them apart; "
                "unset VLLM_LOG_MOE for this model",
            )
        raise refusal(settings, returns, f"keys rows by decoder layer and cannot tell them apart: {what}")


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


def _engine_state(runner: Any) -> _State | None:
    return getattr(runner, "_moe_routes_state", None)


def on_kv_cache_ready(runner: Any) -> None:
    """GPUModelRunner.initialize_kv_cache (CPUModelRunner inherits it): the capture state, the KV-slot store and
    the meta record the front-end's log writes before this engine's records."""
    global _ACTIVE
    settings = engine_settings(runner.vllm_config)
    returns = return_settings(runner.model_config)
    if settings is None and returns is None:
        return
    runner._moe_routes_state = None  # KV cache re-initialised (e.g. wake-up): start afresh
    moe_modules = [m for m in runner.model.modules() if hasattr(m, "_moe_routes_layer_id")]
    if not moe_modules:
        raise refusal(settings, returns, f"needs an MoE model: {runner.model_config.model} has no FusedMoE layer")
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return  # TP ranks other than 0 compute the same routing and capture nothing (register_layer)
    check_layer_modules(moe_modules, settings, returns)
    moe_layer_ids = sorted(m._moe_routes_layer_id for m in moe_modules)
    if settings is not None and settings.layers is not None:
        missing = [i for i in settings.layers if i not in moe_layer_ids]
        if missing:
            raise bad_env(
                ENV_LAYERS, f"layer(s) {missing} are not MoE layers of this model; MoE layers: {moe_layer_ids}"
            )
    captured_mods = sorted((m for m in moe_modules if m._moe_routes_slot >= 0), key=lambda m: m._moe_routes_layer_id)
    captured = [m._moe_routes_layer_id for m in captured_mods]
    rows = [m._moe_routes_slot for m in captured_mods]
    log_cols = None  # the log writes every captured layer
    if settings is not None and settings.layers is not None and returns is not None:
        log_cols = [captured.index(i) for i in sorted(settings.layers)]
    logged = captured if log_cols is None else [captured[c] for c in log_cols]
    n_hidden = int(runner.model_config.get_total_num_hidden_layers())
    if returns is not None and captured and captured[-1] >= n_hidden:
        raise refusal(
            None, returns, f"needs MoE layer indices below the {n_hidden} decoder layers; this model has {captured}"
        )
    logged_mods = captured_mods if log_cols is None else [captured_mods[c] for c in log_cols]
    first = moe_modules[0]
    top_k, num_experts = int(first.top_k), int(first.logical_num_experts)
    if any(int(m.top_k) != top_k or int(m.logical_num_experts) != num_experts for m in moe_modules):
        raise bad_env(ENV_PATH, "MoE layers with different top_k/num_experts are not supported by the log format")
    if any(getattr(m, "is_sequence_parallel", False) for m in moe_modules):
        # Each TP rank then routes only its shard of the batch; rank 0 alone cannot capture every token.
        raise refusal(
            settings,
            returns,
            "does not support sequence-parallel MoE (expert parallel with TP > 1 and DP > 1); use TP = 1 per DP rank",
        )
    source = _routing_source(captured_mods)
    check_recomputed_routing(source, returns, settings)
    device = runner.device
    if device.type not in ("cuda", "cpu"):
        raise refusal(settings, returns, f"does not support {device.type} devices in this patch series")
    parallel = runner.parallel_config
    dp_rank = int(parallel.data_parallel_rank) if parallel.data_parallel_size > 1 else None
    max_tokens = max(int(runner.max_num_tokens), max(getattr(runner, "cudagraph_batch_sizes", None) or [0]))
    buffers = getattr(runner.vllm_config, _BUFFERS_ATTR, None)
    if buffers is None or buffers[0].shape[0] < max_tokens or buffers[0].device != device:
        # Not built with the model (a config whose buffers were never allocated): allocate now, outside the memory
        # budget the KV cache was sized from.
        logger.warning("moe_routes: capture buffers allocated after the KV cache was sized (%d tokens)", max_tokens)
        buffers = _new_buffers(max_tokens, max(rows) + 1, top_k, num_experts, _weights(settings, returns), device)
        object.__setattr__(runner.vllm_config, _BUFFERS_ATTR, buffers)
    max_tokens = int(buffers[0].shape[0])

    kv_cfg = runner.kv_cache_config
    kv_group, manager_block_size = _routing_store_group(kv_cfg)
    if not runner.cache_config.enable_prefix_caching:
        kv_group, manager_block_size = -1, 0  # no hit to fill: no KV-slot store (memory and a copy per step)
    if returns is not None and kv_group < 0 and runner.cache_config.enable_prefix_caching:
        raise refusal(
            None,
            returns,
            "with prefix caching needs a full-attention KV-cache group to keep the routing of cached tokens "
            "by KV slot, and this model has none; pass --no-enable-prefix-caching (enable_prefix_caching=False)",
        )
    num_slots = int(kv_cfg.num_blocks) * manager_block_size if kv_group >= 0 else 0
    kernel_block_size = int(runner.input_batch.block_table[kv_group].block_size) if kv_group >= 0 else 0

    import vllm
    from vllm.platforms import current_platform

    model_config = runner.model_config
    series, patches = _patch_provenance()
    sim = os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY") or None
    weights = _weights(settings, returns)
    async_scheduling = bool(getattr(runner, "use_async_scheduling", False))
    sizes = footprint(
        captured_layers=len(captured),
        buffer_rows=int(buffers[0].shape[1]),
        top_k=top_k,
        num_experts=num_experts,
        max_tokens=max_tokens,
        num_slots=num_slots,
        weights=weights,
        staging_depth=_staging_depth(async_scheduling) if device.type == "cuda" else 0,
    )
    logger.info(
        "moe_routes: capturing %d MoE layers (log: %s, returned per request: %s); device buffers %.1f MiB, pinned "
        "staging %.1f MiB, prefix-cache routing store %d B per KV slot (%.1f MiB for %d slots, touched as they fill)",
        len(captured),
        settings.path if settings is not None else "off",
        ("ids and weights" if returns.weights else "ids") if returns is not None else "off",
        sizes["device"] / 2**20,
        sizes["pinned"] / 2**20,
        sizes["store_per_slot"],
        sizes["store"] / 2**20,
        num_slots,
    )
    meta = {
        "type": "meta",
        "schema_version": SCHEMA_VERSION,
        "engine": "vllm",
        "engine_version": vllm.__version__,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "model_id": str(model_config.model),
        "dtype": str(model_config.dtype).replace("torch.", ""),
        "device": str(device) if device.type == "cpu" else f"{device} ({current_platform.get_device_name()})",
        "seed": model_config.seed,
        "num_experts": num_experts,
        "top_k": top_k,
        "num_hidden_layers": n_hidden,
        "moe_layers": moe_layer_ids,
        "layers_logged": logged,
        "layer_modules": {str(m._moe_routes_layer_id): m.layer_name for m in logged_mods},
        "id_kind": "logical",
        "routing_source": source,
        "routing_simulation_strategy": sim,
        "scoring_func": str(first.scoring_func),
        "renormalize": bool(first.renormalize),
        # topk_weights are what the expert kernel multiplied by. Some models (vLLM's DeepSeek-V2/V3, GLM-4.5) give
        # the kernel 1.0 and scale the MoE output by the config's factor afterwards.
        "kernel_routed_scaling_factor": float(getattr(first, "routed_scaling_factor", 1.0)),
        "config_routed_scaling_factor": getattr(model_config.hf_text_config, "routed_scaling_factor", None),
        "enforce_eager": bool(model_config.enforce_eager),
        "prefix_caching": bool(runner.cache_config.enable_prefix_caching),
        "kv_cache_groups": len(kv_cfg.kv_cache_groups),
        "routing_store_kv_group": kv_group,
        "tensor_parallel_size": parallel.tensor_parallel_size,
        # Under DP every rank's meta record comes first, and its records carry dp_rank.
        "data_parallel_size": parallel.data_parallel_size,
        "data_parallel_rank": dp_rank,
        "expert_parallel": bool(first.use_ep),
        "eplb": bool(first.enable_eplb),
        "num_physical_experts": int(first.global_num_experts),
        "on_error": settings.on_error if settings is not None else None,
        "returns_routed_experts": returns is not None,
        "patch_series": series,
        "patches": patches,
        # For the front-end (removed before the record is written): what to log and how rows are laid out.
        "writer_data_parallel_rank": parallel.data_parallel_rank,
        "_capture": {
            "layers": captured,
            "log": None if settings is None else [settings.path, settings.layers, settings.on_error],
            "log_cols": log_cols,
            "returns": returns is not None,
            "weights": weights,
            "return_weights": bool(returns is not None and returns.weights),
        },
    }
    st = new_state(
        settings=settings,
        returns=returns,
        layers=captured,
        rows=rows,
        top_k=top_k,
        num_experts=num_experts,
        num_hidden_layers=n_hidden,
        max_tokens=max_tokens,
        device=device,
        meta=meta,
        buffers=buffers,
        kv_group=kv_group,
        block_size=manager_block_size,
        kernel_block_size=kernel_block_size,
        num_slots=num_slots,
        dp_rank=dp_rank,
        async_scheduling=async_scheduling,
    )
    runner._moe_routes_state = st
    _ACTIVE = st


def _fresh_blocks(so: Any, group: int, block_size: int) -> np.ndarray:
    """KV blocks (manager ids) of `group` that this step allocates afresh, i.e. not prefix-cache hits: until this
    step's forward fills them they hold an earlier occupant's KV."""
    fresh: list[list[int]] = []
    for new in so.scheduled_new_reqs:
        fresh.append(new.block_ids[group][new.num_computed_tokens // block_size :])
    cached = so.scheduled_cached_reqs
    for i, rid in enumerate(cached.req_ids):
        blocks = cached.new_block_ids[i]
        if blocks is None:
            continue
        if rid in cached.resumed_req_ids:  # the whole block list is replaced; its hits are in front
            fresh.append(blocks[group][cached.num_computed_tokens[i] // block_size :])
        else:
            fresh.append(blocks[group])
    return np.fromiter((b for bl in fresh for b in bl), dtype=np.int64)


def _new_request(st: _State, engine_id: str, sampling_params: Any) -> Request:
    # Without the log, positions before the return start are never needed: they are not sent.
    start = 0 if st.settings is not None else int(getattr(sampling_params, PROMPT_START, 0) or 0)
    return Request(engine_id, ship_from=start, next_pos=start)


def on_step_begin(runner: Any, so: Any) -> None:
    """GPUModelRunner.execute_model, first thing, for every step (also those that schedule no token)."""
    global _ACTIVE
    st = _engine_state(runner)
    _ACTIVE = st
    if st is None:
        return
    for rid in so.finished_req_ids:
        st.requests.pop(rid, None)
    for new in so.scheduled_new_reqs:
        if new.req_id not in st.requests:
            st.requests[new.req_id] = _new_request(st, new.req_id, new.sampling_params)
    if st.num_slots:
        st.fresh_blocks = _fresh_blocks(so, st.kv_group, st.manager_block_size)
    n = int(so.total_num_scheduled_tokens)
    if n:  # rows a captured layer does not write this step keep a value no id takes: caught at assembly
        st.ids_buf[:n].fill_(st.unwritten)


def _stage(st: _State, n: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """Start the device-to-host copy of this step's first n tokens into a free staging buffer: contiguous
    token-major rows on both sides, so each copy is a single async memcpy."""
    idx = st.staging.free.get()  # back-pressure: never drop, wait for an earlier step to be assembled
    h_ids, h_w = st.staging.destination(idx, n)
    h_ids.copy_(st.ids_buf[:n], non_blocking=True)
    if h_w is not None:
        h_w.copy_(st.w_buf[:n], non_blocking=True)
    return idx, h_ids, h_w


def _captured_rows(st: _State, array: np.ndarray) -> np.ndarray:
    """The captured layers' rows of host capture rows [n, buffer rows, K], as a copy (the buffers are reused)."""
    if st.row_slice is not None:
        return array[:, st.row_slice].copy()
    return array[:, st.rows]


def on_forward(
    runner: Any, scheduler_output: Any, num_tokens: int, req_ids: list[str], num_scheduled_tokens: np.ndarray
) -> None:
    """GPUModelRunner.execute_model, right after the model forward of a scheduled batch."""
    st = _engine_state(runner)
    if st is None:
        return
    n = int(num_tokens)
    if n == 0:
        return
    positions = runner.positions.np[:n].copy()
    counts = np.asarray(num_scheduled_tokens[: len(req_ids)], dtype=np.int64).copy()
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    first_pos = positions[np.minimum(starts, n - 1)]
    gap_blocks: dict[int, np.ndarray] = {}
    bt = runner.input_batch.block_table[st.kv_group] if st.num_slots else None
    slots = bt.slot_mapping.np[:n].copy() if bt is not None else np.full(n, -1, dtype=np.int64)
    requests = st.requests
    batch = [requests.get(rid) for rid in req_ids]
    if any(r is None for r in batch):  # a request the step-begin hook did not see as new (should not happen)
        for i, rid in enumerate(req_ids):
            if batch[i] is None:
                batch[i] = requests[rid] = _new_request(st, rid, runner.requests[rid].sampling_params)
    emit_from = np.fromiter((r.next_pos for r in batch), dtype=np.int64, count=len(batch))
    has = counts > 0
    # positions before a request's first one this step that it never sent: a prefix-cache hit, read back
    for i in np.flatnonzero(has & (first_pos > emit_from)).tolist():
        first = int(first_pos[i])
        if bt is not None:
            gap_blocks[i] = bt.block_table.np[i, : (first + bt.block_size - 1) // bt.block_size].copy()
        else:
            gap_blocks[i] = np.zeros(0, dtype=np.int32)
    ends = np.where(has, np.maximum(emit_from, first_pos + counts), emit_from).tolist()
    for req, end in zip(batch, ends, strict=True):
        req.next_pos = end
    event, idx = None, -1
    if st.staging is not None:
        idx, ids, weights = _stage(st, n)
        event = torch.cuda.Event()
        event.record()
    else:  # CPU: the capture buffers are host memory; copy this step's rows of the captured layers
        ids = _captured_rows(st, st.ids_buf.numpy()[:n])
        weights = None if st.w_buf is None else _captured_rows(st, st.w_buf.numpy()[:n])
    job = StepJob(batch, counts, positions, slots, emit_from, gap_blocks, st.fresh_blocks, ids, weights, event, idx)
    st.fresh_blocks = np.zeros(0, dtype=np.int64)
    st.unshipped.append(job)  # assembled when this step's ModelRunnerOutput is built (or collected)


# ----------------------------------------------------------------------------------------------------
# Rows per step: model runner -> ModelRunnerOutput.routed_experts (StepRows) -> scheduler -> EngineCoreOutput
# .moe_routes (RoutesChunk) -> [one frame per step on the wire] -> OutputProcessor.
# ----------------------------------------------------------------------------------------------------
class _Deferred:
    """ModelRunnerOutput.routed_experts of an async-scheduling step until its output is collected
    (AsyncGPUModelRunnerOutput.get_output, after the step's device work is done): no extra host sync."""

    def __init__(self, st: _State, jobs: list[StepJob]) -> None:
        self.st, self.jobs = st, jobs


def on_model_runner_output(runner: Any, output: Any) -> None:
    """GPUModelRunner.sample_tokens, when the step's ModelRunnerOutput is built: the rows of the steps forwarded
    since the last output."""
    st = _engine_state(runner)
    if st is None or not st.unshipped:
        return
    jobs, st.unshipped = st.unshipped, []
    if getattr(runner, "use_async_scheduling", False):
        output.routed_experts = _Deferred(st, jobs)
    else:
        output.routed_experts = _rows_of(st, jobs)


def resolve_output(output: Any) -> None:
    """AsyncGPUModelRunnerOutput.get_output."""
    deferred = output.routed_experts
    if isinstance(deferred, _Deferred):
        output.routed_experts = _rows_of(deferred.st, deferred.jobs)


def _job_arrays(st: _State, job: StepJob) -> tuple[np.ndarray, np.ndarray | None]:
    if job.event is None:
        return job.ids, job.weights
    job.event.synchronize()
    ids = _captured_rows(st, job.ids.numpy())
    return ids, None if job.weights is None else _captured_rows(st, job.weights.numpy())


def _rows_of(st: _State, jobs: list[StepJob]) -> list[StepRows]:
    out = []
    for job in jobs:
        try:
            ids, w = _job_arrays(st, job)
            rows = step_rows(st.assembler.assemble(job, ids, w))
        except MoeRoutesCaptureError as exc:
            # Never a wrong row: the step's positions become gaps (the log says so, the completions that cover
            # them return None); the engine keeps serving (this may run on the executor's output thread, where
            # raising would hang the engine core).
            st.capture_errors += 1
            if st.capture_errors == 1:
                logger.error("moe_routes: %s; the positions of such steps are reported as gaps", exc)
            rows = _gap_rows(st, job)
        finally:
            if job.staging_index >= 0:
                st.staging.free.put(job.staging_index)
        rows.dp_rank = st.dp_rank
        if not st.meta_shipped:
            rows.meta, st.meta_shipped = st.meta, True
        out.append(rows)
    return out


def _gap_rows(st: _State, job: StepJob) -> StepRows:
    """A step whose capture is incomplete: every position it would have sent is a gap."""
    nreq = len(job.requests)
    empty = np.zeros((0, len(st.layers), st.top_k), dtype=id_dtype_for(st.num_experts))
    starts = np.concatenate(([0], np.cumsum(job.counts)[:-1]))
    segments = {}
    for i in range(nreq):
        if job.counts[i] == 0:
            continue
        end = int(job.positions[starts[i]]) + int(job.counts[i])
        if end > job.emit_from[i]:
            segments[i] = [GAP_CAPTURE, int(job.emit_from[i]), end - int(job.emit_from[i])]
    zeros = np.zeros(nreq, dtype=np.int64)
    weights = None if st.w_buf is None else empty.astype(np.float32)
    return StepRows(empty, weights, zeros, zeros, zeros - 1, segments, None)


class RoutesStep(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    """EngineCoreOutput.moe_routes of a step's carrier output: every scheduled request's rows of the step, as
    moe_routes_log.StepRows lays them out (request b owns rows offset[b] .. offset[b] + count[b]); the arrays
    are one serialised frame each."""

    req_ids: list[str]  # engine request ids, batch order
    ids: np.ndarray
    weights: np.ndarray | None
    offset: np.ndarray
    count: np.ndarray
    first: np.ndarray
    segments: dict[int, list[int]] | None = None
    skipped: np.ndarray | None = None
    same_step_hits: dict[int, int] | None = None
    meta: str | None = None  # the engine's meta record (JSON), with the first step each client receives
    dp_rank: int | None = None

    def segments_of(self, b: int) -> list[int] | None:
        return StepRows.segments_of(self, b)  # type: ignore[arg-type]


# The request id of a step's carrier output: no request has it, so the front-end skips the output once it has
# taken its rows (OutputProcessor.process_outputs ignores outputs of requests it does not know).
CARRIER_ID = ""


def note_rows_only(scheduler: Any, request: Any) -> None:
    """Scheduler.update_from_output, for a request the step gave no token (a chunk of a long prefill): its
    client gets the step's rows even when no other output of this step goes to it."""
    pending = getattr(scheduler, "_moe_routes_pending", None)
    if pending is None:
        pending = scheduler._moe_routes_pending = set()
    pending.add(request.client_index)


def attach_step(scheduler: Any, outputs: dict[int, list[Any]], rows_list: list[StepRows]) -> None:
    """Scheduler.update_from_output, once per step: the step's rows go to each client with outputs (or with a
    request whose prefill chunk ran), first in its list, on a carrier output. No work per request here: the
    front-end picks the rows of the completions it still serves and drops the others (requests it finished on a
    stop string or an abort, as it drops their tokens)."""
    global ENABLED
    ENABLED = True
    from vllm.v1.engine import EngineCoreOutput

    meta = getattr(scheduler, "_moe_routes_meta", None)
    for rows in rows_list:
        if rows.meta is not None and meta is None:
            meta = scheduler._moe_routes_meta = json.dumps(rows.meta)
            scheduler._moe_routes_clients = set()
    pending = getattr(scheduler, "_moe_routes_pending", None) or set()
    scheduler._moe_routes_pending = None
    seen = scheduler._moe_routes_clients
    for client in {c for c, outs in outputs.items() if outs} | pending:
        steps = [
            RoutesStep(
                rows.req_ids,
                rows.ids,
                rows.weights,
                rows.offset,
                rows.count,
                rows.first,
                rows.segments or None,
                rows.skipped,
                rows.same_step_hits,
                None,
                rows.dp_rank,
            )
            for rows in rows_list
        ]
        if client not in seen:
            steps[0].meta = meta
            seen.add(client)
        outputs[client].insert(0, EngineCoreOutput(request_id=CARRIER_ID, new_token_ids=[], moe_routes=steps))


# ----------------------------------------------------------------------------------------------------
# Front-end: OutputProcessor hooks. The rows of each completion as they arrive with its tokens: handed to the
# log's writer process and gathered for CompletionOutput.routed_experts.
# ----------------------------------------------------------------------------------------------------
class _FrontEnd:
    """One OutputProcessor's capture state, set up from the first engine meta record it receives."""

    def __init__(self) -> None:
        self.ready = False
        self.layout: Layout | None = None
        self.id_dtype = np.dtype(np.uint8)
        self.top_k = 0
        self.returns = self.return_weights = False
        self.log: LogClient | None = None
        self.log_layers: list[int] = []
        self.log_cols: list[int] | None = None
        self.metas_seen: set[int | None] = set()
        self.on_error = "stop"
        self.capture_gaps_seen = False

    def add_meta(self, meta: dict[str, Any], dp_rank: int | None, owner: Any) -> None:
        capture = meta.pop("_capture")
        if not self.ready:
            self.ready = True
            self.layout = Layout(capture["layers"], meta["num_hidden_layers"])
            self.id_dtype = id_dtype_for(int(meta["num_experts"]))
            self.top_k = int(meta["top_k"])
            self.returns, self.return_weights = bool(capture["returns"]), bool(capture["return_weights"])
            if capture["log"] is not None:
                path, layers, on_error = capture["log"]
                self.on_error = on_error
                self.log_layers, self.log_cols = list(capture["layers"]), capture["log_cols"]
                self.log = LogClient(Settings(path, None if layers is None else tuple(layers), on_error))
                weakref.finalize(owner, self.log.close)
        if self.log is not None and dp_rank not in self.metas_seen:
            self.metas_seen.add(dp_rank)
            self.log.meta(meta)


def _front(output_processor: Any) -> _FrontEnd:
    fe = getattr(output_processor, "_moe_routes", None)
    if fe is None:
        fe = output_processor._moe_routes = _FrontEnd()
    return fe


@dataclass
class _Completion:
    """A completion's front-end state: how its records name it, and the rows it returns."""

    field: bytes
    returned: ReturnedRows


def on_output_request(output_processor: Any, req_state: Any, request: Any) -> None:
    """OutputProcessor.add_request: the id and completion index the caller sees, and where its returned rows
    start (routed_experts_prompt_start, as check_request left it)."""
    params = request.sampling_params
    if not ENABLED or params is None:
        req_state._moe_routes = None
        return
    parent = req_state.parent_req
    n = parent.sampling_params.n if parent is not None else params.n
    tag = (params.extra_args or {}).get(REQUEST_TAG) if isinstance(params.extra_args, dict) else None
    req_id, index = client_request(req_state.external_req_id, tag, req_state.request_index, n)
    start = int(getattr(params, PROMPT_START, 0) or 0)
    req_state._moe_routes = _Completion(request_field(req_id, index), ReturnedRows(start))


def take_step_rows(output_processor: Any, steps: list[RoutesStep]) -> None:
    """OutputProcessor.process_outputs, for a step's carrier output (first in its batch): the rows of every
    completion this front-end still serves; the log gets them as one job (end_of_outputs), the completions
    gather them for their return. Rows of completions it already finished (a stop string it found, an abort)
    are dropped here, as their tokens are."""
    fe = _front(output_processor)
    states = output_processor.request_states
    for step in steps:
        if step.meta is not None:
            fe.add_meta(json.loads(step.meta), step.dp_rank, output_processor)
        entries = []
        for b, rid in enumerate(step.req_ids):
            req_state = states.get(rid)
            state = None if req_state is None else getattr(req_state, "_moe_routes", None)
            if state is None:
                continue
            segments = step.segments_of(b)
            if segments is None:
                continue
            lo, n = int(step.offset[b]), int(step.count[b])
            if fe.returns:
                w = step.weights[lo : lo + n] if fe.return_weights else None
                state.returned.add(segments, step.ids[lo : lo + n], w)
            entries.append((state.field, step.dp_rank, segments, lo, n))
            if segments[0] == GAP_CAPTURE and not fe.capture_gaps_seen:
                fe.capture_gaps_seen = True
                if fe.on_error == "fail" and fe.log is not None:
                    raise RuntimeError(
                        f"moe_routes: the engine could not capture the routing of a step ({ENV_ON_ERROR}=fail); "
                        "its engine log has the error"
                    )
        if fe.log is not None and entries:
            stats = fe.log.front
            if step.skipped is not None:
                stats["recomputed_tokens_skipped"] += int(step.skipped.sum())
            if step.same_step_hits:
                stats["same_step_hits"] += sum(step.same_step_hits.values())
            fe.log.routes(step.ids, step.weights, entries, fe.log_layers, fe.log_cols)


def completion_routes(
    output_processor: Any, req_state: Any, engine_core_output: Any, finish_reason: Any
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """OutputProcessor.process_outputs, for each output: on the finishing one (also when a stop string, found
    here, finishes it) (routed_experts, routed_expert_weights): rows [P + G - 1 - start, num_hidden_layers,
    top_k], as upstream; the last sampled token has no forward. The step's rows arrived before, on its carrier
    (all of them reach the caller: the front-end only finishes a completion at or after the token they came
    with)."""
    state = getattr(req_state, "_moe_routes", None)
    fe = getattr(output_processor, "_moe_routes", None)
    if finish_reason is None or state is None or fe is None or not fe.returns:
        return None, None
    return _returned(fe, req_state, state, aborted=False)


def _returned(
    fe: _FrontEnd, req_state: Any, state: _Completion, aborted: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    got = state.returned
    generated = len(req_state.detokenizer.output_token_ids) if req_state.detokenizer is not None else 0
    if got.broken is not None:
        logger.error("moe_routes: request %s: %s; its routed_experts is None", req_state.request_id, got.broken)
        return None, None
    if aborted and generated == 0:
        if not got.received:
            return None, None  # aborted before any forward reached the front-end (upstream: None as well)
    else:
        expected = req_state.prompt_len + generated - 1 - got.start
        if got.rows != max(expected, 0):
            # A hole the engine reported, or rows the count cannot place: not this completion's positions
            # start .. P+G-2 exactly once.
            logger.error(
                "moe_routes: request %s finished with %d routing rows for its %d positions; routed_experts is None",
                req_state.request_id,
                got.rows,
                expected,
            )
            return None, None
    return got.take(fe.layout, fe.id_dtype, fe.top_k, fe.return_weights)


def abort_routes(output_processor: Any, req_state: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """OutputProcessor.abort_requests: the rows of an aborted completion so far (positions start .. P+G-2 for the
    G tokens its final output carries; for one aborted before its first token, the prompt rows computed so far;
    None when nothing was computed), as upstream 0.22+ returns them."""
    state = getattr(req_state, "_moe_routes", None)
    fe = getattr(output_processor, "_moe_routes", None)
    if state is None or fe is None or not fe.returns:
        return None, None
    return _returned(fe, req_state, state, aborted=True)


def keep_abort_output(output_processor: Any, request_output: Any) -> None:
    """OutputProcessor.abort_requests without a queue (LLMEngine): LLMEngine.abort_request hands the final output
    back."""
    kept = getattr(output_processor, "_moe_routes_aborted", None)
    if kept is None:
        kept = output_processor._moe_routes_aborted = []
    kept.append(request_output)


def take_abort_outputs(output_processor: Any) -> list[Any]:
    """LLMEngine.abort_request: the final outputs of the requests it aborted (routing computed so far included)."""
    kept = getattr(output_processor, "_moe_routes_aborted", None) or []
    output_processor._moe_routes_aborted = []
    return kept


def end_of_outputs(output_processor: Any) -> None:
    """OutputProcessor.process_outputs, after the batch: under VLLM_LOG_MOE_ON_ERROR=fail, a failed log stops
    the engine here (the caller's generate() or the server's output handler gets the error)."""
    fe = getattr(output_processor, "_moe_routes", None)
    if fe is not None and fe.log is not None:
        fe.log.check()


def flush_engine(llm_engine: Any, timeout: float | None = None) -> list[dict[str, Any]]:
    """LLM._run_engine: every record of the completions generate() returns is on disk when it returns. Returns
    the log writer's statistics."""
    fe = getattr(llm_engine.output_processor, "_moe_routes", None)
    if fe is None or fe.log is None:
        return [{}]
    return [fe.log.flush(timeout)]


# ----------------------------------------------------------------------------------------------------
# Requests and choices of the OpenAI server (routed_experts_prompt_start, the choice fields).
# ----------------------------------------------------------------------------------------------------
def prompt_start_of(request: Any) -> int | None:
    """routed_experts_prompt_start as the client sent it; None if absent. OpenAI /v1/completions and
    /v1/chat/completions (and SageMaker /invocations, which dispatches to them): the request field (lax int,
    as upstream 0.30+) or a vllm_xargs key. /inference/v1/generate (GenerateRequest, no such field): inside
    sampling_params, as upstream reads it, or in its extra_args (our other endpoints' vllm_xargs)."""
    if PROMPT_START in getattr(type(request), "model_fields", {}):
        if PROMPT_START in request.model_fields_set:
            return int(getattr(request, PROMPT_START))
        xargs = getattr(request, "vllm_xargs", None) or {}
        return xargs.get(PROMPT_START) if PROMPT_START in xargs else None
    params = getattr(request, "sampling_params", None)
    if params is None:
        return None
    start = getattr(params, PROMPT_START, 0)
    if start:
        return int(start)
    extra = getattr(params, "extra_args", None)
    if isinstance(extra, dict) and PROMPT_START in extra:
        return extra[PROMPT_START]
    return None


def http_request(request: Any, sampling_params: Any) -> None:
    """OpenAI /v1/completions and /v1/chat/completions, after to_sampling_params: the field's start becomes
    the engine's (InputProcessor.process_inputs then range-checks it, as upstream, whether or not the server
    returns routing). As upstream 0.30+: a start sent to a server without the flag is accepted (the choice's
    routed_experts is null), and beam search ignores it (BeamSearchParams has no such field; upstream's
    to_beam_search_params does not read it). Our extension's rule: field and vllm_xargs must agree."""
    if PROMPT_START not in request.model_fields_set:
        return
    start = getattr(request, PROMPT_START)
    xargs = getattr(request, "vllm_xargs", None) or {}
    if PROMPT_START in xargs and xargs[PROMPT_START] != start:
        raise _validation_error(f"{PROMPT_START} given twice ({start} and vllm_xargs {xargs[PROMPT_START]})", start)
    if hasattr(sampling_params, PROMPT_START):
        sampling_params.routed_experts_prompt_start = start


def check_request(sampling_params: Any, prompt_len: int, model_config: Any, resumable: bool = False) -> None:
    """InputProcessor.process_inputs (every front-end: LLM, AsyncLLM, the OpenAI server, /inference/v1/generate):
    a start given as SamplingParams.routed_experts_prompt_start or as extra_args (vllm_xargs) is range-checked
    with upstream's message (0.32.0 input_processor.py:454-463: for every request, the flag on or off) and made
    the field's value. An engine without the flag accepts it and returns None, as upstream."""
    returns = return_settings(model_config)
    if returns is not None and resumable:
        raise _validation_error(
            f"streaming-input sessions are not supported with {RETURN_FLAG} in this patch series "
            "(a session's rows would not follow its chunks)",
            None,
        )
    extra = sampling_params.extra_args
    start = getattr(sampling_params, PROMPT_START, 0)
    if isinstance(extra, dict) and PROMPT_START in extra:
        xstart = extra[PROMPT_START]
        if isinstance(xstart, bool) or not isinstance(xstart, int):
            raise _validation_error(f"{PROMPT_START} must be an integer, got {type(xstart).__name__}", xstart)
        if start not in (0, xstart):
            raise _validation_error(f"{PROMPT_START} given twice ({start} and vllm_xargs {xstart})", xstart)
        start = xstart
    if start == 0:
        return
    if isinstance(start, bool) or not isinstance(start, int):
        raise _validation_error(f"{PROMPT_START} must be an integer, got {type(start).__name__}", start)
    if not 0 <= start <= prompt_len:
        raise _validation_error(
            f"{PROMPT_START} must be between 0 and the prompt length ({prompt_len}), inclusive.", start
        )
    sampling_params.routed_experts_prompt_start = start


def _validation_error(message: str, value: Any) -> Exception:
    """A 400 on the OpenAI server (BadRequestError, param routed_experts_prompt_start), as upstream's."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=PROMPT_START, value=value)


# bytes -> base64 str: pybase64.b64encode_as_string (pybase64 is a vLLM 0.15.1 dependency, as upstream's
# numpy2base64 uses it; it releases the GIL while it encodes), else the stdlib's: the same characters. Looked
# up at the first encoding.
_B64ENCODE: Any = None
# Arrays above this many bytes (ids + weights of one completion) are encoded in a worker thread by
# encode_choice_routes; below it, inline (a thread hop costs more than encoding them: ~0.1 ms).
_B64_OFF_LOOP_BYTES = 1 << 16
# The cached strings on a CompletionOutput: (ids, ids_b64, weights, weights_b64); ids and weights are the
# arrays they encode, checked by identity before use.
_B64_ATTR = "_moe_routes_b64"


def _b64encode() -> Any:
    global _B64ENCODE
    if _B64ENCODE is None:
        try:
            from pybase64 import b64encode_as_string as encode
        except ImportError:  # vLLM requires pybase64; the stdlib gives identical characters
            from base64 import b64encode

            def encode(data: Any) -> str:
                return b64encode(data).decode("ascii")

        _B64ENCODE = encode
    return _B64ENCODE


def _npy_base64(array: np.ndarray) -> str:
    """Byte for byte upstream's numpy2base64 (0.32.0 utils/serial_utils.py:67-71: base64 of the bytes
    np.save(allow_pickle=False) writes), built without np.save's two copies and the bytes -> str decode: the
    .npy header, then the data copied once by numpy after it. numpy's copy and pybase64's encoding release the
    GIL, so in a worker thread (encode_choice_routes) the event loop keeps running."""
    import io

    encode = _b64encode()
    fmt = np.lib.format
    if array.flags.c_contiguous and not array.dtype.hasobject:
        with io.BytesIO() as head:
            try:  # np.save's own header (version 1.0: every array this module returns fits it)
                fmt.write_array_header_1_0(head, fmt.header_data_from_array_1_0(array))
                header = head.getvalue()
            except ValueError:
                header = None
        if header is not None:
            npy = np.empty(len(header) + array.nbytes, np.uint8)  # not zero-filled (bytearray(n) is, holding the GIL)
            npy[: len(header)] = np.frombuffer(header, np.uint8)
            npy[len(header) :] = array.reshape(-1).view(np.uint8)
            return encode(npy)
    with io.BytesIO() as buf:
        np.save(buf, array, allow_pickle=False)
        return encode(buf.getbuffer())


def _encode_pair(ids: np.ndarray, weights: np.ndarray | None) -> tuple[str, str | None]:
    return _npy_base64(ids), None if weights is None else _npy_base64(weights)


def _completion_outputs(outputs: Any) -> list[Any]:
    """The CompletionOutputs in a RequestOutput, a CompletionOutput, or a list of either (None skipped)."""
    if outputs is None:
        return []
    if hasattr(outputs, "outputs"):
        return list(outputs.outputs)
    if hasattr(outputs, "routed_experts"):
        return [outputs]
    return [o for item in outputs for o in _completion_outputs(item)]


async def encode_choice_routes(outputs: Any) -> None:
    """Awaited by the async serving code before it builds choices from `outputs` (a RequestOutput, a
    CompletionOutput, or a list of either): the routing of each finished completion above
    _B64_OFF_LOOP_BYTES is base64-encoded in a worker thread (asyncio.to_thread), not on the event loop
    (DeepSeek-V3, 4096 positions with weights: ~10 MB of .npy), and cached on its CompletionOutput for
    add_choice_fields. Smaller arrays are left to add_choice_fields, which encodes them inline."""
    todo = []
    for out in _completion_outputs(outputs):
        ids = getattr(out, "routed_experts", None)
        if ids is None:
            continue
        weights = getattr(out, "routed_expert_weights", None)
        if ids.nbytes + (0 if weights is None else weights.nbytes) <= _B64_OFF_LOOP_BYTES:
            continue
        cached = getattr(out, _B64_ATTR, None)
        if cached is not None and cached[0] is ids and cached[2] is weights:
            continue
        todo.append((out, ids, weights))
    if not todo:
        return
    import asyncio

    encoded = await asyncio.gather(*(asyncio.to_thread(_encode_pair, ids, w) for _, ids, w in todo))
    for (out, ids, weights), (ids_b64, w_b64) in zip(todo, encoded, strict=True):
        setattr(out, _B64_ATTR, (ids, ids_b64, weights, w_b64))


def add_choice_fields(choice: Any, output: Any, request: Any) -> None:
    """A choice (or a stream choice's final chunk) gets the completion's routing: routed_experts (base64 .npy,
    as vLLM 0.22+) in the field upstream declares on non-streamed choices (`str | None = None`: null when no
    routing is returned), else as an extra field (stream choices, which upstream leaves without it); our
    extensions routed_expert_weights and routed_experts_prompt_start (the start used) as extra fields, present
    only when routing is returned, so stream chunks and null choices do not grow. Set on the built model:
    passed to its constructor they would pass OpenAIBaseModel's validator, which logs every extra field as
    "present in the request but ignored". Uses the strings encode_choice_routes cached, else encodes here."""
    ids = getattr(output, "routed_experts", None)
    if ids is None:
        return
    weights = getattr(output, "routed_expert_weights", None)
    cached = getattr(output, _B64_ATTR, None)
    if cached is not None and cached[0] is ids and cached[2] is weights:
        ids_b64, w_b64 = cached[1], cached[3]
    else:
        ids_b64, w_b64 = _encode_pair(ids, weights)
    extra = choice.__pydantic_extra__
    if "routed_experts" in getattr(type(choice), "model_fields", {}):
        choice.routed_experts = ids_b64
    else:
        extra["routed_experts"] = ids_b64
    if w_b64 is not None:
        extra["routed_expert_weights"] = w_b64
    extra[PROMPT_START] = int(prompt_start_of(request) or 0)
