"""Test helpers: read a moe_routes.jsonl, check coverage, and compute reference routing with HF transformers.

The reference is independent of vLLM: the HF model recomputes the hidden states for prompt + output, a
forward pre-hook on each router (`gate`) module captures its input, and the routing rule of each model
family is written out here from the model's published definition (softmax/sigmoid, top-k, groups,
renormalisation, scaling).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from engine_modules import vllm_pin

from moe_routes import vllm_args
from moe_routes.generate import VllmServer, free_port, server_cli_args
from moe_routes.prompts import SHARED_GSM8K, read_questions
from moe_routes.schema import load_schema

ROOT = Path(__file__).resolve().parent.parent
GSM8K = SHARED_GSM8K
DRIVER = ROOT / "tests" / "vllm_driver.py"
PY = os.environ.get("MOE_ROUTES_TEST_PYTHON") or sys.executable


# LLM kwargs of an engine that returns routing per request, weights included
ROUTES = {"enable_return_routed_experts": True, "enable_return_routed_expert_weights": True}


def engine_defaults() -> dict:
    """The LLM kwargs every test engine of the pin under test gets on CPU (moe_routes/vllm_args.py, e.g. 0.32.0's
    block_size and gpu_memory_utilization): drive / drive_dp / serve add them; a test that builds an engine
    itself passes them too (`LLM(..., **engine_defaults())`)."""
    return vllm_args.engine_defaults(vllm_pin(), "cpu")


def _spec(model, runs: list[dict]) -> str:
    return json.dumps({"model": str(model), "pin": vllm_pin(), "engine_defaults": engine_defaults(), "runs": runs})


def gsm8k_questions(n: int) -> list[str]:
    return read_questions(GSM8K, n)


def shared_prefix_prompts(model_dir: str | Path) -> dict[str, list[list[int]]]:
    """Token-id prompts of the same-step prefix-hit scenario (run "fill" then "shared" on an engine with 15 KV
    blocks of 128 and max_num_seqs 16): "fill" = 7 unrelated requests whose 249 + 8 - 1 = 256 computed
    positions fill exactly two KV blocks each; "shared" = 8 requests behind a 300-token system prompt (two
    full blocks); on an in-process engine core, generate() queues them all before the first step, so the
    first step holds the first (which allocates and registers the system-prompt blocks) and those after it
    that fit, which hit those blocks in the same step; "long" = 4 prompts > 128 tokens (n > 1, chunked prefill)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(q)["input_ids"] for q in gsm8k_questions(80)]
    system = [t for q in ids[40:50] for t in q][:300]
    return {
        "fill": [(q * 8)[:249] for q in ids[:7]],
        "shared": [system + q for q in ids[50:58]],
        "long": [[t for q in ids[60 + 3 * i : 63 + 3 * i] for t in q] * 2 for i in range(4)],
        "first": ids[0],
    }


# tests/cpu_shims: test-only shims loaded by its sitecustomize in every process of a run that asks for them:
# v2_on_cpu (vLLM 0.32.0's Model Runner V2 on CPU, Triton's interpreter) and cpu_collectives (the collectives
# vLLM 0.32.0's CPU communicator lacks for data parallelism)
CPU_SHIMS = Path(__file__).resolve().parent / "cpu_shims"


# A CPU worker on one OpenMP thread, unbound: the automatic core binding wants a NUMA node per worker (TP, DP),
# and on a 2-core machine a worker on every core starves the API server's event loop (a request to it waits
# until the decoding ends)
ONE_THREAD_CPU_WORKER = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def _with_cpu_shims(flags: dict[str, str]) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(CPU_SHIMS), os.environ.get("PYTHONPATH", "")) if p)
    return {**flags, "PYTHONPATH": path}


