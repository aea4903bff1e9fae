"""run_generate --rounds: each round starts both engines afresh, round 2 in the other order; timing.json pools the
rounds' runs and says each round's ratio. Through run_vllm itself, with a stand-in `vllm` package (no engine)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from moe_routes import generate

pytestmark = pytest.mark.fast

FAKE_VLLM = """
import json, os, itertools
__version__ = "0.32.0"
EVENTS = []  # ("start", mode, log path) per LLM(...), ("generate", id(llm)) per call

class SamplingParams:
    def __init__(self, **kw):
        self.max_tokens = kw["max_tokens"]

class _Completion:
    def __init__(self, ids):
        self.token_ids, self.text = ids, "x" * len(ids)

class _Output:
    def __init__(self, rid, prompt, ids):
        self.request_id, self.prompt_token_ids, self.num_cached_tokens = rid, prompt, 0
        self.outputs = [_Completion(ids)]

class _Core:
    def shutdown(self):
        EVENTS.append(("shutdown",))

class _Engine:
    def __init__(self):
        self.engine_core = _Core()
        self.model_config = type("M", (), {"hf_config": {"model_type": "qwen2_moe"}})()

class LLM:
    def __init__(self, **kw):
        self.log = os.environ.get("VLLM_LOG_MOE")
        self.llm_engine, self.ids = _Engine(), itertools.count()
        EVENTS.append(("start", "log" if self.log else "nolog", self.log))
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"type": "meta", "schema_version": 2}, separators=(",", ":")) + "\\n")

    def get_tokenizer(self):
        return type("T", (), {"chat_template": None})()

    def generate(self, prompts, sp, use_tqdm=False):
        EVENTS.append(("generate", "log" if self.log else "nolog"))
        outs = []
        for p in prompts:
            rid = str(next(self.ids))
            outs.append(_Output(rid, [1, 2, 3], [7] * sp.max_tokens))
            if self.log:
                with open(self.log, "a") as f:
                    for pos in range(3 + sp.max_tokens - 1):
                        f.write(json.dumps({"type": "route", "req_id": rid, "token_idx": pos, "layer": 0,
                                            "topk_ids": [0], "topk_weights": [1.0]}, separators=(",", ":")) + "\\n")
        return outs
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    root = tmp_path / "site"
    layers = root / "vllm" / "model_executor" / "layers"
    layers.mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (root / "vllm" / "model_executor" / "__init__.py").write_text("")
    (layers / "__init__.py").write_text("")
    (layers / "moe_routes_log.py").write_text("")  # "patched"
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="0.0-test", cuda=cuda))
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=lambda it, **kw: it))
    monkeypatch.delenv("VLLM_LOG_MOE", raising=False)
    import vllm

    return vllm


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(3)))
    argv = ["--model", str(tmp_path / "m"), "--prompts-file", str(prompts), "--num-prompts", "3", "--max-tokens", "4"]
    assert generate.main([*argv, "--repeats", "2", "--out-dir", str(out), *extra]) == 0
    return out, json.loads((out / "timing.json").read_text())


def test_two_rounds_swap_the_start_order_and_pool_the_runs(tmp_path, fake_vllm):
    out, t = _run(tmp_path, "--rounds", "2")
    starts = [e[1] for e in fake_vllm.EVENTS if e[0] == "start"]
    assert starts == ["log", "nolog", "nolog", "log"]  # round 2 starts the no-log engine first
    logs = [e[2] for e in fake_vllm.EVENTS if e[0] == "start" and e[1] == "log"]
    assert logs[0].endswith("moe_routes.all_runs.jsonl") and logs[1].endswith("moe_routes.all_runs.round2.jsonl")
    # both rounds' engines are shut down, the first round's before the second round starts
    kinds = [e[0] for e in fake_vllm.EVENTS]
    shutdowns = [i for i, k in enumerate(kinds) if k == "shutdown"]
    starts_at = [i for i, k in enumerate(kinds) if k == "start"]
    assert len(shutdowns) == 4 and shutdowns[1] < starts_at[2]
    assert [r["start_order"] for r in t["rounds"]] == [["log", "nolog"], ["nolog", "log"]]
    for mode in ("log", "nolog"):
        assert [r["round"] for r in t["modes"][mode]["runs"]] == [1, 1, 2, 2]
    assert len(t["throughput_ratio_per_round"]) == 2
    assert t["engine_startup_s"] == t["rounds"][0]["startup_s"] and t["warmup"] == t["rounds"][0]["warmup"]
    # the artifact: round 1's first measured log run only, one meta record; the scratch logs are gone
    lines = [json.loads(x) for x in (out / "moe_routes.jsonl").read_text().splitlines()]
    assert [x["type"] for x in lines].count("meta") == 1
    assert {x["req_id"] for x in lines if x["type"] == "route"} == {"3", "4", "5"}  # after the 3 warm-up requests
    assert t["route_records"] == 3 * (3 + 4 - 1)
    assert not list(out.glob("moe_routes.all_runs*"))
    assert t["tokens_identical_across_modes"] is True


def test_one_round_is_the_former_layout(tmp_path, fake_vllm):
    out, t = _run(tmp_path)
    assert [e[1] for e in fake_vllm.EVENTS if e[0] == "start"] == ["log", "nolog"]
    assert len(t["rounds"]) == 1 and "throughput_ratio_per_round" in t
    assert len(t["modes"]["log"]["runs"]) == 2


def test_keep_all_runs_log_keeps_every_round(tmp_path, fake_vllm):
    out, _ = _run(tmp_path, "--rounds", "2", "--keep-all-runs-log")
    assert sorted(p.name for p in out.glob("moe_routes.all_runs*")) == [
        "moe_routes.all_runs.jsonl",
        "moe_routes.all_runs.round2.jsonl",
    ]


def test_per_round_ratios_disagree_by_the_start_order_effect_the_pooled_one_does_not():
    def runs(tps_by_round):
        return [{"round": i, "tokens_per_s": v, "wall_s": 1.0, "generated_tokens_per_s": v} for i, v in tps_by_round]

    # the engine started first runs 10 % slower: round 1 starts log first, round 2 no-log first
    result = {
        "runs": {"log": runs([(1, 90), (1, 90), (2, 100), (2, 100)]), "nolog": runs([(1, 100)] * 2 + [(2, 90)] * 2)}
    }
    s = generate.summarize(result)
    assert s["throughput_ratio_per_round"] == pytest.approx([0.9, 100 / 90])
    assert s["throughput_ratio_log_over_nolog"] == pytest.approx(1.0)


def test_rounds_options():
    assert generate.parse_args(["--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        generate.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        generate.parse_args(["--engine", "sglang", "--rounds", "2"])
    assert generate.engine_start_order(0) == ("log", "nolog") and generate.engine_start_order(1) == ("nolog", "log")
