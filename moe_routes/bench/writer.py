"""Writer micro-benchmark: route records/s of the patched vLLM routing-log writer on one core.

Drives the real writer (vllm/model_executor/layers/moe_routes_log.py, from the patched install) with synthetic
steps: capture check, KV-slot store update (fresh blocks invalidated, then the step stored), record formatting
and the append to a file, all in this thread.

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
    from vllm.model_executor.layers import moe_routes_log as ml

    rng = np.random.default_rng(0)
    n, L, K = a.tokens_per_step, a.layers, a.top_k
    per_req = np.full(a.requests_per_step, n // a.requests_per_step)
    per_req[: n - per_req.sum()] += 1
    block, num_slots = 16, 1 << 20
    requests = [ml.Request(str(i), None) for i in range(a.requests_per_step)]
    jobs = []
    for s in range(a.steps):
        pos = np.concatenate([np.arange(c) + s * c for c in per_req])
        slots = rng.integers(0, num_slots, n)
        jobs.append(
            ml.StepJob(
                requests=requests,
                counts=per_req.copy(),
                positions=pos,
                slots=slots,
                emit_from=np.zeros(len(per_req), np.int64),
                gap_blocks={},
                fresh_blocks=np.unique(slots[::block] // block),
                ids=rng.integers(0, a.experts, (n, L, K)).astype(np.int32),
                weights=rng.random((n, L, K)).astype(np.float32),
            )
        )
    with tempfile.TemporaryDirectory() as d:
        st = ml.WriterState(
            settings=ml.Settings(os.path.join(d, "bench.jsonl"), None),
            layers=list(range(L)),
            rows=list(range(L)),
            top_k=K,
            num_experts=a.experts,
            manager_block_size=block,
            kernel_block_size=block,
            num_slots=num_slots,
            meta={"type": "meta", "bench": True},
        )
        writer = ml.Writer(st)  # not started: everything runs in this thread
        fmt_rates, full_rates = [], []
        records = a.steps * n * L
        # Untimed first pass: the first touch of the KV-slot store's pages (hundreds of MB, allocated
        # lazily by the OS) is a one-time cost an engine pays while it fills its cache.
        for j in jobs:
            writer._write(writer._process(j))
        for _ in range(a.repeats):
            t_process = 0.0
            t0 = time.perf_counter()
            for j in jobs:  # as the writer thread does: process a step, append it
                t1 = time.perf_counter()
                blob = writer._process(j)
                t_process += time.perf_counter() - t1
                writer._write(blob)
            fmt_rates.append(records / t_process)
            full_rates.append(records / (time.perf_counter() - t0))
        size = os.path.getsize(st.settings.path) * a.repeats / (a.repeats + 1)
        os.close(writer.fd)
    print(
        f"shape: {a.experts} experts, top-{K}, {L} layers, {n} tokens/step, {a.steps} steps "
        f"({a.steps * n * L:,} records/repeat, {size / (a.repeats * a.steps * n * L):.0f} bytes/record)"
    )
    print(f"process (slot store + format): median {statistics.median(fmt_rates) / 1e6:.2f} M records/s")
    print(
        f"process + append to file:      median {statistics.median(full_rates) / 1e6:.2f} M records/s "
        f"(runs: {', '.join(f'{r / 1e6:.2f}' for r in full_rates)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
