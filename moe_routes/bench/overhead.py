"""Routing on vs off throughput, side by side, on a CPU bench model larger than the test models.

Builds (once) a random-weight Qwen2-MoE (hidden 512, 8 layers, 32 experts, top-4, shared expert) and runs
run_generate.py on it once per routing source: two engines, a warm-up each, then alternating measured runs, in
--rounds rounds (default 2: the engines started afresh, round 2 in the other order, since the engine started
first can be the slower one; run_generate.py --rounds); prints each median throughput ratio routing on/off.
By default both vLLM ratios in one invocation:
  log      VLLM_LOG_MOE on / off (the engine writes the routing log)
  offline  enable_return_routed_experts (+ _weights) on / off (routing returned on CompletionOutput)
--routing-source (repeatable) picks the sources; http starts two local OpenAI servers (run_generate.py --help).
Pass --model to measure a real model instead (e.g. on a GPU box).

Examples:
  moe-routes bench overhead                       # CPU bench model, eager, 25 prompts x 64 tokens, 5 repeats
                                                  # in each of 2 rounds, log/no-log and returned-routing on/off
  moe-routes bench overhead --routing-source log  # only the log/no-log ratio
  moe-routes bench overhead --routing-source offline --routing-source http   # returned offline and over HTTP
  moe-routes bench overhead --routing-source offline-weights   # weights on/off, ids returned in both engines
  moe-routes bench overhead --compiled            # torch.compile (slow start-up on CPU)
  moe-routes bench overhead --model Qwen/Qwen1.5-MoE-A2.7B-Chat --max-tokens 256   # GPU box
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_routes import REPO_ROOT as ROOT
from moe_routes import cache_root, tinymoe
from moe_routes.generate import ROUTING_SOURCES
from moe_routes.prompts import SHARED_GSM8K

DEFAULT_SOURCES = ("log", "offline")
RATIO_NAMES = {
    "log": "log/no-log (VLLM_LOG_MOE)",
    "offline": "enable_return_routed_experts on/off (offline LLM)",
    "offline-weights": "enable_return_routed_expert_weights on/off (offline LLM; ids returned in both)",
    "http": "enable_return_routed_experts on/off (OpenAI server)",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", help="model id/dir (default: the CPU bench model, built on first use)")
    ap.add_argument("--prompts-file", default=str(SHARED_GSM8K) if SHARED_GSM8K.exists() else None)
    ap.add_argument("--num-prompts", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="measured runs per mode and round (default: %(default)s)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="run_generate.py --rounds: engine pairs started per source, the start order swapped "
        "(default: %(default)s)",
    )
    ap.add_argument("--compiled", action="store_true", help="torch.compile instead of eager")
    ap.add_argument(
        "--routing-source",
        action="append",
        choices=ROUTING_SOURCES,
        help="run_generate.py --routing-source, one run_generate invocation each; repeatable "
        f"(default: {' and '.join(DEFAULT_SOURCES)})",
    )
    ap.add_argument("--out-dir", default=None, help="keep artifacts here, one folder per source (default: a temp dir)")
    a = ap.parse_args(argv)
    sources = list(dict.fromkeys(a.routing_source or DEFAULT_SOURCES))
    if a.model is None and a.prompts_file is None:
        ap.error(
            f"the CPU bench model's tokenizer is trained on prompts: pass --prompts-file ({SHARED_GSM8K} is missing)"
        )
    out = Path(a.out_dir or tempfile.mkdtemp(prefix="moe-bench-"))
    model, extra = a.model, []
    if model is None:
        cache = cache_root()
        model = str(
            tinymoe.build(
                "qwen2_moe",
                cache / "bench-qwen2moe-h512",
                hidden=512,
                layers=8,
                experts=32,
                top_k=4,
                heads=8,
                moe_inter=256,
                vocab=2048,
                prompts_file=Path(a.prompts_file),
            )
        )
        extra = ["--dtype", "float32", "--ignore-eos"]
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    results = {}
    for source in sources:
        src_out = out / source
        cmd = [
            sys.executable,
            str(ROOT / "run_generate.py"),
            "--routing-source",
            source,
            "--model",
            model,
            "--num-prompts",
            str(a.num_prompts),
            "--max-tokens",
            str(a.max_tokens),
            "--repeats",
            str(a.repeats),
            "--rounds",
            str(a.rounds),
            "--out-dir",
            str(src_out),
            *extra,
        ]
        if a.prompts_file:
            cmd += ["--prompts-file", a.prompts_file]
        if not a.compiled:
            cmd.append("--enforce-eager")
        print(f"bench: routing source {source}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(f"bench: run_generate --routing-source {source} failed (rc {proc.returncode}):\n")
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode
        results[source] = json.loads((src_out / "timing.json").read_text())
    first = next(iter(results.values()))
    print(
        f"bench: {model} on {first['device']}, {'compiled' if a.compiled else 'eager'}, "
        f"{first['num_prompts']} prompts x {first['max_tokens']} tokens, "
        f"{first['repeats']} alternating repeats per mode in each of {len(first.get('rounds', [None]))} round(s)"
    )
    for source, t in results.items():
        m = t["modes"]
        print(f"routing source {source}: {RATIO_NAMES[source]}")
        for mode, label in (("nolog", "off"), ("log", "on")):
            print(
                f"  {label:>3} ({mode:>5}): median {m[mode]['median_tokens_per_s']:.1f} tok/s  runs "
                + " ".join(f"{r['tokens_per_s']:.1f}" for r in m[mode]["runs"])
            )
        print(
            f"  throughput ratio on/off (medians): {t['throughput_ratio_log_over_nolog']:.3f}  "
            f"(tokens identical: {t['tokens_identical_across_modes']}; route records {t['route_records']:,})"
        )
        if len(t.get("throughput_ratio_per_round", [])) > 1:
            print(
                "  per round: "
                + ", ".join(
                    f"{ratio:.3f} ({rd['start_order'][0]} engine started first)"
                    for ratio, rd in zip(t["throughput_ratio_per_round"], t["rounds"], strict=True)
                )
            )
    print(
        "summary: "
        + "; ".join(f"{RATIO_NAMES[s]}: {t['throughput_ratio_log_over_nolog']:.3f}" for s, t in results.items())
    )
    print(f"artifacts: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
