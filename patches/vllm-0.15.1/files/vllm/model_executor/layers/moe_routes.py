# SPDX-License-Identifier: Apache-2.0
"""Per-token MoE routing log (``VLLM_LOG_MOE``), added by the moe-routes patch series.

Upstream files only call into this module; all logic lives here. It sits outside the ``fused_moe``
package and imports nothing beyond what ``import vllm`` already loaded, because the front-end
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

import atexit
import copy
import errno
import fcntl
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

logger = init_logger(__name__)

ENV_PATH = "VLLM_LOG_MOE"
ENV_LAYERS = "VLLM_LOG_MOE_LAYERS"
ENV_ON_ERROR = "VLLM_LOG_MOE_ON_ERROR"
ON_ERROR_POLICIES = ("stop", "fail")
DEFAULT_FILE = "moe_routes.jsonl"
SCHEMA_VERSION = 2
STATE_FILE = ".moe-routes-vllm.json"
# SamplingParams.extra_args key carrying the id (and choice index) the client sees for a request.
REQUEST_TAG = "moe_routes"
# A chunk of whole lines per write(2): keeps a killed writer from leaving more than whole lines and keeps
# concurrent appenders (a second engine, DP ranks) from interleaving inside a line.
_WRITE_CHUNK = 1 << 20
# Attribute of the VllmConfig that carries the settings the engine was started with.
_CONFIG_ATTR = "_moe_routes_settings"
_UNSET = object()


class MoeRoutesConfigError(ValueError):
    """A VLLM_LOG_MOE* value or an engine feature that cannot work with the routing log."""


class MoeRoutesCaptureError(RuntimeError):
    """The capture of a step is incomplete: logging it would be wrong."""


@dataclass(frozen=True)
class Settings:
    path: str
    layers: tuple[int, ...] | None
    on_error: str = "stop"


def _bad(var: str, value: str, why: str) -> MoeRoutesConfigError:
    return MoeRoutesConfigError(f"{var}={value!r}: {why}")


def _bad_env(var: str, why: str) -> MoeRoutesConfigError:
    """_bad for a variable as the running process sees it."""
    return _bad(var, os.environ.get(var, ""), why)


def read_settings(environ: dict[str, str] | None = None) -> Settings | None:
    """Parse and check the environment. None means logging is off."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PATH, "")
    if raw.strip() in ("", "0"):
        return None
    path = DEFAULT_FILE if raw.strip() == "1" else raw
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise _bad(ENV_PATH, raw, "is a directory; give a file path (or 1 for ./moe_routes.jsonl)")
    if not os.path.isdir(parent):
        raise _bad(ENV_PATH, raw, f"parent directory {parent} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise _bad(ENV_PATH, raw, f"file {path} is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise _bad(ENV_PATH, raw, f"directory {parent} is not writable")

    layers_raw = env.get(ENV_LAYERS, "")
    layers = None
    if layers_raw.strip():
        try:
            items = [int(x) for x in layers_raw.replace(" ", "").split(",")]
        except ValueError:
            raise _bad(ENV_LAYERS, layers_raw,
                       "expected a comma-separated list of decoder-layer indices, e.g. 0,12,23") from None
        if any(i < 0 for i in items):
            raise _bad(ENV_LAYERS, layers_raw, "layer indices must be >= 0")
        if len(set(items)) != len(items):
            raise _bad(ENV_LAYERS, layers_raw, "duplicate layer index")
        layers = tuple(sorted(items))

    on_error = env.get(ENV_ON_ERROR, "").strip() or "stop"
    if on_error not in ON_ERROR_POLICIES:
        raise _bad(ENV_ON_ERROR, env.get(ENV_ON_ERROR, ""),
                   "expected 'stop' (default: stop logging, keep serving) or 'fail' (stop the engine)")
    return Settings(path=path, layers=layers, on_error=on_error)


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
def validate_engine_config(vllm_config: Any) -> None:
    settings = read_settings()
    object.__setattr__(vllm_config, _CONFIG_ATTR, settings)
    if settings is None:
        return
    try:  # the real test of "can this work": root passes os.access() checks that open() then fails
        os.close(os.open(settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    except OSError as exc:
        raise _bad_env(ENV_PATH, f"cannot open {settings.path} for appending: {exc}") from None
    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    n_layers = model_config.get_total_num_hidden_layers() if model_config is not None else None
    if settings.layers is not None and n_layers is not None:
        out = [i for i in settings.layers if i >= n_layers]
        if out:
            raise _bad_env(ENV_LAYERS,
                           f"layer(s) {out} out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    unsupported = []
    if parallel.pipeline_parallel_size > 1:
        unsupported.append("pipeline parallelism (each stage would own a part of the layers)")
    if vllm_config.speculative_config is not None:
        unsupported.append("speculative decoding (rejected draft tokens would be logged)")
    if getattr(parallel, "enable_dbo", False):
        unsupported.append("dual-batch overlap (two micro-batches share the capture rows)")
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        unsupported.append("context parallelism")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        # KV loaded from outside (P/D disaggregation, LMCache, CPU offloading) was never routed here.
        unsupported.append("KV connectors (kv_transfer_config: disaggregated prefill, LMCache, KV offloading)")
    from vllm import envs

    if envs.VLLM_USE_V2_MODEL_RUNNER:
        unsupported.append("the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1 has no routing hook)")
    if unsupported:
        raise _bad_env(ENV_PATH,
                       "routing logging does not support " + "; ".join(unsupported)
                       + " in this patch series; unset VLLM_LOG_MOE or disable the feature")
    _activate()


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


def tag_choices(sampling_params: Any, engine_request_id: str, client_id: str, first_choice: int,
                num_choices: int) -> None:
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


def external_request_id(internal: str) -> str:
    """vLLM 0.15.1 makes engine ids unique as f"{request_id}-{random_uuid():.8}" (InputProcessor.
    assign_request_id); RequestOutput.request_id carries the caller's part. For requests without a tag."""
    if len(internal) > 9 and internal[-9] == "-":
        return internal[:-9]
    return internal


def client_request(engine_id: str, sampling_params: Any) -> tuple[str, int | None]:
    """(req_id, completion_index) the client sees for an engine request; completion_index is None when
    the client's response has a single completion."""
    extra = getattr(sampling_params, "extra_args", None)
    tag = extra.get(REQUEST_TAG) if isinstance(extra, dict) else None
    if not isinstance(tag, dict):
        return external_request_id(engine_id), None
    index = 0
    if int(tag.get("n", 1)) > 1:
        head, sep, _ = engine_id.partition("_")  # ParentRequest.get_child_info: f"{index}_{parent id}"
        if not (sep and head.isdigit()):
            raise MoeRoutesCaptureError(f"request {engine_id!r} has n={tag['n']} but is not a parallel-sampling "
                                        "child id '<index>_<parent id>' (a moe_routes bug, please report it)")
        index = int(head)
    if int(tag.get("num_choices", 1)) <= 1:
        return str(tag["req_id"]), None
    return str(tag["req_id"]), int(tag.get("first_choice", 0)) + index


def request_field(req_id: str, completion_index: int | None) -> bytes:
    """The JSON text that follows '"req_id":' in a record of this completion."""
    text = json.dumps(str(req_id))
    if completion_index is not None:
        text += f',"completion_index":{int(completion_index)}'
    return text.encode()


# ----------------------------------------------------------------------------------------------------
# Layer registry (FusedMoE.__init__) and the capture op (forward paths).
# ----------------------------------------------------------------------------------------------------
def register_layer(layer: torch.nn.Module) -> None:
    """Called at the end of FusedMoE.__init__. Fixes the layer's row in the capture buffers now (the
    decoder-layer index, or its position in VLLM_LOG_MOE_LAYERS), so that torch.compile and CUDA graphs
    bake a constant row. Turns the hot path on before the first forward is traced."""
    layer._moe_routes_slot = -1
    from vllm.config import get_current_vllm_config

    settings = engine_settings(get_current_vllm_config())
    if settings is None:
        return
    _activate()
    try:
        layer_id = int(layer.layer_id)
    except Exception:
        layer._moe_routes_layer_id = None  # reported by on_kv_cache_ready
        return
    layer._moe_routes_layer_id = layer_id
    if settings.layers is None:
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
        raise RuntimeError(f"moe_routes: routing for {topk_ids.shape[0]} tokens, but the DP ranks hold "
                           f"{sizes} tokens; cannot find DP rank {rank}'s rows (a moe_routes bug, please report it)")
    start = sum(sizes[:rank])
    return topk_ids[start:start + sizes[rank]], topk_weights[start:start + sizes[rank]]


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
    inverse.scatter_(0, torch.where(l2p < 0, n_physical, l2p).flatten(),
                     logical[:, None].expand_as(l2p).flatten())
    return inverse[physical_ids.long()]


# The engine whose buffers a capture writes into: set when its KV cache is ready (so warm-up and CUDA-graph
# capture bake its buffers) and at each of its steps. Several engines may live in one process
# (VLLM_ENABLE_V1_MULTIPROCESSING=0); their steps never interleave within a forward.
_ACTIVE: _State | None = None


def _record_into_buffers(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, row_offset: int,
                         gathered: bool = False) -> None:
    st = _ACTIVE
    if st is None or slot < 0:
        return  # before KV-cache init (profile run), or an engine / rank that does not log
    if gathered:
        topk_ids, topk_weights = _this_dp_rank_rows(topk_ids, topk_weights)
    n = topk_ids.shape[0]
    if row_offset + n > st.max_tokens:
        raise RuntimeError(f"moe_routes: {row_offset + n} tokens in one MoE call exceed the capture "
                           f"buffer ({st.max_tokens}); this is a moe_routes bug, please report it")
    k = st.top_k
    st.ids_buf[row_offset:row_offset + n, slot].copy_(topk_ids[:, :k], non_blocking=True)
    st.w_buf[row_offset:row_offset + n, slot].copy_(topk_weights[:, :k], non_blocking=True)


def _record_op(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, row_offset: int,
               gathered: bool) -> torch.Tensor:
    _record_into_buffers(topk_ids, topk_weights, slot, row_offset, gathered)
    # Returning a fresh tensor that the caller uses keeps the op alive under the compiler's dead-code
    # elimination (an op with no outputs and no mutated inputs is removed).
    return topk_weights.clone()


def _record_fake(topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot: int, row_offset: int,
                 gathered: bool) -> torch.Tensor:
    return torch.empty_like(topk_weights)


_OP_REGISTERED = False


def _ensure_op() -> None:
    global _OP_REGISTERED
    if not _OP_REGISTERED:
        from vllm.utils.torch_utils import direct_register_custom_op

        direct_register_custom_op(op_name="moe_routes_record", op_func=_record_op,
                                  mutates_args=[], fake_impl=_record_fake)
        _OP_REGISTERED = True


def record(layer: torch.nn.Module, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
           row_offset: int = 0) -> torch.Tensor:
    """Capture the routing a kernel is about to use. Returns the weights to pass on to the kernel."""
    if layer._moe_routes_slot < 0:
        return topk_weights
    if layer.enable_eplb:
        topk_ids = _logical_ids(layer, topk_ids)
    return _capture(layer, topk_ids, topk_weights, row_offset)


def _capture(layer: torch.nn.Module, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             row_offset: int) -> torch.Tensor:
    slot, gathered = layer._moe_routes_slot, _gathers_dp_ranks(layer)
    if torch.compiler.is_compiling():
        return torch.ops.vllm.moe_routes_record(topk_ids, topk_weights, slot, row_offset, gathered)
    _record_into_buffers(topk_ids, topk_weights, slot, row_offset, gathered)
    return topk_weights


def record_router(layer: torch.nn.Module, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                  row_offset: int = 0) -> None:
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
# Record formatting: vectorised byte assembly (>= 1 M records/s on one core is the target).
# ----------------------------------------------------------------------------------------------------
_INT_TABLES: dict[int, np.ndarray] = {}


def _int_digits(v: np.ndarray, width: int) -> np.ndarray:
    """ASCII digits of non-negative integers, right-aligned in `width` columns, leading zeros as NUL."""
    d = (v.astype(np.int64)[:, None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10
    out = (d + 48).astype(np.uint8)
    lead = np.cumsum(d, axis=1) == 0
    lead[:, -1] = False
    out[lead] = 0
    return out


def _int_rows(values: np.ndarray, width: int | None = None) -> np.ndarray:
    """_int_digits through a cached table for the usual small ranges (ids, layers, positions < 1e6)."""
    if width is None:
        width = len(str(int(values.max()))) if values.size else 1
    if width > 6:
        return _int_digits(values, width)
    tab = _INT_TABLES.get(width)
    if tab is None:
        tab = _INT_TABLES[width] = _int_digits(np.arange(10 ** width), width)
    return tab[values]


# Two ASCII digits per uint16 (little-endian: first digit in the low byte), and exact powers of ten.
_PAIRS = np.array([(48 + v // 10) | ((48 + v % 10) << 8) for v in range(100)], dtype=np.uint16)
_POW = np.array([10.0 ** (8 - e) for e in range(-99, 100)])
_FLOAT_W = 16


def _float_bytes(x: np.ndarray) -> np.ndarray:
    """float32 values -> 16-byte rows 'NUL s D . DDDDDDDD e s XX' (s: '-' or NUL / exponent sign):
    9 significant digits, so every float32 value round-trips exactly. Built as eight uint16 columns,
    each one 1-D table lookup."""
    x = x.astype(np.float64).ravel()
    a = np.abs(x)
    zero = a == 0
    a[zero] = 1.0
    e = np.floor(np.log10(a)).astype(np.int64)
    m = np.rint(a * _POW[e + 99]).astype(np.int64)
    # log10 just below a power of ten can land on the wrong side; rounding can carry into a 10th digit
    fix = (m < 100_000_000) | (m >= 1_000_000_000)
    if fix.any():
        e[fix] += np.where(m[fix] >= 1_000_000_000, 1, -1)
        m[fix] = np.rint(a[fix] * _POW[e[fix] + 99]).astype(np.int64)
    m[zero] = 0
    e[zero] = 0
    out = np.empty((len(x), 8), dtype=np.uint16)
    out[:, 0] = np.where(x < 0, ord("-") << 8, 0)
    first, rest = np.divmod(m, 100_000_000)
    out[:, 1] = (first + 48) | (ord(".") << 8)
    out[:, 2] = _PAIRS[rest // 1_000_000]
    out[:, 3] = _PAIRS[rest // 10_000 % 100]
    out[:, 4] = _PAIRS[rest // 100 % 100]
    out[:, 5] = _PAIRS[rest % 100]
    out[:, 6] = np.where(e < 0, ord("e") | (ord("-") << 8), ord("e") | (ord("+") << 8))
    out[:, 7] = _PAIRS[np.abs(e)]
    return out.view(np.uint8)


_ROUTE_CHUNK = 1 << 13  # rows per assembly buffer (~1.3 MB): stays in L2, ~1.4x faster than 64k


def format_routes(req_fields: list[bytes], req_index: np.ndarray, token_idx: np.ndarray, layers: list[int],
                  ids: np.ndarray, weights: np.ndarray, cached: bool = False, dp_rank: int | None = None) -> bytes:
    """Compact JSON route records for tokens x layers, assembled as bytes with no per-record Python.

    req_fields[r]: request_field() of request r; token t belongs to request req_index[t].
    ids/weights: [num_tokens, num_layers, top_k]. A record is a fixed-width byte row: constant text from a
    template, numbers from digit tables, NUL filler squeezed out at the end."""
    n, n_layers, k = ids.shape
    if n == 0:
        return b""
    if int(ids.min()) < 0:
        raise MoeRoutesCaptureError("negative expert id in routing capture")
    inverse = np.asarray(req_index, dtype=np.int64)
    req_w = max(len(q) for q in req_fields)
    req_rows = np.zeros((len(req_fields), req_w), dtype=np.uint8)
    for i, q in enumerate(req_fields):
        req_rows[i, : len(q)] = np.frombuffer(q, dtype=np.uint8)
    tok_rows = _int_rows(np.asarray(token_idx, dtype=np.int64))
    layer_rows = _int_rows(np.asarray(layers, dtype=np.int64))
    id_w = len(str(int(ids.max())))

    # '{"type":"route","req_id":' R ',"token_idx":' T ',"layer":' L ',"topk_ids":[' (I sep)*k
    # '"topk_weights":[' (W sep)*k tail, where sep is ',' between items and ']' / '],' after the last
    head = (b'{"type":"route",' + (b'"dp_rank":%d,' % dp_rank if dp_rank is not None else b"") + b'"req_id":',
            b',"token_idx":', b',"layer":', b',"topk_ids":[')
    mid, tail = b',"topk_weights":[', (b',"cached":true}\n' if cached else b"}\n")
    template = bytearray(head[0]) + bytes(req_w) + head[1] + bytes(tok_rows.shape[1]) + head[2] \
        + bytes(layer_rows.shape[1]) + head[3]
    c_req = len(head[0])
    c_tok = c_req + req_w + len(head[1])
    c_layer = c_tok + tok_rows.shape[1] + len(head[2])
    c_ids = len(template)
    template += b"".join(bytes(id_w) + (b"," if j < k - 1 else b"]") for j in range(k)) + mid
    c_w = len(template)
    template += b"".join(bytes(_FLOAT_W) + (b"," if j < k - 1 else b"]") for j in range(k)) + tail
    template = np.frombuffer(bytes(template), dtype=np.uint8)
    width = len(template)

    out = []
    step = max(1, _ROUTE_CHUNK // n_layers)
    for t0 in range(0, n, step):
        t1 = min(n, t0 + step)
        nt = t1 - t0
        buf = np.empty((nt, n_layers, width), dtype=np.uint8)
        buf[:] = template
        buf[:, :, c_req:c_req + req_w] = req_rows[inverse[t0:t1]][:, None, :]
        buf[:, :, c_tok:c_tok + tok_rows.shape[1]] = tok_rows[t0:t1][:, None, :]
        buf[:, :, c_layer:c_layer + layer_rows.shape[1]] = layer_rows[None, :, :]
        id_view = buf[:, :, c_ids:c_ids + k * (id_w + 1)].reshape(nt, n_layers, k, id_w + 1)
        id_view[..., :id_w] = _int_rows(ids[t0:t1].reshape(-1), id_w).reshape(nt, n_layers, k, id_w)
        w_view = buf[:, :, c_w:c_w + k * (_FLOAT_W + 1)].reshape(nt, n_layers, k, _FLOAT_W + 1)
        w_view[..., :_FLOAT_W] = _float_bytes(weights[t0:t1]).reshape(nt, n_layers, k, _FLOAT_W)
        flat = buf.reshape(-1)
        out.append(flat[flat != 0].tobytes())
    return b"".join(out)


def _json_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


# ----------------------------------------------------------------------------------------------------
# Engine-side state, created when the KV cache exists (before warm-up and graph capture).
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Request:
    req_id: str                     # as the client sees it
    completion_index: int | None
    field: bytes                    # request_field(req_id, completion_index)
    next_pos: int = 0               # first position not yet logged


@dataclass
class _StepJob:
    requests: list[_Request]        # batch order
    counts: np.ndarray              # scheduled tokens per request
    positions: np.ndarray           # [n] absolute positions
    slots: np.ndarray               # [n] KV slots (-1: none)
    emit_from: np.ndarray           # per request: first position not yet logged
    gap_blocks: dict[int, np.ndarray]  # request index -> its block-table row, when a gap must be filled
    fresh_blocks: np.ndarray        # KV blocks allocated afresh this step: their slots hold no routing yet
    ids: Any                        # [n, rows, K] host tensor / array
    weights: Any
    event: Any = None               # CUDA event guarding the async D2H copy
    staging_index: int = -1


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


@dataclass
class _State:
    settings: Settings
    layers: list[int]
    rows: list[int]                 # buffer row of each logged layer
    top_k: int
    num_experts: int
    max_tokens: int
    ids_buf: torch.Tensor           # [max_tokens, n_rows, top_k], token-major
    w_buf: torch.Tensor
    device: torch.device
    kv_group: int                   # KV-cache group whose slots key the routing store (-1: none)
    manager_block_size: int         # block size of that group's KV-cache manager (scheduler block ids)
    kernel_block_size: int          # block size of its runner block table (may split manager blocks)
    num_slots: int
    meta: dict[str, Any]
    dp_rank: int | None = None      # set when data_parallel_size > 1: tags every record
    requests: dict[str, _Request] = field(default_factory=dict)   # engine id -> request
    fresh_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    jobs: queue.Queue[Any] = field(default_factory=lambda: queue.Queue(maxsize=64))
    staging: _HostStaging | None = None
    thread: _Writer | None = None
    error: BaseException | None = None
    stopped: bool = False           # logging stopped after an error (policy 'stop')
    stats: dict[str, int] = field(default_factory=lambda: {"route_records": 0, "cached_records": 0,
                                                           "recomputed_tokens_skipped": 0, "gaps": 0,
                                                           "gap_positions": 0, "steps_dropped": 0})


_STAGING_DEPTH = 4


def _patch_provenance() -> tuple[str, list[dict[str, str]]]:
    """Series name and patch hashes from the state file scripts/moe_patch.py writes beside the package."""
    import vllm

    state = Path(vllm.__file__).resolve().parent.parent / STATE_FILE
    try:
        data = json.loads(state.read_text())
        return data["series"], [{"name": p["name"], "sha256": p["sha256"]} for p in data["patches"]]
    except (OSError, ValueError, KeyError, TypeError):
        return (f"vllm-{vllm.__version__} (applied without scripts/moe_patch.py)",
                [{"name": f"unknown: no {STATE_FILE} beside the vllm package", "sha256": ""}])


def check_layer_modules(moe_modules: list[Any]) -> None:
    """One FusedMoE per decoder layer, with a known index: records are keyed by decoder layer."""
    unindexed = [m.layer_name for m in moe_modules if m._moe_routes_layer_id is None]
    if unindexed:
        raise _bad_env(ENV_PATH, f"cannot tell the decoder-layer index of MoE module(s) {unindexed[:3]}")
    by_layer: dict[int, list[str]] = {}
    for m in moe_modules:
        by_layer.setdefault(m._moe_routes_layer_id, []).append(m.layer_name)
    shared = {layer: names for layer, names in sorted(by_layer.items()) if len(names) > 1}
    if shared:
        layer, names = next(iter(shared.items()))
        raise _bad_env(ENV_PATH, f"decoder layer {layer} has {len(names)} MoE modules ({', '.join(names)}), "
                                 "e.g. experts for different token types; the log keys routing by decoder layer "
                                 "and cannot tell them apart; unset VLLM_LOG_MOE for this model")


def _routing_store_group(kv_cache_config: Any) -> tuple[int, int]:
    """(group index, manager block size) of the KV-cache group whose slots identify a token for the
    prefix-cache routing store: a full-attention group keeps every block of a request (a sliding-window
    group swaps blocks that left the window for the null block, a Mamba group has no per-token slots).
    (-1, 0) when there is none: prefix-cache hits then become gap records."""
    from vllm.v1.kv_cache_interface import (AttentionSpec, CrossAttentionSpec, EncoderOnlyAttentionSpec,
                                            FullAttentionSpec, UniformTypeKVCacheSpecs)

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
    if settings is None:
        return
    old = _engine_state(runner)
    if old is not None:  # KV cache re-initialised (e.g. wake-up): drain the old writer, start afresh
        _close(old)
        runner._moe_routes_state = None
    moe_modules = [m for m in runner.model.modules() if hasattr(m, "_moe_routes_layer_id")]
    if not moe_modules:
        raise _bad_env(ENV_PATH, f"model {runner.model_config.model} has no FusedMoE layer; nothing to log")
    check_layer_modules(moe_modules)
    moe_layer_ids = sorted(m._moe_routes_layer_id for m in moe_modules)
    if settings.layers is not None:
        missing = [i for i in settings.layers if i not in moe_layer_ids]
        if missing:
            raise _bad_env(ENV_LAYERS,
                           f"layer(s) {missing} are not MoE layers of this model; MoE layers: {moe_layer_ids}")
    logged_mods = sorted((m for m in moe_modules if m._moe_routes_slot >= 0), key=lambda m: m._moe_routes_layer_id)
    logged = [m._moe_routes_layer_id for m in logged_mods]
    rows = [m._moe_routes_slot for m in logged_mods]
    first = moe_modules[0]
    top_k, num_experts = int(first.top_k), int(first.logical_num_experts)
    if any(int(m.top_k) != top_k or int(m.logical_num_experts) != num_experts for m in moe_modules):
        raise _bad_env(ENV_PATH, "MoE layers with different top_k/num_experts are not supported by the log format")
    if any(getattr(m, "is_sequence_parallel", False) for m in moe_modules):
        # Each TP rank then routes only its shard of the batch; rank 0 alone cannot write every token.
        raise _bad_env(ENV_PATH,
                       "routing logging does not support sequence-parallel MoE (expert parallel with TP > 1 "
                       "and DP > 1); unset VLLM_LOG_MOE or use TP = 1 per DP rank")
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
    num_slots = int(kv_cfg.num_blocks) * manager_block_size if kv_group >= 0 else 0
    kernel_block_size = int(runner.input_batch.block_table[kv_group].block_size) if kv_group >= 0 else 0

    import vllm
    from vllm.platforms import current_platform

    model_config = runner.model_config
    series, patches = _patch_provenance()
    sim = os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY") or None
    meta = {
        "type": "meta", "schema_version": SCHEMA_VERSION, "engine": "vllm",
        "engine_version": vllm.__version__, "vllm_version": vllm.__version__,
        "torch_version": torch.__version__, "model_id": str(model_config.model),
        "dtype": str(model_config.dtype).replace("torch.", ""),
        "device": str(device) if device.type == "cpu" else f"{device} ({current_platform.get_device_name()})",
        "seed": model_config.seed, "num_experts": num_experts, "top_k": top_k,
        "num_hidden_layers": int(model_config.get_total_num_hidden_layers()),
        "moe_layers": moe_layer_ids, "layers_logged": logged,
        "layer_modules": {str(m._moe_routes_layer_id): m.layer_name for m in logged_mods},
        "id_kind": "logical",
        "routing_source": _routing_source(logged_mods),
        "routing_simulation_strategy": sim,
        "scoring_func": str(first.scoring_func), "renormalize": bool(first.renormalize),
        # topk_weights are what the expert kernel multiplied by. Some models (vLLM's DeepSeek-V2/V3,
        # GLM-4.5) give the kernel 1.0 and scale the MoE output by the config's factor afterwards.
        "kernel_routed_scaling_factor": float(getattr(first, "routed_scaling_factor", 1.0)),
        "config_routed_scaling_factor": getattr(model_config.hf_text_config, "routed_scaling_factor", None),
        "enforce_eager": bool(model_config.enforce_eager),
        "prefix_caching": bool(runner.cache_config.enable_prefix_caching),
        "kv_cache_groups": len(kv_cfg.kv_cache_groups), "routing_store_kv_group": kv_group,
        "tensor_parallel_size": parallel.tensor_parallel_size,
        # Under DP every rank's writer appends its own meta record and tags its records with dp_rank.
        "data_parallel_size": parallel.data_parallel_size, "data_parallel_rank": dp_rank,
        "expert_parallel": bool(first.use_ep), "eplb": bool(first.enable_eplb),
        "num_physical_experts": int(first.global_num_experts),
        "on_error": settings.on_error,
        "patch_series": series, "patches": patches,
        "writer": {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex[:12],
                   "data_parallel_rank": parallel.data_parallel_rank},
        "created_unix": time.time(),
    }
    st = _State(settings=settings, layers=logged, rows=rows, top_k=top_k, num_experts=num_experts,
                max_tokens=max_tokens, ids_buf=ids_buf, w_buf=w_buf, device=device, kv_group=kv_group,
                manager_block_size=manager_block_size, kernel_block_size=kernel_block_size, num_slots=num_slots, meta=meta, dp_rank=dp_rank)
    if device.type == "cuda":
        st.staging = _HostStaging(tuple(ids_buf.shape), _STAGING_DEPTH)
    st.thread = _Writer(st)
    st.thread.start()
    runner._moe_routes_state = st
    _ACTIVE = st


def _fresh_blocks(so: Any, group: int, block_size: int) -> np.ndarray:
    """KV blocks (manager ids) of `group` that this step allocates afresh, i.e. not prefix-cache hits:
    until this step's forward fills them they hold an earlier occupant's KV."""
    fresh: list[list[int]] = []
    for new in so.scheduled_new_reqs:
        fresh.append(new.block_ids[group][new.num_computed_tokens // block_size:])
    cached = so.scheduled_cached_reqs
    for i, rid in enumerate(cached.req_ids):
        blocks = cached.new_block_ids[i]
        if blocks is None:
            continue
        if rid in cached.resumed_req_ids:  # the whole block list is replaced; its hits are in front
            fresh.append(blocks[group][cached.num_computed_tokens[i] // block_size:])
        else:
            fresh.append(blocks[group])
    return np.fromiter((b for bl in fresh for b in bl), dtype=np.int64)


def on_step_begin(runner: Any, so: Any) -> None:
    """GPUModelRunner.execute_model, first thing, for every step (also those that schedule no token)."""
    global _ACTIVE
    st = _engine_state(runner)
    _ACTIVE = st
    if st is None or st.stopped:
        return
    _raise_if_failed(st)
    for rid in so.finished_req_ids:
        st.requests.pop(rid, None)
    try:
        for new in so.scheduled_new_reqs:
            if new.req_id not in st.requests:
                req_id, index = client_request(new.req_id, new.sampling_params)
                st.requests[new.req_id] = _Request(req_id, index, request_field(req_id, index))
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


def on_forward(runner: Any, scheduler_output: Any, num_tokens: int, req_ids: list[str],
               num_scheduled_tokens: np.ndarray) -> None:
    """GPUModelRunner.execute_model, right after the model forward of a scheduled batch."""
    st = _engine_state(runner)
    if st is None or st.stopped:
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
            state = runner.requests[rid]
            req_id, index = client_request(rid, state.sampling_params)
            req = st.requests[rid] = _Request(req_id, index, request_field(req_id, index))
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
    if st.staging is not None:
        idx, h_ids, h_w = _stage(st, n)
        event = torch.cuda.Event()
        event.record()
        job = _StepJob(batch, counts, positions, slots, emit_from, gap_blocks, st.fresh_blocks,
                       h_ids, h_w, event=event, staging_index=idx)
    else:
        job = _StepJob(batch, counts, positions, slots, emit_from, gap_blocks, st.fresh_blocks,
                       st.ids_buf.numpy()[:n, st.rows], st.w_buf.numpy()[:n, st.rows])
    st.fresh_blocks = np.zeros(0, dtype=np.int64)
    st.jobs.put(job)


# ----------------------------------------------------------------------------------------------------
# Failure policy. 'stop' (default): a server must keep serving when its routing log cannot be written
# (full disk) or a step's capture is incomplete: logging stops, the log gets a final "error" record and
# the engine log a loud error. 'fail' (VLLM_LOG_MOE_ON_ERROR=fail): the next step or flush raises.
# ----------------------------------------------------------------------------------------------------
def _fail(st: _State, exc: BaseException) -> None:
    if st.error is not None:
        return
    st.error = exc
    if st.settings.on_error == "fail":
        logger.error("moe_routes: the routing log failed (%s: %s); %s=fail stops the engine",
                     type(exc).__name__, exc, ENV_ON_ERROR)
        return
    st.stopped = True
    logger.error("moe_routes: ROUTING LOG STOPPED, %s is incomplete from here on (%s: %s). The engine keeps "
                 "serving; set %s=fail to stop it instead.", st.settings.path, type(exc).__name__, exc,
                 ENV_ON_ERROR)


class _Failure:
    """A failure the engine thread found, handed to the writer so that it is recorded in order."""

    staging_index = -1

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _fail_from_engine(st: _State, exc: BaseException) -> None:
    if st.settings.on_error == "fail":
        raise exc
    st.stopped = True  # nothing more is queued; the writer records the failure after the steps before it
    st.jobs.put(_Failure(exc))


def _raise_if_failed(st: _State) -> None:
    if st.error is not None and st.settings.on_error == "fail":
        raise RuntimeError(f"moe_routes: the routing log {st.settings.path} failed ({ENV_ON_ERROR}=fail)") \
            from st.error


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


class _Writer(threading.Thread):
    def __init__(self, st: _State) -> None:
        super().__init__(name="moe-routes-writer", daemon=True)
        self.st = st
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(st.settings.path, flags, 0o644)
        self.layers = list(st.layers)
        if st.num_slots:
            k, n_layers = st.top_k, len(st.layers)
            id_dtype = np.int16 if st.num_experts <= np.iinfo(np.int16).max else np.int32
            # np.zeros: the OS maps the pages lazily, on first store
            self.store_ids = np.zeros((st.num_slots, n_layers, k), dtype=id_dtype)
            self.store_w = np.zeros((st.num_slots, n_layers, k), dtype=np.float32)
            self.store_valid = np.zeros(st.num_slots, dtype=bool)
        self._last_write: tuple[int, int] | None = None   # [start, end) of our latest whole-line write
        self._write(_json_line(st.meta))
        atexit.register(self.close)

    # ---- file ----
    def _write(self, data: bytes) -> None:
        """Append whole lines under an exclusive lock. A failed chunk is cut off again (ftruncate to the
        chunk's start), so the file only ever holds whole lines."""
        if not data:
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            begin = os.fstat(self.fd).st_size
            offset = begin
            start = 0
            while start < len(data):
                end = len(data) if len(data) - start <= _WRITE_CHUNK else data.rfind(b"\n", start, start + _WRITE_CHUNK) + 1
                if end <= start:
                    end = data.index(b"\n", start) + 1
                try:
                    self._write_all(memoryview(data)[start:end])
                except OSError:
                    os.ftruncate(self.fd, offset)
                    self._last_write = (begin, offset) if offset > begin else None
                    raise
                offset += end - start
                start = end
            self._last_write = (begin, offset)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _write_all(self, view: memoryview) -> None:
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def _write_error_record(self, exc: BaseException) -> None:
        """Best effort: the final line says the log stopped. On a full disk, room is made by cutting whole
        lines off the end of this writer's own latest write (counted in the record)."""
        st = self.st
        record: dict[str, Any] = {"type": "error"}
        if st.dp_rank is not None:
            record["dp_rank"] = st.dp_rank
        record.update(error=f"{type(exc).__name__}: {exc}", policy=st.settings.on_error,
                      message="routing log stopped: records after this line are missing, and requests that "
                              "were running may lack positions", writer_id=st.meta["writer"]["id"],
                      time_unix=time.time(), records_dropped=0)
        for _ in range(4):
            line = _json_line(record)
            try:
                self._write(line)
                return
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    break
                dropped = self._cut_own_tail(len(line) * 2)
                if not dropped:
                    break
                record["records_dropped"] += dropped
        logger.error("moe_routes: could not write the final error record to %s", st.settings.path)

    def _cut_own_tail(self, need: int) -> int:
        """Remove whole lines (at least `need` bytes) from the end of our latest write, if it is still
        the end of the file. Returns the number of lines removed."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self.fd).st_size
            if self._last_write is None or self._last_write[1] != size or size - self._last_write[0] < need:
                return 0
            begin = self._last_write[0]
            tail = os.pread(self.fd, size - begin, begin)
            cut = tail.rfind(b"\n", 0, len(tail) - need) + 1  # keep whole lines in front of the cut
            os.ftruncate(self.fd, begin + cut)
            self._last_write = (begin, begin + cut) if cut else None
            return tail.count(b"\n", cut)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    # ---- thread ----
    def run(self) -> None:
        st = self.st
        while True:
            job = st.jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            try:
                if isinstance(job, _Failure):
                    raise job.exc
                if st.error is None:
                    self._write(self._process(job))
                else:
                    st.stats["steps_dropped"] += 1
            except BaseException as exc:
                failed_before = st.error is not None
                _fail(st, exc)
                if not failed_before and st.settings.on_error == "stop":
                    self._write_error_record(exc)
            finally:
                if job.staging_index >= 0:  # exactly once per job, whatever happened
                    st.staging.free.put(job.staging_index)

    def _process(self, job: _StepJob) -> bytes:
        st = self.st
        n = len(job.positions)
        if job.event is not None:
            job.event.synchronize()
            ids = job.ids.numpy()[:, st.rows]
            w = job.weights.numpy()[:, st.rows]
        else:
            ids, w = job.ids, job.weights
        unwritten = (ids < 0).any(axis=2)  # [n, L]: a logged layer left this step's rows at -1
        if unwritten.any():
            tok, lay = np.argwhere(unwritten)[0]
            raise MoeRoutesCaptureError(
                f"layer {self.layers[lay]} did not capture routing for {int(unwritten[:, lay].sum())} of {n} "
                f"tokens of a step (first: token {int(job.positions[tok])}); an MoE code path without the "
                "moe_routes hook ran (a moe_routes bug, please report it with the model and engine arguments)")
        out = []
        if st.num_slots:
            # 1. blocks allocated afresh this step hold an earlier occupant's KV until they are computed
            if len(job.fresh_blocks):
                bs = st.manager_block_size
                fresh = (job.fresh_blocks[:, None] * bs + np.arange(bs)).ravel()
                self.store_valid[fresh[fresh < st.num_slots]] = False
            # 2. this step's computed tokens, remembered by KV slot (before any hit is filled: a request
            # can hit blocks another request fills in the same step)
            ok = job.slots >= 0
            s = job.slots[ok]
            self.store_ids[s] = ids[ok]
            self.store_w[s] = w[ok]
            self.store_valid[s] = True
        # 3. positions this request never computed here (prefix-cache hit): routing from the KV slots
        starts = np.concatenate(([0], np.cumsum(job.counts)[:-1]))
        for i, blocks in job.gap_blocks.items():
            first = int(job.positions[starts[i]])
            out.append(self._fill_gap(job.requests[i], int(job.emit_from[i]), first, blocks))
        # 4. this step's records; positions recomputed after preemption were logged already
        keep = job.positions >= np.repeat(job.emit_from, job.counts)
        st.stats["recomputed_tokens_skipped"] += int((~keep).sum())
        if keep.any():
            tok_req = np.repeat(np.arange(len(job.requests)), job.counts)[keep]
            out.append(format_routes([r.field for r in job.requests], tok_req, job.positions[keep], self.layers,
                                     ids[keep], w[keep], dp_rank=st.dp_rank))
            st.stats["route_records"] += int(keep.sum()) * len(self.layers)
        return b"".join(out)

    def _gap_record(self, req: _Request, start: int, end: int, reason: str) -> bytes:
        st = self.st
        st.stats["gaps"] += 1
        st.stats["gap_positions"] += end - start
        gap: dict[str, Any] = {"type": "gap"}
        if st.dp_rank is not None:
            gap["dp_rank"] = st.dp_rank
        gap["req_id"] = req.req_id
        if req.completion_index is not None:
            gap["completion_index"] = req.completion_index
        gap.update(token_start=start, token_end=end, reason=reason)
        return _json_line(gap)

    def _fill_gap(self, req: _Request, start: int, end: int, blocks: np.ndarray) -> bytes:
        st = self.st
        if not st.num_slots:
            return self._gap_record(req, start, end, "prefix-cache hit and the KV layout has no per-token "
                                                     "full-attention slots to keep routing by")
        pos = np.arange(start, end, dtype=np.int64)
        kbs = st.kernel_block_size
        slots = blocks[pos // kbs].astype(np.int64) * kbs + pos % kbs
        valid = self.store_valid[slots]
        out = []
        # runs of positions whose slot does / does not hold the token's routing
        edges = np.flatnonzero(np.diff(valid.astype(np.int8))) + 1
        for lo, hi in zip(np.concatenate(([0], edges)), np.concatenate((edges, [len(pos)]))):
            if valid[lo]:
                st.stats["cached_records"] += int(hi - lo) * len(self.layers)
                out.append(format_routes([req.field], np.zeros(hi - lo, dtype=np.int64), pos[lo:hi], self.layers,
                                         self.store_ids[slots[lo:hi]], self.store_w[slots[lo:hi]], cached=True,
                                         dp_rank=st.dp_rank))
            else:
                out.append(self._gap_record(req, int(pos[lo]), int(pos[hi - 1]) + 1,
                                            "prefix-cache hit whose KV slots hold no routing captured in this "
                                            "process for these tokens"))
        return b"".join(out)

    def close(self) -> None:
        if self.is_alive():
            self.st.jobs.put(None)
            self.join(timeout=60)
        try:
            os.close(self.fd)
        except OSError:
            pass
