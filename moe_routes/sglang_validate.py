"""GPU validation of the SGLang return_expert_routing patch series (needs a CUDA box).

Runs a real MoE model through the patched sglang==0.5.10.post1 Engine with
--enable-return-expert-routing (and SGLang's own --enable-return-routed-experts, only as the
reference for check 2) and checks, for N concurrent requests (default 64):
  1. every request gets meta_info["expert_routing"]; shape [P+G-1, L_moe, top_k];
     ids in [0, num_experts); weights finite; no "missing" ranges
  2. ids identical to SGLang's own return_routed_experts (same requests) on the MoE layers
  3. determinism: a second identical run (now served from the radix cache, so cached
     positions come from their KV slots) gives identical ids and weights
  4. streaming: a streamed request gets the payload in its final chunk only
  5. weights consistent with the router: the HF transformers model is run on a sample of
     the generated sequences with output_router_logits, top-k recomputed from the gate
     (softmax, renormalised iff config.norm_topk_prob) and compared (ids agreement >= 0.95,
     weights close where ids agree)
  6. OpenAI endpoints of a real HTTP server (launched with --enable-return-expert-routing and
     --tokenizer-worker-num 2, i.e. multi-tokenizer mode): /v1/completions and
     /v1/chat/completions with n=2 and return_expert_routing in the body (what the openai
     client's extra_body sends) return choices[i].sglext.expert_routing, decodable, ids in
     range, no missing positions, completions payload equal to the Engine's for the same
     greedy prompt; stream=true puts the same payload on each choice's finishing chunk; a
     per-sample list answers HTTP 400
  7. the row bound: an engine with chunked prefill off (-1), the radix cache off and a small
     --max-prefill-tokens, prompts longer than it with ignore_eos (PrefillAdder's
     add_one_req_ignore_eos admits past max_prefill_tokens): every request complete, no error
Exit code 0 = all checks passed. Only stdlib is imported until after argument parsing,
so --help works without sglang/torch installed.
"""

import argparse
import json
import sys


class RawDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, the examples epilog kept as written."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Validate return_expert_routing (moe-routes SGLang patches) on a GPU.",
        epilog="Examples (a CUDA box with the patched SGLang venv, from the repository root):\n"
        "  python -m moe_routes sglang-validate\n"
        "  python -m moe_routes sglang-validate --model Qwen/Qwen3-30B-A3B --tp-size 2 --num-requests 128",
        formatter_class=RawDefaultsFormatter,
    )
    ap.add_argument("--model", default="Qwen/Qwen1.5-MoE-A2.7B-Chat")
    ap.add_argument("--num-requests", type=int, default=64, help="concurrent requests per run")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument(
        "--mem-fraction-static", type=float, default=0.55, help="leave room for the HF model used by the router check"
    )
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument("--disable-overlap-schedule", action="store_true")
    ap.add_argument("--chunked-prefill-size", type=int, default=64, help="small value so long prompts are chunked")
    ap.add_argument(
        "--router-check-samples", type=int, default=4, help="sequences recomputed with the HF model (0 = skip)"
    )
    ap.add_argument("--weights-atol", type=float, default=2e-2, help="bf16 kernels vs HF eager")
    ap.add_argument("--port", type=int, default=30917, help="HTTP server port for the OpenAI checks")
    ap.add_argument("--skip-openai", action="store_true", help="skip check 6 (HTTP server)")
    ap.add_argument("--skip-bound", action="store_true", help="skip check 7 (chunked prefill off)")
    ap.add_argument("--report", default=None, help="write a JSON report here")
    return ap.parse_args(argv)


