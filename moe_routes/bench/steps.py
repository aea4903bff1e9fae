"""Host work per engine step of the patched vLLM: what logging and the per-request return add to a step.

Drives the real hooks of the installed, patched vLLM (``vllm/model_executor/layers/moe_routes.py``) with
synthetic steps of a model shape (default DeepSeek-V3: 61 decoder layers, 58 MoE, 256 experts, top-8) on
CPU tensors, in one process, side by side with a run that has the feature off:

  engine   the engine thread's step: a fixed amount of pure-Python work standing in for a GPU step's host
           side (input preparation, scheduling; it holds the GIL, so anything else holding it slows the step
           down), then the hooks (step begin, after the forward, the ModelRunnerOutput: capture check, KV-slot
           store, the step's rows per request); a decode step of --decode-requests requests x 1 token and a
           prefill step of --prefill-tokens tokens. The log adds nothing else to the engine process: its
           records are written by a writer process the front-end starts.
  wire     one step's rows through the scheduler (a RoutesChunk per request), the frame the engine core's
           output thread packs, msgpack encoding and decoding as the engine core and the front-end do it
           (frames per step), and the front-end's hooks (returned rows gathered; the log's rows handed to a
           real writer process)
  finish   the front-end's work when a completion finishes: its rows concatenated and widened to every decoder
           layer, and base64 of the .npy files, for one completion of --finish-tokens positions; then the
           OpenAI server's part: that base64 inline on the event loop vs. awaited off the loop
           (encode_choice_routes), the longest the loop was blocked, and the JSON body

Modes: log (VLLM_LOG_MOE), ids (enable_return_routed_experts), weights (ids +
enable_return_routed_expert_weights), log+weights. "ms/step added" is the median step time with the mode on
minus the same with it off, measured alternately in this run.

Examples:
  moe-routes bench steps                               # DeepSeek-V3 shape, every mode, 256-request decode
  moe-routes bench steps --mode log --steps 200        # the log alone
  moe-routes bench steps --layers 24 --moe-layers 24 --experts 60 --top-k 4   # Qwen1.5-MoE shape
  moe-routes bench steps --python-work-ms 5            # a cheaper host side per step
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import types

import numpy as np

MODES = ("log", "ids", "weights", "log+weights")
DECODE_PROMPT = 16  # prompt tokens of each decode-scenario request (its first, untimed step)


def _python_work(units: int) -> int:
    """Pure-Python work holding the GIL (dict and list traffic like a scheduler's)."""
    acc, d = 0, {}
    for i in range(units):
        d[i & 1023] = i
        acc += len(d) + (i & 7)
    return acc


def _calibrate(ms: float) -> int:
    units = 20_000
    while True:
        t0 = time.perf_counter()
        _python_work(units)
        dt = time.perf_counter() - t0
        if dt > 0.02:
            return max(1, int(units * ms / 1e3 / dt))
        units *= 2


class _Kv:
    """A KV-cache allocator stand-in: per request a block list; a block is fresh when allocated."""

    def __init__(self, block_size: int) -> None:
        self.bs, self.next_block, self.blocks = block_size, 0, {}

    def grow(self, rid: str, upto: int) -> list[int]:
        blocks = self.blocks.setdefault(rid, [])
        fresh = []
        while len(blocks) * self.bs < upto:
            blocks.append(self.next_block)
            fresh.append(self.next_block)
            self.next_block += 1
        return fresh


class Scenario:
    """Requests of one kind of step: `reqs` requests scheduled `tokens` tokens each, every step."""

    def __init__(self, name: str, reqs: int, tokens: int, prompt: int, new_each_step: bool) -> None:
        self.name, self.reqs, self.tokens, self.prompt, self.new_each_step = name, reqs, tokens, prompt, new_each_step


def _engine(mr, args, mode: str, workdir: str):
    """A capture state built the way on_kv_cache_ready builds it, on CPU, and a runner stand-in."""
    import torch
    from vllm.model_executor.layers import moe_routes_log as ml

    n_hidden, moe = args.layers, list(range(args.layers - args.moe_layers, args.layers))
    log = "log" in mode
    returns = None if mode == "log" else mr.ReturnSettings(weights="weights" in mode)
    settings = ml.Settings(os.path.join(workdir, f"{mode}.jsonl"), None) if log else None
    max_tokens = max(args.prefill_tokens, args.decode_requests * DECODE_PROMPT)
    num_slots = args.kv_slots
    kw = dict(
        settings=settings,
        returns=returns,
        layers=moe,
        top_k=args.top_k,
        num_experts=args.experts,
        num_hidden_layers=n_hidden,
        max_tokens=max_tokens,
        device=torch.device("cpu"),
        kv_group=0,
        block_size=args.block_size,
        num_slots=num_slots,
        meta={"type": "meta", "bench": True, "writer": {"id": "bench"}},
    )
    st = mr.new_state(**kw)
    # An engine that has run a while has touched its whole KV-slot store (the OS maps its pages lazily); the
    # bench's KV "allocator" never recycles a block, so without this every step would pay first-touch faults.
    for store in (getattr(st.assembler, "store_ids", None), getattr(st.assembler, "store_w", None)):
        if store is not None:
            store.fill(0)
    runner = types.SimpleNamespace(_moe_routes_state=st)
    return st, runner


class _Forward:
    """What the MoE layers write during a forward: ids and weights of n tokens in every captured row (random
    routing drawn once, copied in each step)."""

    def __init__(self, st, rng) -> None:
        import torch

        layers, n = len(st.layers), st.max_tokens
        self.ids = torch.from_numpy(rng.integers(0, st.num_experts, (n, layers, st.top_k)).astype(np.int32))
        self.w = torch.from_numpy(rng.random((n, layers, st.top_k), dtype=np.float32))
        self.rows = list(getattr(st, "rows", range(layers)))
        self.contiguous = self.rows == list(range(self.rows[0], self.rows[0] + len(self.rows)))

    def run(self, st, n: int) -> None:
        sl = slice(self.rows[0], self.rows[-1] + 1) if self.contiguous else self.rows
        st.ids_buf[:n, sl] = self.ids[:n].to(st.ids_buf.dtype)
        if getattr(st, "w_buf", None) is not None:
            st.w_buf[:n, sl] = self.w[:n]


def run_steps(mr, args, mode: str | None, sc: Scenario, steps: int, units: int, workdir: str) -> dict:
    """Time `steps` engine steps of scenario `sc`; mode None: the feature off (the hooks are not called,
    as moe_routes.ENABLED is False in such an engine)."""
    from vllm.sampling_params import SamplingParams

    rng = np.random.default_rng(0)
    st = runner = forward = None
    if mode is not None:
        st, runner = _engine(mr, args, mode, workdir)
        forward = _Forward(st, rng)
    kv = _Kv(args.block_size)
    params = SamplingParams(max_tokens=1 << 20)
    live: dict[str, int] = {}  # request -> next position
    serial = 0
    times, hook_times = [], []
    for step in range(steps + 1):
        finished = []
        if sc.new_each_step or step == 0:
            finished = list(live)
            live = {}
            for _ in range(sc.reqs):
                live[f"r{serial}"] = 0
                serial += 1
        new_reqs, cached_ids, cached_blocks = [], [], []
        positions, counts, req_ids = [], [], []
        for rid, pos in live.items():
            c = sc.prompt if pos == 0 else sc.tokens
            fresh = kv.grow(rid, pos + c)
            p = np.arange(pos, pos + c, dtype=np.int64)
            positions.append(p)
            counts.append(c)
            req_ids.append(rid)
            if pos == 0:
                new_reqs.append(
                    types.SimpleNamespace(req_id=rid, sampling_params=params, block_ids=(fresh,), num_computed_tokens=0)
                )
            else:
                cached_ids.append(rid)
                cached_blocks.append((fresh,) if fresh else None)
            live[rid] = pos + c
        n = int(sum(counts))
        so = types.SimpleNamespace(
            finished_req_ids=set(finished),
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=types.SimpleNamespace(
                req_ids=cached_ids,
                new_block_ids=cached_blocks,
                resumed_req_ids=set(),
                num_computed_tokens=[live[r] - 1 for r in cached_ids],
            ),
            total_num_scheduled_tokens=n,
        )
        counts_np = np.asarray(counts, dtype=np.int32)
        first_np = np.asarray([p[0] for p in positions], dtype=np.int64)
        t0 = time.perf_counter()
        _python_work(units)  # the host side of a GPU step, holding the GIL
        th = time.perf_counter()
        hooks = 0.0
        if mode is not None:
            mr.on_step_begin(runner, so)
            t_fwd = time.perf_counter()
            forward.run(st, n)  # the forward itself: not counted
            t_after = time.perf_counter()
            mr.forward_done(runner, req_ids, counts_np, first_np, n)  # what each release's runner adapter calls
            out = types.SimpleNamespace(**{mr._release.RUNNER_OUTPUT_FIELD: None})  # the step's rows
            mr.on_model_runner_output(runner, out)
            t_end = time.perf_counter()
            hooks = (t_fwd - th) + (t_end - t_after)
        t1 = th + hooks
        if step > 0:  # step 0 is the first (prefill) step of a decode scenario, and warms caches
            times.append(t1 - t0)
            hook_times.append(hooks)
    return {"step_ms": 1e3 * statistics.median(times), "hook_ms": 1e3 * statistics.median(hook_times)}


def _step_rows(ml, args, reqs: int, tokens: int, weights: bool, rng) -> object:
    """One step's rows as the model runner hands them to the scheduler (moe_routes_log.StepRows): each request's
    positions 0 .. tokens-1."""
    n = reqs * tokens
    ids = rng.integers(0, args.experts, (n, args.moe_layers, args.top_k)).astype(ml.id_dtype_for(args.experts))
    w = rng.random(ids.shape, dtype=np.float32) if weights else None
    routes = ml.StepRoutes(
        [], [ml.Request(f"r{i}") for i in range(reqs)], np.repeat(np.arange(reqs), tokens),
        np.tile(np.arange(tokens), reqs), ids, w,
    )  # fmt: skip
    return ml.step_rows(routes)


def wire(mr, args, workdir: str) -> list[str]:
    """One step's rows from the scheduler to the front-end: the carrier output the scheduler adds per client,
    msgpack encode / decode (vLLM's encoder and decoder), the OutputProcessor's take of the rows (returned rows
    gathered; the log's handed to a real writer process with the log on)."""
    from vllm.model_executor.layers import moe_routes_log as ml
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    lines = []
    rng = np.random.default_rng(1)
    enc, dec = MsgpackEncoder(), MsgpackDecoder(EngineCoreOutputs)
    moe = list(range(args.layers - args.moe_layers, args.layers))
    for name, reqs, tokens in (
        ("decode", args.decode_requests, 1),
        ("prefill", max(1, args.prefill_tokens // 1024), min(1024, args.prefill_tokens)),
    ):
        for mode in ("ids", "weights", "log+weights"):
            rows = _step_rows(ml, args, reqs, tokens, mode != "ids", rng)
            meta = {
                "type": "meta",
                "num_hidden_layers": args.layers,
                "num_experts": args.experts,
                "top_k": args.top_k,
                "_capture": {
                    "layers": moe,
                    "log": [os.path.join(workdir, f"{name}-{mode}.jsonl"), None, "stop"] if "log" in mode else None,
                    "log_cols": None,
                    "returns": True,
                    "weights": mode != "ids",
                    "return_weights": mode != "ids",
                },
            }
            rows.meta = meta
            scheduler = types.SimpleNamespace()
            op = _OutputProcessor()
            op.request_states = {}
            for i in range(reqs):
                st = types.SimpleNamespace(parent_req=None, request_index=0, external_req_id=f"r{i}")
                mr.on_output_request(op, st, types.SimpleNamespace(sampling_params=_Params()))
                op.request_states[f"r{i}"] = st
            t_sched, t_enc, t_dec, t_front, frames = [], [], [], [], 0
            for rep in range(args.wire_repeats + 1):
                outs = {0: [EngineCoreOutput(request_id=f"r{i}", new_token_ids=[1]) for i in range(reqs)]}
                t0 = time.perf_counter()
                mr.attach_step(scheduler, outs, [rows])
                batch = EngineCoreOutputs(outputs=outs[0])
                t1 = time.perf_counter()
                bufs = enc.encode(batch)
                t2 = time.perf_counter()
                got = dec.decode(bufs)
                t3 = time.perf_counter()
                for eco in got.outputs:
                    if eco.moe_routes is not None:
                        mr.take_step_rows(op, eco.moe_routes)
                mr.end_of_outputs(op)
                t4 = time.perf_counter()
                for st in op.request_states.values():
                    st._moe_routes.returned = ml.ReturnedRows(0)
                frames = len(bufs)
                if rep:  # the first round starts the log's writer process
                    t_sched.append(t1 - t0)
                    t_enc.append(t2 - t1)
                    t_dec.append(t3 - t2)
                    t_front.append(t4 - t3)
                rows.meta = None
            fe = getattr(op, "_moe_routes", None)
            if fe is not None and fe.log is not None:
                fe.log.close()
            med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
            lines.append(
                f"  {name:7} {reqs:4d} req x {tokens:4d} tok, {mode:11}: scheduler {med(t_sched):6.3f} ms  "
                f"encode {med(t_enc):6.3f} ms  decode {med(t_dec):6.3f} ms  front-end {med(t_front):7.3f} ms  "
                f"frames/step {frames}"
            )
    return lines


class _OutputProcessor:
    """Stands in for vLLM's OutputProcessor (the hooks keep their state on it; it must be weakly referable)."""


class _Params:
    """The SamplingParams fields the front-end hook reads."""

    n = 1
    extra_args = None
    routed_experts_prompt_start = 0


def finish(mr, args) -> list[str]:
    """The front-end's work at the end of one completion of --finish-tokens positions that arrived one decode step
    at a time: the chunks concatenated, checked and widened to every decoder layer (CompletionOutput
    .routed_experts), and the base64 .npy of ids (and weights) for an OpenAI choice."""
    from vllm.model_executor.layers import moe_routes_log as ml

    lines = []
    rng = np.random.default_rng(2)
    dtype = ml.id_dtype_for(args.experts)
    t = args.finish_tokens
    layout = ml.Layout(list(range(args.layers - args.moe_layers, args.layers)), args.layers)
    for weights in (False, True):
        ids = rng.integers(0, args.experts, (t, args.moe_layers, args.top_k)).astype(dtype)
        w = rng.random(ids.shape, dtype=np.float32) if weights else None
        times_cat, times_b64 = [], []
        for _ in range(5):
            got = ml.ReturnedRows(0)
            for p in range(t):
                got.add([ml.COMPUTED, p, 1], ids[p : p + 1], None if w is None else w[p : p + 1])
            t0 = time.perf_counter()
            out_ids, out_w = got.take(layout, dtype, args.top_k, weights)
            t1 = time.perf_counter()
            choice = types.SimpleNamespace(__pydantic_extra__={})
            output = types.SimpleNamespace(routed_experts=out_ids, routed_expert_weights=out_w)
            request = types.SimpleNamespace(model_fields_set=set(), vllm_xargs=None)
            mr.add_choice_fields(choice, output, request)
            t2 = time.perf_counter()
            assert out_ids.shape == (t, args.layers, args.top_k)
            times_cat.append(t1 - t0)
            times_b64.append(t2 - t1)
        lines.append(
            f"  {t} positions, {'ids+weights' if weights else 'ids':11}: concatenate+widen "
            f"{1e3 * statistics.median(times_cat):7.2f} ms  base64 .npy {1e3 * statistics.median(times_b64):7.2f} ms"
        )
    return lines


def finish_http(mr, args) -> list[str]:
    """The OpenAI server's encoding of one finished completion of --finish-tokens positions (ids + weights, then
    ids alone) into its choice, in one event loop: wall ms, the CPU time of the event-loop thread (what the
    loop spent on it), and in a second run the longest the loop could not run meanwhile (a ticker coroutine's
    largest gap between two turns; on a shared VM it includes the OS scheduler's preemptions). "inline" is
    add_choice_fields on the loop (the series before issue 17 did only that); "off-loop" awaits
    encode_choice_routes first, as the serving code does now, then add_choice_fields reads the cached strings.
    "json" is the response body's json.dumps (Starlette's JSONResponse), which stays on the loop, upstream
    too."""
    import asyncio
    import json

    rng = np.random.default_rng(3)
    dtype = np.uint8 if args.experts <= 256 else np.uint16
    t = args.finish_tokens
    shape = (t, args.layers, args.top_k)
    request = types.SimpleNamespace(model_fields_set=set(), vllm_xargs=None)
    lines = []

    async def timed(fn, ticker: bool) -> tuple[float, float]:
        """ticker False: (wall, CPU time of the event-loop thread); True: (wall, its longest stall)."""
        done, worst = False, 0.0

        async def tick():
            nonlocal worst
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0)
                now = time.perf_counter()
                worst, last = max(worst, now - last), now

        task = asyncio.ensure_future(tick()) if ticker else None
        await asyncio.sleep(0)
        c0, t0 = time.thread_time(), time.perf_counter()
        await fn()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        done = True
        if task is not None:
            await task
        return wall, worst if ticker else cpu

    for weights in (True, False):
        ids = rng.integers(0, args.experts, shape).astype(dtype)
        w = rng.random(shape, dtype=np.float32) if weights else None
        label = f"{t} positions, {'ids+weights' if weights else 'ids':11}"
        mb = (ids.nbytes + (0 if w is None else w.nbytes)) / 1e6
        modes = [("inline", False)] + ([("off-loop", True)] if hasattr(mr, "encode_choice_routes") else [])
        for name, off_loop in modes:
            walls, cpus, worsts = [], [], []

            async def repeats(off_loop, ids, w, walls, cpus, worsts):  # one event loop, as in a server
                body = None
                for i in range(args.finish_repeats + 1):
                    for ticker in (False, True):
                        output = types.SimpleNamespace(routed_experts=ids, routed_expert_weights=w)
                        choice = types.SimpleNamespace(__pydantic_extra__={})

                        async def run(output=output, choice=choice, off_loop=off_loop):
                            if off_loop:
                                await mr.encode_choice_routes(output)
                            mr.add_choice_fields(choice, output, request)

                        wall, x = await timed(run, ticker)
                        if i:  # the first round starts the executor's thread
                            (worsts if ticker else cpus).append(x)
                            if not ticker:
                                walls.append(wall)
                        body = choice.__pydantic_extra__
                return body

            body = asyncio.run(repeats(off_loop, ids, w, walls, cpus, worsts))
            med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
            lines.append(
                f"  {label} ({mb:5.1f} MB): {name:8} wall {med(walls):6.2f} ms, event-loop thread CPU "
                f"{med(cpus):6.2f} ms, longest loop stall {med(worsts):6.2f} ms"
            )
        t_json = []
        for _ in range(args.finish_repeats):
            t0 = time.perf_counter()
            json.dumps({"choices": [body]}, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
            t_json.append(time.perf_counter() - t0)
        lines.append(f"  {label}: json response body {1e3 * statistics.median(t_json):7.2f} ms (on the loop)")
    try:
        import pybase64

        lines.append(
            f"  base64: pybase64 {pybase64.__version__} (installed; the series before issue 17 used the stdlib)"
        )
    except ImportError:
        lines.append("  base64: the stdlib (pybase64 not installed)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--layers", type=int, default=61, help="decoder layers (default: DeepSeek-V3's 61)")
    ap.add_argument("--moe-layers", type=int, default=58, help="the last N decoder layers are MoE (default 58)")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-slots", type=int, default=1 << 20, help="KV slots of the prefix-cache routing store")
    ap.add_argument("--decode-requests", type=int, default=256)
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--finish-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per scenario and mode")
    ap.add_argument("--wire-repeats", type=int, default=20)
    ap.add_argument("--finish-repeats", type=int, default=7, help="repeats of each finish measurement (medians)")
    ap.add_argument("--python-work-ms", type=float, default=10.0, help="host-side Python per step (GIL held)")
    ap.add_argument("--mode", action="append", choices=MODES, help="repeatable (default: every mode)")
    ap.add_argument("--skip", action="append", default=[], choices=("engine", "wire", "finish"))
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from vllm.model_executor.layers import moe_routes as mr

    mr._activate()  # this process plays an engine (and its front-end) with the feature on
    modes = list(dict.fromkeys(a.mode or MODES))
    print(
        f"shape: {a.layers} decoder layers ({a.moe_layers} MoE), {a.experts} experts, top-{a.top_k}; "
        f"block size {a.block_size}; {a.kv_slots:,} KV slots; series: {mr._patch_provenance()[0]}"
    )
    if "engine" not in a.skip:
        units = _calibrate(a.python_work_ms)
        scenarios = [
            Scenario("decode", a.decode_requests, 1, DECODE_PROMPT, False),
            Scenario("prefill", max(1, a.prefill_tokens // 1024), 0, min(1024, a.prefill_tokens), True),
        ]
        print(f"engine step: {a.python_work_ms:g} ms of host Python, then the hooks; medians of {a.steps} steps")
        with tempfile.TemporaryDirectory() as work:
            for sc in scenarios:
                steps = a.steps if sc.name == "decode" else max(5, a.steps // 6)
                for mode in modes:  # untimed: first-use costs (imports, the allocator's first pages)
                    run_steps(mr, a, mode, sc, 3, units, work)
                label = f"{sc.reqs} requests x {sc.tokens or sc.prompt} tokens"
                for mode in modes:
                    on, off = [], []
                    for _ in range(2):  # alternate: off, on, off, on
                        off.append(run_steps(mr, a, None, sc, steps, units, work))
                        on.append(run_steps(mr, a, mode, sc, steps, units, work))
                    step_on = statistics.median(r["step_ms"] for r in on)
                    step_off = statistics.median(r["step_ms"] for r in off)
                    hook = statistics.median(r["hook_ms"] for r in on)
                    print(
                        f"  {sc.name:7} ({label}) {mode:11}: step {step_off:8.3f} -> {step_on:8.3f} ms, "
                        f"added {step_on - step_off:+7.3f} ms/step ({100 * (step_on / step_off - 1):+5.1f} %), "
                        f"hooks in the engine thread {hook:7.3f} ms"
                    )
    if "wire" not in a.skip:
        print("one step's rows, scheduler (carrier) -> msgpack -> front-end (OutputProcessor, log writer):")
        with tempfile.TemporaryDirectory() as work:
            for line in wire(mr, a, work):
                print(line)
    if "finish" not in a.skip:
        print("front-end at a completion's finish:")
        for line in finish(mr, a):
            print(line)
        print("OpenAI server at a completion's finish (base64 into the choice; event loop):")
        for line in finish_http(mr, a):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
