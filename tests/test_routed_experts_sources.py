"""Routing returned per request (vLLM's enable_return_routed_experts contract) against the engine's own log.

Needs the engine venv (openai client, torch, the patched vLLM): runs in the full suite only.

* openai-python objects: moe_routes.routed_experts.from_choice on real openai.types objects (no engine).
* run_generate's http client path against a stand-in server speaking the contract (no engine).
* run_generate.py --routing-source offline / http on a tiny random GLM-4.5-style model (layer 0 dense, 1-2 MoE,
  routed_scaling_factor outside the kernel): moe_routes.jsonl equals the one of --routing-source log record for
  record (ids exact, weights within 1e-6, cached flags), timing.json says which source it measured, and the
  http source leaves no server behind. Each run_generate starts two engines (~30-60 s each on CPU); the runs
  are made once per module and only for the sources a selected test needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from routes_ref import GSM8K, PY, ROOT, RouteLog

from moe_routes import generate
from moe_routes.routed_experts import encode_npy_b64, from_choice, moe_layer_indices

ARCH = "glm4_moe"  # first_k_dense_replace=1: the returned arrays have a dense layer 0 (rows 0)
NUM_PROMPTS, MAX_TOKENS = 4, 8


def _arrays(T=6, L=3, K=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 8, size=(T, L, K)).astype(np.uint8)
    w = rng.uniform(0.1, 1.0, size=(T, L, K)).astype(np.float32)
    ids[:, 0], w[:, 0] = 0, 0.0
    return ids, w


def _routing_fields(ids, w, start=0):
    return {
        "routed_experts": encode_npy_b64(ids),
        "routed_expert_weights": encode_npy_b64(w),
        "routed_experts_prompt_start": start,
    }


# ---------------------------------------------------------------------------------------------------
# openai-python objects (no engine)
# ---------------------------------------------------------------------------------------------------
def test_from_choice_reads_openai_python_objects():
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    ids, w = _arrays()
    fields = _routing_fields(ids, w, 1)
    completion = Completion.model_validate(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length", **fields}],
        }
    )
    chat = ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop", **fields}
            ],
        }
    )
    chunk = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    last = ChatCompletionChunk.model_validate(
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", **fields}]}
    )
    for choice in (completion.choices[0], chat.choices[0], last.choices[0]):
        assert "routed_experts" in choice.model_extra
        r = from_choice(choice)
        np.testing.assert_array_equal(r.ids, ids)
        np.testing.assert_array_equal(r.weights, w)
        assert r.prompt_start == 1
    middle = ChatCompletionChunk.model_validate(
        {**chunk, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    )
    with pytest.raises(ValueError, match="final chunk"):
        from_choice(middle.choices[0])


# ---------------------------------------------------------------------------------------------------
# run_generate's http client path against a stand-in server (no engine)
# ---------------------------------------------------------------------------------------------------
class _FakeVllm(BaseHTTPRequestHandler):
    """/v1/completions as the patched server answers it: one choice, token ids, routing when `routed`."""

    routed = True
    bodies: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            n = len(self.bodies)
        prompt_ids = list(range(1, 1 + len(body["prompt"].split())))
        token_ids = list(range(100, 100 + body["max_tokens"]))
        choice = {"index": 0, "text": "t" * len(token_ids), "logprobs": None, "finish_reason": "length"}
        choice.update(prompt_token_ids=prompt_ids, token_ids=token_ids)
        if self.routed:
            ids, w = _arrays(T=len(prompt_ids) + len(token_ids) - 1, seed=len(prompt_ids))
            choice.update(_routing_fields(ids, w))
        resp = {
            "id": f"cmpl-{n}",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(token_ids),
                "total_tokens": len(prompt_ids) + len(token_ids),
                "prompt_tokens_details": {"cached_tokens": 1},
            },
        }
        data = json.dumps(resp).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_http_client_path_against_a_stand_in_server(tmp_path):
    import openai

    handlers = {
        mode: type(f"H{mode}", (_FakeVllm,), {"routed": mode == "log", "bodies": []}) for mode in ("log", "nolog")
    }
    servers = {mode: ThreadingHTTPServer(("127.0.0.1", 0), h) for mode, h in handlers.items()}
    for s in servers.values():
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        args = generate.parse_args(
            ["--model", str(tmp_path / "m"), "--routing-source", "http", "--repeats", "2", "--max-tokens", "4"]
            + ["--ignore-eos"]
        )
        clients = {
            mode: openai.OpenAI(base_url=f"http://127.0.0.1:{s.server_address[1]}/v1", api_key="x", max_retries=0)
            for mode, s in servers.items()
        }
        prompts = ["a b c", "a b c d e", "x y"]
        warmup, runs, outputs = generate.http_measure(args, clients, prompts)
    finally:
        for s in servers.values():
            s.shutdown()
    # warm-up + 2 runs per server, every prompt its own request, the extra_body keys top-level JSON
    for mode, h in handlers.items():
        assert len(h.bodies) == 3 * len(prompts) and len(runs[mode]) == 2 and warmup[mode]["wall_s"] > 0
        for body in h.bodies:
            assert body["return_token_ids"] is True and body["ignore_eos"] is True
            assert body["temperature"] == 0.0 and body["seed"] == 1234 and body["max_tokens"] == 4
        assert runs[mode][0]["generated_tokens"] == 3 * 4 and runs[mode][0]["prompt_tokens"] == 3 + 5 + 2
    gens, items = generate.http_completion_items(outputs["log"][0])
    assert [g["prompt_tokens"] for g in gens] == [3, 5, 2]  # answers stay in prompt order
    assert [it["num_tokens"] for it in items] == [7, 9, 6] and all(it["num_cached_tokens"] == 1 for it in items)
    assert [it["routed"].num_positions for it in items] == [6, 8, 5]
    cfg = {"model_type": "glm4_moe", "num_hidden_layers": 3, "n_routed_experts": 8, "num_experts_per_tok": 2}
    cfg["first_k_dense_replace"] = 1
    out = tmp_path / "moe_routes.jsonl"
    n = generate.write_returned_routes(
        args, out, types.SimpleNamespace(**cfg), items, engine_version="test", source="http"
    )
    log = RouteLog(out)
    log.validate_schema()
    assert n == (6 + 8 + 5) * 2 and log.meta["returned_via"] == "http"
    with pytest.raises(ValueError, match="--enable-return-routed-experts"):
        generate.http_completion_items(outputs["nolog"][0])


STUB_SERVER = r"""
import base64, io, json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import numpy as np

argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
routed = "--enable-return-routed-experts" in argv
if os.environ.get("STUB_FAIL_NOLOG") and not routed:
    print("stub: refusing to start (STUB_FAIL_NOLOG)", file=sys.stderr)
    sys.exit(5)
print("pid", os.getpid(), "argv", json.dumps(argv), flush=True)

def b64(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        p = list(range(3, 3 + len(body["prompt"].split())))
        g = list(range(7, 7 + body["max_tokens"]))
        choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}
        choice.update(prompt_token_ids=p, token_ids=g)
        if routed:
            rng = np.random.default_rng(len(p))
            ids = rng.integers(0, 8, size=(len(p) + len(g) - 1, 3, 2)).astype(np.uint8)
            w = rng.uniform(0.1, 1, size=ids.shape).astype(np.float32)
            ids[:, 0], w[:, 0] = 0, 0.0
            choice.update(routed_experts=b64(ids), routed_expert_weights=b64(w), routed_experts_prompt_start=0)
        usage = {"prompt_tokens": len(p), "completion_tokens": len(g), "total_tokens": len(p) + len(g)}
        data = json.dumps({"id": "cmpl-%d-%d" % (os.getpid(), len(p)), "object": "text_completion", "created": 0,
                           "model": body["model"], "choices": [choice], "usage": usage}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def stub_http_run(tmp_path, monkeypatch):
    """run_generate --routing-source http in this process, its two servers replaced by STUB_SERVER (no vLLM):
    a model directory with a GLM-4.5-style config (3 layers, layer 0 dense, 8 experts, top-2) and a tokenizer."""
    from moe_routes import tinymoe
    from moe_routes.prompts import read_questions

    model = tmp_path / "model"
    model.mkdir()
    cfg = tinymoe.make_config(
        "glm4_moe", vocab=512, hidden=64, layers=3, experts=8, top_k=2, heads=2, moe_inter=32, max_pos=512
    )
    cfg.save_pretrained(model)
    tinymoe.train_tokenizer(read_questions(GSM8K, 50), model, 512)
    stub = tmp_path / "stub_server.py"
    stub.write_text(STUB_SERVER)
    monkeypatch.setattr(
        generate, "server_command", lambda args, port, extra: [PY, str(stub), "--port", str(port), *extra]
    )
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="stub"))
    monkeypatch.delenv("VLLM_LOG_MOE", raising=False)
    out = tmp_path / "out"

    def run(*extra):
        argv = ["--routing-source", "http", "--model", str(model), "--prompts-file", str(GSM8K), "--num-prompts", "3"]
        argv += ["--max-tokens", "4", "--repeats", "2", "--server-timeout", "60", "--out-dir", str(out), *extra]
        return generate.main(argv)

    return run, out