def prompts(n):
    topics = [
        "the ocean",
        "prime numbers",
        "a medieval castle",
        "quantum computing",
        "bread baking",
        "the French revolution",
        "volcanoes",
        "jazz music",
        "graph theory",
        "honey bees",
    ]
    out = []
    for i in range(n):
        t = topics[i % len(topics)]
        rep = 1 + (i % 7) * 6  # varied lengths; long ones exceed the prefill chunk
        out.append(f"Request {i}. Explain {t} in detail. " + "Give many facts. " * rep)
    return out


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import sglang as sgl

    from moe_routes.sglang_routing import decode_expert_routing

    fails, report = [], {"model": args.model, "checks": {}}

    def check(name, ok, detail=""):
        report["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(("PASS " if ok else "FAIL ") + name + (f": {detail}" if detail else ""), flush=True)
        if not ok:
            fails.append(name)

    engine = sgl.Engine(
        model_path=args.model,
        tp_size=args.tp_size,
        enable_return_expert_routing=True,
        enable_return_routed_experts=True,
        mem_fraction_static=args.mem_fraction_static,
        disable_cuda_graph=args.disable_cuda_graph,
        disable_overlap_schedule=args.disable_overlap_schedule,
        chunked_prefill_size=args.chunked_prefill_size,
        random_seed=0,
    )
    ps = prompts(args.num_requests)
    sp = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}

    def run():
        return engine.generate(prompt=ps, sampling_params=sp, return_expert_routing=True, return_routed_experts=True)

    out1 = run()
    dec1, problems, native_bad = [], [], 0
    for i, o in enumerate(out1):
        mi = o["meta_info"]
        try:
            d = decode_expert_routing(mi)
        except Exception as e:  # noqa: BLE001
            problems.append(f"req {i}: {e}")
            dec1.append(None)
            continue
        dec1.append(d)
        T = mi["prompt_tokens"] + mi["completion_tokens"] - 1
        ids, w = d["topk_ids"], d["topk_weights"]
        if ids.shape != (T, len(d["layers"]), d["top_k"]):
            problems.append(f"req {i}: shape {ids.shape} != ({T}, {len(d['layers'])}, {d['top_k']})")
        if ids.min() < 0 or ids.max() >= d["num_experts"]:
            problems.append(f"req {i}: ids out of range [{ids.min()}, {ids.max()}]")
        if not np.isfinite(w).all() or d["missing"]:
            problems.append(f"req {i}: non-finite weights or missing {d['missing']}")
        nat = np.frombuffer(__import__("base64").b64decode(mi["routed_experts"]), dtype=np.int32)
        nat = nat.reshape(T, -1, d["top_k"])[:, d["layers"], :]
        if not np.array_equal(nat, ids):
            native_bad += 1
    check("payload_shape_range", not problems, "; ".join(problems[:5]))
    check("ids_equal_native_return_routed_experts", native_bad == 0, f"{native_bad} requests differ")
    report["layers"] = dec1[0]["layers"].tolist() if dec1 and dec1[0] is not None else None

    out2 = run()
    nondet, cached = 0, 0
    for o, d1 in zip(out2, dec1, strict=True):
        d2 = decode_expert_routing(o["meta_info"])
        cached += d2["num_cached_tokens"] > 0
        if d1 is None or not (
            np.array_equal(d1["topk_ids"], d2["topk_ids"])
            and np.allclose(d1["topk_weights"], d2["topk_weights"], atol=1e-6)
        ):
            nondet += 1
    check(
        "deterministic_across_runs_with_radix_hits",
        nondet == 0,
        f"{nondet} requests differ; {cached} requests had prefix-cache hits",
    )

    chunks = list(engine.generate(prompt=ps[0], sampling_params=sp, return_expert_routing=True, stream=True))
    with_payload = [i for i, c in enumerate(chunks) if "expert_routing" in c["meta_info"]]
    check("streaming_final_chunk_only", with_payload == [len(chunks) - 1], f"chunks with payload {with_payload}")

    samples = [(ps[i], out1[i]) for i in range(min(args.router_check_samples, len(ps))) if dec1[i] is not None]
    engine.shutdown()

    if samples:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        cfg = AutoConfig.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16, device_map="cuda")
        renorm = bool(getattr(cfg, "norm_topk_prob", False))
        agree, total, wdiff = 0, 0, 0.0
        for (p, o), d in zip(samples, [x for x in dec1 if x is not None], strict=False):
            ids_in = tok(p)["input_ids"] + o["output_ids"]
            T = d["topk_ids"].shape[0]
            with torch.no_grad():
                r = model(torch.tensor([ids_in[:T]], device="cuda"), output_router_logits=True)
            for li, layer in enumerate(d["layers"].tolist()):
                rl = r.router_logits  # per layer (all layers) or per MoE layer
                logits = rl[layer] if len(rl) == cfg.num_hidden_layers else rl[li]
                prob = torch.softmax(logits.float().reshape(T, -1), dim=-1)
                tw, ti = torch.topk(prob, d["top_k"], dim=-1)
                if renorm:
                    tw = tw / tw.sum(-1, keepdim=True)
                ti, tw = ti.cpu().numpy(), tw.cpu().numpy()
                same = (np.sort(ti, 1) == np.sort(d["topk_ids"][:, li], 1)).all(1)
                agree += int(same.sum())
                total += T
                if same.any():
                    a = np.take_along_axis(tw, np.argsort(ti, 1), 1)[same]
                    b = np.take_along_axis(d["topk_weights"][:, li], np.argsort(d["topk_ids"][:, li], 1), 1)[same]
                    wdiff = max(wdiff, float(np.abs(a - b).max()))
        rate = agree / max(total, 1)
        check(
            "weights_consistent_with_router",
            rate >= 0.95 and wdiff <= args.weights_atol,
            f"id agreement {rate:.4f} over {total} token-layers, max |dw| {wdiff:.4g}",
        )
        del model, r  # the HTTP server and the bound engine below size their KV cache from free memory
        torch.cuda.empty_cache()

    if not args.skip_openai:
        openai_checks(args, ps[0], dec1[0], check)
    if not args.skip_bound:
        bound_check(args, check)

    report["ok"] = not fails
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    print("ALL CHECKS PASSED" if not fails else f"FAILED: {fails}")
    return 0 if not fails else 1


