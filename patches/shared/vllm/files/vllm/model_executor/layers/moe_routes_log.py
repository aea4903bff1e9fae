# SPDX-License-Identifier: Apache-2.0
"""Engine-independent half of the per-token MoE routing capture (``VLLM_LOG_MOE`` and
``enable_return_routed_experts``), added by the moe-routes patch series. Standard library and numpy only, so
that it is importable and testable without torch or vLLM; ``moe_routes.py`` (the engine glue the upstream hooks
call) feeds it host arrays.

Where each part runs:
  engine (model runner)  RouteAssembler: capture check, KV-slot -> routing store, prefix-cache read-back;
                         step_rows(): one step's rows of every request, in position order, as one bundle that
                         rides on the step's outputs to the front-end.
  front-end              (the process whose OutputProcessor hands completions to the caller)
                         ReturnedRows: the rows a completion returns (CompletionOutput.routed_experts);
                         LogClient: hands the rows the caller received to the writer process.
  writer process         (``python moe_routes_log.py --writer-fd N``, started by the front-end) LogFile and
                         format_routes: whole JSONL lines appended under flock, partial-tail repair, failure
                         policy; formatting runs off the engine's and the front-end's GIL.

The log is written from the rows that reach the front-end, so it holds exactly the positions of what the caller
received: rows of steps the engine ran past a stop string the front-end found, past an abort, or (async
scheduling) past an EOS never get there.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import fcntl
import json
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
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
# SamplingParams.extra_args key under which the OpenAI completions endpoint tags each prompt with the response
# id and choice indexes the caller sees (a ChoiceTag: a client's JSON cannot create one).
REQUEST_TAG = "moe_routes"
# A chunk of whole lines per write(2), under flock: concurrent appenders (a second engine, DP ranks) never
# interleave inside a line. (A SIGKILL can still cut a write(2) at a page boundary: LogFile.repair_tail.)
_WRITE_CHUNK = 1 << 20


class MoeRoutesConfigError(ValueError):
    """A VLLM_LOG_MOE* value or an engine feature that cannot work with the routing capture."""


class MoeRoutesCaptureError(RuntimeError):
    """The capture of a step is incomplete: logging or returning it would be wrong."""


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
# Request ids as the caller sees them (front-end).
# ----------------------------------------------------------------------------------------------------
class ChoiceTag(dict):
    """SamplingParams.extra_args[REQUEST_TAG] set by the OpenAI completions endpoint for one prompt: the response
    id and the choices [first_choice, first_choice + n) it answers, of num_choices in the response. A dict, so that
    it travels as one, but only this class counts: a client's vllm_xargs cannot create one."""


def client_request(external_id: str, tag: Any, child_index: int, n: int) -> tuple[str, int | None]:
    """(req_id, completion_index) the caller sees for one completion: the tagged response id and choice index,
    else the request's own id (RequestOutput.request_id) and, with n > 1, the child's index
    (CompletionOutput.index). completion_index is None when the caller gets a single completion."""
    if isinstance(tag, ChoiceTag):
        req_id, first, num = str(tag["req_id"]), int(tag["first_choice"]), int(tag["num_choices"])
    else:
        req_id, first, num = str(external_id), 0, int(n)
    return (req_id, None) if num <= 1 else (req_id, first + int(child_index))


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
# Dtypes and memory: one owner of what every buffer holds.
# ----------------------------------------------------------------------------------------------------
def id_dtype_for(num_experts: int) -> np.dtype:
    """Smallest unsigned dtype of expert ids, as upstream vLLM (0.22+) returns them: uint8 holds 256 ids, uint16
    65,536; int32 beyond (upstream's out-of-tree case). The KV-slot store and the rows sent to the front-end use
    it too."""
    if num_experts <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if num_experts <= 65536 else np.int32)


def capture_dtype_for(num_experts: int) -> np.dtype:
    """Capture buffers (device, and the pinned staging they are copied into): the smallest dtype that holds every
    id and a value no id takes, left in rows no layer wrote this step (unwritten_id). Up to 255 experts the
    capture is already in the dtype the rows travel in (no conversion on the host)."""
    if num_experts <= 255:
        return np.dtype(np.uint8)
    return np.dtype(np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32)


def unwritten_id(num_experts: int) -> int:
    """What the capture buffers hold where no layer wrote this step: 255 in uint8, else -1."""
    return 255 if capture_dtype_for(num_experts) == np.uint8 else -1


def footprint(
    *,
    captured_layers: int,
    buffer_rows: int,
    top_k: int,
    num_experts: int,
    max_tokens: int,
    num_slots: int,
    weights: bool,
    staging_depth: int,
) -> dict[str, int]:
    """Bytes the capture holds for one engine (the engine's TP rank 0 allocates them):
    device: capture buffers [max_tokens, buffer_rows, top_k] (ids, and weights when the log or the weights return
    needs them); pinned: the host staging they are copied into (CUDA), staging_depth copies; store_per_slot and
    store: the prefix-cache routing store (host, pageable, touched as KV slots fill); rows_per_token: what one
    position costs on the way to the front-end."""
    cap_id = capture_dtype_for(num_experts).itemsize
    w = 4 if weights else 0
    device_row = buffer_rows * top_k * (cap_id + w)
    store_per_slot = captured_layers * top_k * (id_dtype_for(num_experts).itemsize + w) + 1  # + the valid flag
    return {
        "device": max_tokens * device_row,
        "pinned": staging_depth * max_tokens * device_row,
        "store_per_slot": store_per_slot if num_slots else 0,
        "store": num_slots * store_per_slot,
        "rows_per_token": captured_layers * top_k * (id_dtype_for(num_experts).itemsize + w),
    }