def runner_env(runner: str) -> dict[str, str]:
    """The environment of a driver process whose engines use `runner`: "v1" (the CPU build's default, the V1-based
    CPUModelRunner) or "v2" (Model Runner V2, the GPU default of vLLM 0.32.0: the shim goes on PYTHONPATH, so
    that the driver and its spawned engine cores import it before vLLM)."""
    if runner == "v1":
        return {}
    assert runner == "v2", runner
    return _with_cpu_shims({"MOE_ROUTES_V2_ON_CPU": "1", "VLLM_USE_V2_MODEL_RUNNER": "1"})


def drive(
    model: str | Path,
    runs: list[dict],
    workdir: Path,
    timeout: int = 900,
    extra_env: dict | None = None,
    runner: str = "v1",
):
    """Run tests/vllm_driver.py in a fresh interpreter; returns the per-run result dicts. runner: see runner_env."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec, out = workdir / "spec.json", workdir / "result.json"
    spec.write_text(_spec(model, runs))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_LOG_MOE", None)
    env.pop("VLLM_LOG_MOE_LAYERS", None)
    env.update(runner_env(runner))
    env.update(extra_env or {})
    proc = subprocess.run(
        [PY, str(DRIVER), "--spec", str(spec), "--out", str(out)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (workdir / "driver.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"driver failed rc={proc.returncode}\n{proc.stderr[-4000:]}")
    results = json.loads(out.read_text())["runs"]
    return results, proc.stdout + proc.stderr


def completion_key(req_id: str, completion_index: int | None = None, dp_rank: int | None = None) -> str:
    """One key per completion: under data parallelism each rank's caller numbers its own requests (key
    them by rank), and a request with n > 1 has several completions."""
    key = req_id if dp_rank is None else f"dp{dp_rank}/{req_id}"
    return key if completion_index is None else f"{key}#{completion_index}"


def request_key(rec: dict) -> str:
    return completion_key(rec["req_id"], rec.get("completion_index"), rec.get("dp_rank"))


def output_key(out: dict) -> str:
    """The key of a driver output (one completion): request_id, plus completion_index when n > 1."""
    return completion_key(out["request_id"], out.get("completion_index"))


def dp_outputs(results: list[dict]) -> list[dict]:
    """Every DP rank's driver outputs (drive_dp's results, in rank order), each request id keyed by its rank as
    the log keys it (completion_key)."""
    return [
        dict(o, request_id=completion_key(o["request_id"], dp_rank=rank))
        for rank, r in enumerate(results)
        for o in r["outputs"]
    ]


def drive_dp(
    model: str | Path, runs_per_rank: list[dict], workdir: Path, timeout: int = 900, runner: str = "v1"
) -> list[dict]:
    """vLLM's offline data-parallel mode: one driver process per DP rank, started together, each with the
    VLLM_DP_* environment (as vLLM's examples/offline_inference/data_parallel.py does); on vLLM 0.32.0 with the
    collectives its CPU communicator lacks (tests/cpu_shims/cpu_collectives.py). runner: see runner_env. Returns
    each rank's run result."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, size = free_port(), len(runs_per_rank)
    procs = []
    for rank, run in enumerate(runs_per_rank):
        spec, out = workdir / f"spec{rank}.json", workdir / f"result{rank}.json"
        spec.write_text(_spec(model, [run]))
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOG_MOE", "VLLM_LOG_MOE_LAYERS")}
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_DP_SIZE=str(size),
            VLLM_DP_RANK=str(rank),
            VLLM_DP_RANK_LOCAL=str(rank),
            VLLM_DP_MASTER_IP="127.0.0.1",
            VLLM_DP_MASTER_PORT=str(port),
            **ONE_THREAD_CPU_WORKER,
        )
        env.update(runner_env(runner))
        if vllm_pin() != "0.15.1":  # 0.32.0's CPU communicator has no all_gatherv / reduce_scatterv
            env.update(_with_cpu_shims({"MOE_ROUTES_CPU_COLLECTIVES": "1"}))
        log = open(workdir / f"driver{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [PY, str(DRIVER), "--spec", str(spec), "--out", str(out)],
                    cwd=workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                out,
                log,
            )
        )
    results = []
    try:
        for rank, (proc, out, log) in enumerate(procs):
            rc = proc.wait(timeout=timeout)
            log.close()
            if rc != 0 or not out.exists():
                tail = (workdir / f"driver{rank}.log").read_text()[-4000:]
                raise AssertionError(f"DP rank {rank} driver failed rc={rc}\n{tail}")
            results.append(json.loads(out.read_text())["runs"][0])
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@contextlib.contextmanager
def serve(model: str | Path, workdir: Path, env: dict | None = None, args: tuple[str, ...] = (), timeout: int = 600):
    """A real `vllm serve` (its module entry point: vllm_args.vllm_entry_point) on localhost (CPU, eager, fp32),
    run by run_generate's VllmServer; yields an `openai` client. Stopping it with SIGINT shuts the engine down the
    way an operator does, which drains the routing log writer. Its output goes to workdir/serve.log."""
    import openai

    port = free_port()
    cmd = [*vllm_args.vllm_entry_point(PY, "serve"), "--model", str(model), "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--seed", "1234"]
    cmd += [*server_cli_args(engine_defaults()), *args]
    workdir.mkdir(parents=True, exist_ok=True)
    run_env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    server = VllmServer("test", cmd, port, workdir / "serve.log", env=run_env)
    try:
        server.wait_healthy(timeout)
        yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=300)
    finally:
        server.stop(grace=120)


class RouteLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metas: list[dict] = []
        self.gaps: list[dict] = []
        self.errors: list[dict] = []
        self.routes: dict[tuple[str, int, int], tuple[list[int], list[float], bool]] = {}
        self.line_of: dict[tuple[str, int, int], int] = {}  # where a key was (last) logged
        self.counts: Counter = Counter()
        raw = self.path.read_bytes()
        assert raw.endswith(b"\n"), "log does not end with a whole line"
        for lineno, line in enumerate(raw.decode().splitlines(), 1):
            rec = json.loads(line)
            if lineno == 1:
                assert rec["type"] == "meta", "line 1 is not a meta record"
            if rec["type"] == "meta":
                self.metas.append(rec)
            elif rec["type"] == "gap":
                self.gaps.append(rec)
            elif rec["type"] == "error":
                self.errors.append(rec)
            else:
                key = (request_key(rec), rec["token_idx"], rec["layer"])
                self.counts[key] += 1
                self.line_of[key] = lineno
                self.routes[key] = (rec["topk_ids"], rec["topk_weights"], rec.get("cached", False))

    @property
    def meta(self) -> dict:
        return self.metas[0]

    def validate_schema(self) -> int:
        import jsonschema

        validator = jsonschema.Draft202012Validator(load_schema())
        n = 0
        with open(self.path) as f:
            for line in f:
                validator.validate(json.loads(line))
                n += 1
        return n

    def check_exact_coverage(self, outputs: list[dict]) -> None:
        """Every finished request: positions 0..P+G-2 once per logged layer, nothing else."""
        dups = [k for k, c in self.counts.items() if c != 1]
        assert not dups, f"{len(dups)} (req, pos, layer) keys logged more than once, e.g. {dups[:3]}"
        layers = self.meta["layers_logged"]
        expected = set()
        for o in outputs:
            n_pos = len(o["prompt_token_ids"]) + len(o["token_ids"]) - 1
            expected.update((output_key(o), p, layer) for p in range(n_pos) for layer in layers)
        got = set(self.routes)
        missing, extra = expected - got, got - expected
        assert not missing, f"{len(missing)} positions missing, e.g. {sorted(missing)[:5]}"
        assert not extra, f"{len(extra)} unexpected records, e.g. {sorted(extra)[:5]}"
        assert not self.gaps, f"gap records: {self.gaps[:3]}"
        assert not self.errors, f"error records: {self.errors[:3]}"

    def hits_in_the_computing_step(self, computing_req: str) -> set[str]:
        """Requests with prefix-cache hits logged before `computing_req`'s position 0. The writer writes steps
        in order and a step's cached records before its computed ones, so a hit on blocks that `computing_req`
        allocates and fills is logged before that position only if it came in the same step."""
        first = min(line for (req, pos, _), line in self.line_of.items() if req == computing_req and pos == 0)
        return {k[0] for k, v in self.routes.items() if v[2] and self.line_of[k] < first}

    def per_request(self, req_id: str, n_pos: int, layers: list[int]):
        ids = np.array([[self.routes[(req_id, p, layer)][0] for layer in layers] for p in range(n_pos)])
        w = np.array([[self.routes[(req_id, p, layer)][1] for layer in layers] for p in range(n_pos)], dtype=np.float64)
        return ids, w


