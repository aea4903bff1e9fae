"""Pure-logic tests of the vLLM routing log's engine-independent half (moe_routes_log.py): settings,
client request ids, record formatting, the writer (KV-slot store, failure policy, partial-tail repair).

No torch, no engine: tests/engine_modules.py picks the installed patched module in an engine venv (the code
the series ships) and the source under patches/ in the light dev venv."""

from __future__ import annotations

import errno
import json
import logging
import queue
import threading
import types

import numpy as np
import pytest
from engine_modules import load_vllm_log_module, start_writer_state
from engine_modules import request as _req

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


def test_external_request_id():
    assert ml.external_request_id("17-0a1b2c3d") == "17"
    assert ml.external_request_id("chatcmpl-abc-0a1b2c3d") == "chatcmpl-abc"
    assert ml.external_request_id("17") == "17"


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
# the writer: KV-slot store order, fresh blocks, capture integrity, failure policy, partial tails
# ---------------------------------------------------------------------------------------------------
def _writer_state(tmp_path, **kw):
    return start_writer_state(ml.WriterState, tmp_path, **kw)


def _job(requests, counts, positions, slots, ids, w=None, emit_from=None, gap_blocks=None, fresh=()):
    ids = np.asarray(ids, dtype=np.int32)
    return ml.StepJob(
        requests,
        np.asarray(counts),
        np.asarray(positions),
        np.asarray(slots),
        np.zeros(len(requests), np.int64) if emit_from is None else np.asarray(emit_from),
        gap_blocks or {},
        np.asarray(fresh, dtype=np.int64),
        ids,
        np.full(ids.shape, 0.5, np.float32) if w is None else w,
    )


def _lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]


def test_same_step_hits_are_filled_after_the_step_is_stored_and_fresh_blocks_never_answer(tmp_path):
    st = _writer_state(tmp_path, num_slots=64, block_size=4, layers=(0,), k=1)
    a, b, c, d = _req("A"), _req("B", 1), _req("C"), _req("D")
    # step 1: A computes positions 0..7 in blocks 2, 3 (slots 8..15); B, in the same step, hit those two
    # blocks (vLLM registers their hashes when A's blocks are allocated) and computes position 8.
    ids = [[[p + 1]] for p in range(8)] + [[[7]]]
    st.jobs.put(
        _job(
            [a, b],
            [8, 1],
            list(range(8)) + [8],
            list(range(8, 16)) + [40],
            ids,
            gap_blocks={1: np.array([2, 3])},
            fresh=[2, 3, 10],
        )
    )
    # step 2: block 3 was allocated afresh (to a request whose forward has not filled it yet) and D hits
    # blocks 2, 3: block 2 still holds A's tokens, block 3 must not answer with A's old routing.
    st.jobs.put(
        _job([c, d], [1, 1], [0, 8], [44, 48], [[[5]], [[6]]], gap_blocks={1: np.array([2, 3])}, fresh=[3, 11, 12])
    )
    done = threading.Event()
    st.jobs.put(done)
    assert done.wait(30)
    recs = _lines(tmp_path)[1:]
    b_cached = sorted((r["token_idx"], r["topk_ids"][0]) for r in recs if r["req_id"] == "B" and r.get("cached"))
    assert b_cached == [(p, p + 1) for p in range(8)], "B's hit positions must carry A's routing of the same step"
    assert all(r.get("completion_index") == 1 for r in recs if r["req_id"] == "B")
    d_recs = [r for r in recs if r["req_id"] == "D"]
    assert sorted((r["token_idx"], r["topk_ids"][0]) for r in d_recs if r.get("cached")) == [
        (p, p + 1) for p in range(4)
    ]
    gaps = [r for r in d_recs if r["type"] == "gap"]
    assert [(g["token_start"], g["token_end"]) for g in gaps] == [(4, 8)]
    assert st.stats["gaps"] == 1 and st.error is None
    st.thread.close()


class _DoneEvent:
    def synchronize(self):
        pass


