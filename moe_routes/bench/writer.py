"""Writer micro-benchmark: route records/s of the patched vLLM routing log's formatting and file append on one
core, and the engine-side assembly of the same steps.

Drives the real code of the installed series (vllm/model_executor/layers/moe_routes_log.py) with synthetic steps:
the assembly the engine thread does per step (capture check, KV-slot store: fresh blocks invalidated, then the
step stored; the step's rows per request), then what the log's writer process does with the rows the front-end
hands it (record formatting, the append to a file under flock), all in this thread.

Examples:
  moe-routes bench writer                           # 60 experts, top-4, 24 layers (Qwen1.5-MoE shape)
  moe-routes bench writer --tokens-per-step 256 --steps 200   # decode-sized steps
  moe-routes bench writer --experts 256 --top-k 8 --layers 58  # DeepSeek-V3 shape
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--experts", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--requests-per-step", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from moe_routes.engine_source import load_vllm_log_module

    ml = load_vllm_log_module()
    rng = np.random.default_rng(0)
    n, L, K = a.tokens_per_step, a.layers, a.top_k
    per_req = np.full(a.requests_per_step, n // a.requests_per_step)
    per_req[: n - per_req.sum()] += 1
    block, num_slots = 16, 1 << 20
    requests = [ml.Request(str(i)) for i in range(a.requests_per_step)]
    fields = [ml.request_field(str(i), None) for i in range(a.requests_per_step)]
    jobs = []
    for s in range(a.steps):
        pos = np.concatenate([np.arange(c) + s * c for c in per_req])
        slots = rng.integers(0, num_slots, n)
        ids = rng.integers(0, a.experts, (n, L, K)).astype(ml.capture_dtype_for(a.experts))
        jobs.append(
            ml.StepJob(
                requests=requests,
                counts=per_req.copy(),
                positions=pos,
                slots=slots,
                emit_from=np.zeros(len(per_req), np.int64),
                gap_blocks={},
                fresh_blocks=np.unique(slots[::block] // block),
                ids=ids,
                weights=rng.random((n, L, K)).astype(np.float32),
            )
        )
    asm = ml.RouteAssembler(
        layers=list(range(L)), top_k=K, num_experts=a.experts, num_slots=num_slots, block_size=block, weights=True
    )
    layers = list(range(L))
    with tempfile.TemporaryDirectory() as d:
        log = ml.LogFile(os.path.join(d, "bench.jsonl"))
        stats = ml.new_stats()

        def chunks_of(rows):
            return [
                ml.Chunk(fields[b], None, rows.segments_of(b), rows.ids[o : o + c], rows.weights[o : o + c])
                for b, (o, c) in enumerate(zip(rows.offset.tolist(), rows.count.tolist(), strict=True))
            ]

        # Untimed first pass: the first touch of the KV-slot store's pages (hundreds of MB, allocated lazily by
        # the OS) is a one-time cost an engine pays while it fills its cache.
        for j in jobs:
            log.write(ml.format_chunks(chunks_of(ml.step_rows(asm.assemble(j, j.ids, j.weights))), layers, None, stats))
        asm_rates, fmt_rates, full_rates = [], [], []
        records = a.steps * n * L
        for _ in range(a.repeats):
            t_asm = t_fmt = 0.0
            t0 = time.perf_counter()
            for j in jobs:
                t1 = time.perf_counter()
                rows = ml.step_rows(asm.assemble(j, j.ids, j.weights))
                t2 = time.perf_counter()
                blob = ml.format_chunks(chunks_of(rows), layers, None, stats)
                t3 = time.perf_counter()
                log.write(blob)
                t_asm += t2 - t1
                t_fmt += t3 - t2
            asm_rates.append(records / t_asm)
            fmt_rates.append(records / t_fmt)
            full_rates.append(records / (time.perf_counter() - t0))
        size = os.path.getsize(log.path) * a.repeats / (a.repeats + 1)
        log.close()
    print(
        f"shape: {a.experts} experts, top-{K}, {L} layers, {n} tokens/step, {a.steps} steps "
        f"({a.steps * n * L:,} records/repeat, {size / (a.repeats * a.steps * n * L):.0f} bytes/record)"
    )
    print(
        f"engine: assembly (slot store, rows per request): median {statistics.median(asm_rates) / 1e6:.2f} M records/s"
    )
    print(f"writer: format:                               median {statistics.median(fmt_rates) / 1e6:.2f} M records/s")
    print(
        f"all, with the append to a file:               median {statistics.median(full_rates) / 1e6:.2f} M records/s "
        f"(runs: {', '.join(f'{r / 1e6:.2f}' for r in full_rates)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
