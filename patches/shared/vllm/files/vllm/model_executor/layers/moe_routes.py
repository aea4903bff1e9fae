# SPDX-License-Identifier: Apache-2.0
"""Per-token MoE routing capture, added by the moe-routes patch series: the routing log (``VLLM_LOG_MOE``) and
``enable_return_routed_experts`` (routing returned per request, as vLLM 0.22+ does, plus weights).

Upstream files only call into this module, the engine glue; it is the same file in every vLLM series. What depends
on the release (which classes route, where a model runner keeps its batch, how a config carries the flag) is in
``moe_routes_release``, one per series, whose public names this module re-exports at its end: hooks call
``moe_routes.X`` only. The engine-independent half (settings, record formatting, assembly, the writer process) is
``moe_routes_log``, importable without torch or vLLM. All three sit outside the ``fused_moe`` package and import
nothing beyond what ``import vllm`` already loaded, because the front-end (``vllm.entrypoints.llm``,
``EngineArgs``, ``InputProcessor``, ``OutputProcessor``) imports them: with the feature off, importing vLLM costs
what it cost before.

Data path, per model step:
  1. ``on_step_begin`` (the model runner's ``execute_model``, before anything else, also for steps that schedule no
     token): forgets finished requests, notes new ones, mirrors their KV block ids and the blocks this step
     allocates afresh or copies, and fills this step's rows of the capture buffers with a value no expert id
     takes, so that a layer that did not write is detected.
  2. Every captured MoE layer copies the routing its expert kernel used (ids, and weights when the log or the
     weights return reads them) into its row of static token-major buffers ``[max_tokens, rows, top_k]`` on the
     model's device, allocated while the model is built (so that the KV cache is sized without them): a
     device-side write, recorded into CUDA graphs; under ``torch.compile`` an opaque custom op. No host sync
     inside the forward.
  3. ``on_forward`` (after the forward): one contiguous device-to-host copy into pinned staging (async + event on
     CUDA), and the batch layout from host arrays (request ids, scheduled tokens, first positions; KV slots from
     the block mirror).
  4. When the step's ``ModelRunnerOutput`` is built (or, under async scheduling, collected): the capture is
     checked, the KV-slot -> routing store updated, prefix-cache hits read back from it, and the step's rows laid
     out per request (``moe_routes_log.step_rows``).
  5. The scheduler puts the step's rows on one carrier ``EngineCoreOutput`` per client (``RoutesStep``).
  6. The front-end's ``OutputProcessor`` takes them before the step's token outputs: rows of completions it has
     finished (a stop string it found, an abort) are dropped there, exactly as the tokens are. It gathers each
     completion's rows for ``CompletionOutput.routed_experts`` and hands them to the log's writer process.

Dummy, profiling, warm-up and graph-capture forwards write only into the device buffers; rows exist solely for
tokens the scheduler scheduled.
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
    BlockMirror,
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
        return ReturnSettings() if _release.upstream_return_asked(model_config) else None
    return got


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
# Front-end validation (EngineArgs.create_engine_config): fail engine start-up, never mid-run. The release's
# validate_engine_config takes over the return flag, then calls check_engine_config.
# ----------------------------------------------------------------------------------------------------
def check_engine_config(
    vllm_config: Any, settings: Settings | None, returns: ReturnSettings | None, unsupported: list[str]
) -> None:
    """The checks every release shares; `unsupported` holds the release's own refusals so far. Attaches the
    settings to the config (they travel with it into forked, spawned and in-process engine cores)."""
    object.__setattr__(vllm_config, _CONFIG_ATTR, settings)
    if settings is None and returns is None:
        return
    model_config = vllm_config.model_config
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
    unsupported = list(unsupported)
    from vllm.platforms import current_platform

    if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
        # Model runners of other devices (XPU) would reach the first step with capture buffers this series
        # cannot stage (pinned copies and events are CUDA's).
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
    if getattr(model_config, "runner_type", "generate") != "generate":
        # A pooling step never builds a ModelRunnerOutput with rows: they would pile up unshipped.
        unsupported.append("pooling models (routing is captured for generated completions)")
    if unsupported:
        raise refusal(settings, returns, "does not support " + "; ".join(unsupported) + " in this patch series")
    _activate()


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
# Layer registry (the release's MoE module constructor) and the capture op (forward paths).
# ----------------------------------------------------------------------------------------------------
def register_moe_module(module: torch.nn.Module, layer_id: int | None, top_k: int, num_experts: int) -> int:
    """Called by the release's register_layer at the end of an MoE module's constructor. Fixes the module's row in
    the capture buffers now (the decoder-layer index, or its position in VLLM_LOG_MOE_LAYERS), so that
    torch.compile and CUDA graphs bake a constant row; allocates the capture buffers with the first such module,
    while the model is built, so that they count as model memory when the KV cache is sized. Turns the hot path
    on before the first forward is traced. Only TP rank 0 captures: the other ranks compute the same routing.
    Returns the row, -1 when the module captures nothing; a module registered here has _moe_routes_layer_id
    (None: its decoder layer is unknown, reported when the KV cache is ready)."""
    module._moe_routes_slot = -1
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    settings = engine_settings(vllm_config)
    returns = return_settings(vllm_config.model_config)
    if settings is None and returns is None:
        return -1
    _activate()
    module._moe_routes_layer_id = layer_id
    if layer_id is None:
        return -1
    if returns is not None or settings.layers is None:  # the per-request return needs every MoE layer
        slot = layer_id
    elif layer_id in settings.layers:
        slot = settings.layers.index(layer_id)
    else:
        return -1
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return -1
    module._moe_routes_slot = slot
    if getattr(vllm_config, _BUFFERS_ATTR, None) is None:
        n_rows = len(settings.layers) if returns is None and settings.layers is not None else None
        n_rows = n_rows or int(vllm_config.model_config.get_total_num_hidden_layers())
        bufs = _new_buffers(_max_tokens(vllm_config), n_rows, int(top_k), int(num_experts), _weights(settings, returns))
        object.__setattr__(vllm_config, _BUFFERS_ATTR, bufs)
    return slot


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
        topk_ids, topk_weights = _release.this_dp_rank_rows(topk_ids, topk_weights)
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


def capture(
    slot: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor, row_offset: int = 0, gathered: bool = False
) -> torch.Tensor:
    """Copy a routing result into row `slot` of the capture buffers (under torch.compile through the opaque op, which
    Dynamo does not trace into). `gathered`: the rows hold every DP rank's tokens (the release's
    this_dp_rank_rows finds this rank's). Returns the weights to hand on to the kernel."""
    if torch.compiler.is_compiling():
        return torch.ops.vllm.moe_routes_record(topk_ids, topk_weights, slot, row_offset, gathered)
    _record_into_buffers(topk_ids, topk_weights, slot, row_offset, gathered)
    return topk_weights


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
    block_size: int  # that group's (KV manager's) block size
    num_slots: int
    meta: dict[str, Any]  # sent to the front-end once, with the first rows
    dp_rank: int | None = None
    deferred_output: bool = False  # the runner hands its ModelRunnerOutput over before the step's work is done
    assembler: RouteAssembler | None = None
    requests: dict[str, Request] = field(default_factory=dict)  # engine id -> request
    blocks: BlockMirror | None = None  # the routing-store group's block ids per request (with the store only)
    fresh_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    block_copies: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
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
    num_slots: int = 0,
    dp_rank: int | None = None,
    async_scheduling: bool = True,
    deferred_output: bool = False,
) -> _State:
    """The capture state of one engine: buffers (allocated here unless the model build did), pinned staging on
    CUDA, the KV-slot store and the block mirror it is addressed through. start_engine builds it; so does
    `moe-routes bench steps`."""
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
        block_size=block_size,
        num_slots=num_slots,
        meta=meta,
        dp_rank=dp_rank,
        deferred_output=deferred_output,
    )
    st.assembler = RouteAssembler(
        layers=layers,
        top_k=top_k,
        num_experts=num_experts,
        num_slots=num_slots,
        block_size=block_size,
        weights=weights,
    )
    if num_slots:
        st.blocks = BlockMirror(block_size)
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