# ----------------------------------------------------------------------------------------------------
# Engine side: one step's raw capture -> every request's rows in position order, prefix-cache hits read back
# from the KV-slot store; then one bundle (StepRows) that rides on the step's outputs to the front-end.
# ----------------------------------------------------------------------------------------------------
# Segment kinds: computed this step, read back from the KV-slot store, and the kinds of gap (positions without
# routing: not in the store, no store to keep routing by, a step whose capture was incomplete).
COMPUTED, CACHED, GAP, GAP_NO_STORE, GAP_CAPTURE = 0, 1, 2, 3, 4


@dataclass
class Request:
    """The engine's view of one request's rows."""

    engine_id: str
    ship_from: int = 0  # first position sent to the front-end (0 with the log, else routed_experts_prompt_start)
    next_pos: int = 0  # first position not yet sent (positions recomputed after a preemption lie below it)


@dataclass
class StepJob:
    requests: list[Request]  # batch order
    counts: np.ndarray  # scheduled tokens per request
    positions: np.ndarray  # [n] absolute positions
    slots: np.ndarray  # [n] KV slots (-1: none)
    emit_from: np.ndarray  # per request: first position to send (max of next_pos and ship_from)
    gap_blocks: dict[int, np.ndarray]  # request index -> its block-table row, when positions before its first
    # computed one must be read back
    fresh_blocks: np.ndarray  # KV blocks allocated afresh this step: their slots hold no routing yet
    ids: Any  # [n, layers, K] capture rows (host array, or a staged tensor the glue resolves)
    weights: Any  # same shape, float32, or None when nothing needs weights
    event: Any = None  # CUDA event guarding the async D2H copy
    staging_index: int = -1
    block_copies: np.ndarray | None = None  # [m, 2] (source, destination) blocks copied before the forward


