# SPDX-License-Identifier: Apache-2.0
"""Engine-independent half of the per-token MoE routing log (``VLLM_LOG_MOE``), added by the moe-routes
patch series: settings, client request ids, record formatting, and the writer thread (KV-slot store,
prefix-cache hits, failure policy, whole-line appends under ``flock``).

Standard library and numpy only, so that this logic is importable and testable without torch or vLLM;
``moe_routes.py`` (the engine glue the upstream hooks call) feeds it host arrays.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A plain stdlib logger: vllm.logger would tie this module to vLLM. Its name sits under "vllm", so vLLM's
# logging configuration still applies to it.
logger = logging.getLogger(__name__)

ENV_PATH = "VLLM_LOG_MOE"
ENV_LAYERS = "VLLM_LOG_MOE_LAYERS"
ENV_ON_ERROR = "VLLM_LOG_MOE_ON_ERROR"
ON_ERROR_POLICIES = ("stop", "fail")
DEFAULT_FILE = "moe_routes.jsonl"
SCHEMA_VERSION = 2
STATE_FILE = ".moe-routes-vllm.json"
# SamplingParams.extra_args key carrying the id (and choice index) the client sees for a request.
REQUEST_TAG = "moe_routes"
# A chunk of whole lines per write(2), under flock: concurrent appenders (a second engine, DP ranks) never
# interleave inside a line. (A SIGKILL can still cut a write(2) at a page boundary: Writer._repair_tail.)
_WRITE_CHUNK = 1 << 20


class MoeRoutesConfigError(ValueError):
    """A VLLM_LOG_MOE* value or an engine feature that cannot work with the routing log."""


class MoeRoutesCaptureError(RuntimeError):
    """The capture of a step is incomplete: logging it would be wrong."""


@dataclass(frozen=True)
class Settings:
    path: str
    layers: tuple[int, ...] | None
    on_error: str = "stop"


def bad_value(var: str, value: str, why: str) -> MoeRoutesConfigError:
    return MoeRoutesConfigError(f"{var}={value!r}: {why}")


def bad_env(var: str, why: str) -> MoeRoutesConfigError:
    """bad_value for a variable as the running process sees it."""
    return bad_value(var, os.environ.get(var, ""), why)


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
        raise bad_value(ENV_PATH, raw, "is a directory; give a file path (or 1 for ./moe_routes.jsonl)")
    if not os.path.isdir(parent):
        raise bad_value(ENV_PATH, raw, f"parent directory {parent} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise bad_value(ENV_PATH, raw, f"file {path} is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise bad_value(ENV_PATH, raw, f"directory {parent} is not writable")

    layers_raw = env.get(ENV_LAYERS, "")
    layers = None
    if layers_raw.strip():
        try:
            items = [int(x) for x in layers_raw.replace(" ", "").split(",")]
        except ValueError:
            raise bad_value(
                ENV_LAYERS, layers_raw, "expected a comma-separated list of decoder-layer indices, e.g. 0,12,23"
            ) from None
        if any(i < 0 for i in items):
            raise bad_value(ENV_LAYERS, layers_raw, "layer indices must be >= 0")
        if len(set(items)) != len(items):
            raise bad_value(ENV_LAYERS, layers_raw, "duplicate layer index")
        layers = tuple(sorted(items))

    on_error = env.get(ENV_ON_ERROR, "").strip() or "stop"
    if on_error not in ON_ERROR_POLICIES:
        raise bad_value(
            ENV_ON_ERROR,
            env.get(ENV_ON_ERROR, ""),
            "expected 'stop' (default: stop logging, keep serving) or 'fail' (stop the engine)",
        )
    return Settings(path=path, layers=layers, on_error=on_error)


# ----------------------------------------------------------------------------------------------------
# Request ids as the client sees them (see moe_routes.py for how the tag gets there).
# ----------------------------------------------------------------------------------------------------
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
            raise MoeRoutesCaptureError(
                f"request {engine_id!r} has n={tag['n']} but is not a parallel-sampling "
                "child id '<index>_<parent id>' (a moe_routes bug, please report it)"
            )
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
        tab = _INT_TABLES[width] = _int_digits(np.arange(10**width), width)
    return tab[values]


# Two ASCII digits per uint16 (little-endian: first digit in the low byte), and exact powers of ten.
_PAIRS = np.array([(48 + v // 10) | ((48 + v % 10) << 8) for v in range(100)], dtype=np.uint16)
_POW = np.array([10.0 ** (8 - e) for e in range(-99, 100)])
_FLOAT_W = 16


def float_bytes(x: np.ndarray) -> np.ndarray:
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


def format_routes(
    req_fields: list[bytes],
    req_index: np.ndarray,
    token_idx: np.ndarray,
    layers: list[int],
    ids: np.ndarray,
    weights: np.ndarray,
    cached: bool = False,
    dp_rank: int | None = None,
) -> bytes:
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
    head = (
        b'{"type":"route",' + (b'"dp_rank":%d,' % dp_rank if dp_rank is not None else b"") + b'"req_id":',
        b',"token_idx":',
        b',"layer":',
        b',"topk_ids":[',
    )
    mid, tail = b',"topk_weights":[', (b',"cached":true}\n' if cached else b"}\n")
    template = (
        bytearray(head[0])
        + bytes(req_w)
        + head[1]
        + bytes(tok_rows.shape[1])
        + head[2]
        + bytes(layer_rows.shape[1])
        + head[3]
    )
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
        buf[:, :, c_req : c_req + req_w] = req_rows[inverse[t0:t1]][:, None, :]
        buf[:, :, c_tok : c_tok + tok_rows.shape[1]] = tok_rows[t0:t1][:, None, :]
        buf[:, :, c_layer : c_layer + layer_rows.shape[1]] = layer_rows[None, :, :]
        id_view = buf[:, :, c_ids : c_ids + k * (id_w + 1)].reshape(nt, n_layers, k, id_w + 1)
        id_view[..., :id_w] = _int_rows(ids[t0:t1].reshape(-1), id_w).reshape(nt, n_layers, k, id_w)
        w_view = buf[:, :, c_w : c_w + k * (_FLOAT_W + 1)].reshape(nt, n_layers, k, _FLOAT_W + 1)
        w_view[..., :_FLOAT_W] = float_bytes(weights[t0:t1]).reshape(nt, n_layers, k, _FLOAT_W)
        flat = buf.reshape(-1)
        out.append(flat[flat != 0].tobytes())
    return b"".join(out)


def json_line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


# ----------------------------------------------------------------------------------------------------
# The writer: one step of host arrays in, whole JSONL lines out.
# ----------------------------------------------------------------------------------------------------
@dataclass
class Request:
    req_id: str  # as the client sees it
    completion_index: int | None
    next_pos: int = 0  # first position not yet logged
    engine_id: str = ""  # the engine's request id (keys the rows returned to the scheduler)
    # Per-request return (enable_return_routed_experts): first position returned
    # (SamplingParams.routed_experts_prompt_start), the next one expected, and whether a hole was found
    # (its rows then stop: the front-end sees a short array and returns None instead of wrong rows).
    return_from: int = 0
    return_next: int = -1
    return_broken: bool = False
    field: bytes = field(init=False)  # request_field(req_id, completion_index), formatted once

    def __post_init__(self) -> None:
        self.field = request_field(self.req_id, self.completion_index)
        if self.return_next < 0:
            self.return_next = self.return_from


@dataclass
class StepJob:
    requests: list[Request]  # batch order
    counts: np.ndarray  # scheduled tokens per request
    positions: np.ndarray  # [n] absolute positions
    slots: np.ndarray  # [n] KV slots (-1: none)
    emit_from: np.ndarray  # per request: first position not yet logged
    gap_blocks: dict[int, np.ndarray]  # request index -> its block-table row, when a gap must be filled
    fresh_blocks: np.ndarray  # KV blocks allocated afresh this step: their slots hold no routing yet
    ids: Any  # [n, rows, K] host tensor / array
    weights: Any
    event: Any = None  # CUDA event guarding the async D2H copy
    staging_index: int = -1


@dataclass(kw_only=True)
class WriterState:
    """What a writer shares with the engine thread that queues its steps (moe_routes._State extends it
    with the device buffers)."""

    settings: Settings | None  # None: nothing is logged, routing is only returned per request
    layers: list[int]  # decoder layers captured (host arrays' second axis), ascending
    rows: list[int]  # buffer row of each captured layer
    log_cols: list[int] | None = None  # which of `layers` the log writes (None: all)
    top_k: int
    num_experts: int
    manager_block_size: int  # block size of the store's KV-cache manager (scheduler block ids)
    kernel_block_size: int  # block size of its runner block table (may split manager blocks)
    num_slots: int  # KV slots the routing store covers (0: none, prefix-cache hits are gaps)
    meta: dict[str, Any]
    dp_rank: int | None = None  # set when data_parallel_size > 1: tags every record
    jobs: queue.Queue[Any] = field(default_factory=lambda: queue.Queue(maxsize=64))
    staging: Any = None  # host buffers jobs were staged in: the writer puts each index back on .free
    thread: Any = None
    error: BaseException | None = None
    stopped: bool = False  # logging stopped after an error (policy 'stop')
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "route_records": 0,
            "cached_records": 0,
            "recomputed_tokens_skipped": 0,
            "gaps": 0,
            "gap_positions": 0,
            "steps_dropped": 0,
        }
    )


# ----------------------------------------------------------------------------------------------------
# Assembly: one step's raw capture -> per-request rows in position order, prefix-cache hits read back from
# the KV-slot store. What the log writes and what the engine returns per request both come from here.
# ----------------------------------------------------------------------------------------------------
@dataclass
class CachedRun:
    """Positions of a prefix-cache hit whose KV slots still hold the routing that computed them."""

    request: Request
    positions: np.ndarray
    ids: np.ndarray  # [n, layers, K]
    weights: np.ndarray


@dataclass
class Gap:
    """Positions a request never computed here and whose routing is not known (a gap record)."""

    request: Request
    start: int
    end: int
    reason: str


@dataclass
class StepRoutes:
    prefix: list[CachedRun | Gap]  # per request, positions before this step's computed ones
    requests: list[Request]  # batch order
    tok_req: np.ndarray  # computed token -> index in `requests` (non-decreasing)
    positions: np.ndarray
    ids: np.ndarray  # [n, layers, K] int32, every captured layer
    weights: np.ndarray
    staging_index: int = -1  # already released by the assembler


_GAP_NO_SLOTS = "prefix-cache hit and the KV layout has no per-token full-attention slots to keep routing by"
_GAP_NOT_STORED = "prefix-cache hit whose KV slots hold no routing captured in this process for these tokens"


class RouteAssembler:
    """Owns the KV-slot -> routing store. assemble() must be called once per step, in step order, from one
    thread (the writer's, or the engine's when routing is returned per request)."""

    def __init__(self, st: WriterState) -> None:
        self.st = st
        if st.num_slots:
            k, n_layers = st.top_k, len(st.layers)
            id_dtype = np.int16 if st.num_experts <= np.iinfo(np.int16).max else np.int32
            # np.zeros: the OS maps the pages lazily, on first store
            self.store_ids = np.zeros((st.num_slots, n_layers, k), dtype=id_dtype)
            self.store_w = np.zeros((st.num_slots, n_layers, k), dtype=np.float32)
            self.store_valid = np.zeros(st.num_slots, dtype=bool)

    def assemble(self, job: StepJob) -> StepRoutes:
        st = self.st
        n = len(job.positions)
        if job.event is not None:
            job.event.synchronize()
            ids = job.ids.numpy()[:, st.rows]
            w = job.weights.numpy()[:, st.rows]
        else:
            ids, w = job.ids, job.weights
        unwritten = (ids < 0).any(axis=2)  # [n, L]: a captured layer left this step's rows at -1
        if unwritten.any():
            tok, lay = np.argwhere(unwritten)[0]
            raise MoeRoutesCaptureError(
                f"layer {st.layers[lay]} did not capture routing for {int(unwritten[:, lay].sum())} of {n} "
                f"tokens of a step (first: token {int(job.positions[tok])}); an MoE code path without the "
                "moe_routes hook ran (a moe_routes bug, please report it with the model and engine arguments)"
            )
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
        prefix: list[CachedRun | Gap] = []
        starts = np.concatenate(([0], np.cumsum(job.counts)[:-1]))
        for i, blocks in job.gap_blocks.items():
            first = int(job.positions[starts[i]])
            prefix.extend(self._read_back(job.requests[i], int(job.emit_from[i]), first, blocks))
        # 4. this step's computed positions; positions recomputed after preemption were emitted already
        keep = job.positions >= np.repeat(job.emit_from, job.counts)
        st.stats["recomputed_tokens_skipped"] += int((~keep).sum())
        all_kept = bool(keep.all())
        return StepRoutes(
            prefix,
            job.requests,
            np.repeat(np.arange(len(job.requests)), job.counts)[keep],
            job.positions if all_kept else job.positions[keep],
            ids if all_kept else ids[keep],
            w if all_kept else w[keep],
        )

    def _read_back(self, req: Request, start: int, end: int, blocks: np.ndarray) -> list[CachedRun | Gap]:
        st = self.st
        if not st.num_slots:
            return [Gap(req, start, end, _GAP_NO_SLOTS)]
        pos = np.arange(start, end, dtype=np.int64)
        kbs = st.kernel_block_size
        slots = blocks[pos // kbs].astype(np.int64) * kbs + pos % kbs
        valid = self.store_valid[slots]
        out: list[CachedRun | Gap] = []
        # runs of positions whose slot does / does not hold the token's routing
        edges = np.flatnonzero(np.diff(valid.astype(np.int8))) + 1
        for lo, hi in zip(np.concatenate(([0], edges)), np.concatenate((edges, [len(pos)])), strict=True):
            if valid[lo]:
                sl = slots[lo:hi]
                out.append(CachedRun(req, pos[lo:hi], self.store_ids[sl].astype(np.int32), self.store_w[sl]))
            else:
                out.append(Gap(req, int(pos[lo]), int(pos[hi - 1]) + 1, _GAP_NOT_STORED))
        return out


def id_dtype_for(num_experts: int) -> np.dtype:
    """Smallest unsigned dtype of returned expert ids, as upstream vLLM (0.22+): uint8 holds 256 ids."""
    return np.dtype(np.uint8 if num_experts <= 256 else np.uint16)


def returned_rows(
    routes: StepRoutes, layers: list[int], num_layers: int, id_dtype: np.dtype, with_weights: bool
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per engine request id: this step's rows [n, num_layers, K] for positions >= its return start, in
    position order (prefix-cache rows first), every decoder layer (rows of layers not captured, i.e. dense
    ones, are 0 as in upstream vLLM). A request whose rows would not continue where its last ones ended
    (a gap) gets none from then on, and an error is logged once: the front-end refuses a short array,
    while a wrong one could not be told."""
    cols = np.asarray(layers, dtype=np.int64)

    def widen(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        rows = np.zeros((len(ids), num_layers, ids.shape[2]), dtype=id_dtype)
        rows[:, cols] = ids
        if not with_weights:
            return rows, None
        wrows = np.zeros(rows.shape, dtype=np.float32)
        wrows[:, cols] = weights
        return rows, wrows

    parts: dict[int, list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]] = {}
    index = {id(r): i for i, r in enumerate(routes.requests)}
    for part in routes.prefix:
        i = index.get(id(part.request))
        if i is None:
            continue
        if isinstance(part, Gap):
            parts.setdefault(i, []).append((np.arange(part.start, part.end), None, None))
        else:
            parts.setdefault(i, []).append((part.positions, *widen(part.ids, part.weights)))
    if len(routes.positions):
        all_ids, all_w = widen(routes.ids, routes.weights)  # one conversion for the whole batch
        bounds = np.flatnonzero(np.diff(routes.tok_req)) + 1
        lo = np.concatenate(([0], bounds)).tolist()
        hi = np.concatenate((bounds, [len(routes.tok_req)])).tolist()
        for a, b in zip(lo, hi, strict=True):
            parts.setdefault(int(routes.tok_req[a]), []).append(
                (routes.positions[a:b], all_ids[a:b], None if all_w is None else all_w[a:b])
            )
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    k = routes.ids.shape[2]
    for i, req_parts in parts.items():
        req = routes.requests[i]
        if req.return_broken:
            continue
        got_ids, got_w = [], []
        for positions, ids, weights in req_parts:
            first = int(positions[0])
            if positions[-1] < req.return_from:
                continue
            skip = max(0, req.return_from - first)
            first += skip
            if ids is None or first != req.return_next:
                req.return_broken = True
                logger.error(
                    "moe_routes: request %s: no routing to return for positions %d.. (%s); its routed_experts "
                    "will be None",
                    req.engine_id,
                    first,
                    "prefix-cache hit without stored routing"
                    if ids is None
                    else f"expected position {req.return_next} next",
                )
                break
            got_ids.append(ids[skip:])
            if weights is not None:
                got_w.append(weights[skip:])
            req.return_next = first + len(positions) - skip
        if req.return_broken:
            continue
        if not got_ids:  # every row lies before the start: an empty chunk, so start == P with one token gives [0, L, K]
            got_ids = [np.zeros((0, num_layers, k), dtype=id_dtype)]
            got_w = [np.zeros((0, num_layers, k), dtype=np.float32)]
        ids_out = got_ids[0] if len(got_ids) == 1 else np.concatenate(got_ids)
        w_out = (got_w[0] if len(got_w) == 1 else np.concatenate(got_w)) if with_weights else None
        out[req.engine_id] = (ids_out, w_out)
    return out


