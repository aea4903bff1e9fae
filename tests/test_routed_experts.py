"""moe_routes.routed_experts (the client helper), moe_routes.records and run_generate's returned-routing
pieces, without an engine. The openai-python objects and the real engines: tests/test_routed_experts_sources.py."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import types

import jsonschema
import numpy as np
import pytest

from moe_routes import generate
from moe_routes.records import iter_route_records
from moe_routes.routed_experts import (
    NPY_MAGIC,
    RoutedExperts,
    RoutedExpertsMissing,
    check_layer_layout,
    decode_npy_b64,
    encode_npy_b64,
    from_choice,
    from_response,
    get_field,
    moe_layer_indices,
    moe_rows,
    num_routed_experts,
    routing_layout,
)
from moe_routes.schema import load_schema

pytestmark = pytest.mark.fast

RNG = np.random.default_rng(0)


def upstream_encode(arr: np.ndarray) -> str:
    """vLLM 0.33's numpy2base64 (utils/serial_utils.py), with the stdlib base64 in place of pybase64."""
    with io.BytesIO() as buffer:
        np.save(buffer, arr, allow_pickle=False)
        return base64.b64encode(buffer.getbuffer()).decode("ascii")


def upstream_decode(s: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


def sample(T=5, L=3, K=2, E=8, dense=(0,), seed=1):
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if E <= 256 else np.uint16
    ids = rng.integers(0, E, size=(T, L, K)).astype(dtype)
    w = rng.uniform(0.05, 1.0, size=(T, L, K)).astype(np.float32)
    for layer in dense:
        ids[:, layer] = 0
        w[:, layer] = 0.0
    return ids, w


class Choice:
    """What openai-python makes of a choice: declared fields as attributes, the rest in model_extra."""

    def __init__(self, finish_reason="length", **extra):
        self.finish_reason = finish_reason
        self.index = extra.pop("index", 0)
        self.model_extra = extra


# ------------------------------------------------------------------------------------------------
# the .npy base64 encoding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts, dtype", [(8, np.uint8), (256, np.uint8), (257, np.uint16), (1024, np.uint16)])
def test_roundtrip_matches_the_upstream_encoder_and_decoder(num_experts, dtype):
    ids = RNG.integers(0, num_experts, size=(7, 4, 3)).astype(dtype)
    s = encode_npy_b64(ids)
    assert s == upstream_encode(ids)  # byte-identical to the server's encoding
    for got in (decode_npy_b64(s), upstream_decode(s)):
        assert got.dtype == dtype and got.shape == ids.shape
        np.testing.assert_array_equal(got, ids)
    assert base64.b64decode(s).startswith(NPY_MAGIC)


def test_weights_roundtrip_exactly():
    w = RNG.random((6, 2, 4)).astype(np.float32)
    got = decode_npy_b64(upstream_encode(w), field="routed_expert_weights")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w)


def test_empty_array_roundtrips():
    ids = np.zeros((0, 3, 2), np.uint8)
    got = decode_npy_b64(encode_npy_b64(ids))
    assert got.shape == (0, 3, 2) and got.dtype == np.uint8


def test_bytes_input_accepted():
    ids = np.arange(6, dtype=np.uint8).reshape(1, 3, 2)
    np.testing.assert_array_equal(decode_npy_b64(encode_npy_b64(ids).encode("ascii")), ids)


@pytest.mark.parametrize(
    "value, needle",
    [
        ("not base64!", "not standard base64"),
        ("QUJD$", "not standard base64"),
        ("QUJDRA", "not standard base64"),  # padding missing
        ("é", "non-ASCII"),
        (12, "expected a base64 string, got int"),
        (None, "expected a base64 string, got NoneType"),
    ],
)
def test_bad_base64_is_refused(value, needle):
    with pytest.raises(ValueError, match=needle) as e:
        decode_npy_b64(value)
    assert "routed_experts" in str(e.value)


def test_sglang_raw_int32_says_what_it_is():
    # SGLang 0.5.10.post1 meta_info["routed_experts"]: base64 of raw int32, C order, no .npy header
    raw = base64.b64encode(np.arange(24, dtype=np.int32).tobytes()).decode()
    with pytest.raises(ValueError, match=r"\.npy magic") as e:
        decode_npy_b64(raw)
    assert "SGLang" in str(e.value) and "moe_routes.sglang_routing" in str(e.value)


