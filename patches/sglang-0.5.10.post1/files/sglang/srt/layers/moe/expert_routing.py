# Copyright 2026 moe-routes maintainers. Licensed under the Apache License, Version 2.0.
"""Per-request expert routing (top-k ids AND weights) for SGLang: ``return_expert_routing``.

Added by the moe-routes patch series (patches/sglang-0.5.10.post1). All logic of the
feature lives here; upstream files call into it with a few lines each.

* Server: ``--enable-return-expert-routing`` (``ServerArgs.enable_return_expert_routing``)
  turns on this capture only; SGLang's native ``--enable-return-routed-experts`` is
  independent. ``check_server_args`` refuses, at start-up, every mode in which the routing
  a request gets back could be wrong (see ``_REFUSED``).
* Model load (``init_for_model_runner``, attention-TP rank 0 only: the only rank whose
  scheduler sends outputs): every ``TopK`` module is found by module name; its
  decoder-layer index comes from the name (``...layers.<i>...``), which also fills
  ``layer_id`` where a model builds ``TopK`` without one. Device buffers
  ``[rows, L_moe, top_k]`` are sized once from the largest forward the scheduler can
  build and never reallocated (CUDA graphs keep pointers to them).
* Forward (``capture``, from ``topk._post_process_topk_ids`` before the logical->physical
  mapping, so ids are logical): device-side copy of ``topk_ids[:, :top_k]`` /
  ``topk_weights[:, :top_k]`` (the slice drops fused shared-expert columns).
* After the forward (``on_forward_end``): rows ``[0, len(out_cache_loc))`` are copied
  asynchronously into one of two pinned staging buffers, tagged with a forward id; they
  are scattered into a pageable, lazily allocated host store indexed by KV slot once
  their event completed.
* Request finish (``collect_for_request``): the request's KV slots
  ``req_to_token[req_pool_idx, :seqlen-1]`` select its rows, so prefix-cache hits get the
  routing computed when the slot was filled. Every staged forward that computed one of its
  positions is scattered first (forward-id check), so a slot never answers with its
  previous occupant's routing.
* Output: the raw arrays travel in the ``expert_routing`` field of
  ``BatchTokenIDOutput`` / ``BatchStrOutput`` (one entry per request index, so the
  multi-tokenizer split works); the tokenizer side encodes them into
  ``meta_info["expert_routing"]``.

Encoding of ``meta_info["expert_routing"]`` (``FORMAT``): ``num_tokens`` T (prompt +
generated - 1; position t is absolute token index t), ``layers`` (decoder-layer indices
of the MoE layers, length L), ``num_experts`` E, ``top_k`` K, ``shape`` [T, L, K],
``byte_order`` "little", ``ids_dtype`` (uint8 if E <= 255, int16 if E <= 32767, else
int32; the dtype's max value means "missing"), ``weights_dtype`` (float32, or float16
with ``--expert-routing-weights-dtype float16``), ``ids`` / ``weights`` (base64 of the
C-order arrays), ``num_cached_tokens`` (positions [0, n) came from the prefix cache),
``missing`` ([start, end) ranges without capture), ``weights_include_routed_scaling_factor``
and ``routed_scaling_factor`` (see ``_scaling_meta``). Decoder: moe_routes/sglang_routing.py
of the moe-routes repository.
"""

from __future__ import annotations

import base64
import collections
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "sglang-expert-routing/v1"
META_KEY = "expert_routing"
REQ_ATTR = "return_expert_routing"
SERVER_FLAG = "--enable-return-expert-routing"
WEIGHTS_FLAG = "--expert-routing-weights-dtype"
WEIGHTS_DTYPES = ("float32", "float16")
_PAYLOAD_ATTR = "expert_routing_payload"
STAGING_DEPTH = 2

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_NUM_EXPERTS_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")

# --------------------------------------------------------------------------- server args


def add_cli_args(parser) -> None:
    parser.add_argument(
        SERVER_FLAG,
        action="store_true",
        help="Allow requests to ask for return_expert_routing: top-k expert ids and weights per token and MoE "
        "layer (moe-routes). Independent of --enable-return-routed-experts.",
    )
    parser.add_argument(
        WEIGHTS_FLAG,
        type=str,
        choices=list(WEIGHTS_DTYPES),
        default="float32",
        help="dtype of the returned expert routing weights (float16 halves the KV-slot host store).",
    )


