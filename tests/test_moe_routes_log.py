"""Pure-logic tests of the engine-independent half of the vLLM routing capture (moe_routes_log.py): settings,
client request ids, record formatting, the engine-side assembly (KV-slot store, capture integrity, the step's
rows per request), the front-end's returned rows, and the log's writer process (failure policy, full disk,
partial-tail repair).

No torch, no engine: tests/engine_modules.py picks the installed patched module in an engine venv (the code
the series ships) and the source under patches/ in the light dev venv. The writer process is real: this file's
module run as a script."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time

import numpy as np
import pytest
from engine_modules import load_vllm_log_module

pytestmark = pytest.mark.fast

ml = load_vllm_log_module()


# ---------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------
def test_settings_off_values(tmp_path):
    for env in ({}, {"VLLM_LOG_MOE": ""}, {"VLLM_LOG_MOE": "0"}, {"VLLM_LOG_MOE": " 0 "}):
        assert ml.read_settings(env) is None


def test_settings_paths_and_layers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = ml.read_settings({"VLLM_LOG_MOE": "1"})
    assert s.path == str(tmp_path / "moe_routes.jsonl") and s.layers is None
    s = ml.read_settings({"VLLM_LOG_MOE": str(tmp_path / "x.jsonl"), "VLLM_LOG_MOE_LAYERS": "23, 0,12"})
    assert s.layers == (0, 12, 23)
    assert not (tmp_path / "x.jsonl").exists()  # parsing never creates the file


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"VLLM_LOG_MOE": "{d}"}, "is a directory"),
        ({"VLLM_LOG_MOE": "{d}/missing/x.jsonl"}, "does not exist"),
        ({"VLLM_LOG_MOE": "{d}/x.jsonl", "VLLM_LOG_MOE_LAYERS": "1,x"}, "comma-separated"),
        ({"VLLM_LOG_MOE": "{d}/x.jsonl", "VLLM_LOG_MOE_LAYERS": "3,3"}, "duplicate"),
        ({"VLLM_LOG_MOE": "{d}/x.jsonl", "VLLM_LOG_MOE_LAYERS": "-2"}, ">= 0"),
    ],
)
def test_settings_errors_name_variable_and_value(tmp_path, env, needle):
    env = {k: v.format(d=tmp_path) for k, v in env.items()}
    with pytest.raises(ml.MoeRoutesConfigError) as exc:
        ml.read_settings(env)
    var = "VLLM_LOG_MOE_LAYERS" if "VLLM_LOG_MOE_LAYERS" in env else "VLLM_LOG_MOE"
    assert str(exc.value).startswith(f"{var}={env[var]!r}:") and needle in str(exc.value)


# ---------------------------------------------------------------------------------------------------
# request ids as the caller sees them
# ---------------------------------------------------------------------------------------------------
def test_client_request_ids():
    assert ml.client_request("7", None, 0, 1) == ("7", None)
    # n > 1: each child's CompletionOutput.index
    assert ml.client_request("7", None, 2, 3) == ("7", 2)
    # OpenAI completions: prompt 1 of a request with n=2 answers choices 2 and 3 of the response
    tag = ml.ChoiceTag(req_id="cmpl-ab", first_choice=2, num_choices=4)
    assert ml.client_request("cmpl-ab-1", tag, 1, 2) == ("cmpl-ab", 3)
    assert ml.client_request("cmpl-ab-0", ml.ChoiceTag(req_id="cmpl-ab", first_choice=0, num_choices=1), 0, 1) == (
        "cmpl-ab",
        None,
    )
    # a client's vllm_xargs can put a plain dict under the same key: it never chooses the id its records carry
    forged = {"req_id": "someone-else", "first_choice": 5, "num_choices": 9}
    assert ml.client_request("7", forged, 0, 1) == ("7", None)
    assert ml.request_field("a", 3) == b'"a","completion_index":3'


# ---------------------------------------------------------------------------------------------------
# record formatting
# ---------------------------------------------------------------------------------------------------
def _reference_lines(requests, index, pos, layers, ids, w, cached=False):
    out = []
    for t in range(len(pos)):
        for j, layer in enumerate(layers):
            req_id, completion = requests[index[t]]
            rec = {"type": "route", "req_id": req_id}
            if completion is not None:
                rec["completion_index"] = completion
            rec.update(token_idx=int(pos[t]), layer=layer, topk_ids=ids[t, j].tolist(), topk_weights=w[t, j].tolist())
            if cached:
                rec["cached"] = True
            out.append(rec)
    return out


@pytest.mark.parametrize("k,experts,cached", [(1, 4, False), (2, 8, True), (4, 60, False), (8, 300, False)])
def test_format_routes_matches_json_reference(k, experts, cached):
    rng = np.random.default_rng(k)
    n, layers = 300, [0, 5, 23, 1000]
    ids = rng.integers(0, experts, (n, len(layers), k)).astype(np.int32)
    w = rng.random((n, len(layers), k)).astype(np.float32)
    w[0, 0, 0], w[1, 1, 0], w[2, 2, 0] = 0.0, 1.0, np.float32(2.5) * np.float32(1e-7)
    requests = [("0", None), ('odd "id"\\x', 3), ("ümlaut", None), ("cmpl-7", 0)]
    index = rng.integers(0, len(requests), n)
    pos = rng.integers(0, 3_000_000, n)
    data = ml.format_routes([ml.request_field(*r) for r in requests], index, pos, layers, ids, w, cached=cached)
    lines = data.decode().split("\n")
    assert lines[-1] == "" and data.count(b"\n") == n * len(layers)
    got = [json.loads(line) for line in lines[:-1]]
    want = _reference_lines(requests, index, pos, layers, ids, w, cached)
    for g, r in zip(got, want, strict=True):
        assert g["topk_weights"] == pytest.approx(r["topk_weights"], rel=1e-7, abs=0)
        # the printed decimal maps back to exactly the captured float32
        assert np.array_equal(
            np.array(g["topk_weights"], dtype=np.float32), np.array(r["topk_weights"], dtype=np.float32)
        )
        g.pop("topk_weights"), r.pop("topk_weights")
        assert g == r
    # key order: request first (the fixed layout plot_hist's fast path reads)
    for i, g in enumerate(got):
        assert list(g)[:2] == ["type", "req_id"]
        assert list(g)[2] == ("token_idx" if requests[index[i // len(layers)]][1] is None else "completion_index")


def test_float_bytes_round_trips_every_sampled_float32():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    rows = ml.float_bytes(x)
    back = np.array([float(r[r != 0].tobytes()) for r in rows], dtype=np.float32)
    assert np.array_equal(back, x)


def test_negative_expert_id_is_refused():
    with pytest.raises(ml.MoeRoutesCaptureError, match="negative expert id"):
        ml.format_routes(
            [ml.request_field("0", None)],
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
            [0],
            np.array([[[-1, 2]]]),
            np.zeros((1, 1, 2), np.float32),
        )


# ---------------------------------------------------------------------------------------------------
# engine side: the KV-slot store, capture integrity, one step's rows per request
# ---------------------------------------------------------------------------------------------------
def _assembler(num_slots=64, layers=(0,), k=1, block_size=4, weights=True, experts=16):
    return ml.RouteAssembler(
        layers=list(layers),
        top_k=k,
        num_experts=experts,
        num_slots=num_slots,
        block_size=block_size,
        weights=weights,
    )


def _job(names, counts, positions, slots, ids, emit_from=None, gap_blocks=None, fresh=(), experts=16):
    ids = np.asarray(ids, dtype=ml.capture_dtype_for(experts))
    return ml.StepJob(
        [ml.Request(n) for n in names],
        np.asarray(counts),
        np.asarray(positions),
        np.asarray(slots),
        np.zeros(len(names), np.int64) if emit_from is None else np.asarray(emit_from),
        gap_blocks or {},
        np.asarray(fresh, dtype=np.int64),
        ids,
        np.full(ids.shape, 0.5, np.float32),
    )


def _assemble(asm, job):
    return ml.step_rows(asm.assemble(job, job.ids, job.weights if asm.weights else None))


def _by_request(rows, job):
    """{request: [(kind, position, expert id of layer 0, top-1)]} from a step's rows."""
    out = {}
    for b, req in enumerate(job.requests):
        seg = rows.segments_of(b)
        if seg is None:
            continue
        ids = rows.ids[rows.offset[b] : rows.offset[b] + rows.count[b]]
        r, got = 0, []
        for j in range(0, len(seg), 3):
            kind, pos, cnt = seg[j : j + 3]
            for p in range(pos, pos + cnt):
                got.append((kind, p, None if kind >= ml.GAP else int(ids[r, 0, 0])))
                r += kind < ml.GAP
        out[req.engine_id] = got
    return out