class BlockMirror:
    """Each request's KV block ids of one KV-cache group, kept on the host from the scheduler's outputs (the
    runner's own table may live on the device only): a row per request in one table, so that a step's KV slots
    are one vectorised lookup. Rows and columns grow on demand."""

    def __init__(self, block_size: int, rows: int = 64, cols: int = 64) -> None:
        self.block_size = int(block_size)
        self.table = np.zeros((rows, cols), dtype=np.int64)
        self.length = np.zeros(rows, dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self.free = list(range(rows - 1, -1, -1))

    def _row(self, req_id: str) -> int:
        row = self.row_of.get(req_id)
        if row is None:
            if not self.free:
                old = len(self.table)
                self.table = np.concatenate((self.table, np.zeros_like(self.table)))
                self.length = np.concatenate((self.length, np.zeros_like(self.length)))
                self.free = list(range(2 * old - 1, old - 1, -1))
            row = self.row_of[req_id] = self.free.pop()
            self.length[row] = 0
        return row

    def _put(self, row: int, at: int, blocks: list[int]) -> None:
        end = at + len(blocks)
        if end > self.table.shape[1]:
            cols = max(end, 2 * self.table.shape[1])
            self.table = np.concatenate(
                (self.table, np.zeros((len(self.table), cols - self.table.shape[1]), np.int64)), 1
            )
        self.table[row, at:end] = blocks
        self.length[row] = end

    def set(self, req_id: str, blocks: list[int]) -> None:
        """The request's whole block list (a new or resumed request)."""
        self._put(self._row(req_id), 0, blocks)

    def append(self, req_id: str, blocks: list[int]) -> None:
        row = self._row(req_id)
        self._put(row, int(self.length[row]), blocks)

    def drop(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.free.append(row)

    def rows_of(self, req_ids: list[str]) -> np.ndarray:
        """Each request's row, -1 for one never given blocks."""
        get = self.row_of.get
        return np.fromiter((get(r, -1) for r in req_ids), dtype=np.int64, count=len(req_ids))

    def slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The KV slot of each token (its request's row, its position); -1 where the request has no such block."""
        bs = self.block_size
        block = positions // bs
        ok = (rows >= 0) & (block < self.length[np.maximum(rows, 0)])
        out = np.full(len(positions), -1, dtype=np.int64)
        if ok.all():
            return self.table[rows, block] * bs + positions % bs
        out[ok] = self.table[rows[ok], block[ok]] * bs + positions[ok] % bs
        return out

    def blocks(self, row: int, end: int) -> np.ndarray:
        """The blocks that hold positions 0 .. end - 1 of the request in `row` (as many as it has)."""
        if row < 0:
            return np.zeros(0, dtype=np.int64)
        n = min(int(self.length[row]), -(-int(end) // self.block_size))
        return self.table[row, :n].copy()


@dataclass
class CachedRun:
    """Positions of a prefix-cache hit whose KV slots still hold the routing that computed them."""

    index: int  # request's batch index
    positions: np.ndarray
    ids: np.ndarray  # [n, layers, K]
    weights: np.ndarray | None


@dataclass
class Gap:
    """Positions a request never computed here and whose routing is not known (a gap record)."""

    index: int
    start: int
    end: int
    kind: int  # GAP or GAP_NO_STORE


@dataclass
class StepRoutes:
    prefix: list[CachedRun | Gap]  # per request, positions before this step's computed ones, in batch order
    requests: list[Request]  # batch order
    tok_req: np.ndarray  # computed token -> index in `requests` (non-decreasing)
    positions: np.ndarray
    ids: np.ndarray  # [n, layers, K] in id_dtype_for(num_experts)
    weights: np.ndarray | None
    skipped: np.ndarray | None = None  # per request: positions recomputed after a preemption, not sent again
    same_step_hits: dict[int, int] | None = None  # per request: hit positions whose slots this very step filled


GAP_REASONS = {
    GAP: "prefix-cache hit whose KV slots hold no routing captured in this process for these tokens",
    GAP_NO_STORE: "prefix-cache hit and the KV layout has no per-token full-attention slots to keep routing by",
    GAP_CAPTURE: "the capture of this step was incomplete (a moe_routes bug: the engine log has the error)",
}


class RouteAssembler:
    """Owns the KV-slot -> routing store. assemble() must be called once per step, in step order, from one
    thread. Ids are kept in id_dtype_for(num_experts), weights only when something reads them."""

    def __init__(
        self,
        *,
        layers: list[int],
        top_k: int,
        num_experts: int,
        num_slots: int,
        block_size: int,
        weights: bool,
    ) -> None:
        self.layers = list(layers)
        self.id_dtype = id_dtype_for(num_experts)
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.block_size = block_size
        self.weights = weights
        if num_slots:
            shape = (num_slots, len(self.layers), top_k)
            # np.zeros: the OS maps the pages lazily, on first store
            self.store_ids = np.zeros(shape, dtype=self.id_dtype)
            self.store_w = np.zeros(shape, dtype=np.float32) if weights else None
            self.store_valid = np.zeros(num_slots, dtype=bool)

    def assemble(self, job: StepJob, ids: np.ndarray, w: np.ndarray | None) -> StepRoutes:
        """ids / w: the job's capture rows as host arrays [n, layers, K] (w None when weights are not kept)."""
        n = len(job.positions)
        if self.num_slots and len(job.fresh_blocks):
            # Blocks allocated afresh this step hold an earlier occupant's KV until this step's forward fills
            # them: invalid before anything else, so that a capture error below leaves them invalid too.
            bs = self.block_size
            fresh = (job.fresh_blocks[:, None] * bs + np.arange(bs)).ravel()
            self.store_valid[fresh[fresh < self.num_slots]] = False
        if self.num_slots and job.block_copies is not None and len(job.block_copies):
            # Copy-on-write of a prefix-cache hit that ends inside a block: the engine copies the shared block's
            # KV into a fresh one before the forward, so the copy holds the routing of the hit's positions too.
            self._copy_blocks(job.block_copies)
        # one pass each: the unwritten value (-1, or 255 in uint8) and foreign ids are both out of range
        if n and (int(ids.max()) >= self.num_experts or (ids.dtype.kind == "i" and int(ids.min()) < 0)):
            if self.num_slots:
                self.store_valid[job.slots[job.slots >= 0]] = False  # never answer a hit from a broken step
            raise self._capture_error(job, ids)
        ids = ids.astype(self.id_dtype, copy=False)  # the glue hands over fresh host copies
        if w is not None:
            w = np.asarray(w, dtype=np.float32)
        written = None
        if self.num_slots:
            # this step's computed tokens, remembered by KV slot before any hit is filled: a request can hit
            # blocks another request fills in the same step
            ok = job.slots >= 0
            every = bool(ok.all())
            written = job.slots if every else job.slots[ok]
            self.store_ids[written] = ids if every else ids[ok]
            if self.store_w is not None:
                self.store_w[written] = w if every else w[ok]
            self.store_valid[written] = True
        prefix: list[CachedRun | Gap] = []
        same_step: dict[int, int] = {}
        starts = np.concatenate(([0], np.cumsum(job.counts)[:-1]))
        for i, blocks in job.gap_blocks.items():
            first = int(job.positions[starts[i]])
            parts, hits_now = self._read_back(i, int(job.emit_from[i]), first, blocks, written)
            prefix.extend(parts)
            if hits_now:
                same_step[i] = hits_now
        # positions recomputed after a preemption (below emit_from) were sent already
        keep = job.positions >= np.repeat(job.emit_from, job.counts)
        tok_req = np.repeat(np.arange(len(job.requests)), job.counts)
        skipped = None
        if not keep.all():
            skipped = np.bincount(tok_req[~keep], minlength=len(job.requests))
            tok_req, positions, ids = tok_req[keep], job.positions[keep], ids[keep]
            w = None if w is None else w[keep]
        else:
            positions = job.positions
        return StepRoutes(prefix, job.requests, tok_req, positions, ids, w, skipped, same_step or None)

    def _copy_blocks(self, copies: np.ndarray) -> None:
        bs = self.block_size
        offsets = np.arange(bs)
        src = (copies[:, 0:1] * bs + offsets).ravel()
        dst = (copies[:, 1:2] * bs + offsets).ravel()
        ok = (src < self.num_slots) & (dst < self.num_slots)
        src, dst = src[ok], dst[ok]
        self.store_ids[dst] = self.store_ids[src]
        if self.store_w is not None:
            self.store_w[dst] = self.store_w[src]
        self.store_valid[dst] = self.store_valid[src]

    def _capture_error(self, job: StepJob, ids: np.ndarray) -> MoeRoutesCaptureError:
        n = len(job.positions)
        unwritten = (ids == unwritten_id(self.num_experts)).any(axis=2)  # [n, L]: a layer left its rows as they were
        if unwritten.any():
            tok, lay = np.argwhere(unwritten)[0]
            return MoeRoutesCaptureError(
                f"layer {self.layers[lay]} did not capture routing for {int(unwritten[:, lay].sum())} of {n} "
                f"tokens of a step (first: token {int(job.positions[tok])}); an MoE code path without the "
                "moe_routes hook ran (a moe_routes bug, please report it with the model and engine arguments)"
            )
        tok, lay, _ = np.argwhere((ids >= self.num_experts) | (ids < 0))[0]
        return MoeRoutesCaptureError(
            f"layer {self.layers[lay]} captured expert id {int(ids[tok, lay].max())} for token "
            f"{int(job.positions[tok])}, but the model has {self.num_experts} experts (a moe_routes bug, please "
            "report it with the model and engine arguments)"
        )

    def _read_back(
        self, index: int, start: int, end: int, blocks: np.ndarray, written: np.ndarray | None
    ) -> tuple[list[CachedRun | Gap], int]:
        if end <= start:
            return [], 0
        if not self.num_slots:
            return [Gap(index, start, end, GAP_NO_STORE)], 0
        pos = np.arange(start, end, dtype=np.int64)
        bs = self.block_size
        block = pos // bs
        have = block < len(blocks)
        slots = np.zeros(len(pos), dtype=np.int64)  # a position without a block: never valid
        slots[have] = blocks[block[have]] * bs + pos[have] % bs
        valid = have & self.store_valid[slots]
        hits_now = int(np.isin(slots[valid], written).sum()) if written is not None and len(written) else 0
        out: list[CachedRun | Gap] = []
        # runs of positions whose slot does / does not hold the token's routing
        edges = np.flatnonzero(np.diff(valid.astype(np.int8))) + 1
        for lo, hi in zip(np.concatenate(([0], edges)), np.concatenate((edges, [len(pos)])), strict=True):
            if valid[lo]:
                sl = slots[lo:hi]
                w = None if self.store_w is None else self.store_w[sl]
                out.append(CachedRun(index, pos[lo:hi], self.store_ids[sl], w))
            else:
                out.append(Gap(index, int(pos[lo]), int(pos[hi - 1]) + 1, GAP))
        return out, hits_now


@dataclass
class StepRows:
    """One step's rows for the front-end. Request b (batch index) owns rows [offset[b], offset[b] + count[b]) of
    ids / weights, which cover its positions in the order of its segments: (kind, first position, positions)
    triples, kind COMPUTED, CACHED or GAP (a gap has no rows). A request whose only segment is computed has no
    entry in `segments`: (COMPUTED, first[b], count[b])."""

    ids: np.ndarray  # [rows, layers, K], id_dtype_for(num_experts)
    weights: np.ndarray | None  # float32, same shape
    offset: np.ndarray  # int64 [B]
    count: np.ndarray  # int64 [B]
    first: np.ndarray  # int64 [B]
    segments: dict[int, list[int]]
    skipped: np.ndarray | None  # int64 [B] or None
    same_step_hits: dict[int, int] | None = None
    req_ids: list[str] = field(default_factory=list)  # engine request ids, batch order
    meta: dict[str, Any] | None = None  # the engine's meta record, on its first step's rows only
    dp_rank: int | None = None

    def segments_of(self, b: int) -> list[int] | None:
        """Request b's segments, flat (kind, first, count, ...); None when it has no rows this step."""
        seg = self.segments.get(b) if self.segments else None
        if seg is not None:
            return seg
        if self.count[b] == 0:
            return None
        return [COMPUTED, int(self.first[b]), int(self.count[b])]


def step_rows(routes: StepRoutes) -> StepRows:
    """Lay one step's rows out per request: its cached runs and gaps first, then its computed run."""
    nreq = len(routes.requests)
    count = np.bincount(routes.tok_req, minlength=nreq).astype(np.int64)
    first = np.full(nreq, -1, dtype=np.int64)
    offset = np.zeros(nreq, dtype=np.int64)
    if nreq:
        offset[1:] = np.cumsum(count)[:-1]
        has = count > 0
        first[has] = routes.positions[offset[has]]
    req_ids = [r.engine_id for r in routes.requests]
    if not routes.prefix:
        return StepRows(
            routes.ids, routes.weights, offset, count, first, {}, routes.skipped, routes.same_step_hits, req_ids
        )
    by_req: dict[int, list[CachedRun | Gap]] = {}
    for part in routes.prefix:
        by_req.setdefault(part.index, []).append(part)
    ids_parts, w_parts, segments = [], [], {}
    new_offset, new_count = np.zeros(nreq, dtype=np.int64), np.zeros(nreq, dtype=np.int64)
    row = 0
    # requests without a prefix keep their computed run as one slice, between those that have one
    for b in range(nreq):
        parts = by_req.get(b)
        lo, n = int(offset[b]), int(count[b])
        new_offset[b] = row
        if parts is None:
            if n:
                ids_parts.append(routes.ids[lo : lo + n])
                if routes.weights is not None:
                    w_parts.append(routes.weights[lo : lo + n])
            new_count[b] = n
            row += n
            continue
        seg: list[int] = []
        for part in parts:
            if isinstance(part, Gap):
                seg += [part.kind, part.start, part.end - part.start]
                continue
            seg += [CACHED, int(part.positions[0]), len(part.positions)]
            ids_parts.append(part.ids)
            if routes.weights is not None:
                w_parts.append(part.weights)
            row += len(part.positions)
        if n:
            seg += [COMPUTED, int(first[b]), n]
            ids_parts.append(routes.ids[lo : lo + n])
            if routes.weights is not None:
                w_parts.append(routes.weights[lo : lo + n])
            row += n
        new_count[b] = row - new_offset[b]
        segments[b] = seg
    k_shape = routes.ids.shape[1:]
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0, *k_shape), dtype=routes.ids.dtype)
    weights = None
    if routes.weights is not None:
        weights = np.concatenate(w_parts) if w_parts else np.zeros((0, *k_shape), dtype=np.float32)
    return StepRows(
        ids, weights, new_offset, new_count, first, segments, routes.skipped, routes.same_step_hits, req_ids
    )


# ----------------------------------------------------------------------------------------------------
# Front-end: the rows a completion returns, and the decoder-layer layout they are returned in.
# ----------------------------------------------------------------------------------------------------
class Layout:
    """Captured MoE layers -> every decoder layer, as upstream vLLM returns routed_experts (rows of dense layers
    are 0). Copies contiguous runs of layers with slices, never a fancy-index assignment."""

    def __init__(self, captured: list[int], num_hidden_layers: int) -> None:
        self.captured = list(captured)
        self.num_hidden_layers = int(num_hidden_layers)
        self.identity = self.captured == list(range(self.num_hidden_layers))
        self.runs: list[tuple[int, int, int]] = []  # (first decoder layer, end, first captured column)
        for col, layer in enumerate(self.captured):
            if self.runs and self.runs[-1][1] == layer:
                lo, _, src = self.runs[-1]
                self.runs[-1] = (lo, layer + 1, src)
            else:
                self.runs.append((layer, layer + 1, col))

    def widen(self, rows: np.ndarray) -> np.ndarray:
        if self.identity:
            return rows
        out = np.zeros((rows.shape[0], self.num_hidden_layers, *rows.shape[2:]), dtype=rows.dtype)
        for lo, hi, src in self.runs:
            out[:, lo:hi] = rows[:, src : src + hi - lo]
        return out


class ReturnedRows:
    """The rows one completion returns: positions start.. in order, gathered from the chunks that reach the
    front-end. A gap, or a position that does not continue where the last rows ended, makes the completion's
    routed_experts None (with one error line), never a wrong array."""

    __slots__ = ("start", "next", "ids", "weights", "broken", "received")

    def __init__(self, start: int) -> None:
        self.start = start
        self.next = start
        self.ids: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.broken: str | None = None
        self.received = False  # any chunk arrived (a completion aborted before its first forward has none)

    def add(self, segments: list[int], ids: np.ndarray, weights: np.ndarray | None) -> None:
        self.received = True
        if self.broken is not None:
            return
        row = 0
        for j in range(0, len(segments), 3):
            kind, pos, cnt = segments[j], segments[j + 1], segments[j + 2]
            end = pos + cnt
            if kind >= GAP:
                if end > self.start:
                    self.broken = f"positions {max(pos, self.start)}..{end - 1} have no routing ({GAP_REASONS[kind]})"
                    return
                continue
            lo, row = row, row + cnt
            if end <= self.start:
                continue
            skip = max(0, self.start - pos)
            if pos + skip != self.next:
                self.broken = f"rows for position {pos + skip} arrived where position {self.next} was expected"
                return
            self.ids.append(ids[lo + skip : lo + cnt])
            if weights is not None:
                self.weights.append(weights[lo + skip : lo + cnt])
            self.next = end

    @property
    def rows(self) -> int:
        return self.next - self.start

    def take(
        self, layout: Layout, id_dtype: np.dtype, k: int, weights: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Every row so far, widened to every decoder layer: fresh arrays (a chunk may be a read-only view into a
        received message frame). Weights (float32) when they are returned, also when there is no row."""

        def cat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
            if not parts:
                return np.zeros((0, len(layout.captured), k), dtype=dtype)
            return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

        ids = layout.widen(cat(self.ids, id_dtype))
        return ids, layout.widen(cat(self.weights, np.dtype(np.float32))) if weights else None


# ----------------------------------------------------------------------------------------------------
# The log file: whole lines, appended under flock by any number of writers (a writer per front-end process).
# Failure policy. 'stop' (default): a server must keep serving when its routing log cannot be written (full
# disk): logging stops, the log gets a final "error" record and the front-end log a loud error. 'fail'
# (VLLM_LOG_MOE_ON_ERROR=fail): the next output the front-end processes, or the flush, raises.
# ----------------------------------------------------------------------------------------------------
class LogFile:
    def __init__(self, path: str) -> None:
        self.path = path
        # O_RDWR: repairing a partial tail and cutting our own tail on a full disk read the file back.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(path, flags, 0o644)
        self._last_write: tuple[int, int] | None = None  # [start, end) of our latest whole-line write

    def open_lines(self) -> int:
        """Under the lock, before this writer's first line: cut a partial last line back to the last newline.
        Linux stops a write(2) to a regular file between pages once a fatal signal is pending, so a writer
        killed by SIGKILL can leave part of a line at a page boundary. Returns the bytes cut."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
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
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def write(self, data: bytes) -> None:
        """Append whole lines under an exclusive lock."""
        if not data:
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            self._append(data)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _append(self, data: bytes) -> None:
        """With the lock held. A failed chunk is cut off again (ftruncate to the chunk's start), so a write error
        never leaves a partial line; only a killed process can (see open_lines)."""
        begin = os.fstat(self.fd).st_size
        offset = begin
        start = 0
        while start < len(data):
            end = len(data) if len(data) - start <= _WRITE_CHUNK else data.rfind(b"\n", start, start + _WRITE_CHUNK) + 1
            if end <= start:
                end = data.index(b"\n", start) + 1
            try:
                view = memoryview(data)[start:end]
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError:
                os.ftruncate(self.fd, offset)
                # A write that got nothing on disk leaves our previous write at the end of the file: keep it,
                # so that cut_own_tail can still make room for the error record there.
                if offset > begin:
                    self._last_write = (begin, offset)
                raise
            offset += end - start
            start = end
        self._last_write = (begin, offset)

    def write_error_record(self, record: dict[str, Any]) -> bool:
        """Best effort: the final line says the log stopped. On a full disk, room is made by cutting whole lines off
        the end of this writer's own latest write (counted in the record's records_dropped)."""
        record = dict(record, records_dropped=0)
        for _ in range(4):
            line = json_line(record)
            try:
                self.write(line)
                return True
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    break
                dropped = self._cut_own_tail(len(line) * 2)
                if not dropped:
                    break
                record["records_dropped"] += dropped
        return False

    def _cut_own_tail(self, need: int) -> int:
        """Remove whole lines (at least `need` bytes) from the end of our latest write, if it is still the end of
        the file. Returns the number of lines removed."""
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

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def new_stats() -> dict[str, int]:
    return {
        "route_records": 0,
        "cached_records": 0,
        "gaps": 0,
        "gap_positions": 0,
        "steps_dropped": 0,
        "recomputed_tokens_skipped": 0,
        "same_step_hits": 0,
    }


@dataclass
class Chunk:
    """One completion's rows that reached the front-end with one output, as the writer formats them."""

    field: bytes  # request_field(req_id, completion_index)
    dp_rank: int | None
    segments: list[int]
    ids: np.ndarray  # [rows, captured layers, K]
    weights: np.ndarray  # float32


def format_chunks(chunks: list[Chunk], layers: list[int], cols: list[int] | None, stats: dict[str, int]) -> bytes:
    """The records of one batch of chunks: gap records, then every cached-run record, then every computed one
    (a prefix-cache hit on blocks another request computed in the same step is written before that request's
    records), grouped per data-parallel rank. `cols`: which captured layers the log writes (None: all)."""
    gaps: list[bytes] = []
    groups: dict[tuple[bool, int | None], tuple[list[bytes], list[int], list[np.ndarray], list[tuple]]] = {}
    for ch in chunks:
        row = 0
        for j in range(0, len(ch.segments), 3):
            kind, pos, cnt = ch.segments[j], ch.segments[j + 1], ch.segments[j + 2]
            if kind >= GAP:
                dp = f'"dp_rank":{ch.dp_rank},' if ch.dp_rank is not None else ""
                gaps.append(
                    f'{{"type":"gap",{dp}"req_id":{ch.field.decode()},"token_start":{pos},"token_end":{pos + cnt},'
                    f'"reason":{json.dumps(GAP_REASONS[kind])}}}\n'.encode()
                )
                stats["gaps"] += 1
                stats["gap_positions"] += cnt
                continue
            fields, req_index, positions, rows = groups.setdefault((kind == CACHED, ch.dp_rank), ([], [], [], []))
            if not fields or fields[-1] is not ch.field:
                fields.append(ch.field)
            req_index.append(np.full(cnt, len(fields) - 1, dtype=np.int64))
            positions.append(np.arange(pos, pos + cnt, dtype=np.int64))
            rows.append((ch, row, row + cnt))
            row += cnt
    out = list(gaps)
    n_layers = len(layers) if cols is None else len(cols)
    for cached in (True, False):
        for (is_cached, dp), (fields, req_index, positions, rows) in groups.items():
            if is_cached != cached:
                continue
            ids = np.concatenate([ch.ids[a:b] for ch, a, b in rows])
            w = np.concatenate([ch.weights[a:b] for ch, a, b in rows])
            if cols is not None:
                ids, w = ids[:, cols], w[:, cols]
            logged = layers if cols is None else [layers[c] for c in cols]
            out.append(
                format_routes(fields, np.concatenate(req_index), np.concatenate(positions), logged, ids, w, cached, dp)
            )
            stats["cached_records" if cached else "route_records"] += len(ids) * n_layers
    return b"".join(out)


# ----------------------------------------------------------------------------------------------------
# The writer process and its front-end client. Messages on one socketpair: a pickled header, then the raw bytes of
# each array it lists (sent as they lie in memory: no pickling of array data).
# ----------------------------------------------------------------------------------------------------
_QUEUE_JOBS = 256  # jobs the front-end may queue before submit() waits for the writer (back-pressure, no drops)


def _send_job(conn: Connection, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
    header["arrays"] = [(a.dtype.str, a.shape) for a in arrays]
    conn.send_bytes(pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL))
    for a in arrays:
        conn.send_bytes(memoryview(np.ascontiguousarray(a)).cast("B"))


def _recv_job(conn: Connection) -> tuple[dict[str, Any], list[np.ndarray]]:
    header = pickle.loads(conn.recv_bytes())
    arrays = [np.frombuffer(conn.recv_bytes(), dtype=np.dtype(d)).reshape(s) for d, s in header["arrays"]]
    return header, arrays


class LogClient:
    """The front-end's side of the routing log: a writer process (this file run as a script) fed over a
    socketpair by a sender thread, so that neither formatting nor the file costs the front-end's GIL. Jobs are
    never dropped while logging runs: past _QUEUE_JOBS queued jobs, submit() waits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = new_stats()  # the writer's counts as of the last flush, plus the front-end's own
        self.front = {"recomputed_tokens_skipped": 0, "same_step_hits": 0, "steps_dropped": 0}
        self.error: str | None = None  # first failure (the writer's, or the process's death)
        self.closed = False
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_JOBS)
        self._replies: dict[int, threading.Event] = {}
        self._results: dict[int, Any] = {}
        self._token = 0
        self._lock = threading.Lock()
        parent, child = socket.socketpair()
        cmd = [sys.executable, os.path.abspath(__file__), "--writer-fd", str(child.fileno()), "--path", settings.path]
        try:
            # Its own session: a Ctrl-C or a signal to the server's process group does not cut it short; it ends
            # when the front-end closes it or is gone, after writing everything it was sent.
            self.proc = subprocess.Popen(
                [*cmd, "--on-error", settings.on_error],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self._sender = threading.Thread(target=self._send_loop, name="moe-routes-log-sender", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="moe-routes-log-replies", daemon=True)
        self._sender.start()
        self._receiver.start()
        _LIVE_CLIENTS.add(self)

    # ---- front-end threads ----
    def submit(self, header: dict[str, Any], arrays: list[np.ndarray] | None = None) -> None:
        self.check()
        if self.error is not None or self.closed:  # policy 'stop': logging stopped, the engine keeps serving
            self.front["steps_dropped"] += 1
            return
        self._jobs.put((header, arrays or []))

    def meta(self, meta: dict[str, Any]) -> None:
        self.submit({"op": "meta", "meta": meta})

    def routes(
        self,
        ids: np.ndarray,
        weights: np.ndarray,
        entries: list[tuple[bytes, int | None, list[int], int, int]],
        layers: list[int],
        cols: list[int] | None,
    ) -> None:
        """One step's rows (every captured layer, as they arrived) and the completions to log from them:
        (request_field, dp_rank, segments, first row, rows) each."""
        if entries:
            self.submit({"op": "routes", "entries": entries, "layers": layers, "cols": cols}, [ids, weights])

    def check(self) -> None:
        """Raise the writer's failure under VLLM_LOG_MOE_ON_ERROR=fail."""
        if self.error is not None and self.settings.on_error == "fail":
            raise RuntimeError(
                f"moe_routes: the routing log {self.settings.path} failed ({ENV_ON_ERROR}=fail): {self.error}"
            )

    def flush(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until every job submitted before is on disk. Returns the writer's statistics."""
        if self.error is None and not self.closed:
            with self._lock:
                self._token += 1
                token, done = self._token, threading.Event()
                self._replies[token] = done
            self._jobs.put(({"op": "flush", "token": token}, []))
            if not done.wait(timeout):
                raise TimeoutError(f"moe_routes: the routing log writer did not drain {self.settings.path} in time")
            self.stats.update(self._results.pop(token, {}))
        self.check()
        stats: dict[str, Any] = dict(self.stats)
        for key, value in self.front.items():
            stats[key] = stats.get(key, 0) + value
        if self.error is not None:
            stats["stopped"] = self.error
        return stats

    def close(self, timeout: float = 120) -> None:
        if self.closed:
            return
        self.closed = True
        self._jobs.put(None)
        self._sender.join(timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("moe_routes: the routing log writer did not finish in %s s; killing it", timeout)
            self.proc.kill()
        self._receiver.join(5)
        self.conn.close()

    # ---- sender / receiver threads ----
    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                try:
                    _send_job(self.conn, {"op": "close"}, [])
                except OSError:
                    pass
                return
            header, arrays = job
            try:
                _send_job(self.conn, header, arrays)
            except OSError as exc:
                self._failed(f"the writer process is gone ({type(exc).__name__}: {exc})")
            except BaseException as exc:  # never leave the queue undrained: submit() and close() wait on it
                self._failed(f"{type(exc).__name__}: {exc}")

    def _recv_loop(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                if not self.closed:
                    rc = self.proc.poll()
                    self._failed(f"the writer process exited unexpectedly (exit status {rc})")
                for done in list(self._replies.values()):
                    done.set()
                return
            kind = msg[0]
            if kind == "flushed":
                _, token, stats = msg
                self._results[token] = stats
                self._replies.pop(token).set()
            elif kind == "repaired":
                logger.warning(
                    "moe_routes: %s ended in a partial line (a writer was killed mid-write); cut its last %d bytes "
                    "back to the last whole line before appending",
                    self.settings.path,
                    msg[1],
                )
            elif kind == "error":
                self._failed(msg[1], recorded=msg[2])
            elif kind == "closed":
                self.stats.update(msg[1])

    def _failed(self, error: str, recorded: bool = False) -> None:
        if self.error is not None:
            return
        self.error = error
        if self.settings.on_error == "fail":
            logger.error("moe_routes: the routing log failed (%s); %s=fail stops the engine", error, ENV_ON_ERROR)
            return
        logger.error(
            "moe_routes: ROUTING LOG STOPPED, %s is incomplete from here on (%s). The engine keeps serving; set "
            "%s=fail to stop it instead.%s",
            self.settings.path,
            error,
            ENV_ON_ERROR,
            "" if recorded else " (no error record could be written to the log)",
        )


_LIVE_CLIENTS: weakref.WeakSet[LogClient] = weakref.WeakSet()


@atexit.register
def _close_live_clients() -> None:
    for client in list(_LIVE_CLIENTS):
        client.close()


def _writer_process(fd: int, path: str, policy: str) -> int:
    """Body of the writer process: jobs in, whole lines out, until the front-end closes (or is gone: what it sent
    before is written)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    log = LogFile(path)
    writer_id = uuid.uuid4().hex[:12]
    repaired = log.open_lines()
    if repaired:
        conn.send(("repaired", repaired))
    stats = {k: 0 for k in ("route_records", "cached_records", "gaps", "gap_positions", "steps_dropped")}
    error: BaseException | None = None
    while True:
        try:
            header, arrays = _recv_job(conn)
        except (EOFError, OSError):
            break
        op = header["op"]
        if op == "flush":
            conn.send(("flushed", header["token"], dict(stats)))
            continue
        if op == "close":
            break
        if error is not None:
            stats["steps_dropped"] += 1
            continue
        try:
            if op == "meta":
                meta = dict(header["meta"])
                meta["writer"] = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "id": writer_id,
                    "data_parallel_rank": meta.pop("writer_data_parallel_rank", None),
                }
                meta["created_unix"] = time.time()
                if repaired:
                    # Never silently: the log says which writer cut how much, and so does the front-end's log.
                    meta["repaired_partial_tail_bytes"], repaired = repaired, 0
                log.write(json_line(meta))
            else:
                ids, weights = arrays
                chunks = [
                    Chunk(field_, dp, segs, ids[r0 : r0 + n], weights[r0 : r0 + n])
                    for field_, dp, segs, r0, n in header["entries"]
                ]
                log.write(format_chunks(chunks, header["layers"], header["cols"], stats))
        except BaseException as exc:  # the file failed, or a record could not be formatted
            error = exc
            recorded = False
            if policy == "stop":
                recorded = log.write_error_record(
                    {
                        "type": "error",
                        "error": f"{type(exc).__name__}: {exc}",
                        "policy": policy,
                        "message": "routing log stopped: records after this line are missing, and requests that "
                        "were running may lack positions",
                        "writer_id": writer_id,
                        "time_unix": time.time(),
                    }
                )
            try:
                conn.send(("error", f"{type(exc).__name__}: {exc}", recorded))
            except OSError:
                pass
    try:
        conn.send(("closed", dict(stats)))
    except OSError:
        pass
    log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="moe-routes routing-log writer process (started by the front-end)")
    ap.add_argument("--writer-fd", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--on-error", choices=ON_ERROR_POLICIES, default="stop")
    a = ap.parse_args(argv)
    return _writer_process(a.writer_fd, a.path, a.on_error)


if __name__ == "__main__":
    sys.exit(main())