@dataclass(frozen=True)
class MoeLayer:
    """What the meta record and the checks need of one registered MoE module, read by the release's
    on_kv_cache_ready (after the weights are loaded: a quantization method picks its kernel then)."""

    layer_id: int | None  # decoder layer (None: unknown)
    slot: int  # capture-buffer row, -1: not captured
    name: str
    top_k: int
    num_experts: int  # logical
    num_physical_experts: int
    scoring_func: str
    renormalize: bool
    kernel_routed_scaling_factor: float  # what the kernel's weights include (models may scale the output instead)
    expert_parallel: bool
    eplb: bool
    sequence_parallel: bool  # each TP rank routes a shard of the batch
    source: str  # "kernel", "router" (recomputed for a kernel that routes internally) or "simulated"


def check_layer_modules(
    layers: list[MoeLayer], settings: Settings | None = None, returns: ReturnSettings | None = None
) -> None:
    """One MoE module per decoder layer, with a known index: records and returned rows are keyed by decoder layer.
    The error names the switch that asked (returns None: the log's VLLM_LOG_MOE)."""
    unindexed = [m.name for m in layers if m.layer_id is None]
    if unindexed:
        if returns is None:
            raise bad_env(ENV_PATH, f"cannot tell the decoder-layer index of MoE module(s) {unindexed[:3]}")
        raise refusal(settings, returns, f"needs the decoder-layer index of MoE module(s) {unindexed[:3]}")
    by_layer: dict[int, list[str]] = {}
    for m in layers:
        by_layer.setdefault(m.layer_id, []).append(m.name)
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