def _stub_pids(out: Path) -> dict:
    pids = {}
    for mode in ("log", "nolog"):
        path = out / f"vllm_server_{mode}.log"
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.startswith("pid ")]
            if lines:
                pids[mode] = int(lines[0].split()[1])
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_run_generate_http_source_with_stand_in_servers(stub_http_run, capsys):
    run, out = stub_http_run
    assert run() == 0
    stdout = capsys.readouterr().out
    t = json.loads((out / "timing.json").read_text())
    assert t["routing_source"] == "http" and t["modes_meaning"] == generate.MODE_MEANING["http"]
    assert t["engine_version"] == "stub" and len(t["modes"]["log"]["runs"]) == 2
    assert t["tokens_identical_across_modes"] is True
    log = RouteLog(out / "moe_routes.jsonl")
    log.validate_schema()
    assert log.meta["returned_via"] == "http" and log.meta["moe_layers"] == [1, 2]
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    outputs = [
        {"request_id": g["req_id"], "prompt_token_ids": [0] * g["prompt_tokens"], "token_ids": g["token_ids"]}
        for g in gens
    ]
    log.check_exact_coverage(outputs)
    assert t["route_records"] == len(log.routes)
    assert "routing source http:" in stdout and generate.MODE_MEANING["http"]["log"] in stdout
    pids = _stub_pids(out)
    assert set(pids) == {"log", "nolog"} and not any(_alive(p) for p in pids.values())
    argv = {m: (out / f"vllm_server_{m}.log").read_text().splitlines()[0] for m in ("log", "nolog")}
    assert "--enable-return-routed-expert-weights" in argv["log"] and "--enable" not in argv["nolog"]


def test_run_generate_http_source_stops_the_first_server_when_the_second_fails(stub_http_run, monkeypatch):
    run, out = stub_http_run
    monkeypatch.setenv("STUB_FAIL_NOLOG", "1")
    with pytest.raises(SystemExit) as e:
        run()
    msg = str(e.value)
    assert "the nolog server exited with code 5" in msg and "stub: refusing to start" in msg, msg
    pids = _stub_pids(out)
    assert "log" in pids and not _alive(pids["log"])