class _HostCopy:
    """A staged host tensor: the writer reads it through .numpy()."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


def test_writer_failure_stops_the_log_with_an_error_record_and_releases_each_buffer_once(tmp_path):
    depth = 3
    # the engine's pinned host buffers (moe_routes._HostStaging), as the writer sees them
    staging = types.SimpleNamespace(
        buffers=[(np.zeros((64, 2, 2), np.int32), np.zeros((64, 2, 2), np.float32)) for _ in range(depth)],
        free=queue.Queue(),
    )
    for i in range(depth):
        staging.free.put(i)
    st = _writer_state(tmp_path, staging=staging)
    good = np.arange(8, dtype=np.int32).reshape(2, 2, 2) % 8
    bad = good.copy()
    bad[1, 1] = -1  # layer 1 did not write token 1 this step
    for ids in (good, bad, good):
        idx = staging.free.get()
        buf_ids, buf_w = staging.buffers[idx]
        buf_ids[:2] = ids
        job = _job([_req("q")], [2], [0, 1], [-1, -1], ids)
        job.ids, job.weights = _HostCopy(buf_ids[:2]), _HostCopy(buf_w[:2])
        job.event, job.staging_index = _DoneEvent(), idx
        st.jobs.put(job)
    done = threading.Event()
    st.jobs.put(done)
    assert done.wait(30)
    freed = []
    while not staging.free.empty():
        freed.append(staging.free.get_nowait())
    assert sorted(freed) == list(range(depth)), "a staging buffer was released twice or never"
    recs = _lines(tmp_path)
    assert [r["type"] for r in recs] == ["meta"] + ["route"] * 4 + ["error"]
    assert "layer 1 did not capture routing" in recs[-1]["error"] and recs[-1]["policy"] == "stop"
    assert st.stopped and st.stats["steps_dropped"] == 1
    st.thread.close()


def test_full_disk_error_record_makes_room_by_cutting_whole_lines_off_its_own_last_write(tmp_path):
    """On a full disk the final error record is written by cutting whole lines off the end of this writer's
    own latest write; that reads the file back, so the writer's fd must be readable."""
    st = _writer_state(tmp_path, layers=(0,), k=1)
    real_write_all = st.thread._write_all
    full = {"on": False}

    def write_all(view):
        if full["on"]:
            full["on"] = False  # room is made once the writer cut its own lines
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(view)

    st.thread._write_all = write_all
    st.jobs.put(_job([_req("q")], [40], list(range(40)), [-1] * 40, [[[1]]] * 40))
    done = threading.Event()
    st.jobs.put(done)
    assert done.wait(30)
    full["on"] = True
    st.jobs.put(_job([_req("q")], [1], [40], [-1], [[[-1]]]))  # an incomplete capture: the log stops
    done = threading.Event()
    st.jobs.put(done)
    assert done.wait(30)
    data = (tmp_path / "r.jsonl").read_bytes()
    assert data.endswith(b"\n")
    recs = _lines(tmp_path)
    assert recs[-1]["type"] == "error" and recs[-1]["records_dropped"] > 0
    assert [r["type"] for r in recs] == ["meta"] + ["route"] * (40 - recs[-1]["records_dropped"]) + ["error"]
    assert st.thread.is_alive() and st.stopped
    st.thread.close()


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("partial", [b'{"type":"route","req_id":"0","tok', b"x" * 200_000])
def test_writer_cuts_a_partial_tail_back_to_the_last_whole_line_and_says_so(tmp_path, partial):
    """A SIGKILLed writer can leave part of a line (Linux stops a write(2) between pages once a fatal signal
    is pending): the next writer cuts it under its lock before its meta record, and says so there and in the
    engine log."""
    path = tmp_path / "r.jsonl"
    whole = b'{"type":"meta","writer":{"id":"killed"}}\n{"type":"route","req_id":"0"}\n'
    path.write_bytes(whole + partial)
    # vLLM's logger does not propagate to the root logger, where caplog listens
    handler = _Messages()
    ml.logger.addHandler(handler)
    try:
        st = _writer_state(tmp_path)
    finally:
        ml.logger.removeHandler(handler)
    st.thread.close()
    data = path.read_bytes()
    assert data.startswith(whole) and data.endswith(b"\n")
    recs = _lines(tmp_path)
    assert [r["type"] for r in recs] == ["meta", "route", "meta"]
    assert recs[-1]["writer"] == {"id": "test"} and recs[-1]["repaired_partial_tail_bytes"] == len(partial)
    assert any("partial line" in m and str(len(partial)) in m for m in handler.messages), handler.messages


def test_writer_leaves_whole_lines_alone_and_cuts_a_file_without_any_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"type":"meta"}\n')
    _writer_state(tmp_path).thread.close()
    recs = _lines(tmp_path)
    assert len(recs) == 2 and "repaired_partial_tail_bytes" not in recs[1]
    path.write_bytes(b'{"type":"me')  # killed inside the first line
    _writer_state(tmp_path).thread.close()
    (rec,) = _lines(tmp_path)
    assert rec["repaired_partial_tail_bytes"] == len(b'{"type":"me')


def test_client_request_ids():
    def params(tag):
        return types.SimpleNamespace(extra_args=None if tag is None else {"moe_routes": tag, "other": 1})

    assert ml.client_request("7-0a1b2c3d", params(None)) == ("7", None)
    assert ml.client_request("7-0a1b2c3d", params({"req_id": "7", "first_choice": 0, "num_choices": 1, "n": 1})) == (
        "7",
        None,
    )
    # a user id that looks like a child id is taken as it is when n == 1
    assert ml.client_request(
        "2_x-0a1b2c3d", params({"req_id": "2_x", "first_choice": 0, "num_choices": 1, "n": 1})
    ) == ("2_x", None)
    assert ml.client_request("2_7-0a1b2c3d", params({"req_id": "7", "first_choice": 0, "num_choices": 3, "n": 3})) == (
        "7",
        2,
    )
    # OpenAI completions: prompt 1 of a request with n=2 answers choices 2 and 3
    tag = {"req_id": "cmpl-ab", "first_choice": 2, "num_choices": 4, "n": 2}
    assert ml.client_request("1_cmpl-ab-1-0a1b2c3d", params(tag)) == ("cmpl-ab", 3)
    assert ml.client_request("cmpl-ab-1-0a1b2c3d", params({**tag, "n": 1, "num_choices": 2})) == ("cmpl-ab", 2)
    with pytest.raises(ml.MoeRoutesCaptureError, match="not a parallel-sampling child id"):
        ml.client_request("7-0a1b2c3d", params({"req_id": "7", "first_choice": 0, "num_choices": 3, "n": 3}))


