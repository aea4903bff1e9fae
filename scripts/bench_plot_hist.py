#!/usr/bin/env python3
"""Benchmark plot_hist.load_routes on a synthetic moe_routes.jsonl log.

Generates N route lines (default 10,000,000) for a 60-expert, top-4, 24-layer
model in the fast writer's compact format into a temporary file (vectorised:
numbers come from pre-formatted string tables, lines are assembled with list
slicing and one bytes.join per block), then times load_routes on it.

    python scripts/bench_plot_hist.py                 # 10M lines
    python scripts/bench_plot_hist.py --lines 1000000 --weighted --keep /tmp/big.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plot_hist  # noqa: E402

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
    meta = {"type": "meta", "schema_version": 2, "engine": "vllm", "engine_version": "bench",
            "torch_version": "bench", "model_id": "synthetic/bench-60e-top4", "device": "cpu",
            "seed": seed, "num_experts": E, "top_k": K, "num_hidden_layers": LAYERS,
            "moe_layers": layers, "layers_logged": layers, "id_kind": "logical",
            "routing_source": "simulated", "patch_series": "bench", "patches": [],
            "writer": {"pid": 0}, "created_unix": time.time()}
    # expert-id strings: a skewed "first" expert per line plus 3 distinct offsets
    n_off = 1000
    offs = np.stack([rng.choice(np.arange(1, E), size=K - 1, replace=False) for _ in range(n_off)])
    ids_tab = _table([(",".join(str((b + o) % E) for o in (0, *row))).encode()
                      for b in range(E) for row in offs])
    # weight strings: 1000 pre-made descending float32 4-tuples summing to ~1
    w = rng.dirichlet(np.ones(K) * 2.0, size=1000).astype(np.float32)
    w = -np.sort(-w, axis=1)
    w_tab = _table([",".join(str(x) for x in row).encode() for row in w])  # float32 shortest repr
    max_tok = TOKENS_PER_REQUEST
    num_tab = _table([str(i).encode() for i in range(max(max_tok, LAYERS, 1))])
    n_req = n_lines // (LAYERS * TOKENS_PER_REQUEST) + 2
    req_tab = _table([b'{"type":"route","req_id":"' + str(r).encode() + b'","token_idx":'
                      for r in range(n_req)])
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
            first = (first + 7 * layer) % E          # layers prefer different experts
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
            ends = np.where(cached, b'],"cached":true}\n', b']}\n').astype(object)
            # interleave the line ends: rebuild with 9 parts per line
            full = [None] * (n * (P + 1))
            for j in range(P):
                full[j::P + 1] = parts[j::P]
            full[P::P + 1] = ends.tolist()
            f.write(b"".join(full))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=10_000_000, help="route lines (default 10M)")
    ap.add_argument("--weighted", action="store_true", help="also time --weighted counting")
    ap.add_argument("--keep", metavar="PATH", help="write the log here and keep it")
    args = ap.parse_args(argv)
    tmpdir = None
    if args.keep:
        path = args.keep
    else:
        tmpdir = tempfile.TemporaryDirectory(prefix="bench_plot_hist_")
        path = os.path.join(tmpdir.name, "moe_routes.jsonl")
    try:
        t0 = time.perf_counter()
        generate(path, args.lines)
        t_gen = time.perf_counter() - t0
        size = os.path.getsize(path)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min)")
        print(f"generated {args.lines:,} route lines ({size / 1e6:.0f} MB) in {t_gen:.1f} s: {path}")
        modes = [False, True] if args.weighted else [False]
        for weighted in modes:
            t0, c0 = time.perf_counter(), time.process_time()
            counts = plot_hist.load_routes(path, weighted=weighted)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"load_routes(weighted={weighted}): {dt:.2f} s wall, {args.lines / dt:,.0f} lines/s, "
                  f"{size / dt / 1e6:.0f} MB/s; {cpu:.2f} s CPU ({args.lines / cpu:,.0f} lines/CPU-s); "
                  f"records={counts.records:,} tokens={counts.tokens:,} "
                  f"requests={counts.requests:,} cached={counts.cached_records:,}")
            assert counts.records == args.lines
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