def test_same_step_hits_are_filled_after_the_step_is_stored_and_fresh_blocks_never_answer():
    asm = _assembler()
    # step 1: A computes positions 0..7 in blocks 2, 3 (slots 8..15); B, in the same step, hit those two blocks
    # (vLLM registers their hashes when A's blocks are allocated) and computes position 8.
    ids = [[[p + 1]] for p in range(8)] + [[[7]]]
    job = _job(["A", "B"], [8, 1], list(range(8)) + [8], list(range(8, 16)) + [40], ids, gap_blocks={1: [2, 3]})
    job.gap_blocks = {1: np.array([2, 3])}
    got = _by_request(_assemble(asm, job), job)
    assert got["B"] == [(ml.CACHED, p, p + 1) for p in range(8)] + [(ml.COMPUTED, 8, 7)]
    assert got["A"] == [(ml.COMPUTED, p, p + 1) for p in range(8)]
    # step 2: block 3 was allocated afresh (to a request whose forward has not filled it yet) and D hits blocks
    # 2, 3: block 2 still holds A's tokens, block 3 must not answer with A's old routing.
    job = _job(["C", "D"], [1, 1], [0, 8], [44, 48], [[[5]], [[6]]], fresh=[3, 11, 12])
    job.gap_blocks = {1: np.array([2, 3])}
    got = _by_request(_assemble(asm, job), job)
    assert got["D"] == [(ml.CACHED, p, p + 1) for p in range(4)] + [(ml.GAP, p, None) for p in range(4, 8)] + [
        (ml.COMPUTED, 8, 6)
    ]