# ---------------------------------------------------------------------------------------------------
# the real engines: run_generate.py per routing source
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_source(models, tmp_path_factory):
    """run_generate.py --routing-source SOURCE on the tiny model, once per source and module."""
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}
    # prompts of four GSM8K questions each (> 128 tokens, one full KV block): the measured run hits the
    # blocks its warm-up filled, so that cached flags are compared too
    from moe_routes.prompts import read_questions

    questions = read_questions(GSM8K, 4 * NUM_PROMPTS)
    long_prompts = tmp_path_factory.mktemp("prompts") / "long.jsonl"
    long_prompts.write_text(
        "".join(json.dumps({"question": " ".join(questions[4 * i : 4 * i + 4])}) + "\n" for i in range(NUM_PROMPTS))
    )

    def run(source: str):
        if source not in done:
            out = tmp_path_factory.mktemp(f"routing-{source}")
            env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
            env.pop("VLLM_LOG_MOE", None)
            cmd = [PY, str(ROOT / "run_generate.py"), "--routing-source", source, "--model", str(models[ARCH])]
            cmd += ["--prompts-file", str(long_prompts), "--num-prompts", str(NUM_PROMPTS)]
            cmd += ["--max-tokens", str(MAX_TOKENS)]
            cmd += ["--ignore-eos", "--repeats", "1", "--enforce-eager", "--dtype", "float32"]
            cmd += ["--max-model-len", "2048", "--out-dir", str(out)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            (out / "run_generate.log").write_text(proc.stdout + proc.stderr)
            done[source] = (out, proc)
        out, proc = done[source]
        assert proc.returncode == 0, f"--routing-source {source}:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
        return out, proc.stdout

    return run


def _by_question(out: Path) -> dict:
    """(question index, token_idx, layer) -> (ids, weights, cached); request ids differ between sources (offline
    numbering vs cmpl-... response ids), generations.jsonl maps them to the question order."""
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    index = {g["req_id"]: i for i, g in enumerate(gens)}
    log = RouteLog(out / "moe_routes.jsonl")
    assert not log.gaps and not log.errors and all(c == 1 for c in log.counts.values())
    routes = {(index[key], t, layer): v for (key, t, layer), v in log.routes.items()}
    return {"routes": routes, "meta": log.meta, "gens": gens, "log": log}


def _assert_same_routing(got: dict, want: dict, source: str) -> None:
    assert [g["token_ids"] for g in got["gens"]] == [g["token_ids"] for g in want["gens"]], "generated tokens differ"
    assert [g["prompt_tokens"] for g in got["gens"]] == [g["prompt_tokens"] for g in want["gens"]]
    missing, extra = set(want["routes"]) - set(got["routes"]), set(got["routes"]) - set(want["routes"])
    assert not missing and not extra, f"{source}: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    bad_ids, bad_cached, max_dw = [], [], 0.0
    for key, (ids, w, cached) in want["routes"].items():
        g_ids, g_w, g_cached = got["routes"][key]
        if g_ids != ids:
            bad_ids.append((key, ids, g_ids))
        if g_cached != cached:
            bad_cached.append((key, cached, g_cached))
        max_dw = max(max_dw, float(np.abs(np.float32(g_w) - np.float32(w)).max()))
    assert not bad_ids, f"{source}: {len(bad_ids)} records with other expert ids than the log, e.g. {bad_ids[:3]}"
    assert max_dw <= 1e-6, f"{source}: weights differ from the log's by up to {max_dw}"
    assert not bad_cached, f"{source}: cached flags differ from the log's, e.g. {bad_cached[:3]}"
    assert any(v[2] for v in want["routes"].values()), "no prefix-cache hit: the cached flags were not compared"
    for field in ("num_experts", "top_k", "num_hidden_layers", "moe_layers", "layers_logged", "model_id", "seed"):
        assert got["meta"][field] == want["meta"][field], field


@pytest.mark.parametrize("source", ["offline", "http"])
def test_returned_routing_equals_the_log(run_source, models, source):
    want = _by_question(run_source("log")[0])
    out, _ = run_source(source)
    got = _by_question(out)
    got["log"].validate_schema()
    assert got["meta"]["returned_via"] == source and "returned_via" not in want["meta"]
    assert got["meta"]["random_weights"] is True and want["meta"]["random_weights"] is True
    from transformers import AutoConfig

    assert got["meta"]["moe_layers"] == moe_layer_indices(AutoConfig.from_pretrained(models[ARCH])) == [1, 2]
    _assert_same_routing(got, want, source)
    # every position of every request, once per MoE layer
    outputs = [
        {"request_id": g["req_id"], "prompt_token_ids": [0] * g["prompt_tokens"], "token_ids": g["token_ids"]}
        for g in got["gens"]
    ]
    got["log"].check_exact_coverage(outputs)


@pytest.mark.parametrize("source", ["log", "offline", "offline-weights", "http"])
def test_timing_json_says_what_was_measured(run_source, source):
    out, stdout = run_source(source)
    t = json.loads((out / "timing.json").read_text())
    assert t["routing_source"] == source and t["modes_meaning"] == generate.MODE_MEANING[source]
    assert t["engine"] == "vllm" and t["tokens_identical_across_modes"] is True
    for mode in ("log", "nolog"):
        runs = t["modes"][mode]["runs"]
        assert len(runs) == 1 and runs[0]["generated_tokens"] == NUM_PROMPTS * MAX_TOKENS
        assert t["engine_startup_s"][mode] > 0 and t["warmup"][mode]["wall_s"] > 0
    ratio = t["modes"]["log"]["median_tokens_per_s"] / t["modes"]["nolog"]["median_tokens_per_s"]
    assert t["throughput_ratio_log_over_nolog"] == pytest.approx(ratio)
    assert t["route_records"] == sum(1 for _ in open(out / "moe_routes.jsonl")) - 1
    assert t["provenance"]["args"]["routing_source"] == source
    assert f"routing source {source}:" in stdout and generate.MODE_MEANING[source]["log"] in stdout


def test_http_source_leaves_no_server_behind(run_source):
    out, _ = run_source("http")
    for mode in ("log", "nolog"):
        first = (out / f"vllm_server_{mode}.log").read_text().splitlines()[0]
        assert first.startswith("$ ") and "vllm.entrypoints.openai.api_server" in first
        assert ("--enable-return-routed-experts" in first) == (mode == "log")
        port = int(first.split("--port ")[1].split()[0])
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"the {mode} server still listens on port {port}"
