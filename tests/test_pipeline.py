"""The user-facing pipeline: ./test.sh (CPU, offline), run_generate.py and the artifacts it leaves."""

from __future__ import annotations

import json
import os
import statistics
import subprocess

import pytest
from engine_modules import vllm_pin
from routes_ref import GSM8K, PY, ROOT, RouteLog

UNREACHABLE_HUB = "http://127.0.0.1:9"  # discard port: connection refused at once


@pytest.fixture(scope="session")
def test_sh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("test_sh")
    # No --offline: a newcomer's plain ./test.sh on a machine without the hub must take the offline path itself.
    env = dict(os.environ, MOE_ROUTES_SKIP_DISK_CHECK="1", HF_ENDPOINT=UNREACHABLE_HUB)
    proc = subprocess.run(
        [
            "./test.sh",
            "--vllm",
            vllm_pin(),  # the pin under test (test.sh's own default is the newest)
            "--device",
            "cpu",
            "--num-prompts",
            "25",
            "--max-tokens",
            "16",
            "--repeats",
            "2",
            "--enforce-eager",
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is not reachable" in proc.stderr and "Taking the OFFLINE path" in proc.stderr, proc.stderr[-3000:]
    assert f"prompts from {GSM8K.resolve()}" in proc.stderr, proc.stderr[-3000:]
    return out, proc.stdout


def test_test_sh_leaves_all_artifacts(test_sh_run):
    out, stdout = test_sh_run
    for name in (
        "moe_routes.jsonl",
        "timing.json",
        "generations.jsonl",
        "expert_hist.png",
        "expert_heatmap.png",
        "expert_stats.json",
    ):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in stdout
    assert "RANDOM weights" in stdout


def test_artifact_log_is_schema_valid_and_complete(test_sh_run):
    out, _ = test_sh_run
    log = RouteLog(out / "moe_routes.jsonl")
    log.validate_schema()
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 25
    # every generated request's positions 0..P+G-2, once per layer: the artifact holds exactly one run
    outputs = [
        {"request_id": g["req_id"], "prompt_token_ids": [0] * g["prompt_tokens"], "token_ids": g["token_ids"]}
        for g in gens
    ]
    log.check_exact_coverage(outputs)


def test_timing_json_fields_consistent(test_sh_run):
    out, _ = test_sh_run
    t = json.loads((out / "timing.json").read_text())
    assert t["engine"] == "vllm" and t["engine_version"].split("+")[0] == vllm_pin() and t["num_prompts"] == 25
    assert t["tokens_identical_across_modes"] is True
    # test.sh's default: two rounds, round 2 starting the engines in the other order; every round's runs pooled
    assert [r["start_order"] for r in t["rounds"]] == [["log", "nolog"], ["nolog", "log"]]
    assert len(t["throughput_ratio_per_round"]) == 2
    for mode in ("log", "nolog"):
        runs = t["modes"][mode]["runs"]
        assert [r["round"] for r in runs] == [1, 1, 2, 2] and t["warmup"][mode]["wall_s"] > 0
        assert all(rd["startup_s"][mode] > 0 and rd["warmup"][mode]["wall_s"] > 0 for rd in t["rounds"])
        assert t["engine_startup_s"][mode] == t["rounds"][0]["startup_s"][mode]
        for r in runs:
            assert r["generated_tokens"] == 25 * 16  # the tiny random model runs with --ignore-eos
            assert r["tokens_per_s"] == pytest.approx((r["prompt_tokens"] + r["generated_tokens"]) / r["wall_s"])
        assert t["modes"][mode]["median_wall_s"] == pytest.approx(statistics.median(r["wall_s"] for r in runs))
    ratio = t["modes"]["log"]["median_tokens_per_s"] / t["modes"]["nolog"]["median_tokens_per_s"]
    assert t["throughput_ratio_log_over_nolog"] == pytest.approx(ratio)
    prov = t["provenance"]
    assert prov["series"] == f"vllm-{vllm_pin()}" and len(prov["patches"]) >= 1 and prov["args"]["seed"] == 1234
    assert len(prov["git"]["commit"] or "") == 40
    n_lines = sum(1 for _ in open(out / "moe_routes.jsonl"))
    assert t["route_records"] == n_lines - 1


def test_pngs_decode(test_sh_run):
    import matplotlib.image as mpimg

    out, _ = test_sh_run
    for name in ("expert_hist.png", "expert_heatmap.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_stats_match_the_log(test_sh_run):
    out, _ = test_sh_run
    stats = json.loads((out / "expert_stats.json").read_text())
    log = RouteLog(out / "moe_routes.jsonl")
    counts = [0] * log.meta["num_experts"]
    for ids, _, _ in log.routes.values():
        for e in ids:
            counts[e] += 1
    assert stats["overall"]["counts"] == counts
    assert stats["records"] == len(log.routes) and stats["requests"] == 25
    assert stats["random_weights"] is True  # run_generate marks the locally built random model


def test_run_generate_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    for args, needle in (
        (["--prompts-file", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--prompts-file", str(bad)], "bad.jsonl:1: expected a JSON object with a 'question' field"),
        (["--engine", "sglang", "--prompts-file", str(GSM8K)], "--engine sglang needs SGLang"),
    ):
        proc = subprocess.run([PY, str(ROOT / "run_generate.py"), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and needle in (proc.stderr + proc.stdout), proc.stderr[-2000:]


@pytest.mark.parametrize(
    "command",
    [
        ["run_generate.py"],
        ["plot_hist.py"],
        ["-m", "moe_routes", "patch"],
        ["-m", "moe_routes"],
        ["-m", "moe_routes", "bench"],
        ["-m", "moe_routes", "bench", "overhead"],
        ["-m", "moe_routes", "bench", "imports"],
        ["-m", "moe_routes", "bench", "writer"],
        ["-m", "moe_routes", "bench", "plot"],
        ["-m", "moe_routes", "tiny-model"],
        ["-m", "moe_routes", "generate"],
        ["-m", "moe_routes", "plot"],
        ["-m", "moe_routes", "sglang-validate"],
        ["-m", "moe_routes", "sglang-decode"],
    ],
)
def test_cli_help_has_examples(command):
    proc = subprocess.run([PY, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "examples" in proc.stdout.lower(), proc.stderr[-2000:]


def test_test_sh_fails_early_and_clearly():
    env = dict(os.environ, HF_ENDPOINT=UNREACHABLE_HUB)
    for args, needle in (
        (["--device", "gpu"], "finds no GPU"),
        (["--offline"], "--offline needs --prompts-file"),
        (["--bogus"], "unknown option"),
        (["--device", "cpu", "--model", "org/some-hub-model"], "is not reachable"),
    ):
        proc = subprocess.run(["./test.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and needle in proc.stderr