def test_a_failed_capture_still_invalidates_the_blocks_of_its_step():
    """Issue 17 item 6: a step whose capture is incomplete raises, but the blocks it allocated afresh are invalid
    before that, so a later prefix-cache hit on them is a gap, never the previous occupant's routing."""
    asm = _assembler()
    fill = _job(["A"], [8], list(range(8)), list(range(8, 16)), [[[p + 1]] for p in range(8)])
    _assemble(asm, fill)
    # block 2 goes to C afresh; C's forward left layer 0 unwritten for one token (-1)
    broken = _job(["C"], [2], [0, 1], [8, 9], [[[3]], [[ml.unwritten_id(16)]]], fresh=[2])
    with pytest.raises(ml.MoeRoutesCaptureError, match="layer 0 did not capture routing for 1 of 2 tokens"):
        _assemble(asm, broken)
    hit = _job(["D"], [1], [8], [20], [[[4]]])
    hit.gap_blocks = {0: np.array([2, 3])}
    got = _by_request(_assemble(asm, hit), hit)["D"]
    assert got[:4] == [(ml.GAP, p, None) for p in range(4)], "stale routing of block 2 answered a hit"
    assert got[4:8] == [(ml.CACHED, p, p + 1) for p in range(4, 8)]


def test_copy_on_write_of_a_partial_hit_reads_back_from_the_copy():
    """vLLM 0.32.0 (hybrid KV layouts: hits at a granularity below the block size): a hit that ends inside a block
    gets a private copy of that block (KVCacheBlockCopy) before the forward, and its hit positions are read from the
    copy's slots. The copy is also a freshly allocated block: invalidated first, then copied into, then this step's
    own tokens stored."""
    asm = _assembler()
    fill = _job(["A"], [8], list(range(8)), list(range(8, 16)), [[[p + 1]] for p in range(8)])  # blocks 2, 3
    _assemble(asm, fill)
    # B hits positions 0..5: block 2 whole, block 3 up to position 5 -> copied into fresh block 7; B computes 6, 7
    job = _job(["B"], [2], [6, 7], [30, 31], [[[14]], [[15]]], fresh=[7])
    job.gap_blocks = {0: np.array([2, 7])}
    job.block_copies = np.array([[3, 7]])
    got = _by_request(_assemble(asm, job), job)["B"]
    assert got == [(ml.CACHED, p, p + 1) for p in range(6)] + [(ml.COMPUTED, 6, 14), (ml.COMPUTED, 7, 15)]
    # without the copy the partial block answers nothing (never A's stale rows of another block)
    asm2 = _assembler()
    _assemble(asm2, fill)
    job2 = _job(["B"], [2], [6, 7], [30, 31], [[[14]], [[15]]], fresh=[7])
    job2.gap_blocks = {0: np.array([2, 7])}
    got2 = _by_request(_assemble(asm2, job2), job2)["B"]
    assert got2[:4] == [(ml.CACHED, p, p + 1) for p in range(4)] and got2[4:6] == [(ml.GAP, 4, None), (ml.GAP, 5, None)]