class ReturnedRoutes:
    """CompletionOutput.routed_experts / .routed_expert_weights a driver run saved (tests/vllm_driver.py
    "save_routes"), shaped like RouteLog for compare_with_reference. key_prefix: e.g. "dp1/" for a DP rank."""

    def __init__(self, path, layers: list[int], key_prefix: str = ""):
        with np.load(path) as z:
            self.ids = {key_prefix + k[4:]: z[k] for k in z.files if k.startswith("ids/")}
            self.weights = {key_prefix + k[8:]: z[k] for k in z.files if k.startswith("weights/")}
            self.none = {key_prefix + k[5:] for k in z.files if k.startswith("none/")}
        self.meta = {"layers_logged": layers}

    def per_request(self, key: str, n_pos: int, layers: list[int]):
        ids, w = self.ids[key], self.weights[key]
        assert ids.ndim == 3 and ids.shape[0] == n_pos, (key, ids.shape, n_pos)
        return ids[:, layers].astype(np.int64), w[:, layers].astype(np.float64)


def returned_equal_to_log(routes: ReturnedRoutes, log: RouteLog, outputs: list[dict], start: int = 0) -> None:
    """Record for record: every (position, layer) the log holds for a completion is the array's row."""
    layers = log.meta["layers_logged"]
    for o in outputs:
        key = output_key(o)
        n_pos = len(o["prompt_token_ids"]) + len(o["token_ids"]) - 1
        ids, w = log.per_request(key, n_pos, layers)
        np.testing.assert_array_equal(routes.ids[key][:, layers], ids[start:])
        np.testing.assert_array_equal(routes.weights[key][:, layers], w[start:].astype(np.float32))


def router_modules(model) -> dict[int, object]:
    """{decoder layer: its router module}: the `gate` / `router` child of the layer's MoE block (a 2-D `weight`
    of [num_experts, hidden]). transformers 4.57 (vLLM 0.15.1's environment): nn.Linear, or a TopkRouter module
    for GLM-4.5 / gpt-oss; 5.x (0.32.0's): a *TopKRouter module in every family (Mixtral's block is then
    `mlp`, no longer `block_sparse_moe`). Either way its first argument is the router's input."""
    gates: dict[int, object] = {}
    for name, mod in model.named_modules():
        if (
            name.endswith((".gate", ".router"))
            and ".layers." in name
            and getattr(mod, "weight", None) is not None
            and mod.weight.dim() == 2
        ):
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert layer not in gates, f"two router modules in decoder layer {layer}: {name}"
            gates[layer] = mod
    return gates


def reference_routing(model_dir: Path, sequences: list[list[int]], layers: list[int]):
    """HF transformers routing for each sequence: list of (ids [T, L, K], weights [T, L, K]).
    tests/test_routes_ref.py checks it against an independent calculation and HF's own routing."""
    import torch
    import transformers as tf

    # `dtype` (transformers >= 4.56; 5.x deprecates `torch_dtype`)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    gates = router_modules(model)
    assert set(layers) <= set(gates), (layers, sorted(gates))
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        gates[layer].register_forward_pre_hook(
            lambda m, args, layer=layer: captured.__setitem__(layer, args[0].detach())
        )
        for layer in layers
    ]
    out = []
    try:
        with torch.no_grad():
            for seq in sequences:
                captured.clear()
                model(torch.tensor([seq]))
                per_layer = [
                    route_rule(cfg, captured[layer].reshape(-1, captured[layer].shape[-1]).float(), gates[layer])
                    for layer in layers
                ]
                out.append((np.stack([p[0] for p in per_layer], 1), np.stack([p[1] for p in per_layer], 1)))
    finally:
        for h in hooks:
            h.remove()
    return out