# (condition on ServerArgs, what is on, the flag to change, why the routing would be wrong)
_REFUSED = (
    (lambda a: a.pp_size > 1, "pipeline parallelism", "--pp-size 1", "each stage runs only its own layers"),
    (
        lambda a: a.speculative_algorithm is not None,
        "speculative decoding",
        "no --speculative-algorithm",
        "draft and rejected tokens go through the MoE layers",
    ),
    (
        lambda a: a.enable_dp_attention,
        "DP attention",
        "no --enable-dp-attention",
        "the MoE layers see the tokens of every DP rank",
    ),
    (
        lambda a: str(a.moe_a2a_backend) != "none",
        "an MoE all-to-all backend",
        "--moe-a2a-backend none",
        "each rank routes only its share of the tokens",
    ),
    (
        lambda a: a.enable_two_batch_overlap or getattr(a, "enable_single_batch_overlap", False),
        "two/single-batch overlap",
        "no --enable-two-batch-overlap / --enable-single-batch-overlap",
        "a micro-batch's TopK call overwrites the other's rows",
    ),
    (
        lambda a: a.attn_cp_size > 1 or a.enable_prefill_context_parallel or a.enable_nsa_prefill_context_parallel,
        "context parallelism",
        "--attn-cp-size 1 and no --enable-(nsa-)prefill-context-parallel",
        "each rank computes a part of the sequence",
    ),
    (
        lambda a: a.enable_pdmux,
        "PD-multiplexing",
        "no --enable-pdmux",
        "prefill and decode run as separate concurrent forwards",
    ),
    (
        lambda a: a.enable_hierarchical_cache or a.hicache_storage_backend is not None,
        "the hierarchical cache / storage prefetch",
        "no --enable-hierarchical-cache / --hicache-storage-backend",
        "KV loaded back from host or storage fills slots without a forward",
    ),
    (
        lambda a: a.enable_lmcache,
        "LMCache",
        "no --enable-lmcache",
        "KV loaded from LMCache fills slots without a forward",
    ),
    (
        lambda a: a.disaggregation_mode != "null",
        "P/D disaggregation",
        "--disaggregation-mode null",
        "prefill and decode run on different servers; transferred KV slots were never routed here",
    ),
    (
        lambda a: a.enable_hisparse,
        "HiSparse",
        "no --enable-hisparse",
        "KV slots are swapped between host and device without a forward",
    ),
    (
        lambda a: a.dllm_algorithm is not None,
        "diffusion LLM decoding",
        "no --dllm-algorithm",
        "blocks are recomputed many times per position",
    ),
    (
        lambda a: a.enable_attn_tp_input_scattered and a.tp_size > 1,
        "scattered attention-TP input",
        "no --enable-attn-tp-input-scattered",
        "each TP rank may route only its scattered share of the tokens",
    ),
)

# MoE runner backends whose TopK never calls select_experts (topk.TopK.forward_cuda:
# TRITON_KERNEL and BYPASSED output formats): no routing reaches the capture hook.
_BYPASSING_BACKENDS = ("triton_kernel", "flashinfer_trtllm", "flashinfer_mxfp4")
# --moe-runner-backend auto resolves to one of them for FP8/FP4 DeepSeek/Qwen3/Llama4 on sm100 and for
# GPT-OSS, so the refusal says what to pass instead
_BACKEND_FIX = "pass --moe-runner-backend triton or flashinfer_cutlass"


def check_server_args(server_args) -> None:
    """Called first in ServerArgs.check_server_args (engine and HTTP server start-up)."""
    if not getattr(server_args, "enable_return_expert_routing", False):
        return
    for cond, what, fix, why in _REFUSED:
        if cond(server_args):
            raise ValueError(
                f"{SERVER_FLAG} is not supported with {what} ({why}): use {fix}, or start without {SERVER_FLAG}"
            )
    backend = str(getattr(server_args, "moe_runner_backend", "auto"))
    if backend in _BYPASSING_BACKENDS:
        raise ValueError(
            f"{SERVER_FLAG} is not supported with --moe-runner-backend {backend} (the kernel routes "
            f"internally, select_experts never runs): {_BACKEND_FIX}, or start without {SERVER_FLAG}"
        )
    wdt = getattr(server_args, "expert_routing_weights_dtype", "float32")
    if wdt not in WEIGHTS_DTYPES:
        raise ValueError(f"{WEIGHTS_FLAG} must be one of {WEIGHTS_DTYPES} (used with {SERVER_FLAG}), got {wdt!r}")


# --------------------------------------------------------------------------- encoding


def ids_dtype_for(num_experts: int) -> np.dtype:
    """Smallest id dtype whose max value is not a valid expert id (it is the "missing" value)."""
    if num_experts <= np.iinfo(np.uint8).max:  # ids 0..254, 255 = "missing"
        return np.dtype(np.uint8)
    if num_experts <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def _missing_ranges(bad: np.ndarray) -> list[list[int]]:
    idx = np.flatnonzero(bad)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return [[int(s), int(e)] for s, e in zip(starts, ends, strict=True)]