def test_block_mirror_slots_match_a_block_table():
    """The host block mirror gives the slot a block table gives: block_table[pos // bs] * bs + pos % bs, growing
    past its first size, -1 beyond a request's blocks or for an unknown request."""
    rng = np.random.default_rng(0)
    mirror = ml.BlockMirror(16, rows=2, cols=2)
    tables = {}
    for i in range(9):
        blocks = rng.permutation(1000)[: rng.integers(1, 12)].tolist()
        mirror.set(f"r{i}", blocks[:3])
        mirror.append(f"r{i}", blocks[3:])
        tables[f"r{i}"] = blocks
    mirror.drop("r4")
    del tables["r4"]
    names = list(tables) + ["r4"]
    rows = mirror.rows_of(names)
    pos = rng.integers(0, 200, size=(len(names), 5))
    got = mirror.slots(np.repeat(rows, 5), pos.ravel()).reshape(len(names), 5)
    for i, name in enumerate(names):
        for j in range(5):
            p = int(pos[i, j])
            blocks = tables.get(name, [])
            want = blocks[p // 16] * 16 + p % 16 if p // 16 < len(blocks) else -1
            assert got[i, j] == want, (name, p)


def test_expert_ids_outside_the_model_are_a_capture_error():
    asm = _assembler(experts=8)
    with pytest.raises(ml.MoeRoutesCaptureError, match="captured expert id 9 .* the model has 8 experts"):
        _assemble(asm, _job(["A"], [1], [0], [0], [[[9]]]))


def test_positions_recomputed_after_a_preemption_are_not_sent_twice():
    asm = _assembler(num_slots=0)
    job = _job(["A", "B"], [3, 2], [0, 1, 2, 0, 1], [-1] * 5, [[[i]] for i in range(5)], emit_from=[2, 0])
    rows = _assemble(asm, job)
    assert _by_request(rows, job) == {"A": [(ml.COMPUTED, 2, 2)], "B": [(ml.COMPUTED, 0, 3), (ml.COMPUTED, 1, 4)]}
    assert rows.skipped.tolist() == [2, 0]


def test_capture_dtype_leaves_a_value_no_id_takes():
    for experts, dtype, unwritten in [
        (8, np.uint8, 255),
        (255, np.uint8, 255),
        (256, np.int16, -1),
        (70000, np.int32, -1),
    ]:
        assert ml.capture_dtype_for(experts) == dtype and ml.unwritten_id(experts) == unwritten
        assert not 0 <= unwritten < experts and np.iinfo(dtype).min <= unwritten <= np.iinfo(dtype).max
        asm = _assembler(experts=experts)
        with pytest.raises(ml.MoeRoutesCaptureError, match="did not capture routing"):
            _assemble(asm, _job(["A"], [1], [0], [0], [[[unwritten]]], experts=experts))


def test_store_and_rows_keep_ids_in_the_narrowest_dtype_and_weights_only_when_read():
    for experts, dtype in [(8, np.uint8), (256, np.uint8), (300, np.uint16), (70000, np.int32)]:
        asm = _assembler(experts=experts, weights=False)
        rows = _assemble(asm, _job(["A"], [1], [0], [0], [[[experts - 1]]], experts=experts))
        assert asm.store_ids.dtype == dtype and asm.store_w is None
        assert rows.ids.dtype == dtype and rows.weights is None and int(rows.ids[0, 0, 0]) == experts - 1


@pytest.mark.parametrize(("num_experts", "dtype"), [(8, np.uint8), (256, np.uint8), (257, np.uint16)])
def test_id_dtype_is_the_smallest_unsigned_type(num_experts, dtype):
    assert ml.id_dtype_for(num_experts) == dtype


def test_footprint_of_the_deepseek_v3_shape():
    """Issue 17 item 10: 61 decoder layers, 58 MoE, 256 experts, top-8, 65,536 batched tokens."""
    shape = dict(captured_layers=58, top_k=8, num_experts=256, max_tokens=65536, num_slots=1 << 20, staging_depth=2)
    ids_only = ml.footprint(buffer_rows=61, weights=False, **shape)
    assert ids_only["store_per_slot"] == 58 * 8 + 1  # uint8 ids and a valid flag (upstream: 464 per token)
    assert ids_only["device"] == 65536 * 61 * 8 * 2  # int16 ids
    with_w = ml.footprint(buffer_rows=61, weights=True, **shape)
    assert with_w["store_per_slot"] == 58 * 8 * 5 + 1 and with_w["pinned"] == 2 * with_w["device"]


# ---------------------------------------------------------------------------------------------------
# front-end: the rows a completion returns, widened to every decoder layer
# ---------------------------------------------------------------------------------------------------
def test_layout_widens_with_slices_and_dense_layers_are_zero():
    rows = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2) + 1
    layout = ml.Layout([1, 2, 4], 6)
    assert layout.runs == [(1, 3, 0), (4, 5, 2)]
    out = layout.widen(rows)
    assert out.shape == (2, 6, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, [1, 2, 4]], rows)
    assert not out[:, [0, 3, 5]].any()
    every = ml.Layout([0, 1, 2], 3)
    assert every.identity and every.widen(rows) is rows