# ---------------------------------------------------------------------------------------------------
# per-request return (enable_return_routed_experts): assembled rows -> each request's array chunk
# ---------------------------------------------------------------------------------------------------
def _assembler(num_slots=64, layers=(1, 2)):
    st = ml.WriterState(
        settings=None,
        layers=list(layers),
        rows=list(range(len(layers))),
        top_k=2,
        num_experts=8,
        manager_block_size=4,
        kernel_block_size=4,
        num_slots=num_slots,
        meta={},
    )
    return ml.RouteAssembler(st)


def _engine_req(name, start=0):
    return ml.Request(name, None, engine_id=f"{name}-engine", return_from=start)


def _rows(asm, job, start_layers=(1, 2)):
    return ml.returned_rows(asm.assemble(job), list(start_layers), 4, ml.id_dtype_for(8), True)


def test_returned_rows_every_decoder_layer_prefix_hits_first_and_the_start_applied():
    asm = _assembler()
    a, b = _engine_req("A"), _engine_req("B", start=3)
    # step 1: A computes positions 0..7 (slots 8..15); B hits those two blocks in the same step and computes 8
    ids = [[[p % 8, 7], [p % 8, 6]] for p in range(8)] + [[[5, 4], [3, 2]]]
    job = _job([a, b], [8, 1], list(range(8)) + [8], list(range(8, 16)) + [40], ids, gap_blocks={1: np.array([2, 3])})
    job.emit_from = np.array([0, 0])
    out = _rows(asm, job)
    ids_a, w_a = out["A-engine"]
    assert ids_a.shape == (8, 4, 2) and ids_a.dtype == np.uint8 and w_a.dtype == np.float32
    assert not ids_a[:, [0, 3]].any() and not w_a[:, [0, 3]].any()  # layers not captured (dense): 0
    np.testing.assert_array_equal(ids_a[:, 1:3], np.asarray(ids[:8]))
    ids_b, _ = out["B-engine"]
    assert ids_b.shape == (6, 4, 2)  # positions 3..8: the hit rows from the start on, then its own
    np.testing.assert_array_equal(ids_b[:5, 1:3], np.asarray(ids[3:8]))
    np.testing.assert_array_equal(ids_b[5, 1:3], np.asarray(ids[8]))
    assert a.return_next == 8 and b.return_next == 9


def test_returned_rows_all_before_the_start_is_an_empty_chunk():
    asm = _assembler()
    r = _engine_req("R", start=4)
    job = _job([r], [4], [0, 1, 2, 3], [0, 1, 2, 3], [[[1, 2], [3, 4]]] * 4)
    ids, w = _rows(asm, job)["R-engine"]
    assert ids.shape == (0, 4, 2) and w.shape == (0, 4, 2) and r.return_next == 4


def test_returned_rows_stop_for_a_request_with_a_hole(caplog):
    asm = _assembler(num_slots=0)  # no KV-slot store: a prefix hit cannot be read back
    r = _engine_req("R")
    job = _job([r], [1], [4], [-1], [[[1, 2], [3, 4]]], gap_blocks={0: np.array([0])})
    with caplog.at_level(logging.ERROR):
        assert "R-engine" not in _rows(asm, job)
    assert r.return_broken and "routed_experts will be None" in caplog.text
    # later steps return nothing for it either: the front-end sees a short array and returns None
    job2 = _job([r], [1], [5], [-1], [[[1, 2], [3, 4]]], emit_from=[5])
    assert _rows(asm, job2) == {}


def test_returned_rows_out_of_order_positions_are_refused():
    asm = _assembler()
    r = _engine_req("R")
    assert _rows(asm, _job([r], [2], [0, 1], [0, 1], [[[1, 2], [3, 4]]] * 2))["R-engine"][0].shape[0] == 2
    assert "R-engine" not in _rows(asm, _job([r], [1], [3], [3], [[[1, 2], [3, 4]]], emit_from=[3]))
    assert r.return_broken


@pytest.mark.parametrize(("num_experts", "dtype"), [(8, np.uint8), (256, np.uint8), (257, np.uint16)])
def test_id_dtype_is_the_smallest_unsigned_type(num_experts, dtype):
    assert ml.id_dtype_for(num_experts) == dtype
