# Copyright 2026 moe-routes maintainers. Licensed under the Apache License, Version 2.0.
"""Per-request expert routing (top-k ids AND weights) for SGLang.

Added by the moe-routes patch series (patches/sglang-0.5.10.post1). All logic of the
feature lives in this module; upstream files only call into it with a few lines.

Mechanism (same family as the native ``return_routed_experts`` of PR #12162):

* Model load (``init_for_model_runner``): every ``TopK`` module of the model is found by
  module name; its decoder-layer index is parsed from the name (``...layers.<i>...``). A
  ``TopK`` built without ``layer_id`` (mixtral, olmoe, granitemoe, ...) gets that index as
  ``layer_id``; dense layers have no ``TopK`` and are therefore excluded. One "slot" per
  MoE layer is allocated in a static device buffer ``[rows, L_moe, top_k]`` for ids (in the
  compact id dtype) and weights (float32).
* Forward (``capture``, called from ``topk._post_process_topk_ids`` before the
  logical->physical mapping, so ids are *logical*): a device-side copy of
  ``topk_ids[:, :top_k]`` / ``topk_weights[:, :top_k]`` into the static buffers. The
  ``[:, :top_k]`` truncation drops fused shared-expert slots. No host sync; valid inside
  CUDA-graph capture (fixed shapes per graph batch size).
* After the forward (``on_forward_end``): rows ``[0, len(out_cache_loc))`` are copied
  asynchronously (pinned staging ring + event) together with ``out_cache_loc``; the staged
  rows are scattered into a host buffer indexed by KV slot once their event completed
  (lazily, FIFO order). No ``.cpu()`` sync on the forward path.
* Request finish (``collect_for_request``): the request's KV slots
  ``req_to_token[req_pool_idx, :seqlen-1]`` select its rows of the host buffer, so
  prefix-cache hits get the routing computed when the KV slot was filled.
* Output (``add_stream_outputs`` / ``finalize_meta_info``): the encoded payload travels
  in the ``customized_info`` channel and lands in ``meta_info["expert_routing"]`` of the
  final chunk.

Encoding of ``meta_info["expert_routing"]`` (``FORMAT`` = "sglang-expert-routing/v1"): a
JSON object with ``num_tokens`` T (= prompt + generated - 1 routed positions, position t
is absolute token index t), ``layers`` (decoder-layer indices of MoE layers, length L),
``num_experts`` E, ``top_k`` K, ``shape`` [T, L, K], ``byte_order`` "little",
``ids_dtype`` ("uint8" if E <= 255, "int16" if E <= 32767, else "int32"),
``weights_dtype`` ("float32", or "float16" when SGLANG_EXPERT_ROUTING_WEIGHTS_DTYPE=float16),
``ids`` / ``weights`` (standard base64 of the C-order arrays), ``num_cached_tokens``
(positions [0, n) came from the prefix cache) and ``missing`` (list of [start, end)
position ranges whose KV slot holds no captured routing; ids there are the dtype's max).
"""

from __future__ import annotations

import base64
import collections
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "sglang-expert-routing/v1"
META_KEY = "expert_routing"
REQ_ATTR = "return_expert_routing"
_PAYLOAD_ATTR = "expert_routing_payload"

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_NUM_EXPERTS_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")

# --------------------------------------------------------------------------- encoding


def ids_dtype_for(num_experts: int) -> np.dtype:
    """Smallest id dtype whose max value is not a valid expert id (it is the fill value)."""
    if num_experts <= np.iinfo(np.uint8).max:  # ids 0..254, 255 = "missing"
        return np.dtype(np.uint8)
    if num_experts <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


_TORCH_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
                 "float32": torch.float32, "float16": torch.float16}


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def _missing_ranges(bad: np.ndarray) -> List[List[int]]:
    out: List[List[int]] = []
    idx = np.flatnonzero(bad)
    if idx.size == 0:
        return out
    start = prev = int(idx[0])
    for i in idx[1:]:
        i = int(i)
        if i != prev + 1:
            out.append([start, prev + 1])
            start = i
        prev = i
    out.append([start, prev + 1])
    return out


def encode_routing(ids: np.ndarray, weights: np.ndarray, layers: Sequence[int], num_experts: int,
                   num_cached_tokens: int = 0, weights_dtype: str = "float32") -> Dict[str, Any]:
    ids = np.asarray(ids)
    weights = np.asarray(weights)
    if ids.ndim != 3 or ids.shape != weights.shape or ids.shape[1] != len(layers):
        raise ValueError(f"bad routing shapes ids={ids.shape} weights={weights.shape} layers={len(layers)}")
    idt = ids_dtype_for(num_experts)
    fill = np.iinfo(idt).max
    ids = ids.astype(idt, copy=False)
    missing = _missing_ranges((ids == fill).any(axis=(1, 2)) if ids.size else np.zeros(ids.shape[0], bool))
    return {
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
        "missing": missing,
    }