def _chunk(segments, first_id=0):
    n = sum(segments[j + 2] for j in range(0, len(segments), 3) if segments[j] < ml.GAP)
    ids = (np.arange(n, dtype=np.uint8) + first_id).reshape(n, 1, 1)
    return segments, ids, ids.astype(np.float32) / 10


def test_returned_rows_start_cached_runs_first_and_the_count():
    got = ml.ReturnedRows(start=3)
    got.add(*_chunk([ml.CACHED, 0, 4, ml.COMPUTED, 4, 2]))  # rows of positions 0..5: 3..5 kept
    got.add(*_chunk([ml.COMPUTED, 6, 1], first_id=6))
    assert got.rows == 4 and got.broken is None
    ids, w = got.take(ml.Layout([0], 1), np.dtype(np.uint8), 1)
    assert ids[:, 0, 0].tolist() == [3, 4, 5, 6] and w[:, 0, 0].tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6])
    nothing = ml.ReturnedRows(start=4)
    nothing.add(*_chunk([ml.COMPUTED, 0, 4]))  # all before the start: an empty array, not None
    ids, w = nothing.take(ml.Layout([0, 2], 3), np.dtype(np.uint8), 1)
    assert ids.shape == (0, 3, 1) and w.shape == (0, 3, 1) and w.dtype == np.float32 and nothing.received
    assert nothing.take(ml.Layout([0, 2], 3), np.dtype(np.uint8), 1, weights=False)[1] is None


@pytest.mark.parametrize(
    "chunks,why",
    [
        ([[ml.GAP, 0, 2, ml.COMPUTED, 2, 1]], "have no routing"),
        ([[ml.COMPUTED, 0, 2], [ml.COMPUTED, 3, 1]], "position 3 arrived where position 2 was expected"),
        ([[ml.GAP_CAPTURE, 0, 1]], "capture of this step was incomplete"),
    ],
)
def test_returned_rows_with_a_hole_are_never_returned(chunks, why):
    got = ml.ReturnedRows(start=0)
    for segments in chunks:
        got.add(*_chunk(segments))
    assert got.broken is not None and why in got.broken


def test_a_gap_before_the_start_does_not_matter():
    got = ml.ReturnedRows(start=4)
    got.add(*_chunk([ml.GAP, 0, 4, ml.COMPUTED, 4, 1]))
    assert got.broken is None and got.rows == 1


# ---------------------------------------------------------------------------------------------------
# the log's writer process: records, stats, failure policy, full disk, partial tails
# ---------------------------------------------------------------------------------------------------
META = {"type": "meta", "num_hidden_layers": 2, "writer_data_parallel_rank": 0}


def _client(tmp_path, on_error="stop", name="r.jsonl"):
    return ml.LogClient(ml.Settings(str(tmp_path / name), None, on_error))


