"""CPU tests of the SGLang return_expert_routing patch series (patches/sglang-0.5.10.post1).

Two modes in one file:
* outer (any python with pytest): runs this file again with the sglang test venv's python
  (built by scripts/setup_sglang_test_env.sh, patched sglang==0.5.10.post1 installed) and
  fails if the inner run fails or that venv is missing.
* inner (MOE_ROUTES_SGLANG_INNER=1, inside the venv): imports the patched, installed sglang
  (sgl_kernel, CUDA-only, is stubbed in-process) and drives the real TopK/select_experts,
  GenerateReqInput, ServerArgs, Session, PrefillAdder, the multi-tokenizer split, TokenizerManager
  methods, the OpenAI serving classes and the expert_routing module with CPU tensors; the stand-ins
  replace only what needs a GPU, ZMQ or a model (events, the tokenizer manager's I/O, Engine).
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_routes import cache_root
from moe_routes.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SGLANG_TEST_VENV", cache_root() / "sglang-test-venv"))
VENV_PY = VENV / "bin" / "python"
INNER = os.environ.get("MOE_ROUTES_SGLANG_INNER") == "1"


# ============================================================================ outer mode
if not INNER:

    def test_inner_suite_in_sglang_venv():
        if not VENV_PY.exists():
            pytest.fail(
                f"SGLang test venv missing ({VENV}): run scripts/setup_sglang_test_env.sh (scripts/run_tests.sh does)"
            )
        env = dict(os.environ, MOE_ROUTES_SGLANG_INNER="1", PYTHONDONTWRITEBYTECODE="1")
        r = subprocess.run(
            [str(VENV_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
            cwd=str(ROOT),
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        sys.stdout.write(r.stdout[-20000:])
        sys.stderr.write(r.stderr[-5000:])
        assert r.returncode == 0, f"inner sglang test run failed (rc={r.returncode})"

    def test_gpu_validate_help_without_sglang():
        r = subprocess.run(
            [sys.executable, "-m", "moe_routes", "sglang-validate", "--help"],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert "return_expert_routing" in r.stdout

    def test_decode_helper_imports_without_sglang():
        code = "import sys; from moe_routes import sglang_routing; assert 'sglang' not in sys.modules; print('ok')"
        r = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True)
        assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ============================================================================ inner mode
else:
    import importlib.abc
    import importlib.machinery
    import types

    class _Dummy:
        def __init__(self, name):
            self._n = name

        def __call__(self, *a, **k):
            raise RuntimeError(f"stub {self._n} called in the CPU test environment")

        def __getattr__(self, k):
            return _Dummy(f"{self._n}.{k}")

    class _StubModule(types.ModuleType):
        def __getattr__(self, k):
            if k.startswith("__"):
                raise AttributeError(k)
            return _Dummy(f"{self.__name__}.{k}")

    class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "sgl_kernel":
                return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):
            m = _StubModule(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, m):
            pass

    sys.meta_path.insert(0, _StubFinder())

    import numpy as np
    import sglang
    import torch
    from sglang.srt.layers.moe import expert_routing as er
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.managers.io_struct import GenerateReqInput

    from moe_routes import sglang_routing

    SCHEMA = load_schema()

    # ------------------------------------------------------------------ series applied?
    def test_installed_sglang_is_patched():
        assert sglang.__version__ == "0.5.10.post1"
        pkg = Path(sglang.__file__).parent / "srt"
        assert "_expert_routing.capture(layer_id, topk_ids, topk_weights)" in (pkg / "layers/moe/topk.py").read_text()
        assert "_expert_routing.on_forward_end(forward_batch)" in (pkg / "model_executor/model_runner.py").read_text()
        mixin = (pkg / "managers/scheduler_output_processor_mixin.py").read_text()
        assert "_expert_routing.collect_for_request" in mixin
        assert (
            "req.return_expert_routing = recv_req.return_expert_routing" in (pkg / "managers/scheduler.py").read_text()
        )
        assert "_expert_routing.check_server_args(self)" in (pkg / "server_args.py").read_text()
        assert (
            "return_expert_routing=request.return_expert_routing"
            in (pkg / "entrypoints/openai/serving_chat.py").read_text()
        )

    # ------------------------------------------------------------------ dtypes/encoding
    @pytest.mark.parametrize(
        "e,dt",
        [
            (8, "uint8"),
            (128, "uint8"),
            (255, "uint8"),
            (256, "int16"),
            (300, "int16"),
            (32767, "int16"),
            (40000, "int32"),
        ],
    )
    def test_ids_dtype(e, dt):
        assert er.ids_dtype_for(e).name == dt
        assert np.iinfo(er.ids_dtype_for(e)).max >= e  # fill value is never a valid id

    @pytest.mark.parametrize("e", [8, 128, 256, 300])
    def test_encode_decode_roundtrip(e):
        rng = np.random.default_rng(e)
        T, L, K = 7, 3, 4
        ids = rng.integers(0, e, size=(T, L, K))
        w = rng.random((T, L, K)).astype(np.float32)
        p = er.encode_routing(ids, w, [1, 3, 5], e, num_cached_tokens=2)
        json.dumps(p)  # JSON-able
        assert p["ids_dtype"] == er.ids_dtype_for(e).name and p["shape"] == [T, L, K]
        assert len(base64.b64decode(p["ids"])) == T * L * K * er.ids_dtype_for(e).itemsize
        assert not hasattr(er, "decode_routing")  # one decoder: moe_routes/sglang_routing.py
        for d in (
            sglang_routing.decode_expert_routing(p),
            sglang_routing.decode_expert_routing({"meta_info": {"expert_routing": p}}),
        ):
            np.testing.assert_array_equal(d["topk_ids"], ids)
            assert d["topk_weights"].dtype == np.float32
            np.testing.assert_array_equal(d["topk_weights"], w)
            assert list(d["layers"]) == [1, 3, 5] and d["num_experts"] == e and d["top_k"] == K
        recs = sglang_routing.to_jsonl_records("r1", sglang_routing.decode_expert_routing(p))
        assert len(recs) == T * L
        route = SCHEMA["$defs"]["route"]
        for r in recs:
            assert set(r) <= set(route["properties"]) and set(route["required"]) <= set(r)
            assert r["type"] == "route" and r["req_id"] == "r1"
            assert np.float32(r["topk_weights"][0]) == w[r["token_idx"], [1, 3, 5].index(r["layer"]), 0]
            assert r.get("cached", False) == (r["token_idx"] < 2)

    def test_missing_rows_become_gaps():
        ids = np.zeros((5, 2, 2), np.int64)
        ids[1:3] = 255  # uint8 fill value for 8 experts
        p = er.encode_routing(ids, np.ones((5, 2, 2), np.float32), [0, 1], 8)
        assert p["missing"] == [[1, 3]]
        recs = sglang_routing.to_jsonl_records("x", sglang_routing.decode_expert_routing(p))
        gaps = [r for r in recs if r["type"] == "gap"]
        assert gaps == [
            {
                "type": "gap",
                "req_id": "x",
                "token_start": 1,
                "token_end": 3,
                "reason": "no routing captured for these KV slots",
            }
        ]
        assert sorted({r["token_idx"] for r in recs if r["type"] == "route"}) == [0, 3, 4]

    def test_error_payload_raises():
        with pytest.raises(ValueError, match="not enabled"):
            sglang_routing.decode_expert_routing({"format": er.FORMAT, "error": "not enabled"})

    # ------------------------------------------------------------------ io_struct
    def _norm(**kw):
        o = GenerateReqInput(**kw)
        o.normalize_batch_and_arguments()
        return o

    def test_request_flag_single_and_default():
        assert _norm(text="hi").return_expert_routing is False
        assert _norm(text="hi", return_expert_routing=True).return_expert_routing is True
        assert _norm(input_ids=[1, 2], return_expert_routing=[True]).return_expert_routing is True
        with pytest.raises(ValueError):
            _norm(text="hi", return_expert_routing="yes")

    def test_request_flag_batch():
        o = _norm(text=["a", "b", "c"], return_expert_routing=True)
        assert o.return_expert_routing == [True, True, True]
        o = _norm(text=["a", "b", "c"], return_expert_routing=[True, False, True])
        assert o.return_expert_routing == [True, False, True]
        assert [o[i].return_expert_routing for i in range(3)] == [True, False, True]
        assert _norm(text=["a", "b"]).return_expert_routing == [False, False]
        with pytest.raises(ValueError):
            _norm(text=["a", "b", "c"], return_expert_routing=[True, False])

    def test_request_flag_parallel_sampling_expansion():
        o = _norm(text=["a", "b"], sampling_params={"n": 3}, return_expert_routing=[True, False])
        assert o.return_expert_routing == [True, False] * 3  # same order as text * n
        assert o.text == ["a", "b"] * 3
        o = _norm(text="a", sampling_params={"n": 2}, return_expert_routing=True)
        assert o.return_expert_routing == [True, True]

    def test_validate_request():
        class SA:
            enable_return_expert_routing = False
            enable_return_routed_experts = True  # the native flag does not enable ours

        class MC:
            hf_text_config = types.SimpleNamespace(num_experts=60, num_experts_per_tok=4)

        er.validate_request(GenerateReqInput(text="a"), SA(), MC())  # not asked: fine
        with pytest.raises(ValueError, match="--enable-return-expert-routing"):
            er.validate_request(GenerateReqInput(text="a", return_expert_routing=True), SA(), MC())
        SA.enable_return_expert_routing = True
        er.validate_request(GenerateReqInput(text="a", return_expert_routing=True), SA(), MC())
        er.validate_request(GenerateReqInput(text=["a", "b"], return_expert_routing=[False, True]), SA(), MC())
        MC.hf_text_config = types.SimpleNamespace(hidden_size=8)
        with pytest.raises(ValueError, match="not a MoE model"):
            er.validate_request(GenerateReqInput(text="a", return_expert_routing=True), SA(), MC())

    # ------------------------------------------------------------------ tiny model
    H = 16

    class Block(torch.nn.Module):
        def __init__(self, moe, E, k, layer_id=None, shared=0):
            super().__init__()
            self.lin = torch.nn.Linear(H, H)
            if moe:
                self.gate = torch.nn.Linear(H, E, bias=False)
                self.topk = TopK(top_k=k + shared, renormalize=True, layer_id=layer_id, num_fused_shared_experts=shared)
            self.moe = moe

        def forward(self, x):
            if self.moe:
                self.topk.forward_native(x, self.gate(x).float())
            return torch.tanh(self.lin(x))

    class Tiny(torch.nn.Module):
        """layers 0 and 2 dense; 1, 3, 4 MoE; layer 3 passes layer_id, the others do not."""

        def __init__(self, E=8, k=2, moe=(1, 3, 4), shared=0):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(1000, H)
            self.layers = torch.nn.ModuleList(
                [Block(i in moe, E, k, layer_id=(i if i == 3 else None), shared=shared) for i in range(5)]
            )

        def forward(self, token_ids):
            x = self.embed(token_ids)
            for layer in self.layers:
                x = layer(x)

    def _cap(model, E=8, slots=512, rows=64, **kw):
        cap = er.build_capturer_for_model(
            model,
            types.SimpleNamespace(num_experts=E),
            num_kv_slots=slots,
            max_rows=rows,
            device="cpu",
            topk_cls=TopK,
            **kw,
        )
        er.set_capturer(cap)
        return cap

    def _reference(model, tokens, E=8):
        """Routing of each token computed alone (position-independent toy model)."""
        cap = _cap(model, E=E, slots=len(tokens) + 1)
        model(torch.tensor(tokens))
        cap.on_forward_end(torch.arange(len(tokens)))
        ids, w = cap.gather(torch.arange(len(tokens)))
        return ids.astype(np.int64), w

    def test_layer_discovery_dense_excluded_and_layer_ids_assigned():
        m = Tiny()
        cap = _cap(m)
        assert cap.layers == [1, 3, 4] and cap.top_k == 2 and cap.num_experts == 8
        assert [m.layers[i].topk.layer_id for i in (1, 3, 4)] == [1, 3, 4]  # mixtral-style: filled from names
        assert cap.np_ids_dtype == np.uint8 and cap.dev_weights.dtype == torch.float32

    def test_capture_matches_router_and_truncates_shared_experts():
        E, k = 8, 2
        m = Tiny(E=E, k=k, shared=1)
        cap = _cap(m, E=E)
        assert cap.top_k == k
        # simulate the fused-shared-expert layout: shared id E appended as last column
        tok = torch.arange(6)
        x = m.embed(tok)
        logits = torch.randn(6, E)
        ids = torch.cat([torch.topk(logits.softmax(-1), k).indices, torch.full((6, 1), E)], 1).int()
        wts = torch.rand(6, k + 1)
        er.capture(3, ids, wts)
        cap.on_forward_end(torch.arange(10, 16))
        got_ids, got_w = cap.gather(torch.arange(10, 16))
        slot = cap.layers.index(3)
        assert (got_ids[:, slot] < E).all()
        np.testing.assert_array_equal(got_ids[:, slot], ids[:, :k].numpy())
        np.testing.assert_array_equal(got_w[:, slot], wts[:, :k].numpy())
        # real TopK path: weights equal renormalised softmax top-k of the gate
        m2 = Tiny(E=E, k=k)
        cap2 = _cap(m2, E=E)
        t = torch.arange(5)
        m2(t)
        cap2.on_forward_end(torch.arange(5))
        gi, gw = cap2.gather(torch.arange(5))
        x = m2.embed(t)
        for li, layer in enumerate(m2.layers):
            if layer.moe:
                p = layer.gate(x).float().softmax(-1)
                tw, ti = torch.topk(p, k)
                tw = tw / tw.sum(-1, keepdim=True)
                s = cap2.layers.index(li)
                np.testing.assert_array_equal(np.sort(gi[:, s], 1), np.sort(ti.numpy(), 1))
                np.testing.assert_allclose(np.sort(gw[:, s], 1), np.sort(tw.detach().numpy(), 1), rtol=1e-5)
                assert np.isfinite(gw[:, s]).all()
            x = torch.tanh(layer.lin(x))

    # ------------------------------------------------------------------ scheduler simulation
    class Req:
        def __init__(self, rid, tokens, pool_idx, gen):
            self.rid, self.tokens, self.req_pool_idx = rid, tokens, pool_idx
            self.origin_input_ids = tokens[: len(tokens) - gen]
            self.output_ids = tokens[len(tokens) - gen :]
            self.return_expert_routing = True
            self.cached_tokens = 0
            self._finished = False

        @property
        def seqlen(self):
            return len(self.origin_input_ids) + len(self.output_ids)

        def finished(self):
            return self._finished

    class Pool:
        def __init__(self, n, width):
            self.req_to_token = torch.zeros((n, width), dtype=torch.int32)

    def _fb(loc, extend=True, rids=None, seq_lens=None, new=None):
        """The ForwardBatch fields on_forward_end reads."""
        return types.SimpleNamespace(
            out_cache_loc=torch.tensor(loc, dtype=torch.int64),
            forward_mode=types.SimpleNamespace(is_extend=lambda: extend),
            rids=rids,
            seq_lens_cpu=None if seq_lens is None else torch.tensor(seq_lens),
            extend_seq_lens_cpu=new,
        )

    def _run(model, cap, batches):
        """batches: list of (tokens, out_cache_loc, pad_rows) in ForwardBatch order."""
        for tokens, loc, pad in batches:
            t = torch.tensor(list(tokens) + [999] * pad)  # padded CUDA-graph rows at the end
            model(t)
            er.on_forward_end(_fb(loc))

    def test_chunked_prefill_decode_mixed_padded_and_radix_hit():
        m = Tiny(E=300, k=3)  # >255 experts -> int16 ids
        cap = _cap(m, E=300, slots=400, rows=21)  # the largest forward below routes 21 tokens
        assert cap.np_ids_dtype == np.int16
        pool = Pool(8, 64)
        free = iter(range(1, 400))  # slot 0 is the padding slot in SGLang
        rng = np.random.default_rng(1)
        A = Req("A", [int(x) for x in rng.integers(0, 900, 30)], 0, gen=4)  # prompt 26, gen 4
        B = Req("B", A.tokens[:20] + [int(x) for x in rng.integers(0, 900, 8)], 1, gen=3)  # shares 20-token prefix
        C = Req("C", [int(x) for x in rng.integers(0, 900, 11)], 2, gen=6)  # prompt 5, gen 6

        def alloc(req, a, b):
            locs = [next(free) for _ in range(a, b)]
            pool.req_to_token[req.req_pool_idx, a:b] = torch.tensor(locs, dtype=torch.int32)
            return locs

        batches = []
        # forward 1: extend A chunk 1 (chunked prefill, 16 tokens) + extend C (5 tokens)
        batches.append((A.tokens[0:16] + C.tokens[0:5], alloc(A, 0, 16) + alloc(C, 0, 5), 0))
        # forward 2: mixed batch: extend A chunk 2 (16..25) + decode C (position 5)
        batches.append((A.tokens[16:26] + [C.tokens[5]], alloc(A, 16, 26) + alloc(C, 5, 6), 0))
        # forwards 3-5: decode A (26..28) and C (6..8), CUDA-graph padded to bs 4
        for s in range(3):
            batches.append(([A.tokens[26 + s], C.tokens[6 + s]], alloc(A, 26 + s, 27 + s) + alloc(C, 6 + s, 7 + s), 2))
        # forward 6: decode C position 9 alone (padded to bs 8)
        batches.append(([C.tokens[9]], alloc(C, 9, 10), 7))
        _run(m, cap, batches)
        # B: radix hit on A's first 20 slots, extend 20..24, then decode 25 and 26
        pool.req_to_token[1, :20] = pool.req_to_token[0, :20]
        B.cached_tokens = 20
        _run(
            m,
            cap,
            [
                (B.tokens[20:25], alloc(B, 20, 25), 0),
                ([B.tokens[25]], alloc(B, 25, 26), 1),
                ([B.tokens[26]], alloc(B, 26, 27), 3),
            ],
        )
        for r in (A, B, C):
            er.collect_for_request(r, pool)
            r._finished = True
        out = types.SimpleNamespace(expert_routing=er.stream_outputs(["A", "X", "B", "C"], [A, B, C]))
        assert out.expert_routing[1] is None and len(out.expert_routing) == 4
        metas = []
        for i, r in zip((0, 2, 3), (A, B, C), strict=True):
            meta = {}
            er.add_to_meta_info(meta, out, i)
            metas.append(meta)
            d = sglang_routing.decode_expert_routing(meta)
            n = r.seqlen - 1
            assert d["topk_ids"].shape == (n, 3, 3) and d["missing"] == []
            ref_ids, ref_w = _reference(m, r.tokens[:n], E=300)
            er.set_capturer(cap)
            np.testing.assert_array_equal(d["topk_ids"], ref_ids)
            np.testing.assert_allclose(d["topk_weights"], ref_w, rtol=1e-6)
            assert (d["topk_ids"] < 300).all() and (d["topk_ids"] >= 0).all()
        assert sglang_routing.decode_expert_routing(metas[1])["num_cached_tokens"] == 20
        meta = {}
        er.add_to_meta_info(meta, out, 1)
        assert meta == {}
        assert er.stream_outputs(["A"], [A]) is None  # sent once, then dropped from the Req

    def test_not_asking_pays_nothing_and_unavailable_error():
        r = Req("N", [1, 2, 3], 0, gen=1)
        r.return_expert_routing = False
        er.collect_for_request(r, None)  # never touches the pool
        assert getattr(r, "expert_routing_payload", None) is None
        er.set_capturer(None, "return_expert_routing is not supported with speculative decoding")
        r.return_expert_routing = True
        er.collect_for_request(r, None)
        r._finished = True
        meta = {}
        er.add_to_meta_info(meta, types.SimpleNamespace(expert_routing=er.stream_outputs(["N"], [r])), 0)
        with pytest.raises(ValueError, match="speculative"):
            sglang_routing.decode_expert_routing(meta)

    def test_unfinished_requests_do_not_send():
        r = Req("U", [1, 2], 0, gen=1)
        r.expert_routing_payload = {"format": er.FORMAT}
        assert er.stream_outputs(["U"], [r]) is None  # streaming chunk before finish

    # ------------------------------------------------------------------ async staging
    class FakeEvent:
        log = []

        def __init__(self):
            self.done = False
            self.synced = False

        def record(self):
            FakeEvent.log.append(self)

        def query(self):
            return self.done

        def synchronize(self):
            self.synced = True
            self.done = True

    def test_async_copy_out_is_lazy_fifo_and_ring_bounded():
        FakeEvent.log = []
        m = Tiny()
        cap = _cap(m, slots=64, rows=8, event_factory=FakeEvent)
        assert len(cap._free) == er.STAGING_DEPTH == 2
        t1, t2, t3 = torch.tensor([5, 6]), torch.tensor([7, 8]), torch.tensor([9, 10])
        m(t1)
        cap.on_forward_end(torch.tensor([3, 4]))
        assert cap._store_ids is None  # host store not even allocated before the first scatter
        assert (cap.gather([3])[0] == cap.fill).all()  # not scattered before the event completes
        m(t2)
        cap.on_forward_end(torch.tensor([3, 5]))  # slot 3 overwritten by a later forward
        e1, e2 = FakeEvent.log
        assert not e1.synced
        m(t3)
        cap.on_forward_end(torch.tensor([6, 7]))  # ring of 2 exhausted -> oldest synchronized
        assert e1.synced and not e2.synced
        e2.done = True
        FakeEvent.log[2].done = True
        ids, _ = cap.gather(torch.tensor([3, 4, 5, 6, 7]))
        ref = {}
        for toks, locs in ((t1, [3, 4]), (t2, [3, 5]), (t3, [6, 7])):
            ri, _ = _reference(m, toks.tolist())
            for j, s in enumerate(locs):
                ref[s] = ri[j]
        np.testing.assert_array_equal(ids.astype(np.int64), np.stack([ref[s] for s in (3, 4, 5, 6, 7)]))

    # ================================================================== issue #10, one block per item
    import argparse
    import asyncio
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    def _sa(**kw):
        return ServerArgs(model_path="dummy", **kw)  # "dummy" skips the model-dependent __post_init__

    # ---- 1. own flag
    def test_own_server_flag_independent_of_native():
        p = argparse.ArgumentParser()
        ServerArgs.add_cli_args(p)
        a = ServerArgs.from_cli_args(
            p.parse_args(
                ["--model-path", "dummy", "--enable-return-expert-routing", "--expert-routing-weights-dtype", "float16"]
            )
        )
        assert a.enable_return_expert_routing and not a.enable_return_routed_experts
        assert a.expert_routing_weights_dtype == "float16"
        er.check_server_args(a)  # an allowed configuration passes our check
        b = ServerArgs.from_cli_args(p.parse_args(["--model-path", "dummy", "--enable-return-routed-experts"]))
        assert b.enable_return_routed_experts and not b.enable_return_expert_routing
        # native flag only: our capture stays off at model load
        er.set_capturer(None)
        er.init_for_model_runner(types.SimpleNamespace(server_args=b))
        assert er.get_capturer() is None

    # ---- 2. refused modes (start-up, through the real ServerArgs.check_server_args)
    @pytest.mark.parametrize(
        "kw,names",
        [
            (dict(pp_size=2), "--pp-size"),
            (dict(speculative_algorithm="EAGLE"), "--speculative-algorithm"),
            (dict(enable_dp_attention=True), "--enable-dp-attention"),
            (dict(moe_a2a_backend="deepep"), "--moe-a2a-backend none"),
            (dict(moe_a2a_backend="mooncake"), "--moe-a2a-backend none"),
            (dict(enable_two_batch_overlap=True), "--enable-two-batch-overlap"),
            (dict(enable_single_batch_overlap=True), "--enable-single-batch-overlap"),
            (dict(attn_cp_size=2), "--attn-cp-size 1"),
            (dict(enable_prefill_context_parallel=True), "prefill-context-parallel"),
            (dict(enable_pdmux=True), "--enable-pdmux"),
            (dict(enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
            (dict(hicache_storage_backend="file"), "--hicache-storage-backend"),
            (dict(enable_lmcache=True), "--enable-lmcache"),
            (dict(disaggregation_mode="prefill"), "--disaggregation-mode null"),
            (dict(disaggregation_mode="decode"), "--disaggregation-mode null"),
            (dict(enable_hisparse=True), "--enable-hisparse"),
            (dict(dllm_algorithm="LowConfidence"), "--dllm-algorithm"),
            (dict(enable_attn_tp_input_scattered=True, tp_size=2), "--enable-attn-tp-input-scattered"),
            (dict(moe_runner_backend="triton_kernel"), "--moe-runner-backend triton_kernel"),
            (dict(moe_runner_backend="flashinfer_trtllm"), "--moe-runner-backend flashinfer_trtllm"),
            (dict(moe_runner_backend="flashinfer_mxfp4"), "--moe-runner-backend flashinfer_mxfp4"),
            (dict(expert_routing_weights_dtype="bfloat16"), "--expert-routing-weights-dtype"),
        ],
    )
    def test_refused_modes_at_startup(kw, names):
        with pytest.raises(ValueError) as e:
            _sa(enable_return_expert_routing=True, **kw).check_server_args()
        assert names in str(e.value) and "--enable-return-expert-routing" in str(e.value)
        er.check_server_args(_sa(**kw))  # flag off: none of our business

    def test_topk_formats_that_bypass_select_experts_refused_at_load():
        from sglang.srt.layers.moe.topk import TopKOutputFormat

        m = Tiny()
        m.layers[1].topk.topk_config.output_format = TopKOutputFormat.BYPASSED
        with pytest.raises(ValueError, match="bypasses select_experts"):
            _cap(m)

    def _tokenized_req(text, **fields):
        """A TokenizedGenerateReqInput of 3 tokens, 4 new tokens, no logprobs; required fields not given are None."""
        from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
        from sglang.srt.sampling.sampling_params import SamplingParams

        kw = {
            f.name: None
            for f in dataclasses.fields(TokenizedGenerateReqInput)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        kw.update(
            input_text=text,
            input_ids=[1, 2, 3],
            sampling_params=SamplingParams(max_new_tokens=4),
            return_logprob=False,
            logprob_start_len=-1,
            top_logprobs_num=0,
            stream=False,
            **fields,
        )
        return TokenizedGenerateReqInput(**kw)

    def test_session_requests_carry_the_flag():
        from sglang.srt.managers.io_struct import SessionParams
        from sglang.srt.managers.session_controller import Session

        for flag in (True, False):
            t = _tokenized_req("hi")
            t.session_params = SessionParams(id="s1")
            t.return_expert_routing = flag
            r = Session(capacity_of_str_len=1000, session_id="s1").create_req(t, tokenizer=None, vocab_size=100)
            assert r.return_expert_routing is flag

    # ---- 3. own output field, split per index by the real multi-tokenizer mixin
    def _batch_out(cls, n, **extra):
        req = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        kw = {k: [None] * n for k in req}
        kw.update(rids=[f"r{i}" for i in range(n)], **extra)
        return cls(**kw)

    # (the mixin's BatchTokenIDOutput branch misses two required fields upstream and cannot run at all;
    # the detokenizer hands BatchStrOutput to the tokenizer workers)
    @pytest.mark.parametrize("cls_name", ["BatchStrOutput"])
    def test_multi_tokenizer_split_keeps_each_requests_payload(cls_name):
        from sglang.srt.managers import io_struct
        from sglang.srt.managers.multi_tokenizer_mixin import _handle_output_by_index

        m = Tiny()
        cap = _cap(m)
        m(torch.tensor([1, 2, 3]))
        er.on_forward_end(_fb([5, 6, 7]))
        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        raw = [cap.assemble("a", torch.tensor([5, 6])), None, cap.assemble("c", torch.tensor([7]))]
        out = _batch_out(
            getattr(io_struct, cls_name),
            3,
            expert_routing=raw,
            output_strs=["x"] * 3,
            output_ids=[[1]] * 3,
            retraction_counts=[0] * 3,
        )
        for i in range(3):
            part = _handle_output_by_index(out, i)  # what the detokenizer sends to tokenizer worker i
            assert part.rids == [f"r{i}"]
            # the worker's real TokenizerManager._handle_batch_output builds meta_info from index 0
            tm = object.__new__(TokenizerManager)
            tm.server_args = _sa()
            tm.enable_metrics = False
            tm.dump_requests_folder = tm.crash_dump_folder = None
            state = types.SimpleNamespace(
                obj=types.SimpleNamespace(stream=False),
                text="",
                output_ids=[],
                finished=False,
                time_stats=types.SimpleNamespace(first_token_time=1.0),
                out_list=[],
                event=types.SimpleNamespace(set=lambda: None),
            )
            tm.rid_to_state = {f"r{i}": state}
            tm._handle_batch_output(part)
            meta = state.out_list[0]["meta_info"]
            if raw[i] is None:
                assert "expert_routing" not in meta
            else:
                d = sglang_routing.decode_expert_routing(meta)
                assert d["topk_ids"].shape[0] == len(raw[i]["ids"])
                np.testing.assert_array_equal(d["topk_ids"], raw[i]["ids"])

    # ---- 4. buffers sized once from the scheduler's bound
    class _Alloc:
        def __init__(self, n):
            self.n = n

        def available_size(self):
            return self.n

    class _NoCache:
        disable = True  # radix cache off

        def evictable_size(self):
            return 0

        def supports_mamba(self):
            return False

    class _Req:
        def __init__(self, n, max_new=1):
            self.extend_input_len = n
            self.origin_input_ids = [0] * n
            self.fill_ids = [0] * n
            self.output_ids = []
            self.host_hit_length = 0
            self.sampling_params = types.SimpleNamespace(ignore_eos=True, max_new_tokens=max_new)

        def set_extend_input_len(self, n):
            self.extend_input_len = n

    @pytest.mark.parametrize("chunk", [-1, 4096])
    @pytest.mark.parametrize("seed", range(6))
    def test_real_prefill_adder_never_exceeds_the_row_bound(seed, chunk):
        """radix cache off, ignore_eos: PrefillAdder.add_one_req_ignore_eos; chunked prefill -1 is the
        case the old bound missed."""
        from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        rng = np.random.default_rng(seed)
        ctx, max_prefill = 32768, 16384
        kv = int(rng.choice([20000, 200000]))
        page = int(rng.choice([1, 16]))
        sa = _sa(
            chunked_prefill_size=chunk, max_prefill_tokens=max_prefill, cuda_graph_max_bs=256, disable_radix_cache=True
        )
        set_global_server_args_for_scheduler(sa)
        bound = er.max_tokens_per_forward(
            sa, max_running_requests=512, context_len=ctx, num_kv_slots=kv, page_size=page
        )
        worst = 0
        for _ in range(30):
            adder = PrefillAdder(page, _NoCache(), _Alloc(kv), None, 0.5, max_prefill, chunk if chunk > 0 else None)
            while True:
                lens = [int(rng.integers(max_prefill - 600, max_prefill)), int(rng.integers(ctx // 2, ctx))]
                if adder.add_one_req(_Req(int(rng.choice(lens))), False, None) != AddReqResult.CONTINUE:
                    break
            worst = max(worst, sum(r.extend_input_len for r in adder.can_run_list))
        if chunk < 0:
            assert worst > max_prefill  # the old bound (chunk / max_prefill_tokens) was too small
        else:
            assert worst == chunk == bound  # chunks fill the budget exactly
        assert worst <= bound

    def test_row_bound_with_chunked_prefill_graphs_and_mixed_chunk():
        f = er.max_tokens_per_forward
        assert f(_sa(chunked_prefill_size=8192), 512, 32768, 10**6, 1) == 8192
        assert f(_sa(chunked_prefill_size=8192, enable_mixed_chunk=True), 512, 32768, 10**6, 1) == 8192 + 512
        assert f(_sa(chunked_prefill_size=64, cuda_graph_max_bs=512), 48, 4096, 10**6, 1) == 512
        assert f(_sa(chunked_prefill_size=64, cuda_graph_bs=[1, 8, 700]), 48, 4096, 10**6, 1) == 700
        assert f(_sa(chunked_prefill_size=-1, max_prefill_tokens=100), 4, 50, 10**6, 16) == 160
        assert f(_sa(chunked_prefill_size=-1, max_prefill_tokens=100), 4, 50, 120, 16) == 120

    def test_a_layer_that_did_not_capture_is_missing_not_stale():
        m = Tiny()
        cap = _cap(m)
        m(torch.tensor([1, 2]))
        er.on_forward_end(_fb([5, 6]))
        er.capture(3, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))  # only layer 3 routes the next one
        er.on_forward_end(_fb([7]))
        p = er.encode_output(cap.assemble("x", torch.tensor([5, 6, 7])))
        assert p["missing"] == [[2, 3]]
        d = sglang_routing.to_jsonl_records("x", sglang_routing.decode_expert_routing(p))
        assert {r["token_idx"] for r in d if r["type"] == "route"} == {0, 1}

    def test_buffers_never_reallocated_clear_error_when_exceeded():
        m = Tiny()
        cap = _cap(m, rows=4)
        ptr = cap.dev_ids.data_ptr()
        m(torch.arange(4))
        cap.on_forward_end(torch.arange(4))
        with pytest.raises(RuntimeError, match="--enable-return-expert-routing"):
            m(torch.arange(5))
        assert cap.dev_ids.data_ptr() == ptr and cap.dev_ids.shape[0] == 4

    # ---- 5. host memory, rank 0 only, fp16, E from the model, stale staging reads
    def test_only_attention_tp_rank0_allocates_and_collects():
        er.set_capturer(None)
        mr = types.SimpleNamespace(server_args=_sa(enable_return_expert_routing=True), tp_rank=1)
        import sglang.srt.layers.dp_attention as dpa

        orig = dpa.get_attention_tp_rank
        dpa.get_attention_tp_rank = lambda: 1
        try:
            er.init_for_model_runner(mr)
        finally:
            dpa.get_attention_tp_rank = orig
        assert er.get_capturer() is None
        r = Req("R", [1, 2, 3], 0, gen=1)
        er.collect_for_request(r, None)  # never touches the pool, no error payload either
        assert getattr(r, "expert_routing_payload", None) is None
        er.set_capturer(None, sender=True)

    def test_init_for_model_runner_sizes_from_the_bound_and_fp16():
        class MR:
            server_args = _sa(
                enable_return_expert_routing=True,
                chunked_prefill_size=-1,
                max_prefill_tokens=300,
                cuda_graph_max_bs=8,
                expert_routing_weights_dtype="float16",
            )
            tp_rank = 0
            max_total_num_tokens = 4000
            page_size = 1
            max_running_requests = 16
            model_config = types.SimpleNamespace(context_len=200, hf_text_config=types.SimpleNamespace(num_experts=8))
            device = "cpu"
            model = Tiny()

        er.init_for_model_runner(MR())
        cap = er.get_capturer()
        assert cap.max_rows == 500 and cap.num_kv_slots == 4001
        assert cap.weights_dtype_name == "float16" and cap.dev_weights.dtype == torch.float16
        MR.model(torch.tensor([3, 4]))
        er.on_forward_end(_fb([10, 11]))
        p = er.encode_output(cap.assemble("x", torch.tensor([10, 11])))
        d = sglang_routing.decode_expert_routing(p)
        assert p["weights_dtype"] == "float16" and d["topk_weights"].shape == (2, 3, 2)
        assert cap._store_weights.dtype == np.float16

    def test_footprint_qwen3_235b_at_1m_slots():
        f = er.footprint(num_layers=94, top_k=8, num_experts=128, rows=8192, num_kv_slots=1_000_000)
        assert f["host_kv_store"] == 1_000_000 * 94 * 8 * 5  # 3.50 GiB
        assert f["device"] == 8192 * 94 * 8 * 5  # 29.4 MiB
        assert f["pinned_staging"] == 2 * 8192 * (94 * 8 * 5 + 8)  # 58.9 MiB
        assert er.footprint(94, 8, 128, 8192, 1_000_000, "float16")["host_kv_store"] == 1_000_000 * 94 * 8 * 3

    def test_num_experts_from_model_and_config_variants():
        class Experts(torch.nn.Module):
            def __init__(self, n, shared=0):
                super().__init__()
                self.num_experts, self.num_fused_shared_experts = n, shared

        m = Tiny(E=8)
        for i in (1, 3, 4):
            m.layers[i].experts = Experts(300 + 1, shared=1)  # config says 8: the model knows better
        cap = _cap(m, E=8)
        assert cap.num_experts == 300 and cap.np_ids_dtype == np.int16
        assert er.config_num_experts(types.SimpleNamespace(ffn_config={"moe_num_experts": 16})) == 16  # DBRX
        assert er.config_num_experts(types.SimpleNamespace(ffn_config=types.SimpleNamespace(moe_num_experts=4))) == 4
        assert er.config_num_experts(types.SimpleNamespace(num_experts=[64, 256])) == 256  # ERNIE-VL / Hunyuan
        assert er.config_num_experts(types.SimpleNamespace(hidden_size=8)) is None

    def test_finish_waits_for_the_staged_forward_that_computed_its_positions():
        FakeEvent.log = []
        m = Tiny()
        cap = _cap(m, slots=64, rows=8, event_factory=FakeEvent)
        # forward 1 computes positions 0..2 of "a" (slots 3, 4, 5); forward 2 (overlap: still in
        # flight) computes position 3 of "a", the token after its last one, and position 0 of "b"
        m(torch.tensor([5, 6, 7]))
        er.on_forward_end(_fb([3, 4, 5], extend=True, rids=["a"], seq_lens=[3], new=[3]))
        m(torch.tensor([8, 9]))
        er.on_forward_end(_fb([6, 7], extend=True, rids=["a", "b"], seq_lens=[4, 1], new=[1, 1]))
        e1, e2 = FakeEvent.log
        p = cap.assemble("a", torch.tensor([3, 4, 5]))  # a finished with seqlen 4: positions 0..2
        assert e1.synced and not e2.synced  # waited for forward 1 only
        assert not (p["ids"] == cap.fill).any()
        ref, _ = _reference(m, [5, 6, 7])
        er.set_capturer(cap)
        np.testing.assert_array_equal(p["ids"].astype(np.int64), ref)
        cap.assemble("b", torch.tensor([7]))
        assert e2.synced and cap.drained_fid == 2

    # ---- 6. OpenAI endpoints through the real serving classes
    class _TM:
        """Stand-in TokenizerManager: what the OpenAI serving classes read, generate_request yields ret items."""

        def __init__(self, flag, num_experts=8):
            self.server_args = _sa(enable_return_expert_routing=flag)
            self.request_logger = types.SimpleNamespace(log_requests=False, log_requests_level=0)
            self.served_model_name = "m"
            self.model_config = types.SimpleNamespace(
                is_multimodal=False,
                get_default_sampling_params=lambda: {},
                hf_config=types.SimpleNamespace(architectures=["Qwen3MoeForCausalLM"]),
                hf_text_config=types.SimpleNamespace(num_experts=num_experts),
            )
            self.tokenizer = types.SimpleNamespace(chat_template=None, apply_chat_template=lambda *a, **k: [1, 2, 3])
            self.seen = []

        def create_abort_task(self, obj):
            return None  # StreamingResponse background task: nothing to abort here

        async def generate_request(self, obj, raw):
            """Like TokenizerManager: streaming yields chunks tagged "index", only the final one of a
            request carries meta_info["expert_routing"]; otherwise one ret item per choice."""
            self.seen.append(obj)
            obj.normalize_batch_and_arguments()
            er.validate_request(obj, self.server_args, self.model_config)  # before the first yield, as upstream
            n = 1 if obj.is_single else len(obj.rid)
            items = []
            for i in range(n):
                meta = {
                    "id": f"r{i}",
                    "finish_reason": {"type": "length"},
                    "prompt_tokens": 3,
                    "completion_tokens": 1,
                    "cached_tokens": 0,
                    "weight_version": "default",
                }
                if er.request_item(obj.return_expert_routing, i):
                    meta["expert_routing"] = er.encode_routing(np.full((2, 1, 2), i), np.ones((2, 1, 2)), [0], 8)
                items.append({"text": f"t{i}", "output_ids": [5], "meta_info": meta, "index": i})
            if obj.stream:
                for it in items:
                    first = dict(
                        it,
                        text="t",
                        meta_info={
                            k: v for k, v in it["meta_info"].items() if k not in ("expert_routing", "finish_reason")
                        },
                    )
                    yield first
                for it in items:
                    yield it
                return
            yield items[0] if obj.is_single else items

    def _serving(kind, flag, num_experts=8):
        from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
        from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

        tm = _TM(flag, num_experts)
        tmpl = types.SimpleNamespace(
            completion_template_name=None,
            chat_template_name=None,
            jinja_template_content_format="string",
            force_reasoning=False,
        )
        return tm, (OpenAIServingChat if kind == "chat" else OpenAIServingCompletion)(tm, tmpl)

    def _openai_call(kind, flag, num_experts=8, **body):
        """The real openai client builds the body (extra_body merged), the real serving class answers."""
        import httpx
        import openai
        from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
        from starlette.requests import Request

        tm, srv = _serving(kind, flag, num_experts)
        cls = ChatCompletionRequest if kind == "chat" else CompletionRequest

        def handler(http_req):
            req = cls.model_validate(json.loads(http_req.content))
            raw = Request(
                {"type": "http", "headers": [], "method": "POST", "path": http_req.url.path, "query_string": b""}
            )

            async def serve():  # one event loop for the handler and the streamed body
                r = await srv.handle_request(req, raw)
                if hasattr(r, "body_iterator"):  # StreamingResponse: server-sent events
                    return r, [c if isinstance(c, bytes) else c.encode() async for c in r.body_iterator]
                return r, None

            r, events = asyncio.run(serve())
            if events is not None:
                return httpx.Response(200, content=b"".join(events), headers={"content-type": "text/event-stream"})
            if hasattr(r, "model_dump_json"):
                return httpx.Response(200, content=r.model_dump_json(), headers={"content-type": "application/json"})
            return httpx.Response(r.status_code, content=r.body, headers={"content-type": "application/json"})

        client = openai.OpenAI(
            api_key="x",
            base_url="http://t/v1",
            max_retries=0,
            http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        )
        if kind == "chat":
            return tm, client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **body)
        return tm, client.completions.create(model="m", prompt="hi", **body)

    @pytest.mark.parametrize("kind", ["completions", "chat"])
    def test_openai_endpoints_return_payload_per_choice(kind):
        tm, resp = _openai_call(kind, True, n=2, extra_body={"return_expert_routing": True})
        assert tm.seen[0].return_expert_routing == [True, True]
        assert [c.index for c in resp.choices] == [0, 1]
        for i, c in enumerate(resp.choices):
            d = sglang_routing.decode_expert_routing(c.model_extra["sglext"]["expert_routing"])
            assert (d["topk_ids"] == i).all()  # each choice its own sequence's routing
        tm, resp = _openai_call(kind, True, n=1)
        assert "sglext" not in (resp.choices[0].model_extra or {})

    @pytest.mark.parametrize("kind", ["completions", "chat"])
    def test_openai_streaming_puts_the_payload_on_each_choices_finishing_chunk(kind):
        tm, stream = _openai_call(kind, True, n=2, stream=True, extra_body={"return_expert_routing": True})
        got = {}
        for chunk in stream:
            for c in chunk.choices:
                ext = (c.model_extra or {}).get("sglext")
                if ext and "expert_routing" in ext:
                    assert c.finish_reason == "length" and c.index not in got
                    got[c.index] = sglang_routing.decode_expert_routing(ext["expert_routing"])
        assert sorted(got) == [0, 1]
        for i, d in got.items():
            assert (d["topk_ids"] == i).all()

    @pytest.mark.parametrize("kind", ["completions", "chat"])
    @pytest.mark.parametrize(
        "flag,body,match",
        [
            (False, {"extra_body": {"return_expert_routing": True}}, "--enable-return-expert-routing"),
            (True, {"n": 2, "extra_body": {"return_expert_routing": [True, False]}}, "per-sample lists"),
        ],
    )
    def test_openai_refusals_are_http_400(kind, flag, body, match):
        import openai

        with pytest.raises(openai.BadRequestError) as e:
            _openai_call(kind, flag, **body)
        assert e.value.status_code == 400 and match in str(e.value)

    @pytest.mark.parametrize("stream", [False, True])
    @pytest.mark.parametrize("kind", ["completions", "chat"])
    def test_openai_request_to_a_dense_model_is_http_400_streamed_or_not(kind, stream):
        """The "not a MoE model" check is the tokenizer manager's; the serving classes kick-start the stream
        generator before sending 200, so a streamed request gets 400 too (native /generate streams: 200 + SSE
        error event, http_server.generate_request)."""
        import openai

        with pytest.raises(openai.BadRequestError) as e:
            _openai_call(kind, True, num_experts=None, stream=stream, extra_body={"return_expert_routing": True})
        assert e.value.status_code == 400 and "not a MoE model" in str(e.value)

    def test_prefix_warmup_requests_for_n_gt_1_carry_no_flag():
        """The real TokenizerManager._handle_batch_request (n > 1 path) with its I/O stubbed."""
        import collections

        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        tm = object.__new__(TokenizerManager)
        sent = []

        async def tokenize(o):
            return _tokenized_req(o.text, return_expert_routing=o.return_expert_routing)

        async def wait(o, state, request):
            yield {"meta_info": {"id": o.rid}}

        tm._tokenize_one_request = tokenize
        tm._send_one_request = lambda t: sent.append(
            (t.input_text, t.sampling_params.max_new_tokens, t.return_expert_routing)
        )
        tm._wait_one_response = wait
        tm._req_stats_init = lambda o: None
        tm.rid_to_state = collections.defaultdict(
            lambda: types.SimpleNamespace(obj=None, time_stats=types.SimpleNamespace(set_finished_time=lambda: None))
        )
        obj = GenerateReqInput(text=["a", "b"], sampling_params={"n": 2}, return_expert_routing=[True, False])
        obj.normalize_batch_and_arguments()

        async def run():
            return [x async for x in tm._handle_batch_request(obj)]

        asyncio.run(run())
        assert sent[:2] == [("a", 0, False), ("b", 0, False)]  # prefix warm-ups: max_new_tokens 0, no flag
        assert sent[2:] == [("a", 4, True), ("a", 4, True), ("b", 4, False), ("b", 4, False)]

    # ---- 8. routed scaling factor: in the weights exactly when the kernel applies it
    def _grouped_cfg(on_output, renormalize, bias=None, f=2.5):
        from sglang.srt.layers.moe.topk import TopKConfig

        return TopKConfig(
            top_k=2,
            use_grouped_topk=True,
            topk_group=2,
            num_expert_group=4,
            renormalize=renormalize,
            correction_bias=bias,
            routed_scaling_factor=f,
            apply_routed_scaling_factor_on_output=on_output,
        )

    @pytest.mark.parametrize("biased", [False, True])
    @pytest.mark.parametrize("renormalize", [True, False])
    @pytest.mark.parametrize("on_output", [True, False])
    def test_scaling_factor_meta_matches_select_experts(on_output, renormalize, biased):
        """Real select_experts (the torch grouped / biased-grouped code the CPU runs): the meta says true
        only when these weights are the unscaled ones times f; biased + no renormalize is null because
        the CUDA fused kernels (flashinfer, moe_fused_gate) scale regardless of renormalize."""
        from sglang.srt.layers.moe.topk import select_experts

        torch.manual_seed(0)
        E, f = 8, 2.5
        bias = torch.randn(E) * 0.1 if biased else None
        cfg = _grouped_cfg(on_output, renormalize, bias, f)
        m = Tiny(E=E, k=2)
        for i in (1, 3, 4):
            m.layers[i].topk.topk_config = cfg
        cap = _cap(m, E=E)
        want = (on_output and renormalize) if not (biased and on_output and not renormalize) else None
        assert cap.scaling == {"weights_include_routed_scaling_factor": want, "routed_scaling_factor": f}
        logits = torch.randn(5, E)
        out = select_experts(torch.zeros(5, 4), logits, cfg, layer_id=1)
        # layer_id None: not captured, so the rows above stay the ones of ``out``
        plain = select_experts(torch.zeros(5, 4), logits, _grouped_cfg(False, renormalize, bias, f), layer_id=None)
        cap.on_forward_end(torch.arange(5))
        ids, w = cap.gather(torch.arange(5))
        np.testing.assert_array_equal(w[:, 0], out.topk_weights.numpy())
        # the CPU runs the torch code: scaled exactly when on_output and renormalize
        scale = f if (on_output and renormalize) else 1.0
        np.testing.assert_allclose(w[:, 0], plain.topk_weights.numpy() * scale, rtol=1e-5)
        if want is not None:
            assert want == (scale == f)
        if renormalize:
            np.testing.assert_allclose(w[:, 0].sum(1), scale, rtol=1e-5)
        p = er.encode_output(cap.assemble("s", torch.arange(5)))
        assert p["weights_include_routed_scaling_factor"] is want and p["routed_scaling_factor"] == f

    def test_scaling_meta_null_for_aiter_biased_and_when_layers_disagree(monkeypatch):
        import sglang.srt.layers.moe.topk as topk_mod

        bias = torch.zeros(8)
        assert er._weights_scaled(_grouped_cfg(False, True, bias)) is False
        monkeypatch.setattr(topk_mod, "_use_aiter", True, raising=False)
        assert er._weights_scaled(_grouped_cfg(False, True, bias)) is None  # aiter's kernel receives f anyway
        assert er._weights_scaled(_grouped_cfg(False, True, None)) is False
        assert er._weights_scaled(_grouped_cfg(True, True, None, f=None)) is False
        meta = er._scaling_meta([_grouped_cfg(True, True), _grouped_cfg(True, False)])
        assert meta == {"weights_include_routed_scaling_factor": None, "routed_scaling_factor": 2.5}

    # ---- 9. review fixes: two routers per layer, no TopK on a MoE config, piecewise bound, gather
    def _mr(model, hf_cfg, **sa_kw):
        return types.SimpleNamespace(
            server_args=_sa(enable_return_expert_routing=True, **sa_kw),
            tp_rank=0,
            max_total_num_tokens=1000,
            page_size=1,
            max_running_requests=8,
            model_config=types.SimpleNamespace(context_len=200, hf_text_config=hf_cfg),
            device="cpu",
            model=model,
        )

    def test_two_topk_in_one_decoder_layer_refused_at_load():
        """ERNIE-4.5-VL: text_experts_topk and vision_experts_topk in one decoder layer, no layer_id."""

        class ErnieVLLike(Tiny):
            def __init__(self):
                super().__init__()
                for i in (1, 3):
                    self.layers[i].text_experts_topk = self.layers[i].topk
                    self.layers[i].vision_experts_topk = TopK(top_k=2, renormalize=True)
                    del self.layers[i].topk

        er.set_capturer(None)
        with pytest.raises(ValueError) as e:
            er.init_for_model_runner(_mr(ErnieVLLike(), types.SimpleNamespace(moe_num_experts=[8, 8])))
        msg = str(e.value)
        assert "decoder layer 1 of ErnieVLLike has 2 MoE TopK modules" in msg
        assert "layers.1.text_experts_topk, layers.1.vision_experts_topk" in msg
        assert "keys routing by decoder layer" in msg and "--enable-return-expert-routing" in msg
        assert er.get_capturer() is None

    def test_moe_config_without_topk_modules_refused_at_load():
        """--model-impl transformers: MoE layers route without sglang's TopK, so nothing could be captured."""

        class Dense(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

        er.set_capturer(None)
        with pytest.raises(ValueError) as e:
            er.init_for_model_runner(_mr(Dense(), types.SimpleNamespace(num_experts=8), model_impl="transformers"))
        assert "--model-impl transformers" in str(e.value) and "--enable-return-expert-routing" in str(e.value)
        er.init_for_model_runner(_mr(Dense(), types.SimpleNamespace(hidden_size=4)))  # dense config: no capture
        assert er.get_capturer() is None

    def test_row_bound_covers_explicit_piecewise_tokens_above_the_max():
        f = er.max_tokens_per_forward
        kw = dict(chunked_prefill_size=64, disable_piecewise_cuda_graph=False, piecewise_cuda_graph_max_tokens=256)
        assert f(_sa(**kw), 8, 4096, 10**6, 1) == 256
        assert f(_sa(**kw, piecewise_cuda_graph_tokens=[16, 128]), 8, 4096, 10**6, 1) == 256
        assert f(_sa(**kw, piecewise_cuda_graph_tokens=[16, 1024]), 8, 4096, 10**6, 1) == 1024
        kw["disable_piecewise_cuda_graph"] = True
        assert f(_sa(**kw, piecewise_cuda_graph_tokens=[16, 1024]), 8, 4096, 10**6, 1) == 64

    @pytest.mark.parametrize("E", [255, 300])
    def test_gather_in_storage_dtype_keeps_values_and_store(E):
        cap = er.ExpertRoutingCapturer([0, 1], [0, 1], 2, E, num_kv_slots=8, max_rows=4)
        ids = torch.tensor([[[0, E - 1], [5, 7]], [[E - 1, 1], [2, 3]]]).to(cap.ids_dtype)
        w = torch.rand(2, 2, 2)
        cap.dev_ids[:2].copy_(ids)
        cap.dev_weights[:2].copy_(w)
        cap.on_forward_end(torch.tensor([3, 5]))
        for _ in range(2):  # the store is not modified by a gather
            gi, gw = cap.gather(torch.tensor([3, 4, 5]))
            assert gi.dtype == cap.np_ids_dtype and gw.dtype == np.float32
            np.testing.assert_array_equal(gi[[0, 2]], ids.numpy())
            assert (gi[1] == cap.fill).all() and np.isnan(gw[1]).all()
            np.testing.assert_array_equal(gw[[0, 2]], w.numpy())

    # ---- 7. run_generate.py --engine sglang: one engine at a time
    def test_run_generate_sglang_runs_engines_one_after_the_other(monkeypatch, tmp_path):
        import transformers

        from moe_routes import generate as run_generate

        alive, events = [], []

        class FakeEngine:
            def __init__(self, **kw):
                assert not alive, "a second SGLang engine started while another one holds the GPU"
                assert "mem_fraction_static" not in kw  # SGLang sizes the one engine itself
                self.log = kw["enable_return_expert_routing"]
                assert "enable_return_routed_experts" not in kw
                alive.append(self)
                events.append(("start", self.log))

            def generate(self, prompt, sampling_params, return_expert_routing):
                assert return_expert_routing == self.log
                events.append(("gen", self.log))
                outs = []
                for i, _ in enumerate(prompt):
                    meta = {"id": str(i), "prompt_tokens": 3, "completion_tokens": 2}
                    if self.log:
                        meta["expert_routing"] = er.encode_routing(
                            np.zeros((4, 2, 2)),
                            np.ones((4, 2, 2)),
                            [1, 3],
                            8,
                            scaling={"weights_include_routed_scaling_factor": False, "routed_scaling_factor": 2.5},
                        )
                    outs.append({"output_ids": [7, 8], "meta_info": meta})
                return outs

            def shutdown(self):
                alive.remove(self)
                events.append(("stop", self.log))

        tok = types.SimpleNamespace(apply_chat_template=lambda m, **k: "p")
        monkeypatch.setattr(sglang, "Engine", FakeEngine)
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
        monkeypatch.setattr(
            transformers.AutoConfig, "from_pretrained", lambda *a, **k: types.SimpleNamespace(num_hidden_layers=4)
        )
        args = run_generate.parse_args(
            [
                "--engine",
                "sglang",
                "--model",
                str(tmp_path),
                "--repeats",
                "3",
                "--num-prompts",
                "2",
                "--out-dir",
                str(tmp_path),
            ]
        )
        res = run_generate.run_sglang(args, ["q1", "q2"], tmp_path)
        assert [e for e in events if e[0] != "gen"] == [
            ("start", False),
            ("stop", False),
            ("start", True),
            ("stop", True),
        ]
        assert len(res["runs"]["log"]) == len(res["runs"]["nolog"]) == 3 and res["tokens_identical"]
        lines = [json.loads(x) for x in (tmp_path / "moe_routes.jsonl").read_text().splitlines()]
        assert lines[0]["kernel_routed_scaling_factor"] == 1.0 and lines[0]["config_routed_scaling_factor"] == 2.5
        assert res["route_records"] == 2 * 4 * 2