# ----------------------------------------------------------------------------------------------------
# Failure policy. 'stop' (default): a server must keep serving when its routing log cannot be written
# (full disk) or a step's capture is incomplete: logging stops, the log gets a final "error" record and
# the engine log a loud error. 'fail' (VLLM_LOG_MOE_ON_ERROR=fail): the next step or flush raises.
# ----------------------------------------------------------------------------------------------------
def fail(st: WriterState, exc: BaseException) -> None:
    if st.error is not None:
        return
    st.error = exc
    if st.settings.on_error == "fail":
        logger.error(
            "moe_routes: the routing log failed (%s: %s); %s=fail stops the engine",
            type(exc).__name__,
            exc,
            ENV_ON_ERROR,
        )
        return
    st.stopped = True
    logger.error(
        "moe_routes: ROUTING LOG STOPPED, %s is incomplete from here on (%s: %s). The engine keeps "
        "serving; set %s=fail to stop it instead.",
        st.settings.path,
        type(exc).__name__,
        exc,
        ENV_ON_ERROR,
    )


class Failure:
    """A failure the engine thread found, handed to the writer so that it is recorded in order."""

    staging_index = -1

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Writer(threading.Thread):
    def __init__(self, st: WriterState, assembles: bool = True) -> None:
        super().__init__(name="moe-routes-writer", daemon=True)
        self.st = st
        # O_RDWR: repairing a partial tail and cutting our own tail on a full disk read the file back.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(st.settings.path, flags, 0o644)
        self.log_cols = st.log_cols
        self.layers = list(st.layers) if st.log_cols is None else [st.layers[c] for c in st.log_cols]
        # Steps arrive raw (StepJob) and are assembled here, or assembled by the engine thread when the
        # engine also returns routing per request (StepRoutes): one owner of the KV-slot store either way.
        self.assembler = RouteAssembler(st) if assembles else None
        self._last_write: tuple[int, int] | None = None  # [start, end) of our latest whole-line write
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            repaired = self._repair_tail()
            if repaired:
                # Never silently: the log says which writer cut how much, and so does the engine log.
                st.meta["repaired_partial_tail_bytes"] = repaired
                logger.warning(
                    "moe_routes: %s ended in a partial line (a writer was killed mid-write); cut its "
                    "last %d bytes back to the last whole line before appending",
                    st.settings.path,
                    repaired,
                )
            self._append(json_line(st.meta))
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        atexit.register(self.close)

    # ---- file ----
    def _repair_tail(self) -> int:
        """Under the lock, before this writer's first line: cut a partial last line back to the last
        newline. Linux stops a write(2) to a regular file between pages once a fatal signal is pending, so
        a writer killed by SIGKILL can leave part of a line at a page boundary. Returns the bytes cut."""
        size = os.fstat(self.fd).st_size
        if size == 0 or os.pread(self.fd, 1, size - 1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:
            begin = max(0, end - (1 << 16))
            cut = os.pread(self.fd, end - begin, begin).rfind(b"\n")
            if cut >= 0:
                keep = begin + cut + 1
                break
            end = begin
        os.ftruncate(self.fd, keep)
        return size - keep

    def _write(self, data: bytes) -> None:
        """Append whole lines under an exclusive lock."""
        if not data:
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            self._append(data)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _append(self, data: bytes) -> None:
        """With the lock held. A failed chunk is cut off again (ftruncate to the chunk's start), so a write
        error never leaves a partial line; only a killed process can (see _repair_tail)."""
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
                # A write that got nothing on disk leaves our previous write at the end of the file: keep it,
                # so that _cut_own_tail can still make room for the error record there.
                if offset > begin:
                    self._last_write = (begin, offset)
                raise
            offset += end - start
            start = end
        self._last_write = (begin, offset)

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
        record.update(
            error=f"{type(exc).__name__}: {exc}",
            policy=st.settings.on_error,
            message="routing log stopped: records after this line are missing, and requests that "
            "were running may lack positions",
            writer_id=st.meta["writer"]["id"],
            time_unix=time.time(),
            records_dropped=0,
        )
        for _ in range(4):
            line = json_line(record)
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
                if isinstance(job, Failure):
                    raise job.exc
                if st.error is None:
                    self._write(self._process(job))
                else:
                    st.stats["steps_dropped"] += 1
            except BaseException as exc:
                failed_before = st.error is not None
                fail(st, exc)
                if not failed_before and st.settings.on_error == "stop":
                    self._write_error_record(exc)
            finally:
                if job.staging_index >= 0:  # exactly once per job, whatever happened
                    st.staging.free.put(job.staging_index)

    def _process(self, job: StepJob | StepRoutes) -> bytes:
        routes = job if isinstance(job, StepRoutes) else self.assembler.assemble(job)
        st, cols = self.st, self.log_cols
        out = []
        for part in routes.prefix:
            if isinstance(part, Gap):
                st.stats["gaps"] += 1
                st.stats["gap_positions"] += part.end - part.start
                out.append(self._gap_record(part))
                continue
            st.stats["cached_records"] += len(part.positions) * len(self.layers)
            out.append(
                format_routes(
                    [part.request.field],
                    np.zeros(len(part.positions), dtype=np.int64),
                    part.positions,
                    self.layers,
                    part.ids if cols is None else part.ids[:, cols],
                    part.weights if cols is None else part.weights[:, cols],
                    cached=True,
                    dp_rank=st.dp_rank,
                )
            )
        if len(routes.positions):
            out.append(
                format_routes(
                    [r.field for r in routes.requests],
                    routes.tok_req,
                    routes.positions,
                    self.layers,
                    routes.ids if cols is None else routes.ids[:, cols],
                    routes.weights if cols is None else routes.weights[:, cols],
                    dp_rank=st.dp_rank,
                )
            )
            st.stats["route_records"] += len(routes.positions) * len(self.layers)
        return b"".join(out)

    def _gap_record(self, gap: Gap) -> bytes:
        record: dict[str, Any] = {"type": "gap"}
        if self.st.dp_rank is not None:
            record["dp_rank"] = self.st.dp_rank
        record["req_id"] = gap.request.req_id
        if gap.request.completion_index is not None:
            record["completion_index"] = gap.request.completion_index
        record.update(token_start=gap.start, token_end=gap.end, reason=gap.reason)
        return json_line(record)

    def close(self) -> None:
        if self.is_alive():
            self.st.jobs.put(None)
            self.join(timeout=60)
        try:
            os.close(self.fd)
        except OSError:
            pass