def _routes(name, segments, first_id=0, layers=2, k=2, index=None):
    n = sum(segments[j + 2] for j in range(0, len(segments), 3) if segments[j] < ml.GAP)
    ids = (np.arange(n * layers * k, dtype=np.uint8) % 7 + first_id).reshape(n, layers, k)
    return ml.Chunk(ml.request_field(name, index), None, segments, ids, np.full(ids.shape, 0.25, np.float32))


def _send(client, chunks, layers, cols):
    """As the front-end hands a step over: the step's arrays and (field, dp_rank, segments, first row, rows)."""
    entries, row = [], 0
    for c in chunks:
        entries.append((c.field, c.dp_rank, c.segments, row, len(c.ids)))
        row += len(c.ids)
    client.routes(np.concatenate([c.ids for c in chunks]), np.concatenate([c.weights for c in chunks]), entries,
                  layers, cols)  # fmt: skip


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_process_writes_meta_gaps_cached_then_computed_records(tmp_path):
    client = _client(tmp_path)
    client.meta(dict(META))
    _send(
        client,
        [_routes("A", [ml.COMPUTED, 0, 3]), _routes("B", [ml.GAP, 0, 2, ml.CACHED, 2, 2, ml.COMPUTED, 4, 1], index=1)],
        layers=[3, 5],
        cols=[1],
    )
    stats = client.flush(30)
    assert stats["route_records"] == 4 and stats["cached_records"] == 2 and stats["gaps"] == 1
    assert stats["gap_positions"] == 2
    recs = _lines(tmp_path / "r.jsonl")
    assert recs[0]["type"] == "meta" and recs[0]["writer"]["pid"] == client.proc.pid
    assert "writer_data_parallel_rank" not in recs[0] and recs[0]["writer"]["data_parallel_rank"] == 0
    assert [(r["type"], r.get("req_id"), r.get("token_idx"), r.get("cached", False)) for r in recs[1:]] == [
        ("gap", "B", None, False),
        ("route", "B", 2, True),
        ("route", "B", 3, True),
        ("route", "A", 0, False),
        ("route", "A", 1, False),
        ("route", "A", 2, False),
        ("route", "B", 4, False),
    ]
    assert all(r["layer"] == 5 for r in recs[1:] if r["type"] == "route")  # only the logged column
    assert recs[1]["completion_index"] == 1 and (recs[1]["token_start"], recs[1]["token_end"]) == (0, 2)
    client.close()
    assert client.proc.returncode == 0


def test_many_completions_of_one_step_keep_their_rows(tmp_path):
    client = _client(tmp_path)
    client.meta(dict(META))
    chunks = [_routes(f"r{i}", [ml.COMPUTED, i, 1], first_id=i % 3) for i in range(40)]
    _send(client, chunks, layers=[0, 1], cols=None)
    client.flush(30)
    recs = [r for r in _lines(tmp_path / "r.jsonl") if r["type"] == "route"]
    assert len(recs) == 80
    for r in recs:
        i = int(r["req_id"][1:])
        assert r["token_idx"] == i and r["topk_ids"][0] == (r["layer"] * 2) % 7 + i % 3
    client.close()


def test_writer_is_not_cut_short_by_a_signal_to_the_servers_process_group(tmp_path):
    client = _client(tmp_path)
    assert os.getsid(client.proc.pid) != os.getsid(0), "a Ctrl-C to the server's group would kill the writer"
    client.close()