def encode_routing(
    ids: np.ndarray,
    weights: np.ndarray,
    layers: Sequence[int],
    num_experts: int,
    num_cached_tokens: int = 0,
    weights_dtype: str = "float32",
    scaling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON-able payload of ``meta_info["expert_routing"]`` (runs on the tokenizer side)."""
    ids = np.asarray(ids)
    weights = np.asarray(weights)
    if ids.ndim != 3 or ids.shape != weights.shape or ids.shape[1] != len(layers):
        raise ValueError(f"bad routing shapes ids={ids.shape} weights={weights.shape} layers={len(layers)}")
    idt = ids_dtype_for(num_experts)
    ids = ids.astype(idt, copy=False)
    bad = (ids == np.iinfo(idt).max).any(axis=(1, 2)) if ids.size else np.zeros(ids.shape[0], bool)
    out = {
        "format": FORMAT,
        "num_tokens": int(ids.shape[0]),
        "layers": [int(x) for x in layers],
        "num_experts": int(num_experts),
        "top_k": int(ids.shape[2]),
        "shape": [int(s) for s in ids.shape],
        "byte_order": "little",
        "ids_dtype": idt.name,
        "weights_dtype": weights_dtype,
        "ids": _b64(ids),
        "weights": _b64(weights.astype(np.dtype(weights_dtype), copy=False)),
        "num_cached_tokens": int(min(max(num_cached_tokens, 0), ids.shape[0])),
        "missing": _missing_ranges(bad),
    }
    out.update(scaling or {})
    return out


def error_payload(reason: str) -> dict[str, Any]:
    return {"format": FORMAT, "error": reason}


def encode_output(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Scheduler-side raw arrays -> meta_info payload; the base64 work stays off the scheduler."""
    if raw is None or "error" in raw:
        return raw
    return encode_routing(
        raw["ids"],
        raw["weights"],
        raw["layers"],
        raw["num_experts"],
        raw["num_cached_tokens"],
        raw["weights_dtype"],
        raw.get("scaling"),
    )


def add_to_meta_info(meta_info: dict[str, Any], recv_obj, i: int) -> None:
    """Called by TokenizerManager._handle_batch_output for output index ``i``."""
    per_req = getattr(recv_obj, "expert_routing", None)
    if per_req and per_req[i] is not None:
        meta_info[META_KEY] = encode_output(per_req[i])


# --------------------------------------------------------------------------- request flag


def normalize_request_flag(value: Any, num: int, batch_size: int, parallel_sample_num: int, is_single: bool):
    """bool for a single request, list[bool] of length ``num`` for a batch.

    A batch accepts a bool (same for every request), a list of len ``batch_size`` (expanded
    like the prompts when ``n`` > 1) or a list of len ``num`` (already expanded).
    """
    if value is None:
        value = False
    if is_single:
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError("return_expert_routing: a list needs a batch request")
            value = value[0]
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"return_expert_routing must be a bool, got {value!r}")
        return bool(value)
    if isinstance(value, (bool, np.bool_)):
        return [bool(value)] * num
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (bool, np.bool_)) for v in value):
        raise ValueError(f"return_expert_routing must be a bool or a list of bools, got {value!r}")
    value = [bool(v) for v in value]
    if len(value) == num:
        return value
    if len(value) == batch_size:
        return value * parallel_sample_num
    raise ValueError(
        f"return_expert_routing has {len(value)} entries, the batch has {batch_size} prompts ({num} requests)"
    )


def request_item(value: Any, i: int) -> bool:
    return bool(value[i]) if isinstance(value, (list, tuple)) else bool(value)


