# SPDX-License-Identifier: Apache-2.0
"""Per-token MoE routing log (``VLLM_LOG_MOE``), added by the moe-routes patch series.

Upstream files only call into this module: the engine glue (settings of an engine, capture op, staging,
attribution). Its engine-independent half (settings parsing, client ids, record formatting, the writer
thread) is ``moe_routes_log``, importable without torch or vLLM so that it is tested in seconds. Both sit
outside the ``fused_moe`` package and import nothing beyond what ``import vllm`` already loaded (the log
module: stdlib and numpy), because the front-end
(``vllm.entrypoints.llm``, ``EngineArgs``, ``InputProcessor``) imports it: with logging off, importing
vLLM costs what it cost before.

Data path, per model step:
  1. ``on_step_begin`` (``GPUModelRunner.execute_model``, before anything else, also for steps that
     schedule no token): forgets finished requests, learns the client-visible id of new requests,
     notes the KV blocks this step allocates afresh, and fills this step's rows of the capture
     buffers with -1, so that a logged layer that did not write is detected, never logged stale.
  2. Every logged ``FusedMoE`` layer copies the routing its expert kernel used (``topk_ids``,
     ``topk_weights``) into its row of two static token-major buffers ``[max_tokens, rows, top_k]``
     on the model's device: a device-side write, recorded into CUDA graphs and replayed with them;
     under ``torch.compile`` an opaque custom op. No host sync inside the forward.
  3. ``on_forward`` (after the model forward): one contiguous device-to-host copy of the first
     ``num_tokens`` rows into a pinned staging buffer (async + event on CUDA), plus numpy copies of
     the batch layout (request ids, positions, KV slots).
  4. A writer thread checks that every logged row was written, updates a KV-slot -> routing store
     (invalidating blocks allocated afresh, then storing this step's tokens), fills prefix-cache hits
     from that store (``"cached": true``; a slot that does not hold the hit token gives a ``gap``
     record, never another token's routing), and appends whole JSONL lines under an ``flock``.

Dummy, profiling, warm-up and graph-capture forwards write only into the device buffers; records are
emitted solely for tokens ``GPUModelRunner.execute_model`` scheduled.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.moe_routes_log import (
    ENV_LAYERS,
    ENV_ON_ERROR,
    ENV_PATH,
    REQUEST_TAG,
    SCHEMA_VERSION,
    STATE_FILE,
    Failure,
    MoeRoutesCaptureError,
    MoeRoutesConfigError,
    Request,
    RouteAssembler,
    Settings,
    StepJob,
    Writer,
    WriterState,
    bad_env,
    client_request,
    id_dtype_for,
    read_settings,
    returned_rows,
)

logger = init_logger(__name__)

# Attribute of the VllmConfig that carries the settings the engine was started with.
_CONFIG_ATTR = "_moe_routes_settings"
# Attribute of the ModelConfig that carries the per-request return (enable_return_routed_experts).
_RETURN_ATTR = "_moe_routes_return"
_UNSET = object()
RETURN_FLAG = "--enable-return-routed-experts"
WEIGHTS_FLAG = "--enable-return-routed-expert-weights"
PROMPT_START = "routed_experts_prompt_start"


@dataclass(frozen=True)
class ReturnSettings:
    """enable_return_routed_experts as this series serves it: CompletionOutput.routed_experts (and, with
    enable_return_routed_expert_weights, .routed_expert_weights), from the same capture as the log."""

    weights: bool = False


def return_settings(model_config: Any) -> ReturnSettings | None:
    return getattr(model_config, _RETURN_ATTR, None)


# The check every hot-path hook does: True once an engine that logs was configured or built in this
# process. Set at import from the environment (a spawned engine process inherits it) and by
# validate_engine_config / register_layer, which see the settings an engine actually starts with:
# VLLM_LOG_MOE may be set after `import vllm`, and a forked engine core inherits module state.
ENABLED: bool = os.environ.get(ENV_PATH, "").strip() not in ("", "0")


def _activate() -> None:
    global ENABLED
    _ensure_op()
    ENABLED = True


def engine_settings(vllm_config: Any) -> Settings | None:
    """The settings this engine started with: those validate_engine_config attached to its config
    (they travel with the config into forked, spawned and in-process engine cores), else the
    environment (a config built without EngineArgs.create_engine_config)."""
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
    """enable_return_routed_experts is served by this module, from the capture the log uses. Upstream's own
    path (RoutedExpertsCapturer) returns zeros on this pin (bound before the capturer exists, fixed in 0.16
    by PR #33013) and allocates on cuda only: switched off by clearing the ModelConfig flag, which it alone
    reads; the request lives on in the ModelConfig's _moe_routes_return."""
    weights = bool(getattr(engine_args, "enable_return_routed_expert_weights", False))
    returns = None
    if model_config is not None and model_config.enable_return_routed_experts:
        returns = ReturnSettings(weights=weights)
        model_config.enable_return_routed_experts = False
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
# Request ids as the client sees them (front-end): InputProcessor.assign_request_id makes engine ids
# unique ("<id>-<8 random chars>"), parallel sampling (n > 1) runs child requests "<index>_<engine id>",
# and the OpenAI completions endpoint runs prompt i of a request as "<id>-<i>". The tag rides in
# SamplingParams.extra_args to the model runner, which only sees engine ids.
# ----------------------------------------------------------------------------------------------------
# Engine request id -> (response id, first choice index, choices in the response), filled by the OpenAI
# completions endpoint and consumed by tag_request in the same (API server) process. Kept out of the
# request itself: a client can set SamplingParams.extra_args (vllm_xargs) but not this table.
_CHOICES: dict[str, tuple[str, int, int]] = {}
_CHOICES_MAX = 1 << 16  # prompts that fail validation never reach tag_request: drop the oldest


def tag_choices(
    sampling_params: Any, engine_request_id: str, client_id: str, first_choice: int, num_choices: int
) -> None:
    """OpenAI /v1/completions: the prompt run as `engine_request_id` answers choices
    [first_choice, first_choice + n) of the response `client_id`."""
    if not ENABLED or not hasattr(sampling_params, "extra_args"):
        return  # logging off, or beam search (BeamSearchParams), which runs its own requests
    if len(_CHOICES) >= _CHOICES_MAX:
        del _CHOICES[next(iter(_CHOICES))]
    _CHOICES[engine_request_id] = (str(client_id), int(first_choice), int(num_choices))


def tag_request(request: Any) -> None:
    """InputProcessor.assign_request_id: record the id the caller sees (RequestOutput.request_id, or the
    OpenAI response id), its first choice index and n, so that every record maps to exactly one
    completion. Whatever a client put under the same key is replaced."""
    params = getattr(request, "sampling_params", None)
    if not ENABLED or params is None:
        return
    n = int(params.n)
    client_id, first_choice, num_choices = _CHOICES.pop(request.external_req_id, (request.external_req_id, 0, n))
    tag = {"req_id": client_id, "first_choice": first_choice, "num_choices": num_choices, "n": n}
    # A private copy: the caller's SamplingParams may be shared by several prompts.
    params = copy.copy(params)
    params.extra_args = {**(params.extra_args or {}), REQUEST_TAG: tag}
    request.sampling_params = params


# ----------------------------------------------------------------------------------------------------
# Layer registry (FusedMoE.__init__) and the capture op (forward paths).
# ----------------------------------------------------------------------------------------------------
def register_layer(layer: torch.nn.Module) -> None:
    """Called at the end of FusedMoE.__init__. Fixes the layer's row in the capture buffers now (the
    decoder-layer index, or its position in VLLM_LOG_MOE_LAYERS), so that torch.compile and CUDA graphs
    bake a constant row. Turns the hot path on before the first forward is traced."""
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
        layer._moe_routes_slot = layer_id
    elif layer_id in settings.layers:
        layer._moe_routes_slot = settings.layers.index(layer_id)


def _gathers_dp_ranks(layer: torch.nn.Module) -> bool:
    """True when the router input holds every DP rank's tokens: FusedMoE.forward_impl's naive
    dispatch (do_naive_dispatch_combine), i.e. DP without a modular all2all kernel and without DP
    chunking. The chunked path and modular kernels route this rank's tokens only."""
    if layer.dp_size <= 1 or layer.use_dp_chunking:
        return False
    from vllm.model_executor.layers.fused_moe.fused_moe_modular_method import FusedMoEModularMethod

    return not isinstance(layer.quant_method, FusedMoEModularMethod)


def _this_dp_rank_rows(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This DP rank's rows of a routing result computed on the all-gathered batch. Naive dispatch
    concatenates the ranks' (padded) batches in rank order, sized by dp_metadata.num_tokens_across_dp_cpu;
    the sizes are host values, so no device sync."""
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
    """EPLB: the router maps each logical expert to one of its physical replicas. Invert the layer's
    current logical_to_physical_map ([logical, replica] -> physical, -1 padded); device ops only, so this
    is captured into CUDA graphs and follows in-place EPLB rearrangements."""
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
        return  # before KV-cache init (profile run), or an engine / rank that does not log
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
    """Monolithic kernels that route internally (FlashInfer TRT-LLM, MXFP4, XPU): log the router's result
    for the same inputs; the meta record says routing_source='router'. The CPU kernel records itself."""
    if layer._moe_routes_slot < 0 or _kernel_records_itself(layer):
        return
    # _compute_routing is select_experts without the EPLB replica mapping and its expert-load
    # accounting, which must count the kernel's own call only: its ids are already logical.
    topk_weights, topk_ids = layer.router._compute_routing(hidden_states, router_logits, None)
    _capture(layer, topk_ids, topk_weights, row_offset)


def _routing_source(moe_modules: list[torch.nn.Module]) -> str:
    """'kernel': ids/weights the expert kernel received; 'router': a monolithic kernel routes internally
    and we log the router's result for the same inputs; 'simulated': a RoutingSimulatorRouter."""
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


# ----------------------------------------------------------------------------------------------------
# Engine-side state, created when the KV cache exists (before warm-up and graph capture).
# ----------------------------------------------------------------------------------------------------
class _HostStaging:
    """Pinned host buffers the device buffers are copied into, one per step in flight. The copy of the
    first n tokens goes to buffer[:n] of a token-major buffer: a contiguous pinned region, so the
    device-to-host copy is a single async memcpy (a strided or pageable destination makes PyTorch stage
    through pageable memory and the host waits for the whole forward)."""

    def __init__(self, shape: tuple[int, ...], depth: int, alloc: Any = None) -> None:
        alloc = alloc or (lambda s, dtype: torch.empty(s, dtype=dtype, pin_memory=True))
        self.buffers = [(alloc(shape, torch.int32), alloc(shape, torch.float32)) for _ in range(depth)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self.free.put(i)

    def destination(self, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.buffers[index]
        return ids[:n], weights[:n]


@dataclass(kw_only=True)
class _State(WriterState):
    """One engine's capture state: the writer's share plus the device buffers and per-request progress."""

    max_tokens: int
    ids_buf: torch.Tensor  # [max_tokens, n_rows, top_k], token-major
    w_buf: torch.Tensor
    device: torch.device
    kv_group: int  # KV-cache group whose slots key the routing store (-1: none)
    requests: dict[str, Request] = field(default_factory=dict)  # engine id -> request
    fresh_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    staging: _HostStaging | None = None
    thread: Writer | None = None
    assembler: RouteAssembler | None = None  # set when steps are assembled here (routing returned per request)
    returns: ReturnSettings | None = None
    num_hidden_layers: int = 0
    unreturned: list[StepJob] = field(default_factory=list)  # steps forwarded, not yet in a ModelRunnerOutput


_STAGING_DEPTH = 4


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
    """One FusedMoE per decoder layer, with a known index: records and returned rows are keyed by decoder
    layer. The error names the switch that asked (returns None: the log's VLLM_LOG_MOE)."""
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
    """(group index, manager block size) of the KV-cache group whose slots identify a token for the
    prefix-cache routing store: a full-attention group keeps every block of a request (a sliding-window
    group swaps blocks that left the window for the null block, a Mamba group has no per-token slots).
    (-1, 0) when there is none: prefix-cache hits then become gap records."""
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
    """GPUModelRunner.initialize_kv_cache (CPUModelRunner inherits it): allocate the capture buffers,
    the KV-slot store and the writer, and write the meta record."""
    global _ACTIVE
    settings = engine_settings(runner.vllm_config)
    returns = return_settings(runner.model_config)
    if settings is None and returns is None:
        return
    old = _engine_state(runner)
    if old is not None:  # KV cache re-initialised (e.g. wake-up): drain the old writer, start afresh
        _close(old)
        runner._moe_routes_state = None
    moe_modules = [m for m in runner.model.modules() if hasattr(m, "_moe_routes_layer_id")]
    if not moe_modules:
        raise refusal(settings, returns, f"needs an MoE model: {runner.model_config.model} has no FusedMoE layer")
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
        # Each TP rank then routes only its shard of the batch; rank 0 alone cannot write every token.
        raise refusal(
            settings,
            returns,
            "does not support sequence-parallel MoE (expert parallel with TP > 1 and DP > 1); use TP = 1 per DP rank",
        )
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        # TP ranks other than 0 compute the same routing; one copy of the log is written by rank 0.
        for mod in moe_modules:
            mod._moe_routes_slot = -1
        return
    parallel = runner.parallel_config
    dp_rank = int(parallel.data_parallel_rank) if parallel.data_parallel_size > 1 else None
    n_rows = max(rows) + 1
    max_tokens = int(runner.max_num_tokens)
    sizes = getattr(runner, "cudagraph_batch_sizes", None) or []
    if sizes:
        max_tokens = max(max_tokens, int(max(sizes)))
    device = runner.device
    ids_buf = torch.full((max_tokens, n_rows, top_k), -1, dtype=torch.int32, device=device)
    w_buf = torch.zeros((max_tokens, n_rows, top_k), dtype=torch.float32, device=device)

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
        "routing_source": _routing_source(logged_mods),
        "routing_simulation_strategy": sim,
        "scoring_func": str(first.scoring_func),
        "renormalize": bool(first.renormalize),
        # topk_weights are what the expert kernel multiplied by. Some models (vLLM's DeepSeek-V2/V3,
        # GLM-4.5) give the kernel 1.0 and scale the MoE output by the config's factor afterwards.
        "kernel_routed_scaling_factor": float(getattr(first, "routed_scaling_factor", 1.0)),
        "config_routed_scaling_factor": getattr(model_config.hf_text_config, "routed_scaling_factor", None),
        "enforce_eager": bool(model_config.enforce_eager),
        "prefix_caching": bool(runner.cache_config.enable_prefix_caching),
        "kv_cache_groups": len(kv_cfg.kv_cache_groups),
        "routing_store_kv_group": kv_group,
        "tensor_parallel_size": parallel.tensor_parallel_size,
        # Under DP every rank's writer appends its own meta record and tags its records with dp_rank.
        "data_parallel_size": parallel.data_parallel_size,
        "data_parallel_rank": dp_rank,
        "expert_parallel": bool(first.use_ep),
        "eplb": bool(first.enable_eplb),
        "num_physical_experts": int(first.global_num_experts),
        "on_error": settings.on_error if settings is not None else None,
        "returns_routed_experts": returns is not None,
        "patch_series": series,
        "patches": patches,
        "writer": {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "id": uuid.uuid4().hex[:12],
            "data_parallel_rank": parallel.data_parallel_rank,
        },
        "created_unix": time.time(),
    }
    st = _State(
        settings=settings,
        layers=captured,
        rows=rows,
        log_cols=log_cols,
        top_k=top_k,
        num_experts=num_experts,
        max_tokens=max_tokens,
        ids_buf=ids_buf,
        w_buf=w_buf,
        device=device,
        kv_group=kv_group,
        manager_block_size=manager_block_size,
        kernel_block_size=kernel_block_size,
        num_slots=num_slots,
        meta=meta,
        dp_rank=dp_rank,
        returns=returns,
        num_hidden_layers=n_hidden,
    )
    if device.type == "cuda":
        st.staging = _HostStaging(tuple(ids_buf.shape), _STAGING_DEPTH)
    # One owner of the KV-slot store: the engine thread when it must hand rows back with each step's
    # output, else the writer thread.
    if returns is not None:
        st.assembler = RouteAssembler(st)
    if settings is not None:
        st.thread = Writer(st, assembles=returns is None)
        st.thread.start()
    runner._moe_routes_state = st
    _ACTIVE = st


def _fresh_blocks(so: Any, group: int, block_size: int) -> np.ndarray:
    """KV blocks (manager ids) of `group` that this step allocates afresh, i.e. not prefix-cache hits:
    until this step's forward fills them they hold an earlier occupant's KV."""
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


def _new_request(engine_id: str, sampling_params: Any) -> Request:
    req_id, index = client_request(engine_id, sampling_params)
    start = getattr(sampling_params, PROMPT_START, 0) or 0
    return Request(req_id, index, engine_id=engine_id, return_from=int(start))


def on_step_begin(runner: Any, so: Any) -> None:
    """GPUModelRunner.execute_model, first thing, for every step (also those that schedule no token)."""
    global _ACTIVE
    st = _engine_state(runner)
    _ACTIVE = st
    if st is None or (st.stopped and st.returns is None):
        return
    _raise_if_failed(st)
    for rid in so.finished_req_ids:
        st.requests.pop(rid, None)
    try:
        for new in so.scheduled_new_reqs:
            if new.req_id not in st.requests:
                st.requests[new.req_id] = _new_request(new.req_id, new.sampling_params)
    except MoeRoutesCaptureError as exc:
        _fail_from_engine(st, exc)
        return
    if st.num_slots:
        st.fresh_blocks = _fresh_blocks(so, st.kv_group, st.manager_block_size)
    n = int(so.total_num_scheduled_tokens)
    if n:
        st.ids_buf[:n].fill_(-1)  # rows a logged layer does not write this step stay -1: caught by the writer


def _stage(st: _State, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Start the device-to-host copy of this step's first n tokens into a free staging buffer:
    contiguous token-major rows on both sides, so each copy is a single async memcpy."""
    idx = st.staging.free.get()  # back-pressure: never drop, wait for the writer to free a buffer
    h_ids, h_w = st.staging.destination(idx, n)
    h_ids.copy_(st.ids_buf[:n], non_blocking=True)
    h_w.copy_(st.w_buf[:n], non_blocking=True)
    return idx, h_ids, h_w


def on_forward(
    runner: Any, scheduler_output: Any, num_tokens: int, req_ids: list[str], num_scheduled_tokens: np.ndarray
) -> None:
    """GPUModelRunner.execute_model, right after the model forward of a scheduled batch."""
    st = _engine_state(runner)
    if st is None or (st.stopped and st.returns is None):
        return
    _raise_if_failed(st)
    n = int(num_tokens)
    if n == 0:
        return
    positions = runner.positions.np[:n].copy()
    counts = np.asarray(num_scheduled_tokens[: len(req_ids)], dtype=np.int64).copy()
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    emit_from = np.empty(len(req_ids), dtype=np.int64)
    gap_blocks: dict[int, np.ndarray] = {}
    bt = runner.input_batch.block_table[st.kv_group] if st.num_slots else None
    slots = bt.slot_mapping.np[:n].copy() if bt is not None else np.full(n, -1, dtype=np.int64)
    batch = []
    for i, rid in enumerate(req_ids):
        req = st.requests.get(rid)
        if req is None:  # a request the step-begin hook did not see as new (should not happen)
            req = st.requests[rid] = _new_request(rid, runner.requests[rid].sampling_params)
        batch.append(req)
        c = int(counts[i])
        emit_from[i] = req.next_pos
        if c == 0:
            continue
        first = int(positions[starts[i]])
        if first > req.next_pos:
            if bt is not None:
                gap_blocks[i] = bt.block_table.np[i, : (first + bt.block_size - 1) // bt.block_size].copy()
            else:
                gap_blocks[i] = np.zeros(0, dtype=np.int32)
        req.next_pos = max(req.next_pos, first + c)
    event, idx = None, -1
    if st.staging is not None:
        idx, ids, weights = _stage(st, n)
        event = torch.cuda.Event()
        event.record()
    else:  # CPU: the capture buffers are host memory; the row selection copies this step's rows for the writer
        ids, weights = st.ids_buf.numpy()[:n, st.rows], st.w_buf.numpy()[:n, st.rows]
    job = StepJob(batch, counts, positions, slots, emit_from, gap_blocks, st.fresh_blocks, ids, weights, event, idx)
    st.fresh_blocks = np.zeros(0, dtype=np.int64)
    if st.returns is not None:
        st.unreturned.append(job)  # assembled when this step's ModelRunnerOutput is built
    else:
        st.jobs.put(job)


# ----------------------------------------------------------------------------------------------------
# Per-request return (enable_return_routed_experts): worker -> ModelRunnerOutput.routed_experts ->
# scheduler -> EngineCoreOutput chunks -> OutputProcessor -> CompletionOutput.routed_experts.
# ----------------------------------------------------------------------------------------------------
class _Deferred:
    """ModelRunnerOutput.routed_experts of an async-scheduling step until its output is collected
    (AsyncGPUModelRunnerOutput.get_output, after the step's device work is done): no extra host sync."""

    def __init__(self, st: _State, jobs: list[StepJob]) -> None:
        self.st, self.jobs = st, jobs


def on_model_runner_output(runner: Any, output: Any) -> None:
    """GPUModelRunner.sample_tokens, when the step's ModelRunnerOutput is built: attach the rows of the
    steps forwarded since the last output, {engine request id: (ids, weights or None)}."""
    st = _engine_state(runner)
    if st is None or st.returns is None:
        return
    jobs, st.unreturned = st.unreturned, []
    if getattr(runner, "use_async_scheduling", False):
        output.routed_experts = _Deferred(st, jobs)
    else:
        output.routed_experts = _rows_of(st, jobs)


def resolve_output(output: Any) -> None:
    """AsyncGPUModelRunnerOutput.get_output."""
    deferred = output.routed_experts
    if isinstance(deferred, _Deferred):
        output.routed_experts = _rows_of(deferred.st, deferred.jobs)


def _rows_of(st: _State, jobs: list[StepJob]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for job in jobs:
        try:
            routes = st.assembler.assemble(job)
        except MoeRoutesCaptureError as exc:
            # Incomplete rows are never handed to a trainer: the step's requests return None from here on
            # (the front-end refuses their short arrays); the engine keeps serving (this may run on the
            # executor's output thread, where raising would hang the engine core), the log records it.
            for req in job.requests:
                req.return_broken = True
            logger.error("moe_routes: routed experts of %d requests dropped: %s", len(job.requests), exc)
            if st.thread is not None:
                st.jobs.put(Failure(exc))
            continue
        finally:
            if job.staging_index >= 0:
                st.staging.free.put(job.staging_index)
        if st.thread is not None:
            st.jobs.put(routes)  # the log formats and writes the same assembled rows
        step = returned_rows(routes, st.layers, st.num_hidden_layers, id_dtype_for(st.num_experts), st.returns.weights)
        for rid, (ids, weights) in step.items():
            if rid in out:  # two forwards before one output (not seen in 0.15.1; kept exact anyway)
                ids0, w0 = out[rid]
                ids = np.concatenate((ids0, ids))
                weights = None if weights is None else np.concatenate((w0, weights))
            out[rid] = (ids, weights)
    return out


def take_step_rows(request: Any, rows: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
    """Scheduler.update_from_output, for each scheduled request: keep this step's rows until the request's
    next EngineCoreOutput (a partial prefill step emits none)."""
    got = rows.get(request.request_id)
    if got is not None:
        pending = getattr(request, "_moe_routes_rows", None)
        if pending is None:
            request._moe_routes_rows = pending = []
        pending.append(got)


def attach_rows(engine_core_output: Any, request: Any) -> None:
    """Scheduler.update_from_output: the rows kept since the request's last output ride on this one."""
    pending = getattr(request, "_moe_routes_rows", None)
    if not pending:
        return
    request._moe_routes_rows = []
    ids = [p[0] for p in pending]
    engine_core_output.routed_experts = ids[0] if len(ids) == 1 else np.concatenate(ids)
    if pending[0][1] is not None:
        w = [p[1] for p in pending]
        engine_core_output.routed_expert_weights = w[0] if len(w) == 1 else np.concatenate(w)


def on_output_request(req_state: Any, request: Any) -> None:
    """OutputProcessor.add_request: where this completion's rows start, and its chunk list."""
    params = request.sampling_params
    req_state._moe_routes_start = int(getattr(params, PROMPT_START, 0) or 0) if params is not None else 0
    req_state._moe_routes_chunks = []


def completion_routes(
    req_state: Any, engine_core_output: Any, finish_reason: Any
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """OutputProcessor.process_outputs: (routed_experts, routed_expert_weights) of the CompletionOutput;
    set on the finishing output only (also when a stop string, found here, finishes the request), as
    upstream. Rows [P + G - 1 - start, num_hidden_layers, top_k]: the last sampled token has no forward."""
    chunks = getattr(req_state, "_moe_routes_chunks", None)
    if chunks is None:  # a state created without on_output_request: never pass a single step's chunk on
        return None, None
    if engine_core_output.routed_experts is not None:
        chunks.append((engine_core_output.routed_experts, engine_core_output.routed_expert_weights))
    if finish_reason is None or not chunks:
        return None, None  # not finished, or aborted before any forward (upstream: None as well)
    req_state._moe_routes_chunks = []
    # always a fresh array: a single chunk may be a read-only view into a received message frame
    ids = np.concatenate([c[0] for c in chunks])
    weights = None if chunks[0][1] is None else np.concatenate([c[1] for c in chunks])
    generated = len(req_state.detokenizer.output_token_ids) if req_state.detokenizer is not None else 0
    expected = req_state.prompt_len + generated - 1 - req_state._moe_routes_start
    if len(ids) != expected:
        # short: a hole the engine reported; long: rows the count cannot place. Either way not this
        # completion's positions start .. P+G-2 exactly once.
        logger.error(
            "moe_routes: request %s finished with %d routing rows for its %d positions; routed_experts is None",
            req_state.request_id,
            len(ids),
            expected,
        )
        return None, None
    return ids, weights


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


def _fail_from_engine(st: _State, exc: BaseException) -> None:
    if st.settings is None or st.settings.on_error == "fail" or st.returns is not None:
        raise exc
    st.stopped = True  # nothing more is queued; the writer records the failure after the steps before it
    st.jobs.put(Failure(exc))


def _raise_if_failed(st: _State) -> None:
    if st.error is not None and st.settings.on_error == "fail":
        raise RuntimeError(f"moe_routes: the routing log {st.settings.path} failed ({ENV_ON_ERROR}=fail)") from st.error


def flush(runner: Any = None, timeout: float | None = None) -> dict[str, Any]:
    """Block until every queued step is on disk. Returns writer statistics."""
    st = _engine_state(runner) if runner is not None else _ACTIVE
    if st is None:
        return {}
    if st.thread is not None and st.thread.is_alive():
        done = threading.Event()
        st.jobs.put(done)
        if not done.wait(timeout):
            raise TimeoutError("moe_routes: writer did not drain in time")
    _raise_if_failed(st)
    stats: dict[str, Any] = dict(st.stats)
    if st.stopped:
        stats["stopped"] = f"{type(st.error).__name__}: {st.error}"
    return stats


def flush_worker(worker: Any) -> dict[str, Any]:
    """collective_rpc target: LLM._run_engine calls it so that records are on disk when generate returns."""
    return flush(getattr(worker, "model_runner", None))


def flush_engine(llm_engine: Any) -> list[dict[str, Any]]:
    import cloudpickle

    # A plain callable is refused by the V1 engine-core serialiser, and the multiprocess executor
    # pickles any non-str method once more, so cloudpickled bytes reach a TP worker as bytes, not a
    # callable. Every executor resolves a str against WorkerWrapperBase, whose execute_method unpickles
    # bytes: route through it. A module-level function pickles by reference.
    return llm_engine.collective_rpc("execute_method", args=(cloudpickle.dumps(flush_worker),))


def _close(st: _State) -> None:
    if st.thread is not None:
        st.thread.close()
