"""CPU tests of the SGLang return_expert_routing patch series (patches/sglang-0.5.10.post1).

Two modes in one file:
* outer (any python with pytest): runs this file again with the sglang test venv's python
  (built by scripts/setup_sglang_test_env.sh, patched sglang==0.5.10.post1 installed) and
  fails if the inner run fails or that venv is missing.
* inner (MOE_ROUTES_SGLANG_INNER=1, inside the venv): imports the patched, installed sglang
  (sgl_kernel, CUDA-only, is stubbed in-process) and drives the real TopK/select_experts,
  GenerateReqInput and the expert_routing module with CPU tensors.
"""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CACHE = Path(os.environ.get("MOE_ROUTES_CACHE", Path.home() / ".cache" / "moe-routes"))
VENV = Path(os.environ.get("SGLANG_TEST_VENV", _CACHE / "sglang-test-venv"))
VENV_PY = VENV / "bin" / "python"
INNER = os.environ.get("MOE_ROUTES_SGLANG_INNER") == "1"


# ============================================================================ outer mode
if not INNER:

    def test_inner_suite_in_sglang_venv():
        if not VENV_PY.exists():
            pytest.fail(f"SGLang test venv missing ({VENV}): run scripts/setup_sglang_test_env.sh "
                        "(scripts/run_tests.sh does)")
        env = dict(os.environ, MOE_ROUTES_SGLANG_INNER="1", PYTHONDONTWRITEBYTECODE="1")
        r = subprocess.run(
            [str(VENV_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
            cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900,
        )
        sys.stdout.write(r.stdout[-20000:])
        sys.stderr.write(r.stderr[-5000:])
        assert r.returncode == 0, f"inner sglang test run failed (rc={r.returncode})"

    def test_gpu_validate_help_without_sglang():
        r = subprocess.run([sys.executable, "-I", str(ROOT / "scripts" / "sglang_gpu_validate.py"), "--help"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "return_expert_routing" in r.stdout

    def test_decode_helper_imports_without_sglang():
        code = ("import sys; sys.path.insert(0, 'scripts'); import sglang_routing; "
                "assert 'sglang' not in sys.modules; print('ok')")
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
    import torch

    import sglang
    from sglang.srt.layers.moe import expert_routing as er
    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.managers.io_struct import GenerateReqInput

    sys.path.insert(0, str(ROOT / "scripts"))
    import sglang_routing  # noqa: E402

    SCHEMA = json.loads((ROOT / "schemas" / "moe_routes.schema.json").read_text())

    # ------------------------------------------------------------------ series applied?
    def test_installed_sglang_is_patched():
        assert sglang.__version__ == "0.5.10.post1"
        pkg = Path(sglang.__file__).parent / "srt"
        assert "_expert_routing.capture(layer_id, topk_ids, topk_weights)" in (pkg / "layers/moe/topk.py").read_text()
        assert "_expert_routing.on_forward_end(forward_batch)" in (pkg / "model_executor/model_runner.py").read_text()
        assert "_expert_routing.collect_for_request" in (pkg / "managers/scheduler_output_processor_mixin.py").read_text()
        assert "req.return_expert_routing = recv_req.return_expert_routing" in (pkg / "managers/scheduler.py").read_text()
        assert "_expert_routing.check_server_args(self)" in (pkg / "server_args.py").read_text()
        assert "return_expert_routing=request.return_expert_routing" in (
            pkg / "entrypoints/openai/serving_chat.py").read_text()

    # ------------------------------------------------------------------ dtypes/encoding
    @pytest.mark.parametrize("e,dt", [(8, "uint8"), (128, "uint8"), (255, "uint8"), (256, "int16"),
                                      (300, "int16"), (32767, "int16"), (40000, "int32")])
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
        assert not hasattr(er, "decode_routing")  # one decoder: scripts/sglang_routing.py
        for d in (sglang_routing.decode_expert_routing(p),
                  sglang_routing.decode_expert_routing({"meta_info": {"expert_routing": p}})):
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
        assert gaps == [{"type": "gap", "req_id": "x", "token_start": 1, "token_end": 3,
                         "reason": "no routing captured for these KV slots"}]
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
                self.topk = TopK(top_k=k + shared, renormalize=True, layer_id=layer_id,
                                 num_fused_shared_experts=shared)
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
                [Block(i in moe, E, k, layer_id=(i if i == 3 else None), shared=shared) for i in range(5)])

        def forward(self, token_ids):
            x = self.embed(token_ids)
            for layer in self.layers:
                x = layer(x)

    def _cap(model, E=8, slots=512, rows=64, **kw):
        cap = er.build_capturer_for_model(model, types.SimpleNamespace(num_experts=E), num_kv_slots=slots,
                                          max_rows=rows, device="cpu", topk_cls=TopK, **kw)
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
            self.output_ids = tokens[len(tokens) - gen:]
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
            forward_mode=types.SimpleNamespace(is_extend=lambda: extend), rids=rids,
            seq_lens_cpu=None if seq_lens is None else torch.tensor(seq_lens), extend_seq_lens_cpu=new)

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
        A = Req("A", [int(x) for x in rng.integers(0, 900, 30)], 0, gen=4)   # prompt 26, gen 4
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
        _run(m, cap, [(B.tokens[20:25], alloc(B, 20, 25), 0), ([B.tokens[25]], alloc(B, 25, 26), 1),
                      ([B.tokens[26]], alloc(B, 26, 27), 3)])
        for r in (A, B, C):
            er.collect_for_request(r, pool)
            r._finished = True
        out = types.SimpleNamespace(expert_routing=er.stream_outputs(["A", "X", "B", "C"], [A, B, C]))
        assert out.expert_routing[1] is None and len(out.expert_routing) == 4
        metas = []
        for i, r in zip((0, 2, 3), (A, B, C)):
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
        m(t1); cap.on_forward_end(torch.tensor([3, 4]))
        assert cap._store_ids is None  # host store not even allocated before the first scatter
        assert (cap.gather([3])[0] == cap.fill).all()  # not scattered before the event completes
        m(t2); cap.on_forward_end(torch.tensor([3, 5]))  # slot 3 overwritten by a later forward
        e1, e2 = FakeEvent.log
        assert not e1.synced
        m(t3); cap.on_forward_end(torch.tensor([6, 7]))  # ring of 2 exhausted -> oldest synchronized
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
