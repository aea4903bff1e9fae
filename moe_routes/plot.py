"""Expert-usage histograms and statistics from a moe_routes.jsonl log.

The log format is described by schemas/moe_routes.schema.json: one JSON object
per line; the first non-empty line is a ``meta`` record, every further writer
appending to the same file starts with its own ``meta`` record, then ``route``
records (one per request, token position and logged MoE layer) and ``gap``
records (positions whose routing could not be captured); an ``error`` record says the writer stopped
(the log is incomplete from there on).

Importable core::

    counts = load_routes("moe_routes.jsonl", layers=[0, 3], requests=["7"])
    summary = summarize(counts)
    plot(counts, summary, "out/")

The reader streams the file in chunks of whole lines and takes, per chunk, the first of three paths that
can vouch for it (``reader="auto"``):

1. ``arrow``: ``pyarrow.json`` parses the chunk against the route-record schema (strict JSON, no unknown
   keys, no type coercion, multi-threaded) and numpy checks the values; gap records in it get the
   per-line checks. A chunk holding anything else (a meta or error record, a ``null``, a blank line,
   non-UTF-8 bytes) or any invalid value is not counted here: it goes to path 2, which names the line.
2. ``regex``: lines in the fast writer's compact form are parsed for the whole chunk with one regular
   expression and numpy; other lines (meta, gap, error, other key orders, whitespace, escapes) go
   through ``json.loads`` and the same validation.
3. per line: ``json.loads`` for every line of a chunk path 2 could not vouch for; it finds the first
   error in line order.

All paths apply the same rules; an error is always ``path:lineno: message``. Without pyarrow
(``reader="regex"``) paths 2 and 3 alone give the same results with about 1.3x the CPU time and 2x the
wall time on 2 cores (10 M-line log, APPENDIX section 8).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "READERS",
    "RouteCounts",
    "RouteLogError",
    "SelectionError",
    "load_routes",
    "summarize",
    "format_summary",
    "plot",
    "main",
]

CHUNK_BYTES = 8 << 20  # bytes read per chunk (whole lines are processed)
MAX_TOKEN_IDX = (1 << 32) - 1  # token positions beyond this are rejected
DEFAULT_MAX_LAYERS = 1 << 16  # layer cap when no meta record gives num_hidden_layers
STATS_NAME = "expert_stats.json"
HIST_NAME = "expert_hist.png"
HEATMAP_NAME = "expert_heatmap.png"
READERS = ("auto", "arrow", "regex")  # load_routes(reader=...): auto = arrow when pyarrow imports
PYARROW_HINT = (
    "pyarrow is not installed: pip install pyarrow (pinned in every lock file under locks/, e.g. "
    "locks/vllm-<pin>-cpu.txt), or use reader 'regex' (same results, slower)"
)


class RouteLogError(Exception):
    """Invalid log content; ``str()`` is ``path:lineno: message``."""

    def __init__(self, path: str, lineno: int | None, message: str):
        self.path, self.lineno, self.message = path, lineno, message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.lineno is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.lineno}: {self.message}"


class SelectionError(Exception):
    """--layers / --requests selected no route record."""


class _LineError(Exception):
    """Validation failure of one record (line number attached by the caller)."""


@dataclass
class RouteCounts:
    """Expert usage counted from one log (after layer/request selection)."""

    path: str
    num_experts: int
    top_k: int
    weighted: bool
    layers: list  # logged layers that have selected records, ascending
    counts: np.ndarray  # (len(layers), num_experts): assignments, or summed weights
    layer_records: np.ndarray  # (len(layers),) route records per layer
    records: int  # selected route records
    requests: int  # distinct completions ((dp_rank, req_id, completion_index)) among selected records
    tokens: int  # distinct (completion, token_idx) among selected route records
    cached_records: int  # selected route records with "cached": true
    gap_records: int  # gap records of the selected requests
    gap_positions: int  # sum of token_end - token_start over those gap records
    error_records: list  # "error" records: the writer stopped, the log is incomplete
    meta_records: int
    lines: int  # lines read (including a dropped truncated last line)
    meta: dict  # the first meta record
    model_ids: list
    random_weights: bool
    layers_logged: list  # union of meta "layers_logged"
    selected_layers: list | None = None
    selected_requests: list | None = None
    truncated_line: int | None = None
    warnings: list = field(default_factory=list)
    reader: str = "regex"  # the reader that ran: "arrow" or "regex"
    chunks: dict = field(default_factory=dict)  # chunks counted per path: {"arrow", "regex", "per_line"}

    @property
    def model_id(self) -> str:
        return ", ".join(self.model_ids) if self.model_ids else "?"


# --------------------------------------------------------------------------- parsing


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _json_loads(raw):
    return json.loads(raw, parse_constant=_reject_constant)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_ROUTE_KEYS = {"type", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"}
_GAP_KEYS = {"type", "req_id", "token_start", "token_end", "reason"}


def _request_key(req: bytes, dp_rank: bytes, completion: bytes = b"") -> bytes:
    """The unit counted per request is a completion: data-parallel logs tag records with dp_rank because
    every rank's caller numbers its own requests, and a request with n > 1 has one completion_index per
    completion: (dp_rank, req_id, completion_index). NUL cannot occur in a logged req_id."""
    if not dp_rank and not completion:
        return req
    return req + b"\x00" + dp_rank + b"\x00" + completion


def _req_id_of(key: bytes) -> bytes:
    return key.split(b"\x00", 1)[0]


def _optional_index(obj: dict, key: str) -> bytes:
    """dp_rank / completion_index: absent (b"") or an integer >= 0 (its decimal text)."""
    if key not in obj:
        return b""
    v = obj[key]
    if not _is_int(v) or v < 0:
        raise _LineError(f"{key} must be an integer >= 0, got {v!r}")
    return str(v).encode()


def _check_keys(obj: dict, required: set, optional: set, kind: str):
    missing = required - obj.keys()
    if missing:
        raise _LineError(f"{kind} record lacks key(s) {', '.join(sorted(missing))}")
    extra = obj.keys() - required - optional
    if extra:
        raise _LineError(f"{kind} record has unexpected key(s) {', '.join(sorted(extra))}")


def _check_meta(obj: dict) -> tuple:
    for key in ("num_experts", "top_k"):
        if key not in obj:
            raise _LineError(f"meta record lacks {key!r}")
        if not _is_int(obj[key]) or obj[key] < 1:
            raise _LineError(f"meta {key} must be an integer >= 1, got {obj[key]!r}")
    if obj["top_k"] > obj["num_experts"]:
        raise _LineError(f"meta top_k={obj['top_k']} exceeds num_experts={obj['num_experts']}")
    for key in ("layers_logged", "moe_layers"):
        if key in obj and not (isinstance(obj[key], list) and all(_is_int(v) and v >= 0 for v in obj[key])):
            raise _LineError(f"meta {key} must be a list of integers >= 0")
    if "num_hidden_layers" in obj and not (_is_int(obj["num_hidden_layers"]) and obj["num_hidden_layers"] >= 1):
        raise _LineError("meta num_hidden_layers must be an integer >= 1")
    if "model_id" in obj and not isinstance(obj["model_id"], str):
        raise _LineError("meta model_id must be a string")
    return obj["num_experts"], obj["top_k"]


def _check_route(obj: dict, num_experts: int, top_k: int, max_layers: int) -> tuple:
    _check_keys(obj, _ROUTE_KEYS, {"cached", "dp_rank", "completion_index"}, "route")
    req = obj["req_id"]
    if not isinstance(req, str):
        raise _LineError(f"req_id must be a string, got {type(req).__name__}")
    tok = obj["token_idx"]
    if not _is_int(tok) or not 0 <= tok <= MAX_TOKEN_IDX:
        raise _LineError(f"token_idx must be an integer in [0, {MAX_TOKEN_IDX}], got {tok!r}")
    layer = obj["layer"]
    if not _is_int(layer) or layer < 0:
        raise _LineError(f"layer must be an integer >= 0, got {layer!r}")
    if layer >= max_layers:
        raise _LineError(f"layer {layer} >= number of decoder layers {max_layers}")
    ids, ws = obj["topk_ids"], obj["topk_weights"]
    if not isinstance(ids, list):
        raise _LineError(f"topk_ids must be a list, got {type(ids).__name__}")
    if not isinstance(ws, list):
        raise _LineError(f"topk_weights must be a list, got {type(ws).__name__}")
    if len(ids) != top_k:
        raise _LineError(f"topk_ids has {len(ids)} entries, top_k is {top_k}")
    if len(ws) != top_k:
        raise _LineError(f"topk_weights has {len(ws)} entries, top_k is {top_k}")
    for i, e in enumerate(ids):
        if not _is_int(e):
            raise _LineError(f"topk_ids[{i}] must be an integer, got {e!r}")
        if not 0 <= e < num_experts:
            raise _LineError(f"topk_ids[{i}]={e} outside [0, {num_experts})")
    for i, w in enumerate(ws):
        if not _is_num(w):
            raise _LineError(f"topk_weights[{i}] must be a finite number, got {w!r}")
    cached = obj.get("cached", False)
    if "cached" in obj and cached is not True:
        raise _LineError(f"cached must be true when present, got {cached!r}")
    key = _request_key(
        req.encode("utf-8", "surrogatepass"), _optional_index(obj, "dp_rank"), _optional_index(obj, "completion_index")
    )
    return key, tok, layer, ids, ws, cached


def _check_gap(obj: dict) -> tuple:
    _check_keys(obj, _GAP_KEYS, {"dp_rank", "completion_index"}, "gap")
    _optional_index(obj, "dp_rank")
    _optional_index(obj, "completion_index")
    if not isinstance(obj["req_id"], str):
        raise _LineError("gap req_id must be a string")
    s, e = obj["token_start"], obj["token_end"]
    if not (_is_int(s) and s >= 0 and _is_int(e) and e >= 0):
        raise _LineError("gap token_start/token_end must be integers >= 0")
    if e < s:
        raise _LineError(f"gap token_end {e} < token_start {s}")
    if not isinstance(obj["reason"], str):
        raise _LineError("gap reason must be a string")
    return obj["req_id"], e - s


def _fast_pattern(top_k: int) -> re.Pattern:
    """One alternation per line.

    Groups: 1 dp_rank or empty, 2 req_id, 3 completion_index or empty, 4 the integers
    ``T,"layer":L,"topk_ids":[i1,...,iK``, 5 the weights, 6 ``,"cached":true`` or empty, 7 the text of
    any other line.
    findall() on a buffer of complete lines yields exactly one tuple per line, in
    order; a line that is not a fast route line has an empty group 3.
    Numbers are matched loosely here and validated strictly afterwards.
    """
    ints = rb"[0-9]+(?:,[0-9]+){%d}" % (top_k - 1)
    num = rb"[-+.eE0-9]+"
    nums = num + rb"(?:," + num + rb"){%d}" % (top_k - 1)
    route = (
        rb'\{"type":"route",(?:"dp_rank":([0-9]+),)?"req_id":"([^"\\\x00-\x1f]*)"'
        rb'(?:,"completion_index":([0-9]+))?,"token_idx":([0-9]+,'
        rb'"layer":[0-9]+,"topk_ids":\[' + ints + rb')\],"topk_weights":\['
        rb"(" + nums + rb')\](,"cached":true)?\}'
    )
    return re.compile(rb"(?:" + route + rb"|([^\n]*))\n")


_NUM_KEYS = b'"layertopk_ids:['  # bytes deleted from group 2 to leave "T,L,i1,...,iK"


def _leading_zero(joined: bytes) -> bool:
    """True if any comma-separated integer in ``joined`` has a leading zero."""
    a = np.frombuffer(b"," + joined + b",", dtype=np.uint8)
    return bool(((a[:-2] == 44) & (a[1:-1] == 48) & (a[2:] != 44)).any())


# Strict JSON-number check for a comma-joined list of tokens that the fast regex
# matched loosely as [-+.eE0-9]+ : bytes are mapped to classes with bytes.translate,
# adjacent class pairs are checked with one table, leading zeros and repeated '.'/'e'
# are found with a few more vectorised tests.  Equivalent to fullmatching every token
# with -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? .
_PAD, _SEP, _D, _Z, _DOT, _EXP, _PLUS, _MINUS = range(8)
_cls = bytearray(256)
_cls[ord(",")] = _SEP
for _ch in b"123456789":
    _cls[_ch] = _D
_cls[ord("0")], _cls[ord(".")], _cls[ord("e")], _cls[ord("E")] = _Z, _DOT, _EXP, _EXP
_cls[ord("+")], _cls[ord("-")] = _PLUS, _MINUS
_CLS = bytes(_cls)


def _pair_ok(x: int, y: int) -> bool:
    if y == _MINUS:
        return x in (_SEP, _EXP)
    if y == _PLUS:
        return x == _EXP
    if y in (_DOT, _EXP):
        return x in (_D, _Z)
    if y in (_D, _Z):
        return x != _PAD
    if y == _SEP:
        return x in (_D, _Z)
    return False


_PAIR_OK = bytes(1 if i < 64 and _pair_ok(i // 8, i % 8) else 0 for i in range(256))
_SKELETON_BAD = tuple(
    bytes(t)
    for t in (
        (_DOT, _DOT),
        (_EXP, _DOT),
        (_EXP, _EXP),
        (_EXP, _PLUS, _DOT),
        (_EXP, _MINUS, _DOT),
        (_EXP, _PLUS, _EXP),
        (_EXP, _MINUS, _EXP),
    )
)


def _valid_numbers(joined: bytes) -> bool:
    c = bytes((_SEP,)) + joined.translate(_CLS)
    if len(c) < 2 or c[-1] not in (_D, _Z):
        return False
    a = np.frombuffer(c, dtype=np.uint8)
    pair = a[:-1] * np.uint8(8) + a[1:]
    if 0 in pair.tobytes().translate(_PAIR_OK):
        return False
    digit_after = (a[2:] == _D) | (a[2:] == _Z)
    if ((pair[:-1] == _SEP * 8 + _Z) & digit_after).any():  # ",0" then digit
        return False
    if ((pair[:-2] == _SEP * 8 + _MINUS) & (a[2:-1] == _Z) & digit_after[1:]).any():  # ",-0" digit
        return False
    skeleton = c.translate(None, bytes((_D, _Z)))  # per number at most one '.', then one 'e'
    return not any(b in skeleton for b in _SKELETON_BAD)


def _import_pyarrow():
    """(pyarrow, pyarrow.compute, pyarrow.json) or None when pyarrow is not installed."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.json
    except ImportError:
        return None
    return pyarrow, pyarrow.compute, pyarrow.json


class _ArrowRoutes:
    """Path 1: a chunk of route (and gap) records, parsed by pyarrow.json against the route schema and checked
    with numpy.

    ``columns()`` returns the chunk's validated route columns plus the raw text of its gap lines, or None when
    the chunk holds anything the strict schema plus these checks cannot vouch for (a meta or error record, an
    invalid value); the caller then runs the regex / per-line paths, which find and name the offending line.
    pyarrow's parser (RapidJSON) already rejects what ``json.loads`` rejects here (leading zeros, trailing
    commas, bad numbers, lone surrogates) and repeated keys, and never coerces types (a string, float or bool
    where an integer belongs is an error); a key outside the schema becomes a column of its own, which must be
    empty for route rows. What pyarrow does accept and the rules forbid is screened here: ``null`` (absent and
    null look the same in a column), NaN and Infinity, invalid UTF-8, blank lines or two objects on one line
    (row count != line count), ``"cached":false``.
    """

    def __init__(self, pa, pc, pj):
        self.pa, self.pc, self.pj = pa, pc, pj
        self.schema = pa.schema(
            [
                ("type", pa.string()),
                ("req_id", pa.string()),
                ("token_idx", pa.int64()),
                ("layer", pa.int64()),
                ("topk_ids", pa.list_(pa.int64())),
                ("topk_weights", pa.list_(pa.float64())),
                ("cached", pa.bool_()),
                ("dp_rank", pa.int64()),
                ("completion_index", pa.int64()),
            ]
        )
        # unknown keys become extra columns: a route row with any of them is refused below; gap rows (the only
        # other record frequent enough to matter) are handed back as text for the per-line checks
        self.parse_options = pj.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="infer")
        self.read_options = pj.ReadOptions(use_threads=True, block_size=1 << 20)

    def columns(self, buf: bytes, nlines: int, K: int, E: int, max_layers: int, weighted: bool):
        """((keys, codes, token_idx, layer, ids, weights, cached), gap lines) for a chunk of route and gap
        records, or None. The gap lines (raw text) still need the per-line checks."""
        # text screens: every line starts with '{' (no blank or indented line, so rows == lines means one
        # object per line), no null, UTF-8
        a = np.frombuffer(buf, dtype=np.uint8)
        starts = np.flatnonzero(a == 10)[:-1] + 1
        if a[0] != 123 or len(starts) != nlines - 1 or not (a[starts] == 123).all() or b"null" in buf:
            return None
        if not buf.isascii():
            try:
                buf.decode("utf-8")
            except UnicodeDecodeError:
                return None
        pa, pc = self.pa, self.pc
        try:
            t = self.pj.read_json(
                pa.BufferReader(buf), read_options=self.read_options, parse_options=self.parse_options
            )
        except (pa.ArrowException, ValueError, UnicodeError):
            return None
        if t.num_rows != nlines or t.column("type").null_count:
            return None
        is_route = pc.equal(t.column("type"), "route").combine_chunks()
        gaps = []
        if is_route.false_count:
            other = np.flatnonzero(~is_route.to_numpy(zero_copy_only=False))
            if not pc.all(pc.equal(t.column("type").take(other), "gap")).as_py():
                return None  # meta, error or unknown records: the regex path keeps their order and errors
            ends = np.append(starts - 1, len(buf) - 1)
            begins = np.insert(starts, 0, 0)
            gaps = [buf[begins[i] : ends[i]] for i in other.tolist()]
            t = t.filter(is_route)
        n = t.num_rows
        col = {name: t.column(name).combine_chunks() for name in t.column_names}
        for name in col:
            if name not in self.schema.names and col[name].null_count != n:
                return None  # a route record with an unknown key
        for name in ("type", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"):
            if col[name].null_count:
                return None
        tok = col["token_idx"].to_numpy()
        layer = col["layer"].to_numpy()
        if n and (tok.min() < 0 or tok.max() > MAX_TOKEN_IDX or layer.min() < 0 or layer.max() >= max_layers):
            return None
        lists = []
        for name in ("topk_ids", "topk_weights"):
            arr = col[name]
            offsets = arr.offsets.to_numpy()
            if offsets[0] != 0 or not (np.diff(offsets) == K).all():
                return None
            values = arr.values
            if values.null_count:
                return None
            lists.append(values.to_numpy()[: n * K].reshape(n, K))
        ids, ws = lists
        if n and (ids.min() < 0 or ids.max() >= E):
            return None
        if not np.isfinite(ws).all():
            return None
        cached = col["cached"]
        if cached.null_count == n:
            cached_arr = None
        else:
            if cached.false_count:
                return None
            cached_arr = cached.fill_null(False).to_numpy(zero_copy_only=False)
        extra = []
        for name in ("dp_rank", "completion_index"):
            c = col[name]
            if c.null_count == n:
                extra.append(None)
                continue
            v = c.fill_null(-1).to_numpy()
            if (v[c.is_valid().to_numpy(zero_copy_only=False)] < 0).any():
                return None
            extra.append(v)
        enc = col["req_id"].dictionary_encode()
        names = [r.encode("utf-8") for r in enc.dictionary.to_pylist()]
        idx = enc.indices.to_numpy().astype(np.int64)
        if all(v is None for v in extra):
            keys, inverse = names, idx
        else:
            dp, comp = (np.full(n, -1, np.int64) if v is None else v for v in extra)
            uniq, inverse = np.unique(np.stack([idx, dp, comp], axis=1), axis=0, return_inverse=True)
            keys = [
                _request_key(names[i], b"" if d < 0 else b"%d" % d, b"" if c < 0 else b"%d" % c)
                for i, d, c in uniq.tolist()
            ]
            inverse = inverse.reshape(-1)
        return (keys, inverse, tok, layer, ids, (ws if weighted else None), cached_arr), gaps


class _Loader:
    def __init__(self, path: str, layers, requests, weighted: bool, reader: str = "auto"):
        if reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
        self.arrow = None
        if reader != "regex":
            mods = _import_pyarrow()
            if mods is None and reader == "arrow":
                raise ImportError(PYARROW_HINT)
            self.arrow = _ArrowRoutes(*mods) if mods is not None else None
        self.chunk_paths = {"arrow": 0, "regex": 0, "per_line": 0}
        self.path = path
        self.warnings = [] if self.arrow is not None or reader == "regex" else [PYARROW_HINT]
        self.weighted = weighted
        self.sel_layers = None if layers is None else sorted({int(v) for v in layers})
        self.sel_requests = None if requests is None else list(dict.fromkeys(str(r) for r in requests))
        self._sel_req_keys = (
            None if self.sel_requests is None else {r.encode("utf-8", "surrogatepass") for r in self.sel_requests}
        )
        self.E = self.K = None
        self.pattern = None
        self.max_layers = DEFAULT_MAX_LAYERS
        self.metas = []
        self.layers_logged = set()
        self.flat = np.zeros(0, dtype=np.float64)  # layer * E + expert
        self.layer_records = np.zeros(0, dtype=np.int64)  # selected records per layer
        self.layer_seen = np.zeros(0, dtype=np.int64)  # all records per layer
        self.req_code = {}  # req_id bytes -> code
        self.req_selected = np.zeros(0, dtype=bool)  # code -> passes --requests
        self.req_used = np.zeros(0, dtype=bool)  # code -> has selected records
        self.token_keys = []
        self.token_keys_len = 0
        self.records = self.cached = self.gaps = self.gap_positions = 0
        self.errors = []
        self.lineno = 0
        self.truncated_line = None

    # ------------------------------------------------------------------ helpers
    def error(self, lineno, msg):
        return RouteLogError(self.path, lineno, msg)

    def _layer_mask(self, n):
        if self.sel_layers is None:
            return None
        m = np.zeros(n, dtype=bool)
        sel = [v for v in self.sel_layers if v < n]
        m[sel] = True
        return m

    def _codes(self, reqs: Sequence[bytes]) -> np.ndarray:
        table = self.req_code
        new = [r for r in dict.fromkeys(reqs) if r not in table]
        if new:
            base = len(table)
            for i, r in enumerate(new):
                table[r] = base + i
            if self._sel_req_keys is None:
                add = np.ones(len(new), dtype=bool)
            else:
                add = np.fromiter((_req_id_of(r) in self._sel_req_keys for r in new), dtype=bool, count=len(new))
            self.req_selected = np.concatenate([self.req_selected, add])
            self.req_used = np.concatenate([self.req_used, np.zeros(len(new), dtype=bool)])
        return np.fromiter(map(table.__getitem__, reqs), dtype=np.int64, count=len(reqs))

    def _grow(self, nlayers):
        if nlayers > len(self.layer_seen):
            pad = nlayers - len(self.layer_seen)
            self.layer_seen = np.concatenate([self.layer_seen, np.zeros(pad, np.int64)])
            self.layer_records = np.concatenate([self.layer_records, np.zeros(pad, np.int64)])
            self.flat = np.concatenate([self.flat, np.zeros(pad * self.E, np.float64)])

    def _add(self, reqs, tok, layer, ids, ws, cached, codes=None):
        """Count one validated batch. reqs: list of request keys (bytes), or with ``codes`` the distinct keys
        and codes[i] the index into them of row i; others numpy arrays."""
        n = len(tok)
        if n == 0:
            return
        E = self.E
        self._grow(int(layer.max()) + 1)
        self.layer_seen[: int(layer.max()) + 1] += np.bincount(layer)
        codes = self._codes(reqs) if codes is None else self._codes(reqs)[codes]
        mask = self.req_selected[codes]
        lm = self._layer_mask(len(self.layer_seen))
        if lm is not None:
            mask &= lm[layer]
        if not mask.all():
            codes, tok, layer, ids = codes[mask], tok[mask], layer[mask], ids[mask]
            ws = ws[mask] if ws is not None else None
            cached = cached[mask] if cached is not None else None
            n = len(tok)
            if n == 0:
                return
        self.records += n
        if cached is not None:
            self.cached += int(cached.sum())
        self.req_used[codes] = True
        nl = int(layer.max()) + 1
        self.layer_records[:nl] += np.bincount(layer, minlength=nl)
        flat_idx = (layer[:, None] * E + ids).ravel()
        if self.weighted:
            add = np.bincount(flat_idx, weights=ws.ravel(), minlength=nl * E)
        else:
            add = np.bincount(flat_idx, minlength=nl * E)
        self.flat[: nl * E] += add
        keys = np.unique((codes << 32) | tok)
        self.token_keys.append(keys)
        self.token_keys_len += len(keys)
        if self.token_keys_len > 4_000_000 and len(self.token_keys) > 1:
            merged = np.unique(np.concatenate(self.token_keys))
            self.token_keys, self.token_keys_len = [merged], len(merged)

    # ------------------------------------------------------------------ records
    def _meta(self, obj, lineno):
        try:
            E, K = _check_meta(obj)
        except _LineError as exc:
            raise self.error(lineno, str(exc)) from None
        if self.E is None:
            self.E, self.K = E, K
            self.pattern = _fast_pattern(K)
        elif (E, K) != (self.E, self.K):
            raise self.error(
                lineno,
                f"meta record disagrees with the first one: num_experts={E}, "
                f"top_k={K} (first meta: num_experts={self.E}, top_k={self.K})",
            )
        if "num_hidden_layers" in obj:
            nh = obj["num_hidden_layers"]
            self.max_layers = nh if not self.metas else max(self.max_layers, nh)
        self.layers_logged.update(obj.get("layers_logged", []))
        self.metas.append(obj)

    def _other_line(self, raw: bytes, lineno: int, slow: list):
        """Parse one line that the fast path did not take. Appends routes to ``slow``."""
        if not raw.strip():
            return
        try:
            obj = _json_loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _LineError(f"not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise _LineError(f"record is a JSON {type(obj).__name__}, not an object")
        kind = obj.get("type")
        if kind == "route":
            req, tok, layer, ids, ws, cached = _check_route(obj, self.E, self.K, self.max_layers)
            slow.append((lineno, req, tok, layer, ids, ws, cached))
        elif kind == "gap":
            req, npos = _check_gap(obj)
            if self._sel_req_keys is None or req.encode("utf-8", "surrogatepass") in self._sel_req_keys:
                self.gaps += 1
                self.gap_positions += npos
        elif kind == "meta":
            self._meta(obj, lineno)
        elif kind == "error":
            if not isinstance(obj.get("error"), str):
                raise _LineError("error record lacks an 'error' string")
            self.errors.append({"line": lineno, **obj})
        else:
            raise _LineError(f"unknown record type {kind!r} (expected meta, route, gap or error)")

    def _fast_batch(self, cols, first_lineno, keep_idx):
        """Validate and convert fast-path columns. Returns (batch, (lineno, msg) | None)."""
        dps, reqs, completions, ints, ws, cached = cols[:6]
        n = len(ints)
        E, K = self.E, self.K
        linenos = (
            (first_lineno + np.asarray(keep_idx, dtype=np.int64))
            if keep_idx is not None
            else first_lineno + np.arange(n, dtype=np.int64)
        )
        if n == 0:
            return None, None
        errors = []

        # leading zeros are not valid JSON, a non-UTF-8 req_id neither: let the
        # per-line checker report the line
        ijoined = b",".join(ints).translate(None, _NUM_KEYS)
        if _leading_zero(ijoined):
            return "slow", None
        if any(dps) or any(completions):
            if any(len(d) > 1 and d[:1] == b"0" for d in (*dps, *completions)):
                return "slow", None
            reqs = list(map(_request_key, reqs, dps, completions))
        rj = b"\n".join(reqs)
        if not rj.isascii():
            try:
                rj.decode("utf-8")
            except UnicodeDecodeError:
                return "slow", None
        allints = np.fromstring(ijoined, dtype=np.int64, sep=",")  # saturates on overflow
        if len(allints) != n * (K + 2):
            return "slow", None
        allints = allints.reshape(n, K + 2)
        tok, layer, idarr = allints[:, 0], allints[:, 1], allints[:, 2:]
        wjoined = b",".join(ws)
        if not _valid_numbers(wjoined):
            return "slow", None
        w = None
        if self.weighted:
            w = np.fromstring(wjoined, dtype=np.float64, sep=",")
            if len(w) != n * K or not np.isfinite(w).all():
                return "slow", None
            w = w.reshape(n, K)
        bad = tok > MAX_TOKEN_IDX
        if bad.any():
            i = int(np.argmax(bad))
            errors.append((int(linenos[i]), f"token_idx must be an integer in [0, {MAX_TOKEN_IDX}], got {int(tok[i])}"))
        bad = layer >= self.max_layers
        if bad.any():
            i = int(np.argmax(bad))
            errors.append((int(linenos[i]), f"layer {int(layer[i])} >= number of decoder layers {self.max_layers}"))
        bad = (idarr >= E) | (idarr < 0)
        if bad.any():
            row = bad.any(axis=1)
            i = int(np.argmax(row))
            j = int(np.argmax(bad[i]))
            errors.append((int(linenos[i]), f"topk_ids[{j}]={int(idarr[i, j])} outside [0, {E})"))
        if errors:
            return None, min(errors)
        n_cached = len(cached) - cached.count(b"")
        cached_arr = np.fromiter(map(bool, cached), dtype=bool, count=n) if n_cached else None
        return (list(reqs), tok, layer, idarr, w, cached_arr), None

    def _slow_chunk(self, lines: Sequence[bytes], first_lineno: int):
        """Per-line path (json.loads for every line) for a chunk of complete lines."""
        self.chunk_paths["per_line"] += 1
        slow = []
        for i, raw in enumerate(lines):
            try:
                self._other_line(raw, first_lineno + i, slow)
            except _LineError as exc:
                raise self.error(first_lineno + i, str(exc)) from None
        self._add_slow(slow)

    def _add_slow(self, slow):
        if not slow:
            return
        _, reqs, tok, layer, ids, ws, cached = zip(*slow, strict=False)
        self._add(
            list(reqs),
            np.array(tok, dtype=np.int64),
            np.array(layer, dtype=np.int64),
            np.array(ids, dtype=np.int64).reshape(len(tok), self.K),
            np.array(ws, dtype=np.float64).reshape(len(tok), self.K),
            np.array(cached, dtype=bool),
        )

    def _chunk(self, buf: bytes, first_lineno: int, nlines: int):
        """Process a buffer of complete lines (ends with b'\\n')."""
        if self.arrow is not None:
            cols = self.arrow.columns(buf, nlines, self.K, self.E, self.max_layers, self.weighted)
            gaps = None if cols is None else self._gap_lines(cols[1])
            if gaps is not None:
                self.chunk_paths["arrow"] += 1
                keys, inverse, *rest = cols[0]
                self._add(keys, *rest, codes=inverse)
                self.gaps += gaps[0]
                self.gap_positions += gaps[1]
                return
        self._regex_chunk(buf, first_lineno)

    def _gap_lines(self, lines: list):
        """(selected gap records, their positions) for gap lines, or None if one is invalid (the regex path
        then reports it in line order)."""
        count = positions = 0
        for raw in lines:
            try:
                obj = _json_loads(raw)
                if not isinstance(obj, dict) or obj.get("type") != "gap":
                    return None
                req, npos = _check_gap(obj)
            except (ValueError, UnicodeDecodeError, _LineError):
                return None
            if self._sel_req_keys is None or req.encode("utf-8", "surrogatepass") in self._sel_req_keys:
                count += 1
                positions += npos
        return count, positions

    def _regex_chunk(self, buf: bytes, first_lineno: int):
        """Path 2 for a buffer of complete lines; falls back to the per-line path when it cannot vouch."""
        matches = self.pattern.findall(buf)
        cols = list(zip(*matches, strict=False))
        toks = cols[3]
        n_other = toks.count(b"")
        if n_other == 0:
            keep_idx = None
            fast_cols = cols
            other = []
        else:
            is_fast = [t != b"" for t in toks]
            keep_idx = list(itertools.compress(range(len(toks)), is_fast))
            fast_cols = [list(itertools.compress(c, is_fast)) for c in cols[:6]]
            # the raw text of an "other" line is group 7 (the fast groups are empty)
            other = [(i, cols[6][i]) for i, f in enumerate(is_fast) if not f]

        # other lines first (they may be meta records); remember the first error
        snapshot = (
            len(self.metas),
            set(self.layers_logged),
            self.gaps,
            self.gap_positions,
            self.max_layers,
            len(self.errors),
        )
        slow, err = [], None
        for i, raw in other:
            try:
                self._other_line(raw, first_lineno + i, slow)
            except _LineError as exc:
                err = (first_lineno + i, str(exc))
                break
            except RouteLogError as exc:
                err = (exc.lineno, exc.message)
                break
        batch, ferr = self._fast_batch(fast_cols, first_lineno, keep_idx)
        if batch == "slow":
            # the fast path could not vouch for this chunk (leading zeros, bad numbers, ...):
            # undo what the other lines counted and redo the chunk line by line, which also
            # finds the first error in line order
            nmeta, self.layers_logged, self.gaps, self.gap_positions, self.max_layers, nerr = snapshot
            del self.metas[nmeta:]
            del self.errors[nerr:]
            self._slow_chunk(buf.split(b"\n")[:-1], first_lineno)
            return
        errs = [e for e in (err, ferr) if e is not None]
        if errs:
            lineno, msg = min(errs)
            raise self.error(lineno, msg)
        self.chunk_paths["regex"] += 1
        if batch is not None:
            self._add(*batch)
        self._add_slow(slow)

    # ------------------------------------------------------------------ driver
    def run(self) -> RouteCounts:
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise RouteLogError(self.path, None, f"cannot open: {exc.strerror}") from None
        with f:
            # first non-empty line must be a meta record
            while True:
                raw = f.readline()
                if not raw:
                    raise self.error(None, "empty log: no meta record")
                self.lineno += 1
                if raw.strip():
                    break
            complete = raw.endswith(b"\n")
            try:
                obj = _json_loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                if not complete:
                    raise self.error(self.lineno, "truncated first line: no meta record") from None
                raise self.error(self.lineno, f"not valid JSON ({exc})") from None
            if not isinstance(obj, dict) or obj.get("type") != "meta":
                raise self.error(self.lineno, 'first record is not a meta record (missing {"type":"meta", ...} line)')
            self._meta(obj, self.lineno)

            rest = b""
            while True:
                data = f.read(CHUNK_BYTES)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                buf, rest = data[: cut + 1], data[cut + 1 :]
                nlines = buf.count(b"\n")
                self._chunk(buf, self.lineno + 1, nlines)
                self.lineno += nlines
            if rest:
                # The writer ends every record with its newline in the same write(2), but a SIGKILL can cut
                # that write at a page boundary: a last line without newline is a writer killed mid-write.
                # Like an error record it is loud but not fatal: the lines before it are whole.
                self.lineno += 1
                slow = []
                try:
                    self._other_line(rest, self.lineno, slow)
                except _LineError as exc:
                    if str(exc).startswith("not valid JSON"):
                        self.truncated_line = self.lineno
                        self.warnings.append(
                            f"{self.path}:{self.lineno}: truncated last line: incomplete last line (no newline, not "
                            "parseable): the writer was killed mid-write - not counted, the other lines are used "
                            "(the next writer to open this log cuts it off)"
                        )
                    else:
                        raise self.error(self.lineno, str(exc)) from None
                else:
                    self.warnings.append(
                        f"{self.path}:{self.lineno}: incomplete last line (no newline): the writer was killed "
                        "mid-write; the record itself is complete and counted"
                    )
                self._add_slow(slow)
        return self._result()

    def _result(self) -> RouteCounts:
        E = self.E
        for err in self.errors:
            self.warnings.append(
                f"{self.path}:{err['line']}: the routing log writer stopped ({err['error']}): "
                "the log is incomplete from there on"
            )
        seen_layers = [int(v) for v in np.flatnonzero(self.layer_seen)]
        extra = sorted(set(seen_layers) - self.layers_logged) if self.layers_logged else []
        if extra:
            self.warnings.append(f"{self.path}: route records for layer(s) {extra} not in any meta layers_logged")
        if self.sel_layers is not None:
            missing = [v for v in self.sel_layers if v not in set(seen_layers)]
            if missing and len(missing) < len(self.sel_layers):
                self.warnings.append(
                    f"selected layer(s) {missing} have no route records (logged layers: {seen_layers})"
                )
        if self.sel_requests is not None:
            present = {_req_id_of(k).decode("utf-8", "surrogatepass") for k in self.req_code}
            missing = [r for r in self.sel_requests if r not in present]
            if missing and len(missing) < len(self.sel_requests):
                shown = missing[:10] + (["..."] if len(missing) > 10 else [])
                self.warnings.append(f"selected request(s) {shown} have no route records")
        if self.records == 0:
            what = []
            if self.sel_layers is not None:
                what.append(f"layers {self.sel_layers} (logged: {seen_layers})")
            if self.sel_requests is not None:
                shown = self.sel_requests[:10] + (["..."] if len(self.sel_requests) > 10 else [])
                what.append(f"requests {shown} ({len(self.req_code)} requests in the log)")
            if what:
                raise SelectionError(f"{self.path}: the selection matches no route record: " + " and ".join(what))
            raise SelectionError(f"{self.path}: the log has no route records")
        layers = [int(v) for v in np.flatnonzero(self.layer_records)]
        mat = self.flat.reshape(-1, E)[layers]
        tokens = len(np.unique(np.concatenate(self.token_keys))) if self.token_keys else 0
        model_ids = list(dict.fromkeys(str(m.get("model_id", "?")) for m in self.metas))
        if len(model_ids) > 1:
            self.warnings.append(f"{self.path}: meta records name different models: {model_ids}")
        return RouteCounts(
            path=self.path,
            num_experts=E,
            top_k=self.K,
            weighted=self.weighted,
            layers=layers,
            counts=mat,
            layer_records=self.layer_records[layers].copy(),
            records=self.records,
            requests=int(self.req_used.sum()),
            tokens=int(tokens),
            cached_records=self.cached,
            gap_records=self.gaps,
            gap_positions=self.gap_positions,
            error_records=self.errors,
            meta_records=len(self.metas),
            lines=self.lineno,
            meta=self.metas[0],
            model_ids=model_ids,
            random_weights=any(m.get("random_weights") is True for m in self.metas),
            layers_logged=sorted(self.layers_logged),
            selected_layers=self.sel_layers,
            selected_requests=self.sel_requests,
            truncated_line=self.truncated_line,
            warnings=self.warnings,
            reader="arrow" if self.arrow is not None else "regex",
            chunks=dict(self.chunk_paths),
        )


def load_routes(
    path,
    layers: Iterable[int] | None = None,
    requests: Iterable[str] | None = None,
    weighted: bool = False,
    reader: str = "auto",
) -> RouteCounts:
    """Read a moe_routes.jsonl log and count expert usage per (layer, expert).

    layers / requests restrict the route records counted (None = all).  With
    weighted=True each assignment counts its topk_weight instead of 1.
    reader: "auto" (pyarrow when installed, else the pure-Python reader), "arrow"
    (ImportError naming the pin without pyarrow) or "regex"; the results are the same.
    Raises RouteLogError (with line number) for invalid content and
    SelectionError when nothing is selected.
    """
    return _Loader(os.fspath(path), layers, requests, weighted, reader).run()


# --------------------------------------------------------------------------- statistics


def _dist(counts: np.ndarray) -> dict:
    counts = np.asarray(counts, dtype=np.float64)
    E = len(counts)
    total = float(counts.sum())
    shares = counts / total if total > 0 else np.zeros(E)
    p = shares[shares > 0]
    entropy = float(-(p * np.log2(p)).sum()) if len(p) else 0.0
    hmax = math.log2(E) if E > 1 else 0.0
    order = np.argsort(-counts, kind="stable")[:3]
    return {
        "total": total,
        "counts": [float(c) if not float(c).is_integer() else int(c) for c in counts],
        "shares": [float(s) for s in shares],
        "entropy_bits": entropy,
        "entropy_frac": entropy / hmax if hmax > 0 else None,
        "imbalance": float(counts.max() / (total / E)) if total > 0 else None,
        "top3": [{"expert": int(e), "share": float(shares[e])} for e in order],
    }


def summarize(counts: RouteCounts) -> dict:
    """Machine-readable statistics (the content of expert_stats.json)."""
    E = counts.num_experts
    overall = _dist(counts.counts.sum(axis=0))
    per_layer = []
    for i, layer in enumerate(counts.layers):
        d = _dist(counts.counts[i])
        per_layer.append({"layer": layer, "records": int(counts.layer_records[i]), **d})
    return {
        "input": counts.path,
        "model_id": counts.model_id,
        "model_ids": counts.model_ids,
        "random_weights": counts.random_weights,
        "num_experts": E,
        "top_k": counts.top_k,
        "weighted": counts.weighted,
        "count_unit": "topk_weight" if counts.weighted else "assignment",
        "selection": {"layers": counts.selected_layers, "requests": counts.selected_requests},
        "records": counts.records,
        "requests": counts.requests,
        "count_request_unit": "completion: (dp_rank, req_id, completion_index)",
        "tokens": counts.tokens,
        "layers": counts.layers,
        "layers_logged": counts.layers_logged,
        "cached_records": counts.cached_records,
        "gap_records": counts.gap_records,
        "gap_positions": counts.gap_positions,
        "error_records": [
            {k: v for k, v in e.items() if k in ("line", "error", "policy", "time_unix")} for e in counts.error_records
        ],
        "meta_records": counts.meta_records,
        "lines": counts.lines,
        "truncated_last_line": counts.truncated_line,
        "warnings": list(counts.warnings),
        "uniform_share": 1.0 / E,
        "entropy_max_bits": math.log2(E) if E > 1 else 0.0,
        "overall": overall,
        "per_layer": per_layer,
    }


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _top3(d) -> str:
    return ", ".join(f"e{t['expert']} {_pct(t['share'])}" for t in d["top3"])


def _ent(d) -> str:
    frac = "n/a" if d["entropy_frac"] is None else f"{d['entropy_frac']:.3f}"
    return f"H={d['entropy_bits']:.3f} bits ({frac} of max)"


def format_summary(s: dict) -> str:
    E = s["num_experts"]
    lines = []
    if s["random_weights"]:
        bar = "!" * 78
        lines += [
            bar,
            "!! NOTE: meta says random_weights=true: this model has RANDOM weights.",
            "!! Its routing statistics mean nothing about the real model.",
            bar,
        ]
    for err in s["error_records"]:
        bar = "!" * 78
        lines += [
            bar,
            f"!! INCOMPLETE LOG: the writer stopped at line {err['line']}: {err['error']}",
            "!! Records after it are missing; requests running then may lack positions.",
            bar,
        ]
    if s["truncated_last_line"] is not None:
        bar = "!" * 78
        lines += [
            bar,
            f"!! INCOMPLETE LAST LINE {s['truncated_last_line']}: the writer was killed mid-write.",
            "!! That line is not counted; records the writer had not written yet are missing.",
            bar,
        ]
    unit = "summed topk_weights" if s["weighted"] else "expert assignments"
    lines.append(f"{s['input']}: model {s['model_id']}, {E} experts, top-{s['top_k']}, counting {unit}")
    sel = []
    if s["selection"]["layers"] is not None:
        sel.append(f"layers {s['selection']['layers']}")
    if s["selection"]["requests"] is not None:
        sel.append(f"{len(s['selection']['requests'])} selected request id(s)")
    lines.append(
        f"records {s['records']}  requests {s['requests']}  tokens {s['tokens']}  "
        f"layers {len(s['layers'])} {_compact_layers(s['layers'])}"
        + (f"  [selection: {'; '.join(sel)}]" if sel else "")
    )
    lines.append(
        f"cached-position records {s['cached_records']}  gap records {s['gap_records']} "
        f"({s['gap_positions']} positions)  meta records {s['meta_records']}"
    )
    o = s["overall"]
    imb = "n/a" if o["imbalance"] is None else f"{o['imbalance']:.3f}"
    lines.append(f"overall: top-3 {_top3(o)}; {_ent(o)}; imbalance max/mean {imb}")
    lines.append(f"normalised distribution (share per expert, uniform = {_pct(1 / E)}):")
    per_row = 10
    for start in range(0, E, per_row):
        cells = "".join(f"{f'e{e}':>5}{_pct(o['shares'][e]):>6}" for e in range(start, min(E, start + per_row)))
        lines.append("  " + cells)
    lines.append("per layer:")
    for d in s["per_layer"]:
        imb = "n/a" if d["imbalance"] is None else f"{d['imbalance']:.2f}"
        lines.append(f"  L{d['layer']:<3} {_ent(d)}  imb {imb}  top-3 {_top3(d)}")
    return "\n".join(lines)


def _compact_layers(layers) -> str:
    if not layers:
        return "[]"
    parts, start, prev = [], layers[0], layers[0]
    for v in list(layers[1:]) + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return "[" + ",".join(parts) + "]"


# --------------------------------------------------------------------------- plots

TITLE_FONTSIZE = 9


def fit_title(text: str, fig_width_in: float, fontsize: float) -> str:
    """text with each line wrapped to the figure's width: matplotlib neither wraps nor shrinks a title, so a long
    model path or statistics line ran past the right edge of a 6-inch figure. A character of the default sans
    font averages ~0.6 em; wrap at 90 % of the width for the figure's margins."""
    per_line = max(20, int(0.9 * fig_width_in * 72 / (0.6 * fontsize)))
    return "\n".join(
        textwrap.fill(line, per_line, break_on_hyphens=False, break_long_words=True) for line in text.split("\n")
    )


def plot(counts: RouteCounts, summary: dict | None, out_dir) -> list:
    """Write expert_hist.png and expert_heatmap.png into out_dir; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    if summary is None:
        summary = summarize(counts)
    os.makedirs(out_dir, exist_ok=True)
    E = counts.num_experts
    shares = np.array(summary["overall"]["shares"])
    unit = "topk_weight mass" if counts.weighted else "assignments"
    rw = " [RANDOM WEIGHTS: meaningless]" if counts.random_weights else ""
    paths = []

    width = min(24.0, max(6.0, 0.18 * E + 2))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.bar(np.arange(E), shares, width=0.85, color="tab:blue")
    ax.axhline(1.0 / E, color="tab:red", linestyle="--", linewidth=1.2, label=f"uniform 1/{E} = {100 / E:.2f}%")
    ax.set_xlim(-0.7, E - 0.3)
    ax.set_xlabel("expert id")
    ax.set_ylabel(f"share of {unit}")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if E <= 64:
        ax.set_xticks(np.arange(E))
        ax.tick_params(axis="x", labelsize=7 if E > 32 else 9)
    o = summary["overall"]
    ax.set_title(
        fit_title(
            f"{counts.model_id}{rw}\nexpert usage, layers {_compact_layers(counts.layers)}: "
            f"{counts.tokens} tokens, {counts.records} route records, top-{counts.top_k}; "
            f"H={o['entropy_bits']:.2f} bits, max/mean={o['imbalance']:.2f}",
            width,
            TITLE_FONTSIZE,
        ),
        fontsize=TITLE_FONTSIZE,
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    p = os.path.join(out_dir, HIST_NAME)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    L = len(counts.layers)
    tot = counts.counts.sum(axis=1, keepdims=True)
    mat = np.divide(counts.counts, tot, out=np.zeros_like(counts.counts), where=tot > 0)
    fig, ax = plt.subplots(figsize=(width, min(14.0, max(3.5, 0.3 * L + 2.0))))
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis")
    step = max(1, math.ceil(L / 40))
    ax.set_yticks(np.arange(0, L, step))
    ax.set_yticklabels([str(counts.layers[i]) for i in range(0, L, step)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel("expert id")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"share within layer (uniform {100 / E:.2f}%)", fontsize=8)
    ax.set_title(
        fit_title(
            f"{counts.model_id}{rw}\nper-layer expert share: {counts.tokens} tokens, {counts.records} route records",
            0.8 * width,  # centred over the axes, which the colorbar narrows
            TITLE_FONTSIZE,
        ),
        fontsize=TITLE_FONTSIZE,
    )
    fig.tight_layout()
    p = os.path.join(out_dir, HEATMAP_NAME)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# --------------------------------------------------------------------------- CLI

EPILOG = """\
examples:
  # all logged layers; writes expert_hist.png, expert_heatmap.png, expert_stats.json next to the log
  python plot_hist.py moe_routes.jsonl

  # three layers, two requests, plots into out/
  python plot_hist.py moe_routes.jsonl --layers 0,3,5 --requests 0,1 --out-dir out/

  # layer range, request ids from a file (one per line), weight by topk_weights
  python plot_hist.py moe_routes.jsonl --layers 0-11 --requests-file reqs.txt --weighted

  # statistics only, JSON on stdout
  python plot_hist.py moe_routes.jsonl --no-plots --summary-json -

exit status: 0 ok, 1 invalid log (message "FILE:LINE: ...") or empty selection, 2 bad usage.
An incomplete last line (no newline: the writer was killed mid-write) is reported loudly and, unless it
is a complete record, not counted.
"""


def _parse_layers(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise argparse.ArgumentTypeError(f"bad layer {part!r} (use e.g. 0,3,5 or 0-11)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad layer range {part!r}")
        out.extend(range(lo, hi + 1))
    if not out:
        raise argparse.ArgumentTypeError("empty layer list")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plot_hist.py",  # also `moe-routes plot`
        description="Expert-usage histogram, layer x expert heatmap and routing statistics "
        "(shares, entropy, load imbalance) from a moe_routes.jsonl log.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("log", help="moe_routes.jsonl file")
    p.add_argument("--out-dir", help="where to write the PNGs and expert_stats.json (default: the log's directory)")
    p.add_argument(
        "--layers", type=_parse_layers, help="comma-separated decoder-layer indices or ranges (default: all logged)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requests", help="comma-separated req_id values, matched on every DP rank (default: all)")
    g.add_argument("--requests-file", help="file with one req_id per line")
    p.add_argument("--weighted", action="store_true", help="count each assignment by its topk_weight instead of 1")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (expert_stats.json is still written)")
    p.add_argument("--summary-json", metavar="PATH", help="also write the statistics JSON to PATH ('-' = stdout)")
    p.add_argument(
        "--reader",
        choices=READERS,
        default="auto",
        help="log reader: pyarrow.json with the pure-Python paths as fallback (arrow), the "
        "pure-Python reader alone (regex), or arrow when pyarrow is installed (auto, the "
        "default); all give the same results",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    requests = None
    if args.requests is not None:
        requests = [r for r in args.requests.split(",") if r != ""]
    elif args.requests_file is not None:
        try:
            with open(args.requests_file, encoding="utf-8") as fh:
                requests = [ln.strip() for ln in fh if ln.strip()]
        except OSError as exc:
            print(f"error: {args.requests_file}: {exc.strerror}", file=sys.stderr)
            return 1
    if requests is not None and not requests:
        print("error: empty request selection", file=sys.stderr)
        return 1
    try:
        counts = load_routes(
            args.log, layers=args.layers, requests=requests, weighted=args.weighted, reader=args.reader
        )
    except (RouteLogError, SelectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in counts.warnings:
        print(f"warning: {w}", file=sys.stderr)
    summary = summarize(counts)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.log))
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(summary, indent=1)
    with open(os.path.join(out_dir, STATS_NAME), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    if args.summary_json == "-":
        print(text)
    else:
        print(format_summary(summary))
        if args.summary_json:
            with open(args.summary_json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
    written = [os.path.join(out_dir, STATS_NAME)]
    if not args.no_plots:
        written = plot(counts, summary, out_dir) + written
    print("wrote " + ", ".join(written), file=sys.stderr if args.summary_json == "-" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