def route_rule(cfg, hidden, gate):
    """The published routing rule of each model family, from the router's input."""
    import torch

    logits = hidden @ gate.weight.float().T
    if getattr(gate, "bias", None) is not None:
        logits = logits + gate.bias.float()
    mt = cfg.model_type
    if mt == "gpt_oss":
        values, ids = torch.topk(logits, cfg.num_experts_per_tok, dim=-1)
        return ids.numpy(), torch.softmax(values, dim=-1).numpy()
    if mt in ("qwen2_moe", "qwen3_moe", "mixtral"):
        k = cfg.num_experts_per_tok
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        renorm = True if mt == "mixtral" else bool(cfg.norm_topk_prob)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        return ids.numpy(), w.numpy()
    if mt == "glm4_moe":
        k, n_group, topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        scores = torch.sigmoid(logits)
        biased = scores + gate.e_score_correction_bias.float()
        t, e = biased.shape
        group_scores = biased.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
        keep_groups = group_scores.topk(topk_group, dim=-1)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, keep_groups, 1.0)
        mask = mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        ids = biased.masked_fill(mask == 0, float("-inf")).topk(k, dim=-1)[1]
        w = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return ids.numpy(), (w * cfg.routed_scaling_factor).numpy()
    raise NotImplementedError(mt)


def compare_with_reference(log: RouteLog, model_dir: Path, outputs: list[dict], weight_scale: float = 1.0) -> dict:
    """Agreement of logged routing with the HF reference over every (token, layer) of every request.

    weight_scale: factor between the HF routing weights and the weights the vLLM kernel applies (vLLM
    models that scale the MoE output by routed_scaling_factor outside the kernel)."""
    layers = log.meta["layers_logged"]
    seqs = [o["prompt_token_ids"] + o["token_ids"][:-1] for o in outputs]
    refs = [(i, w * weight_scale) for i, w in reference_routing(model_dir, seqs, layers)]
    total = agree = 0
    max_w = 0.0
    for o, seq, (ref_ids, ref_w) in zip(outputs, seqs, refs, strict=True):
        ids, w = log.per_request(output_key(o), len(seq), layers)
        order_log = np.argsort(ids, -1)
        order_ref = np.argsort(ref_ids, -1)
        ids_s = np.take_along_axis(ids, order_log, -1)
        ref_s = np.take_along_axis(ref_ids, order_ref, -1)
        same = (ids_s == ref_s).all(-1)
        total += same.size
        agree += int(same.sum())
        if same.any():
            dw = np.abs(np.take_along_axis(w, order_log, -1) - np.take_along_axis(ref_w, order_ref, -1))[same]
            max_w = max(max_w, float(dw.max()))
    return {"entries": total, "id_agreement": agree / total, "max_weight_diff": max_w}


def assert_agrees_with_reference(
    log, model_dir: Path, outputs: list[dict], weight_scale: float = 1.0, floor: float = 0.999
) -> dict:
    """compare_with_reference, asserted: the expert sets agree on >= `floor` of the (token, layer) entries (the
    issue's floor is 99.9 %; fp32 on both sides gives 100 %) and the weights within 1e-4. `log`: a RouteLog or
    ReturnedRoutes."""
    agreement = compare_with_reference(log, model_dir, outputs, weight_scale)
    assert agreement["id_agreement"] >= floor, agreement
    assert agreement["max_weight_diff"] <= 1e-4, agreement
    return agreement