def _as_count(v) -> int | None:
    # Hunyuan / ERNIE-VL give one count per layer or modality: the id range is the largest
    if isinstance(v, (list, tuple)):
        v = max((x for x in v if isinstance(x, int)), default=None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 1 else None


def config_num_experts(hf_text_config) -> int | None:
    found = [_as_count(getattr(hf_text_config, k, None)) for k in _NUM_EXPERTS_KEYS]
    ffn = getattr(hf_text_config, "ffn_config", None)  # DBRX
    if ffn is not None:
        found.append(
            _as_count(ffn.get("moe_num_experts") if isinstance(ffn, dict) else getattr(ffn, "moe_num_experts", None))
        )
    found = [x for x in found if x is not None]
    return max(found) if found else None


def _asked(value) -> bool:
    return any(bool(v) for v in value) if isinstance(value, (list, tuple)) else bool(value)


def flag_off_message() -> str:
    return (
        f"return_expert_routing was requested but the server was started without {SERVER_FLAG}: "
        f"restart it with {SERVER_FLAG} (see also {WEIGHTS_FLAG})"
    )


def validate_request(obj, server_args, model_config) -> None:
    """Called by TokenizerManager._validate_one_request; ValueError -> HTTP 400."""
    if not _asked(getattr(obj, REQ_ATTR, False)):
        return
    if not getattr(server_args, "enable_return_expert_routing", False):
        raise ValueError(flag_off_message())
    cfg = getattr(model_config, "hf_text_config", None)
    if cfg is None or config_num_experts(cfg) is None:
        raise ValueError("return_expert_routing was requested but the served model is not a MoE model.")


# --------------------------------------------------------------------------- OpenAI endpoints


def openai_validate(request, server_args) -> str | None:
    """Error message (-> HTTP 400) for a /v1/completions or /v1/chat/completions request, or None."""
    value = getattr(request, REQ_ATTR, False)
    if isinstance(value, (list, tuple)):
        return (
            "return_expert_routing must be true or false: it applies to every choice of the request "
            f"(all n={getattr(request, 'n', 1)} samples); per-sample lists are not supported"
        )
    if value and not getattr(server_args, "enable_return_expert_routing", False):
        return flag_off_message()
    return None


def openai_sglext(request, payload: dict[str, Any] | None):
    """``choices[i].sglext`` carrying that choice's own payload, or None.

    Per choice, unlike the native ``routed_experts`` (response level, first choice only): every
    choice is its own sequence with its own routing. Streaming: the choice's finishing chunk.
    """
    if payload is None or not getattr(request, REQ_ATTR, False):
        return None
    from sglang.srt.entrypoints.openai.protocol import SglExt

    return SglExt(expert_routing=payload)


def openai_choice_sglext(request, ret_item: dict[str, Any]):
    return openai_sglext(request, ret_item.get("meta_info", {}).get(META_KEY))


def openai_stream_stash(stash: dict[int, Any], index: int, content: dict[str, Any]) -> None:
    """Chat streaming sends finish chunks after the loop: keep each index's payload until then."""
    payload = content.get("meta_info", {}).get(META_KEY)
    if payload is not None:
        stash[index] = payload


# --------------------------------------------------------------------------- capturer


class _DoneEvent:
    def record(self, *a):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


class _Staged:
    """One pinned staging buffer plus what the forward it holds computed (for the freshness check)."""

    __slots__ = ("ids", "weights", "loc", "n", "event", "fid", "rids", "end_pos", "num_new")

    def __init__(self, rows, num_layers, top_k, ids_dtype, w_dtype, pin):
        self.ids = torch.empty((rows, num_layers, top_k), dtype=ids_dtype, pin_memory=pin)
        self.weights = torch.empty((rows, num_layers, top_k), dtype=w_dtype, pin_memory=pin)
        self.loc = torch.empty((rows,), dtype=torch.int64, pin_memory=pin)
        self.n = 0
        self.event = None
        self.fid = -1
        self.rids = None
        self.end_pos = None
        self.num_new = None

    def first_pos(self, rid) -> int | None:
        """Lowest position of ``rid`` this forward computed; 0 when unknown (then it must be waited for)."""
        if self.rids is None:
            return 0
        try:
            j = self.rids.index(rid)
        except ValueError:
            return None
        if self.end_pos is None:
            return 0
        new = 1 if self.num_new is None else int(self.num_new[j])
        return int(self.end_pos[j]) - new


_TORCH_DTYPES = {
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "float32": torch.float32,
    "float16": torch.float16,
}


def footprint(
    num_layers: int, top_k: int, num_experts: int, rows: int, num_kv_slots: int, weights_dtype: str = "float32"
) -> dict[str, int]:
    """Bytes each buffer takes (the formula the start-up log line and APPENDIX.md report)."""
    per_entry = ids_dtype_for(num_experts).itemsize + np.dtype(weights_dtype).itemsize
    per_row = num_layers * top_k * per_entry
    return {
        "device": rows * per_row,
        "pinned_staging": STAGING_DEPTH * rows * (per_row + 8),
        "host_kv_store": num_kv_slots * per_row,
    }


class ExpertRoutingCapturer:
    def __init__(
        self,
        layer_ids: Sequence[int],
        decoder_layers: Sequence[int],
        top_k: int,
        num_experts: int,
        num_kv_slots: int,
        max_rows: int,
        device="cpu",
        weights_dtype: str = "float32",
        event_factory: Callable[[], Any] | None = None,
        scaling: dict[str, Any] | None = None,
    ):
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"duplicate MoE layer ids {list(layer_ids)}")
        if weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"{WEIGHTS_FLAG} must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
        self.layer_to_slot = {int(layer): i for i, layer in enumerate(layer_ids)}
        self.layers = [int(x) for x in decoder_layers]
        self.top_k = int(top_k)
        self.num_experts = int(num_experts)
        self.device = torch.device(device)
        self.np_ids_dtype = ids_dtype_for(num_experts)
        self.ids_dtype = _TORCH_DTYPES[self.np_ids_dtype.name]
        self.weights_dtype_name = weights_dtype
        self.w_dtype = _TORCH_DTYPES[weights_dtype]
        self.fill = int(np.iinfo(self.np_ids_dtype).max)
        self.scaling = dict(scaling or {})
        self.max_rows = int(max_rows)
        self.num_kv_slots = int(num_kv_slots)
        L, K = len(self.layers), self.top_k
        # Sized once: CUDA graphs captured later keep these addresses.
        self.dev_ids = torch.full((self.max_rows, L, K), self.fill, dtype=self.ids_dtype, device=self.device)
        self.dev_weights = torch.zeros((self.max_rows, L, K), dtype=self.w_dtype, device=self.device)
        pin = self.device.type == "cuda"
        self._free = collections.deque(
            _Staged(self.max_rows, L, K, self.ids_dtype, self.w_dtype, pin) for _ in range(STAGING_DEPTH)
        )
        self._pending: collections.deque = collections.deque()
        # KV-slot store: pageable numpy from calloc, so the OS maps pages only for slots that
        # get written; ids are stored +1 so that the zero page means "missing".
        self._store_ids = None
        self._store_weights = None
        self._store_id_dtype = self.np_ids_dtype  # id + 1 <= E <= the dtype's max
        if event_factory is None:
            event_factory = torch.cuda.Event if self.device.type == "cuda" else _DoneEvent
        self._event_factory = event_factory
        self.fid = 0  # forwards queued so far
        self.drained_fid = 0  # every forward <= this one is in the host store
        sizes = footprint(L, K, num_experts, self.max_rows, self.num_kv_slots, weights_dtype)
        self.sizes = sizes
        logger.info(
            "expert routing: %d MoE layers %s, top_k=%d, num_experts=%d (ids %s, weights %s), rows/forward %d, "
            "KV slots %d: device %.1f MiB, pinned staging %.1f MiB, KV-slot host store up to %.2f GiB "
            "(pageable, touched as slots fill)",
            L,
            self.layers,
            K,
            num_experts,
            self.np_ids_dtype.name,
            weights_dtype,
            self.max_rows,
            self.num_kv_slots,
            sizes["device"] / 2**20,
            sizes["pinned_staging"] / 2**20,
            sizes["host_kv_store"] / 2**30,
        )

    # ---- forward side (device only) ----
    def capture(self, layer_id, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        slot = self.layer_to_slot.get(layer_id)
        if slot is None:
            return
        n = topk_ids.shape[0]
        if n > self.max_rows:
            raise RuntimeError(
                f"{SERVER_FLAG}: a forward routed {n} tokens, more than the {self.max_rows} rows sized at start-up "
                f"(from --chunked-prefill-size / --max-prefill-tokens / --cuda-graph-max-bs / "
                f"--max-running-requests); please report this, or start without {SERVER_FLAG}"
            )
        k = self.top_k
        self.dev_ids[:n, slot].copy_(topk_ids[:, :k], non_blocking=True)
        self.dev_weights[:n, slot].copy_(topk_weights[:, :k].detach(), non_blocking=True)

    def on_forward_end(self, out_cache_loc: torch.Tensor | None, rids=None, end_pos=None, num_new=None) -> None:
        """Queue the copy of rows [0, len(out_cache_loc)) to the host (async on CUDA)."""
        if out_cache_loc is None:
            return
        n = int(out_cache_loc.shape[0])
        if n == 0:
            return
        if n > self.max_rows:
            raise RuntimeError(
                f"{SERVER_FLAG}: forward of {n} tokens exceeds the {self.max_rows} rows sized at start-up"
            )
        self.drain(block=False)
        if not self._free:
            self._drain_one(block=True)
        st = self._free.popleft()
        st.ids[:n].copy_(self.dev_ids[:n], non_blocking=True)
        st.weights[:n].copy_(self.dev_weights[:n], non_blocking=True)
        st.loc[:n].copy_(out_cache_loc, non_blocking=True)
        # stream-ordered after the copy: a layer whose hook does not run in the next forward leaves
        # "missing" rows, never this forward's routing
        self.dev_ids[:n].fill_(self.fill)
        st.n = n
        self.fid += 1
        st.fid = self.fid
        st.rids, st.end_pos, st.num_new = rids, end_pos, num_new
        st.event = self._event_factory()
        st.event.record()
        self._pending.append(st)

    # ---- host side ----
    def _ensure_store(self):
        if self._store_ids is None:
            shape = (self.num_kv_slots, len(self.layers), self.top_k)
            self._store_ids = np.zeros(shape, dtype=self._store_id_dtype)
            self._store_weights = np.zeros(shape, dtype=np.dtype(self.weights_dtype_name))

    def _drain_one(self, block: bool) -> bool:
        st = self._pending[0]
        if block:
            st.event.synchronize()
        elif not st.event.query():
            return False
        if st.fid != self.drained_fid + 1:
            raise RuntimeError(f"expert routing staging out of order: forward {st.fid} after {self.drained_fid}")
        self._ensure_store()
        loc = st.loc[: st.n].numpy()
        self._store_ids[loc] = st.ids[: st.n].numpy().astype(self._store_id_dtype) + 1
        self._store_weights[loc] = st.weights[: st.n].numpy()
        self.drained_fid = st.fid
        self._pending.popleft()
        st.event = None
        st.rids = st.end_pos = st.num_new = None
        self._free.append(st)
        return True

    def drain(self, block: bool = False) -> None:
        """Scatter completed staged copies into the KV-slot host store, oldest first."""
        while self._pending and self._drain_one(block):
            pass

    def wait_for(self, rid, num_positions: int) -> None:
        """Make every staged forward that computed a position < num_positions of ``rid`` visible.

        Under the overlap scheduler the next forward (which may hold this request's discarded
        extra token) is still in flight when the request finishes; it is waited for only if it
        computed one of the positions read here.
        """
        need = 0
        for st in self._pending:
            pos = st.first_pos(rid)
            if pos is not None and pos < num_positions:
                need = st.fid
        while self._pending and self._pending[0].fid <= need:
            self._drain_one(block=True)
        self.drain(block=False)
        if self.drained_fid < need:
            raise RuntimeError(f"expert routing: forward {need} not in the host store (have {self.drained_fid})")

    def gather(self, slots) -> tuple:
        self.drain(block=False)
        slots = np.asarray(torch.as_tensor(slots, dtype=torch.int64).cpu().numpy())
        L, K = len(self.layers), self.top_k
        if self._store_ids is None:
            return (
                np.full((len(slots), L, K), self.fill, self.np_ids_dtype),
                np.full((len(slots), L, K), np.nan, np.dtype(self.weights_dtype_name)),
            )
        # in the storage dtype (= the id dtype): no T x L x K int64 temporaries, only a bool mask
        ids = self._store_ids[slots]
        missing = ids == 0
        ids -= 1
        ids[missing] = self.fill
        w = self._store_weights[slots]
        w[missing] = np.nan
        return ids, w

    def assemble(self, rid, slots, num_cached_tokens: int = 0) -> dict[str, Any]:
        self.wait_for(rid, len(slots))
        ids, w = self.gather(slots)
        return {
            "ids": ids,
            "weights": w,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "num_cached_tokens": int(num_cached_tokens),
            "weights_dtype": self.weights_dtype_name,
            "scaling": self.scaling,
        }


_CAPTURER: ExpertRoutingCapturer | None = None
_UNAVAILABLE_REASON = "expert routing capture is not enabled in this process"
_SENDER = True


def get_capturer() -> ExpertRoutingCapturer | None:
    return _CAPTURER


def set_capturer(capturer: ExpertRoutingCapturer | None, reason: str = "", sender: bool = True) -> None:
    global _CAPTURER, _UNAVAILABLE_REASON, _SENDER
    _CAPTURER = capturer
    _SENDER = sender
    if reason:
        _UNAVAILABLE_REASON = reason


# --------------------------------------------------------------------------- model load


def find_moe_topk_modules(model: torch.nn.Module, topk_cls=None) -> list[tuple]:
    """[(decoder_layer_index, module_name, TopK module)] sorted by layer index."""
    if topk_cls is None:
        from sglang.srt.layers.moe.topk import TopK as topk_cls  # noqa: N813
    found = []
    for order, (name, mod) in enumerate(model.named_modules()):
        if not isinstance(mod, topk_cls):
            continue
        m = _LAYER_RE.findall(name)
        if m:
            layer = int(m[-1])
        elif getattr(mod, "layer_id", None) is not None:
            layer = int(mod.layer_id)
        else:
            layer = order
        found.append((layer, name, mod))
    found.sort(key=lambda x: x[0])
    return found


def _model_num_experts(model, topk_name: str, num_redundant: int) -> int | None:
    """Logical routed experts of the FusedMoE beside a TopK (its num_experts counts fused shared and
    redundant EPLB experts too)."""
    parent = topk_name.rsplit(".", 1)[0] if "." in topk_name else ""
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        return None
    experts = getattr(owner, "experts", None)
    n = getattr(experts, "num_experts", None)
    if not isinstance(n, int):
        return None
    return n - int(getattr(experts, "num_fused_shared_experts", 0) or 0) - int(num_redundant or 0)


def _weights_scaled(cfg) -> bool | None:
    """Whether select_experts leaves routed_scaling_factor inside topk_weights for this TopKConfig; None
    when that depends on which kernel runs, which is only decided per call (device, expert count).

    topk.select_experts in 0.5.10.post1: only the grouped paths accept apply_routed_scaling_factor_on_output
    (the others assert it off). grouped_topk_gpu and biased_grouped_topk_impl / kimi_k2 multiply only
    inside ``if renormalize``; the CUDA fused kernels of biased_grouped_topk_gpu (flashinfer
    fused_topk_deepseek, moe_fused_gate) multiply regardless of renormalize. ROCm aiter's biased kernel
    receives the factor even with the flag off."""
    if cfg.routed_scaling_factor is None:
        return False
    biased = bool(cfg.use_grouped_topk) and cfg.correction_bias is not None
    if not cfg.apply_routed_scaling_factor_on_output:
        if biased:
            from sglang.srt.layers.moe import topk

            if getattr(topk, "_use_aiter", False):
                return None
        return False
    if cfg.renormalize:
        return True  # every path that accepts the flag applies it under renormalize
    return None if biased else False  # non-biased grouped: torch code only, inside ``if renormalize``


def _scaling_meta(cfgs) -> dict[str, Any]:
    """``weights_include_routed_scaling_factor``: true / false when known at load, null when the kernel
    chosen per forward decides (otherwise the model scales the MoE output after the experts)."""
    applied = {_weights_scaled(c) for c in cfgs}
    factors = {c.routed_scaling_factor for c in cfgs}
    if len(factors) != 1:
        raise ValueError("return_expert_routing: MoE layers disagree on routed_scaling_factor")
    f = factors.pop()
    return {
        "weights_include_routed_scaling_factor": applied.pop() if len(applied) == 1 else None,
        "routed_scaling_factor": None if f is None else float(f),
    }


def check_one_topk_per_layer(found, model) -> None:
    """Records are keyed by decoder layer: a layer with two routers (ERNIE-4.5-VL's text/vision experts,
    each routing a subset of the tokens) would share one index and rows that no longer match
    out_cache_loc."""
    by_layer: dict[int, list[str]] = {}
    for layer, name, _ in found:
        by_layer.setdefault(layer, []).append(name)
    for layer, names in sorted(by_layer.items()):
        if len(names) > 1:
            raise ValueError(
                f"{SERVER_FLAG}: decoder layer {layer} of {type(model).__name__} has {len(names)} MoE TopK "
                f"modules ({', '.join(names)}), e.g. experts for different token types; the routing log keys "
                f"routing by decoder layer and cannot tell them apart; start without {SERVER_FLAG} for this model"
            )


def build_capturer_for_model(
    model, hf_text_config, num_kv_slots: int, max_rows: int, device, topk_cls=None, num_redundant_experts: int = 0, **kw
) -> ExpertRoutingCapturer | None:
    found = find_moe_topk_modules(model, topk_cls)
    if not found:
        return None
    check_one_topk_per_layer(found, model)
    layers, layer_ids, top_ks, cfgs, model_e = [], [], set(), [], []
    for layer, name, mod in found:
        cfg = mod.topk_config
        fmt = getattr(cfg, "output_format", None)
        if fmt is not None and getattr(fmt, "name", str(fmt)) != "STANDARD":
            raise ValueError(
                f"{SERVER_FLAG}: {name} uses top-k output format {fmt}, which bypasses "
                f"select_experts; {_BACKEND_FIX}, or start without {SERVER_FLAG}"
            )
        if mod.layer_id is None:
            mod.layer_id = layer  # models built without layer_id (mixtral, olmoe, granitemoe, ...)
        layers.append(layer)
        layer_ids.append(mod.layer_id)
        top_ks.add(cfg.top_k - cfg.num_fused_shared_experts)
        cfgs.append(cfg)
        e = _model_num_experts(model, name, num_redundant_experts)
        if e is not None:
            model_e.append(e)
    if len(top_ks) != 1:
        raise ValueError(f"return_expert_routing: MoE layers disagree on top_k {sorted(top_ks)}")
    # the id dtype and its "missing" value must cover the largest id any layer can return
    candidates = model_e + [x for x in (config_num_experts(hf_text_config),) if x is not None]
    if not candidates:
        raise ValueError(
            "return_expert_routing: cannot find the number of routed experts in the model "
            "(no FusedMoE 'experts' beside TopK, no n_routed_experts/num_experts/"
            "num_local_experts/moe_num_experts/ffn_config.moe_num_experts in the config)"
        )
    return ExpertRoutingCapturer(
        layer_ids,
        layers,
        top_ks.pop(),
        max(candidates),
        num_kv_slots,
        max_rows,
        device,
        scaling=_scaling_meta(cfgs),
        **kw,
    )


def _round_up(x: int, m: int) -> int:
    return -(-x // max(m, 1)) * max(m, 1)


def max_tokens_per_forward(
    server_args, max_running_requests: int, context_len: int, num_kv_slots: int, page_size: int
) -> int:
    """Upper bound of the rows one forward routes (scheduler + graph runners of 0.5.10.post1).

    * Chunked prefill on: PrefillAdder caps a prefill batch at chunked_prefill_size tokens
      (decode requests mixed in come out of that budget).
    * Chunked prefill off (-1): rem_input_tokens = max_prefill_tokens only stops adding requests
      once it is used up, so the last admitted request (at most context_len tokens, e.g. via
      add_one_req_ignore_eos) can overshoot it; and a batch never holds more tokens than KV slots.
    * Decode: one token per running request; CUDA graphs pad to the captured batch size.
    * Piecewise CUDA graphs pad an extend to the captured token count (an explicit
      --piecewise-cuda-graph-tokens list may go above --piecewise-cuda-graph-max-tokens).
    """
    cp = server_args.chunked_prefill_size
    if cp is not None and cp > 0:
        prefill = _round_up(cp, page_size)
    else:
        prefill = min(num_kv_slots, _round_up(server_args.max_prefill_tokens + context_len, page_size))
    if getattr(server_args, "enable_mixed_chunk", False):
        prefill += max_running_requests
    graph_bs = max([server_args.cuda_graph_max_bs or 0] + list(server_args.cuda_graph_bs or []))
    piecewise = 0
    if not getattr(server_args, "disable_piecewise_cuda_graph", True):
        piecewise = max(
            [getattr(server_args, "piecewise_cuda_graph_max_tokens", None) or 0]
            + list(getattr(server_args, "piecewise_cuda_graph_tokens", None) or [])
        )
    return int(max(prefill, max_running_requests, graph_bs, piecewise, 1))


def _attention_tp_rank(model_runner) -> int:
    try:
        from sglang.srt.layers.dp_attention import get_attention_tp_rank

        return int(get_attention_tp_rank())
    except Exception:  # not initialised (no distributed env): plain TP rank
        return int(getattr(model_runner, "tp_rank", 0))


def init_for_model_runner(model_runner) -> None:
    """Called once by ModelRunner.initialize after the KV pool exists, before CUDA-graph capture."""
    sa = model_runner.server_args
    if not getattr(sa, "enable_return_expert_routing", False) or getattr(model_runner, "is_draft_worker", False):
        return
    check_server_args(sa)  # also for ModelRunners built without the engine's start-up check
    if _attention_tp_rank(model_runner) != 0:
        # only attention-TP rank 0's scheduler sends outputs: no buffers, no capture elsewhere
        set_capturer(None, sender=False)
        return
    from sglang.srt.layers.moe.utils import get_moe_runner_backend

    backend = get_moe_runner_backend()
    for probe in ("is_triton_kernels", "is_flashinfer_trtllm", "is_flashinfer_mxfp4"):
        if getattr(backend, probe, lambda: False)():
            raise ValueError(
                f"{SERVER_FLAG}: not supported with MoE runner backend {backend} (its TopK never calls "
                f"select_experts; --moe-runner-backend auto picks it for some models and GPUs): "
                f"{_BACKEND_FIX}, or start without {SERVER_FLAG}"
            )
    num_kv_slots = model_runner.max_total_num_tokens + model_runner.page_size
    rows = max_tokens_per_forward(
        sa,
        model_runner.max_running_requests,
        model_runner.model_config.context_len,
        num_kv_slots,
        model_runner.page_size,
    )
    cap = build_capturer_for_model(
        model_runner.model,
        model_runner.model_config.hf_text_config,
        num_kv_slots=num_kv_slots,
        max_rows=rows,
        device=model_runner.device,
        weights_dtype=getattr(sa, "expert_routing_weights_dtype", "float32"),
        num_redundant_experts=getattr(sa, "ep_num_redundant_experts", 0),
    )
    if cap is None and config_num_experts(model_runner.model_config.hf_text_config) is not None:
        # e.g. --model-impl transformers: its MoE layers route without sglang's TopK, nothing would be captured
        raise ValueError(
            f"{SERVER_FLAG}: the model config is a MoE model but the loaded {type(model_runner.model).__name__} "
            f"has no sglang TopK module to capture routing from (--model-impl "
            f"{getattr(sa, 'model_impl', 'auto')}); use --model-impl sglang, or start without {SERVER_FLAG}"
        )
    set_capturer(cap, "" if cap is not None else "the model has no MoE (TopK) layers")


# --------------------------------------------------------------------------- hooks


def capture(layer_id, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """Called from topk._post_process_topk_ids (logical ids, before EPLB mapping)."""
    cap = _CAPTURER
    if cap is not None:
        cap.capture(layer_id, topk_ids, topk_weights)


def on_forward_end(forward_batch) -> None:
    """Called from ModelRunner.forward after the model forward (and graph replay)."""
    cap = _CAPTURER
    if cap is None:
        return
    num_new = None
    if forward_batch.forward_mode.is_extend():
        num_new = getattr(forward_batch, "extend_seq_lens_cpu", None)
    cap.on_forward_end(
        forward_batch.out_cache_loc,
        getattr(forward_batch, "rids", None),
        getattr(forward_batch, "seq_lens_cpu", None),
        num_new,
    )


def collect_for_request(req, req_to_token_pool) -> None:
    """Called at request finish, before its KV slots are released."""
    if not getattr(req, REQ_ATTR, False) or not _SENDER:
        return
    cap = _CAPTURER
    if cap is None:
        setattr(req, _PAYLOAD_ATTR, error_payload(_UNAVAILABLE_REASON))
        return
    n = max(req.seqlen - 1, 0)
    slots = req_to_token_pool.req_to_token[req.req_pool_idx, :n].to("cpu", torch.int64)
    setattr(req, _PAYLOAD_ATTR, cap.assemble(req.rid, slots, getattr(req, "cached_tokens", 0) or 0))


def stream_outputs(rids: list[str], reqs) -> list[dict[str, Any] | None] | None:
    """The ``expert_routing`` field of BatchTokenIDOutput: one entry per sent rid, None if nobody asked."""
    payloads = {}
    for req in reqs:
        p = getattr(req, _PAYLOAD_ATTR, None)
        if p is not None and req.finished():
            payloads[req.rid] = p
            setattr(req, _PAYLOAD_ATTR, None)
    if not payloads:
        return None
    return [payloads.get(rid) for rid in rids]