def bound_check(args, check):
    import sglang as sgl

    from moe_routes.sglang_routing import decode_expert_routing

    engine = sgl.Engine(
        model_path=args.model,
        tp_size=args.tp_size,
        enable_return_expert_routing=True,
        mem_fraction_static=args.mem_fraction_static,
        chunked_prefill_size=-1,
        disable_radix_cache=True,
        max_prefill_tokens=256,
        random_seed=0,
    )
    ps = [f"Request {i}. " + "Tell me everything about graph theory. " * 60 for i in range(16)]
    problems = []
    try:
        outs = engine.generate(
            prompt=ps,
            sampling_params={"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True},
            return_expert_routing=True,
        )
        for i, o in enumerate(outs):
            d = decode_expert_routing(o["meta_info"])
            T = o["meta_info"]["prompt_tokens"] + o["meta_info"]["completion_tokens"] - 1
            if d["topk_ids"].shape[0] != T or d["missing"]:
                problems.append(f"req {i}: {d['topk_ids'].shape[0]} of {T} positions, missing {d['missing']}")
    except Exception as e:  # noqa: BLE001
        problems.append(repr(e)[:300])
    finally:
        engine.shutdown()
    check("bound_chunked_prefill_off_ignore_eos", not problems, "; ".join(problems[:5]))


def openai_checks(args, prompt, engine_decoded, check):
    import subprocess
    import time
    import urllib.error
    import urllib.request

    import numpy as np

    from moe_routes.sglang_routing import decode_expert_routing

    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        args.model,
        "--port",
        str(args.port),
        "--tp-size",
        str(args.tp_size),
        "--mem-fraction-static",
        str(args.mem_fraction_static),
        "--chunked-prefill-size",
        str(args.chunked_prefill_size),
        "--random-seed",
        "0",
        "--enable-return-expert-routing",
        "--tokenizer-worker-num",
        "2",
    ]
    srv = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{args.port}"

    def post(path, body):
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stream_payloads(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        got = {}
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:]).get("choices", []):
                    if "expert_routing" in (c.get("sglext") or {}):
                        got[c["index"]] = c["sglext"]["expert_routing"]
        return got

    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except Exception:  # noqa: BLE001
                if srv.poll() is not None:
                    check("openai_server_started", False, f"server exited with {srv.returncode}")
                    return
                time.sleep(2)
        common = {
            "model": args.model,
            "temperature": 0.0,
            "max_tokens": args.max_new_tokens,
            "n": 2,
            "return_expert_routing": True,
        }
        for path, body in (
            ("/v1/completions", dict(common, prompt=prompt)),
            ("/v1/chat/completions", dict(common, messages=[{"role": "user", "content": prompt}])),
        ):
            code, resp = post(path, body)
            problems = [] if code == 200 else [f"HTTP {code}: {resp}"]
            decs = []
            for c in resp.get("choices", []):
                try:
                    d = decode_expert_routing(c["sglext"]["expert_routing"])
                except Exception as e:  # noqa: BLE001
                    problems.append(f"choice {c.get('index')}: {e}")
                    continue
                decs.append(d)
                if d["missing"] or d["topk_ids"].min() < 0 or d["topk_ids"].max() >= d["num_experts"]:
                    problems.append(f"choice {c['index']}: missing {d['missing']} / ids out of range")
            if len(decs) != 2:
                problems.append(f"{len(decs)} choices with a payload, expected 2")
            elif not np.array_equal(decs[0]["topk_ids"], decs[1]["topk_ids"]):
                problems.append("greedy choices differ in routing")
            if path == "/v1/completions" and decs and engine_decoded is not None:
                if not np.array_equal(decs[0]["topk_ids"], engine_decoded["topk_ids"]):
                    problems.append("payload differs from the Engine's for the same greedy prompt")
            check(f"openai{path.replace('/', '_')}_per_choice", not problems, "; ".join(problems[:5]))
            code, resp = post(path, dict(body, return_expert_routing=[True, False]))
            check(f"openai{path.replace('/', '_')}_400_per_sample_list", code == 400, f"HTTP {code}: {str(resp)[:200]}")
            streamed = stream_payloads(base + path, dict(body, stream=True))
            ok = sorted(streamed) == [0, 1] and all(
                np.array_equal(decode_expert_routing(streamed[i])["topk_ids"], decs[i]["topk_ids"])
                for i in (0, 1)
                if i < len(decs)
            )
            check(f"openai{path.replace('/', '_')}_stream_final_chunk", ok, f"payloads for choices {sorted(streamed)}")
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    sys.exit(main())