def test_full_disk_stops_the_log_with_an_error_record_and_keeps_serving(tmp_path):
    """Policy 'stop': the write that fails is cut back, the error record makes room by cutting whole lines off
    this writer's own last write, later steps are dropped and counted, nothing raises."""

    def fill(client):
        client.meta(dict(META))
        _send(client, [_routes("A", [ml.COMPUTED, 0, 20])], layers=[0, 1], cols=None)
        client.flush(30)

    scratch = _client(tmp_path, name="scratch.jsonl")
    fill(scratch)
    scratch.close()
    room = (tmp_path / "scratch.jsonl").stat().st_size + 50  # meta + A's 40 lines fit, not one more step
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (room, old[1]))  # the writer process inherits it at start
    try:
        full = _client(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
    fill(full)
    _send(full, [_routes("B", [ml.COMPUTED, 0, 20])], layers=[0, 1], cols=None)  # does not fit
    stats = full.flush(30)
    assert "File too large" in stats["stopped"]
    _send(full, [_routes("C", [ml.COMPUTED, 0, 1])], layers=[0, 1], cols=None)
    assert full.flush(30)["steps_dropped"] == 1
    data = (tmp_path / "r.jsonl").read_bytes()
    assert data.endswith(b"\n")
    recs = [json.loads(line) for line in data.splitlines()]
    assert recs[-1]["type"] == "error" and recs[-1]["policy"] == "stop" and recs[-1]["records_dropped"] >= 1
    assert recs[-1]["writer_id"] == recs[0]["writer"]["id"]
    assert [r["type"] for r in recs] == ["meta"] + ["route"] * (40 - recs[-1]["records_dropped"]) + ["error"]
    assert not any(r.get("req_id") == "B" for r in recs), "a failed write left part of its lines"
    full.close()


def test_fail_policy_raises_at_the_next_use(tmp_path):
    client = _client(tmp_path, on_error="fail")
    client.meta(dict(META))
    os.kill(client.proc.pid, signal.SIGKILL)
    client.proc.wait()
    deadline = time.time() + 10
    while client.error is None and time.time() < deadline:
        time.sleep(0.05)
    assert "writer process" in client.error
    with pytest.raises(RuntimeError, match="VLLM_LOG_MOE_ON_ERROR=fail"):
        _send(client, [_routes("A", [ml.COMPUTED, 0, 1])], layers=[0, 1], cols=None)
    with pytest.raises(RuntimeError, match="VLLM_LOG_MOE_ON_ERROR=fail"):
        client.flush(5)
    client.close()


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("partial", [b'{"type":"route","req_id":"0","tok', b"x" * 200_000])
def test_writer_cuts_a_partial_tail_back_to_the_last_whole_line_and_says_so(tmp_path, partial):
    """A SIGKILLed writer can leave part of a line (Linux stops a write(2) between pages once a fatal signal is
    pending): the next writer cuts it under its lock before its meta record, and says so there and in the
    front-end's log."""
    path = tmp_path / "r.jsonl"
    whole = b'{"type":"meta","writer":{"id":"killed"}}\n{"type":"route","req_id":"0"}\n'
    path.write_bytes(whole + partial)
    handler = _Messages()  # vLLM's logger does not propagate to the root logger, where caplog listens
    ml.logger.addHandler(handler)
    try:
        client = _client(tmp_path)
        client.meta(dict(META))
        client.flush(30)
    finally:
        ml.logger.removeHandler(handler)
    client.close()
    data = path.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\n")
    recs = _lines(path)
    assert [r["type"] for r in recs] == ["meta", "route", "meta"]
    assert recs[-1]["repaired_partial_tail_bytes"] == len(partial)
    assert any("partial line" in m and str(len(partial)) in m for m in handler.messages), handler.messages


def test_writer_leaves_whole_lines_alone_and_cuts_a_file_without_any_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"type":"meta"}\n')
    client = _client(tmp_path)
    client.meta(dict(META))
    client.close()
    recs = _lines(path)
    assert len(recs) == 2 and "repaired_partial_tail_bytes" not in recs[1]
    path.write_bytes(b'{"type":"me')  # killed inside the first line
    client = _client(tmp_path)
    client.meta(dict(META))
    client.close()
    (rec,) = _lines(path)
    assert rec["repaired_partial_tail_bytes"] == len(b'{"type":"me')


def test_writer_process_writes_what_it_was_sent_when_the_front_end_is_gone(tmp_path):
    """The front-end killed: the writer reads what is left on the socket, writes it, and exits."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import importlib.util, os, signal, sys, numpy as np
        spec = importlib.util.spec_from_file_location("moe_routes_log", {ml.__file__!r})
        ml = importlib.util.module_from_spec(spec); sys.modules["moe_routes_log"] = ml; spec.loader.exec_module(ml)
        client = ml.LogClient(ml.Settings({str(tmp_path / "r.jsonl")!r}, None, "stop"))
        client.meta({{"type": "meta"}})
        ids = np.zeros((500, 2, 2), np.uint8)
        client.routes(ids, ids.astype(np.float32), [(b'"A"', None, [0, 0, 500], 0, 500)], [0, 1], None)
        import time; time.sleep(0.5)
        print(client.proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    writer_pid = int(out.stdout.split()[0])
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(writer_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    recs = _lines(tmp_path / "r.jsonl")
    assert len([r for r in recs if r["type"] == "route"]) == 1000