def test_pickled_object_array_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        decode_npy_b64(base64.b64encode(buf.getvalue()).decode())


def test_truncated_and_trailing_bytes_are_refused():
    raw = base64.b64decode(encode_npy_b64(np.arange(60, dtype=np.uint8).reshape(5, 3, 4)))
    with pytest.raises(ValueError, match="malformed .npy"):
        decode_npy_b64(base64.b64encode(raw[:-7]).decode())
    with pytest.raises(ValueError, match="bytes after the .npy array"):
        decode_npy_b64(base64.b64encode(raw + b"\0\0").decode())


# ------------------------------------------------------------------------------------------------
# RoutedExperts
# ------------------------------------------------------------------------------------------------
def test_routed_experts_checks_rank_dtype_and_weights():
    ids, w = sample()
    r = RoutedExperts(ids, w, 3)
    assert (r.num_positions, r.num_layers, r.top_k) == (5, 3, 2) and list(r.positions) == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="rank 3"):
        RoutedExperts(ids[:, 0])
    assert RoutedExperts(ids.astype(np.int32)).ids.dtype == np.int32  # upstream's out-of-tree platforms
    with pytest.raises(ValueError, match="negative expert id -1"):
        RoutedExperts(ids.astype(np.int32) - 1)
    with pytest.raises(ValueError, match="uint8, uint16 or int32"):
        RoutedExperts(ids.astype(np.int64))
    with pytest.raises(ValueError, match="routed_expert_weights: expected float32, got float64"):
        RoutedExperts(ids, w.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        RoutedExperts(ids, w[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        RoutedExperts(ids, w, -1)
    with pytest.raises(ValueError, match="expected an int"):
        RoutedExperts(ids, w, True)


def test_check_against_what_the_caller_knows():
    ids, w = sample(T=9, L=3, K=2, E=8)
    r = RoutedExperts(ids, w, prompt_start=2)
    assert r.check(num_tokens=12, num_layers=3, top_k=2, num_experts=8) is r  # 12 - 1 - 2 rows
    for kwargs, needle in (
        ({"num_tokens": 11}, "9 rows, expected 8"),
        ({"num_layers": 2}, "3 layers, expected 2"),
        ({"top_k": 4}, "top_k 2, expected 4"),
        ({"num_experts": int(ids.max())}, "out of range"),
    ):
        with pytest.raises(ValueError, match=needle):
            r.check(**kwargs)


def test_from_completion_output():
    ids, w = sample()
    out = types.SimpleNamespace(routed_experts=ids, routed_expert_weights=w)
    r = RoutedExperts.from_completion_output(out, prompt_start=4)
    assert r.ids is ids and r.weights is w and r.prompt_start == 4
    r = RoutedExperts.from_completion_output(types.SimpleNamespace(routed_experts=ids))
    assert r.weights is None
    with pytest.raises(RoutedExpertsMissing, match="enable_return_routed_experts=True"):
        RoutedExperts.from_completion_output(types.SimpleNamespace(routed_experts=None))


# ------------------------------------------------------------------------------------------------
# choices: dicts (requests/httpx JSON) and objects with model_extra (openai-python)
# ------------------------------------------------------------------------------------------------
def _payload(ids, w, start=0):
    return {
        "routed_experts": encode_npy_b64(ids),
        "routed_expert_weights": encode_npy_b64(w),
        **({} if start is None else {"routed_experts_prompt_start": start}),
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda p: {"index": 0, "text": "x", "finish_reason": "length", **p},  # /v1/completions
        lambda p: {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop", **p},  # chat
        lambda p: {"index": 0, "delta": {}, "finish_reason": "stop", **p},  # final chunk of a streamed choice
        lambda p: Choice(text="x", **p),  # openai-python object
    ],
    ids=["completion", "chat", "stream-final", "object"],
)
def test_from_choice_decodes_every_choice_kind(make):
    ids, w = sample()
    r = from_choice(make(_payload(ids, w, 2)))
    np.testing.assert_array_equal(r.ids, ids)
    np.testing.assert_array_equal(r.weights, w)
    assert r.prompt_start == 2


def test_from_choice_prompt_start_echo_and_default():
    ids, w = sample()
    assert from_choice(_payload(ids, w, None)).prompt_start == 0  # upstream vLLM does not echo it
    assert from_choice(_payload(ids, w, None), prompt_start=5).prompt_start == 5
    assert from_choice(_payload(ids, w, 5), prompt_start=5).prompt_start == 5
    with pytest.raises(ValueError, match="sent 4, the server used 5"):
        from_choice(_payload(ids, w, 5), prompt_start=4)
    with pytest.raises(ValueError, match="expected an int"):
        from_choice({**_payload(ids, w), "routed_experts_prompt_start": "5"})


def test_from_choice_without_weights():
    ids, _ = sample()
    r = from_choice({"routed_experts": encode_npy_b64(ids), "finish_reason": "stop"})
    assert r.weights is None and r.prompt_start == 0


def test_from_choice_bad_payloads_name_the_field():
    ids, w = sample()
    with pytest.raises(ValueError, match="routed_expert_weights: expected float32"):
        from_choice({**_payload(ids, w), "routed_expert_weights": encode_npy_b64(w.astype(np.float16))})
    with pytest.raises(ValueError, match="routed_experts: expected rank 3"):
        from_choice({**_payload(ids, w), "routed_experts": encode_npy_b64(ids[0])})
    with pytest.raises(ValueError, match="routed_experts: expected uint8, uint16 or int32"):
        from_choice({**_payload(ids, w), "routed_experts": encode_npy_b64(ids.astype(np.int64))})
    with pytest.raises(ValueError, match="routed_expert_weights: the decoded bytes"):
        from_choice({**_payload(ids, w), "routed_expert_weights": base64.b64encode(w.tobytes()).decode()})


def test_missing_routing_says_how_to_start_the_server():
    for choice in (
        {"index": 0, "text": "x", "finish_reason": "length"},
        {"index": 0, "text": "x", "finish_reason": "length", "routed_experts": None},
        Choice(text="x"),
    ):
        with pytest.raises(RoutedExpertsMissing, match="--enable-return-routed-experts"):
            from_choice(choice)
    with pytest.raises(RoutedExpertsMissing, match="null: the server returns no routing.*beam search"):
        from_choice({"index": 0, "token_ids": [1], "finish_reason": "stop", "routed_experts": None})  # generate
    with pytest.raises(RoutedExpertsMissing, match="final chunk"):
        from_choice({"index": 0, "delta": {"content": "x"}, "finish_reason": None})
    with pytest.raises(RoutedExpertsMissing, match="sglang_routing"):
        from_choice({"index": 0, "text": "x", "finish_reason": "stop", "sglext": {"routed_experts": "..."}})
    ids, w = sample()
    with pytest.raises(ValueError, match="on choice.message"):
        from_choice({"index": 0, "message": {"content": "x", **_payload(ids, w)}, "finish_reason": "stop"})


def test_from_response_orders_by_choice_index():
    a, wa = sample(seed=1)
    b, wb = sample(seed=2)
    resp = {"choices": [{"index": 1, "finish_reason": "stop", **_payload(b, wb)}, {"index": 0, **_payload(a, wa)}]}
    got = from_response(resp)
    np.testing.assert_array_equal(got[0].ids, a)
    np.testing.assert_array_equal(got[1].ids, b)
    with pytest.raises(ValueError, match="choices"):
        from_response({"id": "x"})


def test_get_field_prefers_model_extra_then_attributes():
    c = Choice(text="t", token_ids=[1, 2])
    assert get_field(c, "token_ids") == [1, 2] and get_field(c, "finish_reason") == "length"
    assert get_field(c, "absent") is None and get_field({"a": 1}, "a") == 1


# ------------------------------------------------------------------------------------------------
# which layers are MoE layers
# ------------------------------------------------------------------------------------------------
def cfg(**kw):
    return types.SimpleNamespace(**kw)


@pytest.mark.parametrize(
    "config, want",
    [
        # Qwen1.5/Qwen2-MoE: (i + 1) % decoder_sparse_step == 0, not in mlp_only_layers, num_experts > 0
        (cfg(model_type="qwen2_moe", num_hidden_layers=4, num_experts=60, decoder_sparse_step=1), [0, 1, 2, 3]),
        (cfg(model_type="qwen2_moe", num_hidden_layers=6, num_experts=8, decoder_sparse_step=2), [1, 3, 5]),
        (
            cfg(model_type="qwen2_moe", num_hidden_layers=5, num_experts=8, decoder_sparse_step=1, mlp_only_layers=[0]),
            [1, 2, 3, 4],
        ),
        (cfg(model_type="qwen2_moe", num_hidden_layers=3, num_experts=0, decoder_sparse_step=1), []),
        (
            cfg(
                model_type="qwen3_moe", num_hidden_layers=6, num_experts=128, decoder_sparse_step=3, mlp_only_layers=[5]
            ),
            [2],
        ),
        # DeepSeek: i >= first_k_dense_replace and i % moe_layer_freq == 0, n_routed_experts not None
        (cfg(model_type="deepseek_v3", num_hidden_layers=5, n_routed_experts=256, first_k_dense_replace=3), [3, 4]),
        (
            cfg(
                model_type="deepseek_v2",
                num_hidden_layers=7,
                n_routed_experts=64,
                first_k_dense_replace=1,
                moe_layer_freq=2,
            ),
            [2, 4, 6],
        ),
        (cfg(model_type="deepseek_v2", num_hidden_layers=3, n_routed_experts=None, first_k_dense_replace=0), []),
        (cfg(model_type="deepseek", num_hidden_layers=3, n_routed_experts=64, first_k_dense_replace=1), [1, 2]),
        # GLM-4.5: i >= first_k_dense_replace; vLLM's glm4_moe.py has no moe_layer_freq rule
        (
            cfg(
                model_type="glm4_moe",
                num_hidden_layers=5,
                n_routed_experts=128,
                first_k_dense_replace=3,
                moe_layer_freq=2,
            ),
            [3, 4],
        ),
        # every layer
        (cfg(model_type="mixtral", num_hidden_layers=3, num_local_experts=8), [0, 1, 2]),
        (cfg(model_type="gpt_oss", num_hidden_layers=2, num_local_experts=32), [0, 1]),
        (cfg(model_type="olmoe", num_hidden_layers=2, num_experts=64), [0, 1]),
        (cfg(model_type="phimoe", num_hidden_layers=2, num_local_experts=16), [0, 1]),
        (cfg(model_type="granitemoe", num_hidden_layers=2, num_local_experts=32), [0, 1]),
        # config.json dicts, and a multimodal wrapper whose text_config is known
        ({"model_type": "glm4_moe", "num_hidden_layers": 3, "n_routed_experts": 8, "first_k_dense_replace": 1}, [1, 2]),
        (
            cfg(model_type="some_vl", text_config=cfg(model_type="qwen3_moe", num_hidden_layers=2, num_experts=4)),
            [0, 1],
        ),
    ],
)
def test_moe_layer_indices(config, want):
    assert moe_layer_indices(config) == want


def test_moe_layer_indices_refuses_to_guess():
    with pytest.raises(ValueError, match="unknown model_type 'llama4'"):
        moe_layer_indices(cfg(model_type="llama4", num_hidden_layers=4, num_local_experts=16))
    with pytest.raises(ValueError, match="unknown model_type None"):
        moe_layer_indices({})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        moe_layer_indices(cfg(model_type="mixtral", num_local_experts=8))
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        moe_layer_indices(cfg(model_type="qwen2_moe", num_hidden_layers=2, num_experts=8, decoder_sparse_step=0))


def test_num_routed_experts_and_layout():
    assert num_routed_experts(cfg(num_experts=60)) == 60
    assert num_routed_experts(cfg(n_routed_experts=256, num_experts=None)) == 256
    assert num_routed_experts({"num_local_experts": 8}) == 8
    assert num_routed_experts(cfg(model_type="llama")) is None
    c = cfg(
        model_type="glm4_moe", num_hidden_layers=3, n_routed_experts=8, first_k_dense_replace=1, num_experts_per_tok=2
    )
    layout = {"num_hidden_layers": 3, "moe_layers": [1, 2], "num_experts": 8, "top_k": 2}
    assert routing_layout(c) == dict(layout, routed_scaling_factor=None)
    # a multimodal wrapper: everything from its text config, the scaling factor too
    wrapped = {"model_type": "some_vl", "text_config": dict(vars(c), routed_scaling_factor=2.5)}
    assert routing_layout(wrapped) == dict(layout, routed_scaling_factor=2.5)


def test_moe_rows_and_layer_layout_check():
    ids, w = sample(T=4, L=3, K=2, dense=(0,))
    np.testing.assert_array_equal(moe_rows(ids, [1, 2]), ids[:, 1:])
    with pytest.raises(ValueError, match="out of range"):
        moe_rows(ids, [3])
    r = RoutedExperts(ids, w)
    check_layer_layout(r, [1, 2])
    check_layer_layout(RoutedExperts(ids), [1, 2])  # ids only: dense rows must still be 0
    with pytest.raises(ValueError, match="layer 1 is dense"):
        check_layer_layout(r, [2])
    w0 = w.copy()
    w0[2, 1] = 0.0
    with pytest.raises(ValueError, match=r"layer 1 is an MoE layer.*row 2 \(position 2\)"):
        check_layer_layout(RoutedExperts(ids, w0), [1, 2])
    with pytest.raises(ValueError, match="out of range"):
        check_layer_layout(r, [1, 2, 3])
    check_layer_layout(RoutedExperts(ids[:0], w[:0]), [2])  # no positions: nothing to contradict


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
ROUTE = jsonschema.Draft202012Validator(load_schema())


def test_route_records_positions_cached_gaps_and_exact_weights():
    ids, w = sample(T=4, L=2, K=3, dense=())
    recs = list(
        iter_route_records(
            "r", ids, w, [3, 5], token_start=10, num_cached_tokens=12, missing=[(11, 13)], completion_index=1
        )
    )
    gaps = [r for r in recs if r["type"] == "gap"]
    routes = [r for r in recs if r["type"] == "route"]
    assert gaps == [
        {
            "type": "gap",
            "req_id": "r",
            "completion_index": 1,
            "token_start": 11,
            "token_end": 13,
            "reason": "no routing captured for these KV slots",
        }
    ]
    assert [(r["token_idx"], r["layer"]) for r in routes] == [(10, 3), (10, 5), (13, 3), (13, 5)]
    assert [r.get("cached", False) for r in routes] == [True, True, False, False]
    for r in recs:
        ROUTE.validate(json.loads(json.dumps(r)))
    for r in routes:
        row, col = r["token_idx"] - 10, [3, 5].index(r["layer"])
        assert r["topk_ids"] == ids[row, col].tolist()
        # 9 significant digits map back to exactly the float32 the engine returned
        np.testing.assert_array_equal(np.float32(json.loads(json.dumps(r["topk_weights"]))), w[row, col])
    assert list(routes[0]) == [
        "type",
        "req_id",
        "completion_index",
        "token_idx",
        "layer",
        "topk_ids",
        "topk_weights",
        "cached",
    ]


def test_a_gap_that_begins_before_the_first_row_is_reported_from_that_row():
    ids, w = sample(T=4, L=1, K=2, dense=())
    recs = list(iter_route_records("r", ids, w, [0], token_start=10, missing=[(2, 4), (8, 12)]))
    assert [(r["type"], r.get("token_start", r.get("token_idx"))) for r in recs] == [
        ("gap", 10),
        ("route", 12),
        ("route", 13),
    ]
    assert recs[0]["token_end"] == 12


def test_route_records_refuse_mismatched_arrays():
    ids, w = sample(T=2, L=2, K=2, dense=())
    with pytest.raises(ValueError, match="do not match"):
        list(iter_route_records("r", ids, w[:, :1], [0, 1]))
    with pytest.raises(ValueError, match="do not match"):
        list(iter_route_records("r", ids, w, [0]))


# ------------------------------------------------------------------------------------------------
# run_generate: arguments, CLI flags, the returned-routing writer (read back by the plot reader)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["offline", "offline-weights"])
def test_each_offline_engine_must_return_what_its_mode_means(source):
    """An engine that returned more or less than its mode says (e.g. an ids-only engine without ids) stops the run
    instead of measuring something else."""

    def outs(ids, weights):
        c = types.SimpleNamespace(
            routed_experts=np.zeros((1, 1, 1)) if ids else None,
            routed_expert_weights=np.zeros((1, 1, 1)) if weights else None,
        )
        return [types.SimpleNamespace(request_id="0", outputs=[c])]

    nolog_ids = source == "offline-weights"
    good = {"log": [outs(True, True)], "nolog": [outs(nolog_ids, False)]}
    generate.check_returned_per_mode(source, good)
    for bad in ({"log": [outs(True, False)]}, {"nolog": [outs(not nolog_ids, False)]}, {"nolog": [outs(True, True)]}):
        with pytest.raises(SystemExit, match=f"--routing-source {source}: the"):
            generate.check_returned_per_mode(source, {**good, **bad})


def test_parse_args_routing_source():
    assert generate.parse_args([]).routing_source == "log"
    assert generate.parse_args(["--routing-source", "http"]).routing_source == "http"
    assert generate.parse_args(["--engine", "sglang"]).routing_source == "offline"
    assert generate.mode_meaning("vllm", "offline")["log"].startswith("LLM(enable_return_routed_experts=True")
    for argv in (
        ["--engine", "sglang", "--routing-source", "log"],
        ["--routing-source", "offline", "--keep-all-runs-log"],
        ["--server-timeout", "0"],
    ):
        with pytest.raises(SystemExit):
            generate.parse_args(argv)


def test_server_cli_args_mirror_the_engine_kwargs(monkeypatch):
    from moe_routes import vllm_args

    monkeypatch.setattr(vllm_args, "installed_engine_defaults", dict)  # a pin that needs none (0.15.1, a GPU)
    args = generate.parse_args(["--model", "/m", "--enforce-eager", "--max-model-len", "2048", "--dtype", "float32"])
    kwargs = generate.vllm_engine_kwargs(args)
    assert generate.server_cli_args(kwargs) == [
        "--model",
        "/m",
        "--seed",
        "1234",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--tensor-parallel-size",
        "1",
        "--max-model-len",
        "2048",
    ]
    assert generate.server_cli_args(generate.ROUTED_EXPERTS_ENGINE_ARGS) == [
        "--enable-return-routed-experts",
        "--enable-return-routed-expert-weights",
    ]


@pytest.fixture
def fake_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="0.0-test"))


def _glm_items(n=3, P=5, G=4, start=0):
    items = []
    for i in range(n):
        ids, w = sample(T=P + G - 1 - start, L=3, K=2, E=8, dense=(0,), seed=10 + i)
        items.append(
            {"req_id": f"cmpl-{i}", "routed": RoutedExperts(ids, w, start), "num_tokens": P + G, "num_cached_tokens": 2}
        )
    return items


GLM = cfg(
    model_type="glm4_moe",
    num_hidden_layers=3,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
)


def test_write_returned_routes_is_schema_valid_and_plot_readable(tmp_path, fake_torch):
    from moe_routes.plot import load_routes

    args = generate.parse_args(["--model", str(tmp_path / "model"), "--routing-source", "http"])
    items = _glm_items()
    out = tmp_path / "moe_routes.jsonl"
    n = generate.write_returned_routes(args, out, GLM, items, engine_version="0.15.1", source="http")
    lines = out.read_text().splitlines()
    assert n == len(lines) - 1 == 3 * 8 * 2  # 3 completions x (5 + 4 - 1) positions x 2 MoE layers
    for line in lines:
        ROUTE.validate(json.loads(line))
    meta = json.loads(lines[0])
    assert meta["returned_via"] == "http" and meta["engine"] == "vllm" and meta["vllm_version"] == "0.15.1"
    assert meta["moe_layers"] == meta["layers_logged"] == [1, 2] and meta["num_hidden_layers"] == 3
    assert (meta["num_experts"], meta["top_k"]) == (8, 2)
    assert meta["kernel_routed_scaling_factor"] is None and meta["config_routed_scaling_factor"] == 2.5
    first = json.loads(lines[1])
    assert first == {
        "type": "route",
        "req_id": "cmpl-0",
        "token_idx": 0,
        "layer": 1,
        "topk_ids": items[0]["routed"].ids[0, 1].tolist(),
        "topk_weights": first["topk_weights"],
        "cached": True,
    }
    counts = load_routes(out)
    assert counts.records == n and counts.requests == 3 and counts.layers == [1, 2]


def test_write_returned_routes_refuses_inconsistent_arrays(tmp_path, fake_torch):
    args = generate.parse_args(["--model", str(tmp_path / "model")])
    out = tmp_path / "r.jsonl"

    def refused(items, needle, config=GLM):
        with pytest.raises(ValueError, match=needle):
            generate.write_returned_routes(args, out, config, items, engine_version="x", source="offline")

    items = _glm_items(n=1)
    refused([{**items[0], "num_tokens": 10}], "request cmpl-0: .*8 rows, expected 9")
    r = items[0]["routed"]
    refused([{**items[0], "routed": RoutedExperts(r.ids)}], "no routed_expert_weights")
    refused(items, "layer 1 is dense", config=cfg(**{**vars(GLM), "first_k_dense_replace": 2}))
    refused(items, "3 layers, expected 4", config=cfg(**{**vars(GLM), "num_hidden_layers": 4}))


def test_http_completion_items_read_openai_style_objects():
    ids, w = sample(T=5, L=3, K=2)
    choice = Choice(text="abc", prompt_token_ids=[1, 2, 3], token_ids=[4, 5, 6], **_payload(ids, w, 0))
    usage = types.SimpleNamespace(prompt_tokens=3, completion_tokens=3, prompt_tokens_details=None)
    resp = types.SimpleNamespace(id="cmpl-a", choices=[choice], usage=usage)
    gens, items = generate.http_completion_items([resp])
    assert gens == [{"req_id": "cmpl-a", "prompt_tokens": 3, "text": "abc", "token_ids": [4, 5, 6]}]
    assert items[0]["num_tokens"] == 6 and items[0]["num_cached_tokens"] == 0
    np.testing.assert_array_equal(items[0]["routed"].ids, ids)
    usage.prompt_tokens_details = types.SimpleNamespace(cached_tokens=2)
    assert generate.http_completion_items([resp])[1][0]["num_cached_tokens"] == 2
    choice.model_extra.pop("token_ids")
    with pytest.raises(ValueError, match="no token ids"):
        generate.http_completion_items([resp])


# ------------------------------------------------------------------------------------------------
# run_generate's server child (http source): start-up errors, process-group shutdown
# ------------------------------------------------------------------------------------------------
HEALTHY_SERVER = """
import http.server, subprocess, sys
port = int(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine core
print("grandchild", child.pid, flush=True)
if len(sys.argv) > 2:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a server that ignores Ctrl-C
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def test_server_that_exits_reports_its_output(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('ValueError: no such flag --foo', file=sys.stderr); sys.exit(3)"]
    server = generate.VllmServer("log", cmd, generate.free_port(), tmp_path / "s.log")
    try:
        with pytest.raises(SystemExit) as e:
            server.wait_healthy(60)
    finally:
        server.stop()
    msg = str(e.value)
    assert "the log server exited with code 3" in msg and "ValueError: no such flag --foo" in msg, msg


def test_server_health_timeout_names_the_option_and_output(tmp_path):
    cmd = [sys.executable, "-c", "print('loading weights ...', flush=True); import time; time.sleep(600)"]
    server = generate.VllmServer("nolog", cmd, generate.free_port(), tmp_path / "s.log")
    try:
        deadline = time.time() + 60  # a loaded machine can take longer than the timeout to start Python
        while b"loading weights" not in (tmp_path / "s.log").read_bytes() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(SystemExit) as e:
            server.wait_healthy(1.5)
    finally:
        server.stop(grace=5)
    msg = str(e.value)
    assert "did not answer /health within 2 s (--server-timeout" in msg and "loading weights" in msg, msg
    assert server.proc.returncode is not None


@pytest.mark.parametrize("ignores_sigint", [False, True])
def test_server_stop_ends_the_whole_process_group(tmp_path, ignores_sigint):
    port = generate.free_port()
    cmd = [sys.executable, "-c", HEALTHY_SERVER, str(port)] + (["stubborn"] if ignores_sigint else [])
    log = tmp_path / "s.log"
    server = generate.VllmServer("log", cmd, port, log)
    try:
        server.wait_healthy(60)
    finally:
        server.stop(grace=2)
    grandchild = int(next(line for line in log.read_text().splitlines() if line.startswith("grandchild")).split()[1])
    assert server.proc.returncode is not None
    deadline = time.monotonic() + 10  # a SIGKILLed process can still be listed for a moment
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild), "the server's child outlived stop()"
