"""Benchmark the moe_routes.jsonl readers of plot_hist.py (moe_routes.plot) on a synthetic log.

Generates N route lines (default 10,000,000, 1.4 GB) for a 60-expert, top-4, 24-layer model in the fast
writer's compact format (vectorised: numbers come from pre-formatted string tables, lines are assembled
with list slicing and one bytes.join per block), then times each reader on that same file, repeats in
rotating order, and prints the median wall and CPU seconds (CPU = all threads of the process).

Readers (--readers, comma-separated):
  arrow    load_routes(reader="arrow"): pyarrow.json + numpy checks, full validation (plot_hist's default)
  regex    load_routes(reader="regex"): the pure-Python reader (regex fast path + json.loads per line)
  orjson   orjson.loads per line + numpy counting: a lower bound, no validation beyond the record type
  polars   polars.scan_ndjson with the route schema + numpy counting: a lower bound (polars coerces numbers
           to strings and ignores unknown and repeated keys, so it could not validate by itself)
  duckdb   duckdb read_json with the route columns, counted in SQL: a lower bound (duckdb casts strings,
           floats and bools to integers and ignores unknown keys)
The lower-bound readers need their package (pip install orjson polars duckdb); a missing one is skipped.

Examples:
  moe-routes bench plot                                  # 10M lines in a temporary file, arrow and regex once
  moe-routes bench plot --keep /tmp/routes10m.jsonl --readers none                   # only write the log
  moe-routes bench plot --log /tmp/routes10m.jsonl --readers regex,arrow,orjson,polars,duckdb --repeats 3
  taskset -c 1 moe-routes bench plot --log /tmp/routes10m.jsonl --readers arrow,regex --repeats 3   # one core
  moe-routes bench plot --lines 1000000 --weighted
(without installing: python -m moe_routes bench plot ... from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np

from moe_routes import plot
from moe_routes.schema import schema_version

E, K, LAYERS = 60, 4, 24
TOKENS_PER_REQUEST = 512
BLOCK = 1_000_000


def _table(values) -> np.ndarray:
    t = np.empty(len(values), dtype=object)
    t[:] = values
    return t


def generate(path: str, n_lines: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    layers = list(range(LAYERS))
    meta = {
        "type": "meta",
        "schema_version": schema_version(),
        "engine": "vllm",
        "engine_version": "bench",
        "torch_version": "bench",
        "model_id": "synthetic/bench-60e-top4",
        "device": "cpu",
        "seed": seed,
        "num_experts": E,
        "top_k": K,
        "num_hidden_layers": LAYERS,
        "moe_layers": layers,
        "layers_logged": layers,
        "id_kind": "logical",
        "routing_source": "simulated",
        "patch_series": "bench",
        "patches": [],
        "writer": {"pid": 0},
        "created_unix": time.time(),
    }
    # expert-id strings: a skewed "first" expert per line plus 3 distinct offsets
    n_off = 1000
    offs = np.stack([rng.choice(np.arange(1, E), size=K - 1, replace=False) for _ in range(n_off)])
    ids_tab = _table([(",".join(str((b + o) % E) for o in (0, *row))).encode() for b in range(E) for row in offs])
    # weight strings: 1000 pre-made descending float32 4-tuples summing to ~1
    w = rng.dirichlet(np.ones(K) * 2.0, size=1000).astype(np.float32)
    w = -np.sort(-w, axis=1)
    w_tab = _table([",".join(str(x) for x in row).encode() for row in w])  # float32 shortest repr
    max_tok = TOKENS_PER_REQUEST
    num_tab = _table([str(i).encode() for i in range(max(max_tok, LAYERS, 1))])
    n_req = n_lines // (LAYERS * TOKENS_PER_REQUEST) + 2
    req_tab = _table([b'{"type":"route","req_id":"' + str(r).encode() + b'","token_idx":' for r in range(n_req)])
    bias = np.linspace(3.0, 0.3, E)
    p_first = bias / bias.sum()
    with open(path, "wb") as f:
        f.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
        for start in range(0, n_lines, BLOCK):
            n = min(BLOCK, n_lines - start)
            line = np.arange(start, start + n, dtype=np.int64)
            layer = line % LAYERS
            tokpos = line // LAYERS
            req = tokpos // TOKENS_PER_REQUEST
            tok = tokpos % TOKENS_PER_REQUEST
            first = rng.choice(E, size=n, p=p_first)
            first = (first + 7 * layer) % E  # layers prefer different experts
            idx = first * n_off + rng.integers(0, n_off, size=n)
            cached = rng.random(n) < 0.05
            P = 8
            parts = [None] * (n * P)
            parts[0::P] = req_tab[req].tolist()
            parts[1::P] = num_tab[tok].tolist()
            parts[2::P] = [b',"layer":'] * n
            parts[3::P] = num_tab[layer].tolist()
            parts[4::P] = [b',"topk_ids":['] * n
            parts[5::P] = ids_tab[idx].tolist()
            parts[6::P] = [b'],"topk_weights":['] * n
            parts[7::P] = w_tab[rng.integers(0, len(w_tab), size=n)].tolist()
            ends = np.where(cached, b'],"cached":true}\n', b"]}\n").astype(object)
            # interleave the line ends: rebuild with 9 parts per line
            full = [None] * (n * (P + 1))
            for j in range(P):
                full[j :: P + 1] = parts[j::P]
            full[P :: P + 1] = ends.tolist()
            f.write(b"".join(full))


ROUTE_SCHEMA = {
    "type": "string",
    "req_id": "string",
    "token_idx": "int64",
    "layer": "int64",
    "topk_ids": "list<int64>",
    "topk_weights": "list<float64>",
    "cached": "bool",
    "dp_rank": "int64",
    "completion_index": "int64",
}


def _counts(layer, ids, reqs_tok) -> tuple:
    """(records, assignments per (layer, expert), tokens) from numpy columns."""
    flat = np.bincount((layer[:, None] * E + ids).ravel(), minlength=LAYERS * E)
    return len(layer), flat.reshape(LAYERS, E), len(np.unique(reqs_tok))


def read_orjson(path: str, weighted: bool) -> tuple:
    import orjson

    layer, ids, keys = [], [], []
    codes: dict = {}
    with open(path, "rb") as f:
        f.readline()  # meta
        for raw in f:
            o = orjson.loads(raw)
            if o["type"] != "route":
                continue
            layer.append(o["layer"])
            ids.append(o["topk_ids"])
            keys.append((codes.setdefault(o["req_id"], len(codes)) << 32) | o["token_idx"])
    return _counts(np.array(layer, dtype=np.int64), np.array(ids, dtype=np.int64), np.array(keys, dtype=np.int64))


def read_polars(path: str, weighted: bool) -> tuple:
    import polars as pl

    schema = {
        "type": pl.String,
        "req_id": pl.String,
        "token_idx": pl.Int64,
        "layer": pl.Int64,
        "topk_ids": pl.List(pl.Int64),
        "topk_weights": pl.List(pl.Float64),
        "cached": pl.Boolean,
    }
    df = (
        pl.scan_ndjson(path, schema=schema)
        .filter(pl.col("type") == "route")
        .select(
            pl.col("req_id").cast(pl.Categorical).to_physical().cast(pl.Int64),
            "token_idx",
            "layer",
            "topk_ids",
            "topk_weights",
        )
        .collect()
    )
    ids = df["topk_ids"].list.to_array(K).to_numpy()
    keys = (df["req_id"].to_numpy() << 32) | df["token_idx"].to_numpy()
    return _counts(df["layer"].to_numpy(), ids, keys)


def read_duckdb(path: str, weighted: bool) -> tuple:
    import duckdb

    cols = (
        "{'type': 'VARCHAR', 'req_id': 'VARCHAR', 'token_idx': 'BIGINT', 'layer': 'BIGINT', "
        "'topk_ids': 'BIGINT[]', 'topk_weights': 'DOUBLE[]', 'cached': 'BOOLEAN'}"
    )
    con = duckdb.connect()
    con.execute(
        f"CREATE TEMP VIEW r AS SELECT * FROM read_json('{path}', format='newline_delimited', "
        f"columns={cols}) WHERE type = 'route'"
    )
    records, tokens = con.execute("SELECT count(*), count(DISTINCT (req_id, token_idx)) FROM r").fetchone()
    rows = con.execute(
        "SELECT layer, e, count(*) FROM (SELECT layer, unnest(topk_ids) AS e FROM r) GROUP BY ALL"
    ).fetchall()
    mat = np.zeros((LAYERS, E), dtype=np.int64)
    for layer, e, c in rows:
        mat[layer, e] = c
    return records, mat, tokens


def read_moe_routes(reader: str):
    def read(path: str, weighted: bool) -> tuple:
        c = plot.load_routes(path, weighted=weighted, reader=reader)
        assert c.chunks["per_line"] == 0, c.chunks
        full = np.zeros((LAYERS, E))
        full[c.layers] = c.counts
        return c.records, full, c.tokens

    return read


READERS = {
    "arrow": read_moe_routes("arrow"),
    "regex": read_moe_routes("regex"),
    "orjson": read_orjson,
    "polars": read_polars,
    "duckdb": read_duckdb,
}


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        model = "?"
    return f"{model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="moe-routes bench plot",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--lines", type=int, default=10_000_000, help="route lines to generate (default 10M)")
    ap.add_argument("--weighted", action="store_true", help="count by topk_weight (arrow / regex readers)")
    ap.add_argument("--keep", metavar="PATH", help="write the log here and keep it")
    ap.add_argument("--log", metavar="PATH", help="time this existing log (written by --keep) instead of generating")
    ap.add_argument(
        "--readers",
        default="arrow,regex",
        help=f"comma-separated, from {', '.join(READERS)}; 'none' only generates (default arrow,regex)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per reader, in rotating order (default 1)")
    args = ap.parse_args(argv)
    names = [] if args.readers == "none" else [r for r in args.readers.split(",") if r]
    unknown = [r for r in names if r not in READERS]
    if unknown:
        ap.error(f"unknown reader(s) {unknown}; have {list(READERS)}")
    tmpdir = None
    if args.log:
        path = args.log
    elif args.keep:
        path = args.keep
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="bench_plot_")
        path = os.path.join(tmpdir.name, "moe_routes.jsonl")
    try:
        if not args.log:
            t0 = time.perf_counter()
            generate(path, args.lines)
            print(f"generated {args.lines:,} route lines in {time.perf_counter() - t0:.1f} s: {path}")
        size = os.path.getsize(path)
        print(f"{_machine()}; log {size / 1e6:.0f} MB: {path}")
        times: dict = {r: [] for r in names}
        ref = None
        for rep in range(args.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)] if names else []
            for name in order:
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    records, mat, tokens = READERS[name](path, args.weighted)
                    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                except ImportError as exc:
                    print(f"{name}: skipped ({exc})")
                    names.remove(name)
                    del times[name]
                    continue
                if not args.weighted or name in ("arrow", "regex"):
                    if ref is None:
                        ref = (records, np.asarray(mat, dtype=np.float64), tokens)
                    assert records == ref[0] and tokens == ref[2], (name, records, tokens, ref)
                    assert np.allclose(np.asarray(mat, dtype=np.float64), ref[1]), name
                times[name].append((dt, cpu))
                print(
                    f"  run {rep + 1} {name:7s} {dt:7.2f} s wall {cpu:7.2f} s CPU  {records / dt:>12,.0f} lines/s"
                    f"  records={records:,} tokens={tokens:,}",
                    flush=True,
                )
        if names:
            print(f"\nmedians over {args.repeats} run(s), {_machine()}:")
            print(f"{'reader':8s} {'wall s':>8s} {'CPU s':>8s}  runs (wall s)")
            for name in sorted(names, key=lambda r: statistics.median(t[0] for t in times[r])):
                walls = [t[0] for t in times[name]]
                cpus = [t[1] for t in times[name]]
                print(
                    f"{name:8s} {statistics.median(walls):8.2f} {statistics.median(cpus):8.2f}  "
                    + " ".join(f"{w:.2f}" for w in walls)
                )
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    return 0