def routing_source(layers: list[MoeLayer]) -> str:
    kinds = {m.source for m in layers}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def start_engine(
    runner: Any,
    layers: list[MoeLayer],
    *,
    device: torch.device,
    max_tokens: int,
    kv_cache_config: Any,
    kv_group: int,
    block_size: int,
    async_scheduling: bool,
    deferred_output: bool,
) -> None:
    """The release's on_kv_cache_ready, with what it read from its model runner: builds the capture state, the
    KV-slot store and the meta record the front-end's log writes before this engine's records. `layers`: every
    registered MoE module; (kv_group, block_size): the KV-cache group whose slots key the routing store, (-1, 0)
    when there is none."""
    global _ACTIVE
    settings = engine_settings(runner.vllm_config)
    returns = return_settings(runner.model_config)
    runner._moe_routes_state = None  # KV cache re-initialised (e.g. wake-up): start afresh
    if settings is None and returns is None:
        return
    if not layers:
        raise refusal(settings, returns, f"needs an MoE model: {runner.model_config.model} has no MoE layer")
    from vllm.distributed import get_tensor_model_parallel_rank

    if get_tensor_model_parallel_rank() != 0:
        return  # TP ranks other than 0 compute the same routing and capture nothing (register_moe_module)
    check_layer_modules(layers, settings, returns)
    moe_layer_ids = sorted(m.layer_id for m in layers)
    if settings is not None and settings.layers is not None:
        missing = [i for i in settings.layers if i not in moe_layer_ids]
        if missing:
            raise bad_env(
                ENV_LAYERS, f"layer(s) {missing} are not MoE layers of this model; MoE layers: {moe_layer_ids}"
            )
    captured_mods = sorted((m for m in layers if m.slot >= 0), key=lambda m: m.layer_id)
    captured = [m.layer_id for m in captured_mods]
    rows = [m.slot for m in captured_mods]
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
    first = layers[0]
    top_k, num_experts = first.top_k, first.num_experts
    if any(m.top_k != top_k or m.num_experts != num_experts for m in layers):
        raise bad_env(ENV_PATH, "MoE layers with different top_k/num_experts are not supported by the log format")
    if any(m.sequence_parallel for m in layers):
        # Each TP rank then routes only its shard of the batch; rank 0 alone cannot capture every token.
        raise refusal(
            settings,
            returns,
            "does not support sequence-parallel MoE (expert parallel with TP > 1 and DP > 1); use TP = 1 per DP rank",
        )
    source = routing_source(captured_mods)
    check_recomputed_routing(source, returns, settings)
    if device.type not in ("cuda", "cpu"):
        raise refusal(settings, returns, f"does not support {device.type} devices in this patch series")
    parallel = runner.parallel_config
    dp_rank = int(parallel.data_parallel_rank) if parallel.data_parallel_size > 1 else None
    buffers = getattr(runner.vllm_config, _BUFFERS_ATTR, None)
    if buffers is None or buffers[0].shape[0] < max_tokens or buffers[0].device != device:
        # Not built with the model (a config whose buffers were never allocated): allocate now, outside the memory
        # budget the KV cache was sized from.
        logger.warning("moe_routes: capture buffers allocated after the KV cache was sized (%d tokens)", max_tokens)
        buffers = _new_buffers(max_tokens, max(rows) + 1, top_k, num_experts, _weights(settings, returns), device)
        object.__setattr__(runner.vllm_config, _BUFFERS_ATTR, buffers)
    max_tokens = int(buffers[0].shape[0])

    prefix_caching = bool(runner.cache_config.enable_prefix_caching)
    if not prefix_caching:
        kv_group, block_size = -1, 0  # no hit to fill: no KV-slot store (memory and a copy per step)
    if returns is not None and kv_group < 0 and prefix_caching:
        raise refusal(
            None,
            returns,
            "with prefix caching needs a full-attention KV-cache group to keep the routing of cached tokens "
            "by KV slot, and this model has none; pass --no-enable-prefix-caching (enable_prefix_caching=False)",
        )
    num_slots = int(kv_cache_config.num_blocks) * block_size if kv_group >= 0 else 0

    import vllm
    from vllm.platforms import current_platform

    model_config = runner.model_config
    series, patches = _patch_provenance()
    sim = os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY") or None
    weights = _weights(settings, returns)
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
        "layer_modules": {str(m.layer_id): m.name for m in logged_mods},
        "id_kind": "logical",
        "routing_source": source,
        "routing_simulation_strategy": sim,
        "scoring_func": str(first.scoring_func),
        "renormalize": bool(first.renormalize),
        # topk_weights are what the expert kernel multiplied by. Some models (vLLM's DeepSeek-V2/V3, GLM-4.5) give
        # the kernel 1.0 and scale the MoE output by the config's factor afterwards.
        "kernel_routed_scaling_factor": float(first.kernel_routed_scaling_factor),
        "config_routed_scaling_factor": getattr(model_config.hf_text_config, "routed_scaling_factor", None),
        "enforce_eager": bool(model_config.enforce_eager),
        "prefix_caching": prefix_caching,
        "kv_cache_groups": len(kv_cache_config.kv_cache_groups),
        "routing_store_kv_group": kv_group,
        "tensor_parallel_size": parallel.tensor_parallel_size,
        # Under DP every rank's meta record comes first, and its records carry dp_rank.
        "data_parallel_size": parallel.data_parallel_size,
        "data_parallel_rank": dp_rank,
        "expert_parallel": bool(first.expert_parallel),
        "eplb": bool(first.eplb),
        "num_physical_experts": int(first.num_physical_experts),
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
        block_size=block_size,
        num_slots=num_slots,
        dp_rank=dp_rank,
        async_scheduling=async_scheduling,
        deferred_output=deferred_output,
    )
    runner._moe_routes_state = st
    _ACTIVE = st