def decode_routing(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of ``encode_routing`` (same as scripts/sglang_routing.py in the moe-routes repo)."""
    if payload.get("format") != FORMAT:
        raise ValueError(f"unknown expert routing format {payload.get('format')!r}")
    if "error" in payload:
        raise ValueError(payload["error"])
    shape = tuple(payload["shape"])
    ids = np.frombuffer(base64.b64decode(payload["ids"]), dtype=np.dtype(payload["ids_dtype"]).newbyteorder("<"))
    w = np.frombuffer(base64.b64decode(payload["weights"]), dtype=np.dtype(payload["weights_dtype"]).newbyteorder("<"))
    return {
        "topk_ids": ids.reshape(shape).astype(np.int32),
        "topk_weights": w.reshape(shape).astype(np.float32),
        "layers": np.asarray(payload["layers"], dtype=np.int64),
        "num_experts": int(payload["num_experts"]),
        "top_k": int(payload["top_k"]),
        "num_cached_tokens": int(payload.get("num_cached_tokens", 0)),
        "missing": [tuple(r) for r in payload.get("missing", [])],
    }


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


def _model_num_experts(hf_text_config) -> Optional[int]:
    for key in _NUM_EXPERTS_KEYS:
        v = getattr(hf_text_config, key, None)
        if isinstance(v, int) and v > 1:
            return v
    return None


def validate_request(obj, server_args, model_config) -> None:
    """Called by TokenizerManager._validate_one_request; ValueError -> HTTP 400."""
    value = getattr(obj, REQ_ATTR, False)
    asked = any(bool(v) for v in value) if isinstance(value, (list, tuple)) else bool(value)
    if not asked:
        return
    if not getattr(server_args, "enable_return_routed_experts", False):
        raise ValueError(
            "The server is not configured to return expert routing. "
            "Please set `--enable-return-routed-experts` to enable `return_expert_routing`."
        )
    cfg = getattr(model_config, "hf_text_config", None)
    if cfg is None or _model_num_experts(cfg) is None:
        raise ValueError("return_expert_routing was requested but the served model is not a MoE model.")


# --------------------------------------------------------------------------- capturer


class _DoneEvent:
    def record(self, *a):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


class _Staged:
    __slots__ = ("ids", "weights", "loc", "n", "event")

    def __init__(self, rows, num_layers, top_k, ids_dtype, w_dtype, pin):
        self.ids = torch.empty((rows, num_layers, top_k), dtype=ids_dtype, pin_memory=pin)
        self.weights = torch.empty((rows, num_layers, top_k), dtype=w_dtype, pin_memory=pin)
        self.loc = torch.empty((rows,), dtype=torch.int64, pin_memory=pin)
        self.n = 0
        self.event = None


class ExpertRoutingCapturer:
    def __init__(self, layer_ids: Sequence[int], decoder_layers: Sequence[int], top_k: int, num_experts: int,
                 num_kv_slots: int, max_rows: int, device="cpu", weights_dtype: str = "float32",
                 ring_size: int = 3, event_factory: Optional[Callable[[], Any]] = None,
                 sync: bool = False):
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"duplicate MoE layer ids {list(layer_ids)}")
        self.layer_to_slot = {int(l): i for i, l in enumerate(layer_ids)}
        self.layers = [int(x) for x in decoder_layers]
        self.top_k = int(top_k)
        self.num_experts = int(num_experts)
        self.device = torch.device(device)
        self.np_ids_dtype = ids_dtype_for(num_experts)
        self.ids_dtype = _TORCH_DTYPES[self.np_ids_dtype.name]
        self.weights_dtype_name = weights_dtype
        self.w_dtype = _TORCH_DTYPES[weights_dtype]
        self.fill = int(np.iinfo(self.np_ids_dtype).max)
        L, K = len(self.layers), self.top_k
        self.dev_ids = torch.zeros((max_rows, L, K), dtype=self.ids_dtype, device=self.device)
        self.dev_weights = torch.zeros((max_rows, L, K), dtype=self.w_dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.host_ids = torch.full((num_kv_slots, L, K), self.fill, dtype=self.ids_dtype, pin_memory=pin)
        self.host_weights = torch.full((num_kv_slots, L, K), float("nan"), dtype=self.w_dtype, pin_memory=pin)
        if event_factory is None:
            event_factory = torch.cuda.Event if self.device.type == "cuda" else _DoneEvent
        self._event_factory = event_factory
        self._free = collections.deque(_Staged(max_rows, L, K, self.ids_dtype, self.w_dtype, pin)
                                       for _ in range(max(1, ring_size)))
        self._pending: collections.deque = collections.deque()
        self.sync = sync
        logger.info("expert routing: %d MoE layers %s, top_k=%d, num_experts=%d, ids %s, host %.1f MB",
                    L, self.layers, K, num_experts, self.np_ids_dtype.name,
                    (self.host_ids.nbytes + self.host_weights.nbytes) / 2**20)

    # ---- forward side (device only) ----
    def capture(self, layer_id, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        slot = self.layer_to_slot.get(layer_id)
        if slot is None:
            return
        n = topk_ids.shape[0]
        if n > self.dev_ids.shape[0]:
            self._grow(n)
        k = self.top_k
        self.dev_ids[:n, slot].copy_(topk_ids[:, :k], non_blocking=True)
        self.dev_weights[:n, slot].copy_(topk_weights[:, :k].detach(), non_blocking=True)

    def _grow(self, n: int) -> None:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"expert routing buffer too small for a graph batch of {n} tokens")
        L, K = self.dev_ids.shape[1:]
        self.dev_ids = torch.zeros((n, L, K), dtype=self.ids_dtype, device=self.device)
        self.dev_weights = torch.zeros((n, L, K), dtype=self.w_dtype, device=self.device)
        self.drain(block=True)
        pin = self.device.type == "cuda"
        self._free = collections.deque(_Staged(n, L, K, self.ids_dtype, self.w_dtype, pin) for _ in self._free)

    def on_forward_end(self, out_cache_loc: Optional[torch.Tensor]) -> None:
        """Queue the copy of rows [0, len(out_cache_loc)) to the host (async on CUDA)."""
        if out_cache_loc is None:
            return
        n = int(out_cache_loc.shape[0])
        if n == 0:
            return
        self.drain(block=False)
        if not self._free:
            self._drain_one(block=True)
        st = self._free.popleft()
        if st.ids.shape[0] < n:  # only possible after _grow raced; keep it simple
            st = _Staged(n, *self.dev_ids.shape[1:], self.ids_dtype, self.w_dtype, self.device.type == "cuda")
        st.ids[:n].copy_(self.dev_ids[:n], non_blocking=True)
        st.weights[:n].copy_(self.dev_weights[:n], non_blocking=True)
        st.loc[:n].copy_(out_cache_loc, non_blocking=True)
        st.n = n
        st.event = self._event_factory()
        st.event.record()
        self._pending.append(st)
        if self.sync:
            self.drain(block=True)

    # ---- host side ----
    def _drain_one(self, block: bool) -> bool:
        st = self._pending[0]
        if block:
            st.event.synchronize()
        elif not st.event.query():
            return False
        loc = st.loc[: st.n]
        self.host_ids[loc] = st.ids[: st.n]
        self.host_weights[loc] = st.weights[: st.n]
        self._pending.popleft()
        st.event = None
        self._free.append(st)
        return True

    def drain(self, block: bool = False) -> None:
        """Scatter completed staged copies into the KV-slot host buffer, oldest first."""
        while self._pending and self._drain_one(block):
            pass

    def gather(self, slots) -> tuple:
        self.drain(block=False)
        slots = torch.as_tensor(slots, dtype=torch.int64).cpu()
        return self.host_ids[slots].numpy(), self.host_weights[slots].float().numpy()

    def assemble(self, slots, num_cached_tokens: int = 0) -> Dict[str, Any]:
        ids, w = self.gather(slots)
        return encode_routing(ids, w, self.layers, self.num_experts, num_cached_tokens, self.weights_dtype_name)


_CAPTURER: Optional[ExpertRoutingCapturer] = None
_UNAVAILABLE_REASON = "expert routing capture is not enabled in this process"


def get_capturer() -> Optional[ExpertRoutingCapturer]:
    return _CAPTURER


def set_capturer(capturer: Optional[ExpertRoutingCapturer], reason: str = "") -> None:
    global _CAPTURER, _UNAVAILABLE_REASON
    _CAPTURER = capturer
    if reason:
        _UNAVAILABLE_REASON = reason


# --------------------------------------------------------------------------- model load


def find_moe_topk_modules(model: torch.nn.Module, topk_cls=None) -> List[tuple]:
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


def build_capturer_for_model(model, hf_text_config, num_kv_slots: int, max_rows: int, device,
                             topk_cls=None, **kw) -> Optional[ExpertRoutingCapturer]:
    found = find_moe_topk_modules(model, topk_cls)
    if not found:
        return None
    layers, layer_ids, top_ks = [], [], set()
    for layer, name, mod in found:
        cfg = mod.topk_config
        fmt = getattr(cfg, "output_format", None)
        if fmt is not None and getattr(fmt, "name", str(fmt)) != "STANDARD":
            raise ValueError(f"return_expert_routing: {name} uses top-k output format {fmt}, which bypasses "
                             "select_experts; use the default MoE runner backend")
        if mod.layer_id is None:
            mod.layer_id = layer  # models built without layer_id (mixtral, olmoe, granitemoe, ...)
        layers.append(layer)
        layer_ids.append(mod.layer_id)
        top_ks.add(cfg.top_k - cfg.num_fused_shared_experts)
    if len(top_ks) != 1:
        raise ValueError(f"return_expert_routing: MoE layers disagree on top_k {sorted(top_ks)}")
    num_experts = _model_num_experts(hf_text_config)
    if num_experts is None:
        raise ValueError("return_expert_routing: cannot find the number of routed experts in the model config")
    return ExpertRoutingCapturer(layer_ids, layers, top_ks.pop(), num_experts, num_kv_slots, max_rows, device, **kw)


def init_for_model_runner(model_runner) -> None:
    """Called once by ModelRunner after the model is loaded (before CUDA-graph capture)."""
    sa = model_runner.server_args
    if not getattr(sa, "enable_return_routed_experts", False) or getattr(model_runner, "is_draft_worker", False):
        return
    for cond, what in ((getattr(sa, "enable_dp_attention", False), "--enable-dp-attention"),
                       (getattr(sa, "pp_size", 1) > 1, "pipeline parallelism"),
                       (getattr(sa, "speculative_algorithm", None), "speculative decoding")):
        if cond:
            set_capturer(None, f"return_expert_routing is not supported with {what}")
            logger.warning("expert routing disabled: not supported with %s", what)
            return
    from sglang.srt.layers.moe.utils import get_moe_runner_backend

    backend = get_moe_runner_backend()
    for probe in ("is_triton_kernels", "is_flashinfer_trtllm", "is_flashinfer_mxfp4"):
        if getattr(backend, probe, lambda: False)():
            raise ValueError(f"--enable-return-routed-experts: expert routing is not available with MoE runner "
                             f"backend {backend} (the kernel routes internally)")
    chunk = max(getattr(sa, "chunked_prefill_size", 0) or 0, getattr(sa, "max_prefill_tokens", 0) or 0)
    max_rows = chunk + model_runner.max_running_requests + 64
    wdt = os.environ.get("SGLANG_EXPERT_ROUTING_WEIGHTS_DTYPE", "float32")
    cap = build_capturer_for_model(
        model_runner.model, model_runner.model_config.hf_text_config,
        num_kv_slots=model_runner.max_total_num_tokens + model_runner.page_size,
        max_rows=max_rows, device=model_runner.device, weights_dtype=wdt,
        sync=os.environ.get("SGLANG_EXPERT_ROUTING_SYNC", "0") == "1")
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
    if cap is not None:
        cap.on_forward_end(getattr(forward_batch, "out_cache_loc", None))


def collect_for_request(req, req_to_token_pool) -> None:
    """Called at request finish, before its KV slots are released."""
    if not getattr(req, REQ_ATTR, False):
        return
    cap = _CAPTURER
    if cap is None:
        setattr(req, _PAYLOAD_ATTR, {"format": FORMAT, "error": _UNAVAILABLE_REASON})
        return
    n = max(req.seqlen - 1, 0)
    slots = req_to_token_pool.req_to_token[req.req_pool_idx, :n].to("cpu", torch.int64)
    setattr(req, _PAYLOAD_ATTR, cap.assemble(slots, getattr(req, "cached_tokens", 0) or 0))


def add_stream_outputs(customized_info: Dict[str, list], rids: List[str], reqs) -> None:
    """Append a per-rid aligned list under META_KEY when some sent request carries a payload."""
    payloads = {}
    for req in reqs:
        p = getattr(req, _PAYLOAD_ATTR, None)
        if p is not None and req.finished():
            payloads[req.rid] = p
    if payloads:
        customized_info[META_KEY] = [payloads.get(rid) for rid in rids]


def finalize_meta_info(meta_info: Dict[str, Any]) -> None:
    if META_KEY in meta_info and meta_info[META_KEY] is None:
        del meta_info[META_KEY]