def _engine_state(runner: Any) -> _State | None:
    return getattr(runner, "_moe_routes_state", None)


def _note_blocks(st: _State, so: Any) -> None:
    """The routing-store group's block ids of the step's requests, mirrored from the scheduler output (what the
    runner's block table holds, which V2 keeps on the device only), the blocks this step allocates afresh (not
    prefix-cache hits: until this step's forward fills them they hold an earlier occupant's KV), and the blocks
    it copies before the forward (copy-on-write of a hit that ends inside a block)."""
    g, bs, mirror = st.kv_group, st.block_size, st.blocks
    fresh: list[list[int]] = []
    for new in so.scheduled_new_reqs:
        blocks = new.block_ids[g]
        mirror.set(new.req_id, blocks)  # a resumed request sent as new (V2) gets its whole list again
        fresh.append(blocks[new.num_computed_tokens // bs :])
    cached = so.scheduled_cached_reqs
    for i, rid in enumerate(cached.req_ids):
        blocks = cached.new_block_ids[i]
        if blocks is None:
            continue
        if rid in cached.resumed_req_ids:  # the whole block list is replaced; its hits are in front
            mirror.set(rid, blocks[g])
            fresh.append(blocks[g][cached.num_computed_tokens[i] // bs :])
        else:
            mirror.append(rid, blocks[g])
            fresh.append(blocks[g])
    st.fresh_blocks = np.fromiter((b for bl in fresh for b in bl), dtype=np.int64)
    copies = getattr(so, "kv_cache_block_copies", None)
    if copies:
        st.block_copies = np.asarray([(c[0], c[1]) for c in copies], dtype=np.int64).reshape(-1, 2)


def _new_request(st: _State, engine_id: str, sampling_params: Any) -> Request:
    # Without the log, positions before the return start are never needed: they are not sent.
    start = 0 if st.settings is not None else int(getattr(sampling_params, PROMPT_START, 0) or 0)
    return Request(engine_id, ship_from=start, next_pos=start)


def on_step_begin(runner: Any, so: Any) -> None:
    """The model runner's execute_model, first thing, for every step (also those that schedule no token)."""
    global _ACTIVE
    st = _engine_state(runner)
    _ACTIVE = st
    if st is None:
        return
    for rid in so.finished_req_ids:
        st.requests.pop(rid, None)
        if st.blocks is not None:
            st.blocks.drop(rid)
    for new in so.scheduled_new_reqs:
        # a request preempted and resumed keeps its Request: positions it sent before are not sent again
        if new.req_id not in st.requests:
            st.requests[new.req_id] = _new_request(st, new.req_id, new.sampling_params)
    if st.blocks is not None:
        _note_blocks(st, so)
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


def forward_done(
    runner: Any, req_ids: list[str], num_scheduled_tokens: np.ndarray, first_positions: np.ndarray, num_tokens: int
) -> None:
    """The release's runner adapters, right after the model forward of a scheduled batch, with host arrays only:
    the batch's request ids, scheduled tokens and first positions (request b's tokens are positions
    first_positions[b] .. + num_scheduled_tokens[b] - 1, in batch order), and the unpadded token count."""
    st = _engine_state(runner)
    if st is None:
        return
    n = int(num_tokens)
    if n == 0:
        return
    nreq = len(req_ids)
    counts = np.asarray(num_scheduled_tokens[:nreq], dtype=np.int64).copy()
    first_pos = np.asarray(first_positions[:nreq], dtype=np.int64).copy()
    if int(counts.sum()) != n:
        raise RuntimeError(
            f"moe_routes: the batch schedules {int(counts.sum())} tokens, the forward ran {n} (a moe_routes bug, "
            "please report it with the engine arguments)"
        )
    starts = np.zeros(nreq, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    positions = np.repeat(first_pos - starts, counts) + np.arange(n, dtype=np.int64)
    requests = st.requests
    batch = [requests.get(rid) for rid in req_ids]
    if any(r is None for r in batch):  # a request the step-begin hook did not see as new (should not happen):
        for i, rid in enumerate(req_ids):  # its rows are sent from position 0; the front-end skips what it
            if batch[i] is None:  # does not return
                batch[i] = requests[rid] = Request(rid)
    emit_from = np.fromiter((r.next_pos for r in batch), dtype=np.int64, count=nreq)
    has = counts > 0
    gap_blocks: dict[int, np.ndarray] = {}
    mirror = st.blocks
    if mirror is not None:
        rows = mirror.rows_of(req_ids)
        slots = mirror.slots(np.repeat(rows, counts), positions)
    else:
        slots = np.full(n, -1, dtype=np.int64)
    # positions before a request's first one this step that it never sent: a prefix-cache hit, read back
    for i in np.flatnonzero(has & (first_pos > emit_from)).tolist():
        if mirror is not None:
            gap_blocks[i] = mirror.blocks(int(rows[i]), int(first_pos[i]))
        else:
            gap_blocks[i] = np.zeros(0, dtype=np.int64)
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
    job = StepJob(
        requests=batch,
        counts=counts,
        positions=positions,
        slots=slots,
        emit_from=emit_from,
        gap_blocks=gap_blocks,
        fresh_blocks=st.fresh_blocks,
        ids=ids,
        weights=weights,
        event=event,
        staging_index=idx,
        block_copies=st.block_copies,
    )
    st.fresh_blocks = np.zeros(0, dtype=np.int64)
    st.block_copies = np.zeros((0, 2), dtype=np.int64)
    st.unshipped.append(job)  # assembled when this step's ModelRunnerOutput is built (or collected)


# ----------------------------------------------------------------------------------------------------
# Rows per step: model runner -> ModelRunnerOutput.routed_experts (StepRows) -> scheduler -> EngineCoreOutput
# .moe_routes (RoutesChunk) -> [one frame per step on the wire] -> OutputProcessor.
# ----------------------------------------------------------------------------------------------------
class _Deferred:
    """The rows of a ModelRunnerOutput handed over before its step's device work is done (async scheduling, V2)
    until the output is collected (the release's resolve_output, after that work): no extra host sync."""

    def __init__(self, st: _State, jobs: list[StepJob]) -> None:
        self.st, self.jobs = st, jobs


def on_model_runner_output(runner: Any, output: Any) -> None:
    """The model runner's sample_tokens, when the step's ModelRunnerOutput is built: the rows of the steps
    forwarded since the last output, in the release's RUNNER_OUTPUT_FIELD."""
    st = _engine_state(runner)
    if st is None or not st.unshipped:
        return
    jobs, st.unshipped = st.unshipped, []
    setattr(output, _release.RUNNER_OUTPUT_FIELD, _Deferred(st, jobs) if st.deferred_output else _rows_of(st, jobs))


def resolve_output(output: Any) -> None:
    """Where the model runner's deferred output is collected (AsyncGPUModelRunnerOutput / AsyncOutput.get_output)."""
    deferred = getattr(output, _release.RUNNER_OUTPUT_FIELD, None)
    if isinstance(deferred, _Deferred):
        setattr(output, _release.RUNNER_OUTPUT_FIELD, _rows_of(deferred.st, deferred.jobs))


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
    """A completion's front-end state: how its records name it, the rows it returns, its front-end."""

    field: bytes
    returned: ReturnedRows
    front: _FrontEnd


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
    req_state._moe_routes = _Completion(request_field(req_id, index), ReturnedRows(start), _front(output_processor))


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


def request_routes(req_state: Any, finish_reason: Any, upstream: np.ndarray | None = None) -> tuple[Any, Any]:
    """The completion's (routed_experts, routed_expert_weights) when it finishes (normally, on a stop string found
    in the front-end, or aborted by the client or the engine): rows [P + G - 1 - start, num_hidden_layers, top_k],
    as upstream; the last sampled token has no forward. An aborted completion returns the rows computed so far
    (positions start .. P+G-2 for the G tokens its final output carries; for one aborted before its first token,
    the prompt rows computed so far; None when nothing was computed), as upstream 0.22+. The step's rows arrived
    before, on its carrier (all of them reach the caller: the front-end only finishes a completion at or after
    the token they came with). `upstream`: what the engine returns without this series' return (kept then)."""
    state = getattr(req_state, "_moe_routes", None)
    if finish_reason is None or state is None or not state.front.returns:
        return upstream, None
    aborted = getattr(finish_reason, "name", None) == "ABORT"  # FinishReason.ABORT, from the client or the engine
    return _returned(state.front, req_state, state, aborted)


def completion_routes(
    output_processor: Any, req_state: Any, engine_core_output: Any, finish_reason: Any
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """OutputProcessor.process_outputs, for each output (0.15.1's hook): request_routes."""
    return request_routes(req_state, finish_reason)


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
    """OutputProcessor.abort_requests (0.15.1's hook): request_routes of a client abort."""
    from vllm.v1.engine import FinishReason

    return request_routes(req_state, FinishReason.ABORT)


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


def _encode_pair(ids: np.ndarray | None, weights: np.ndarray | None) -> tuple[str | None, str | None]:
    return None if ids is None else _npy_base64(ids), None if weights is None else _npy_base64(weights)


def _completion_outputs(outputs: Any) -> list[Any]:
    """The CompletionOutputs in a RequestOutput, a CompletionOutput, or a list of either (None skipped)."""
    if outputs is None:
        return []
    if hasattr(outputs, "outputs"):
        return list(outputs.outputs)
    if hasattr(outputs, "routed_experts"):
        return [outputs]
    return [o for item in outputs for o in _completion_outputs(item)]


async def encode_choice_routes(outputs: Any, ids: bool = True) -> None:
    """Awaited by the async serving code before it builds choices from `outputs` (a RequestOutput, a
    CompletionOutput, or a list of either): the routing of each finished completion above
    _B64_OFF_LOOP_BYTES is base64-encoded in a worker thread (asyncio.to_thread), not on the event loop
    (DeepSeek-V3, 4096 positions with weights: ~10 MB of .npy), and cached on its CompletionOutput for
    add_choice_fields. Smaller arrays are left to add_choice_fields, which encodes them inline. ids=False: the
    serving code encodes the ids itself (upstream's non-streamed choices from vLLM 0.22 on): only the weights."""
    todo = []
    for out in _completion_outputs(outputs):
        got = getattr(out, "routed_experts", None)
        if got is None:
            continue
        weights = getattr(out, "routed_expert_weights", None)
        want = got if ids else None
        if (0 if want is None else want.nbytes) + (0 if weights is None else weights.nbytes) <= _B64_OFF_LOOP_BYTES:
            continue
        cached = getattr(out, _B64_ATTR, None)
        if cached is not None and cached[0] is got and cached[2] is weights and (cached[1] is not None or not ids):
            continue
        todo.append((out, got, want, weights))
    if not todo:
        return
    import asyncio

    encoded = await asyncio.gather(*(asyncio.to_thread(_encode_pair, want, w) for _, _, want, w in todo))
    for (out, got, _, weights), (ids_b64, w_b64) in zip(todo, encoded, strict=True):
        setattr(out, _B64_ATTR, (got, ids_b64, weights, w_b64))


def add_choice_fields(choice: Any, output: Any, request: Any) -> None:
    """A choice (or a stream choice's final chunk) gets the completion's routing: routed_experts (base64 .npy,
    as vLLM 0.22+) in the field upstream declares on non-streamed choices (`str | None = None`: null when no
    routing is returned; kept when the serving code filled it already), else as an extra field (stream choices,
    which upstream leaves without it); our extensions routed_expert_weights and routed_experts_prompt_start (the
    start used) as extra fields, present only when routing is returned, so stream chunks and null choices do not
    grow. Set on the built model: passed to its constructor they would pass OpenAIBaseModel's validator, which
    logs every extra field as "present in the request but ignored". Uses the strings encode_choice_routes
    cached, else encodes here."""
    ids = getattr(output, "routed_experts", None)
    if ids is None:
        return
    weights = getattr(output, "routed_expert_weights", None)
    declared = "routed_experts" in getattr(type(choice), "model_fields", {})
    filled = declared and getattr(choice, "routed_experts", None) is not None
    cached = getattr(output, _B64_ATTR, None)
    if cached is not None and cached[0] is ids and cached[2] is weights:
        ids_b64, w_b64 = cached[1], cached[3]
    else:
        ids_b64, w_b64 = None, None if weights is None else _npy_base64(weights)
    if not filled and ids_b64 is None:
        ids_b64 = _npy_base64(ids)
    extra = choice.__pydantic_extra__
    if declared:
        if not filled:
            choice.routed_experts = ids_b64
    else:
        extra["routed_experts"] = ids_b64
    if w_b64 is not None:
        extra["routed_expert_weights"] = w_b64
    extra[PROMPT_START] = int(prompt_start_of(request) or 0)


# The release's half: the names this module calls (_release.RUNNER_OUTPUT_FIELD, .upstream_return_asked,
# .this_dp_rank_rows) and its hook entry points (register_layer, record, on_kv_cache_ready, on_forward, ...),
# re-exported for the hooks. Last, because that module builds on everything above.
from vllm.model_executor.layers import moe_routes_release as _release  # noqa: E402
from vllm.model_executor.layers.moe_routes_release import *  # noqa: E402, F403
