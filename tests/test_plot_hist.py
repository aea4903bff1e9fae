"""Tests for plot_hist.py (moe_routes.plot) on a small hand-computed log.

The log (4 experts, top-2, layers 1 and 3, requests "a" and "b", tokens 0 and 1):

  layer 1:  a/0 [0,1] w[.75,.25]   a/1 [0,2] w[.5,.5]   b/0 [0,1] w[.6,.4]   b/1 [3,0] w[.9,.1] (cached)
  layer 3:  a/0 [1,2] w[.5,.5]     a/1 [1,2] w[.5,.5]   b/0 [2,3] w[.5,.5]   b/1 [1,3] w[.5,.5]

plus a gap record for request "a" (positions 5..7 -> 2 positions) and a second
writer's meta record.  All expected numbers below are worked out by hand.
"""

import json
import os
import subprocess
import sys

import pytest

import moe_routes.plot as plot_hist
from moe_routes.schema import schema_version

pytestmark = pytest.mark.fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "plot_hist.py")


def meta(**kw):
    m = {
        "type": "meta",
        "schema_version": schema_version(),
        "engine": "vllm",
        "engine_version": "0.15.1",
        "torch_version": "2.9.1",
        "model_id": "test/tiny-moe",
        "device": "cpu",
        "seed": 0,
        "num_experts": 4,
        "top_k": 2,
        "num_hidden_layers": 4,
        "moe_layers": [1, 3],
        "layers_logged": [1, 3],
        "id_kind": "logical",
        "routing_source": "kernel",
        "patch_series": "test",
        "patches": [],
        "writer": {"pid": 1},
        "created_unix": 0.0,
    }
    m.update(kw)
    return json.dumps(m)


def route(req, tok, layer, ids, ws, cached=False):
    # exactly the fast writer's compact form and key order
    ids_s = ",".join(str(i) for i in ids)
    ws_s = ",".join(repr(w) for w in ws)
    line = (
        f'{{"type":"route","req_id":"{req}","token_idx":{tok},"layer":{layer},'
        f'"topk_ids":[{ids_s}],"topk_weights":[{ws_s}]'
    )
    return line + (',"cached":true}' if cached else "}")


GOOD_LINES = [
    meta(),
    route("a", 0, 1, [0, 1], [0.75, 0.25]),
    route("a", 0, 3, [1, 2], [0.5, 0.5]),
    route("a", 1, 1, [0, 2], [0.5, 0.5]),
    route("a", 1, 3, [1, 2], [0.5, 0.5]),
    '{"type":"gap","req_id":"a","token_start":5,"token_end":7,"reason":"test"}',
    meta(writer={"pid": 2}),
    route("b", 0, 1, [0, 1], [0.6, 0.4]),
    route("b", 0, 3, [2, 3], [0.5, 0.5]),
    route("b", 1, 1, [3, 0], [0.9, 0.1], cached=True),
    # same kind of record in another key order and with spaces (json.loads path)
    '{"layer": 3, "topk_weights": [0.5, 0.5], "topk_ids": [1, 3], "token_idx": 1, "req_id": "b", "type": "route"}',
]


@pytest.fixture(autouse=True, params=["arrow", "regex"])
def reader(request):
    """Every test runs with each reader: pyarrow.json (the default when installed) and, as if pyarrow were
    missing, the pure-Python reader. Set by hand, not with monkeypatch, so that it holds for the whole test."""
    saved = plot_hist._import_pyarrow
    if request.param == "regex":
        plot_hist._import_pyarrow = lambda: None
    else:
        assert saved() is not None, "pyarrow (plot_hist's reader) is missing: pip install pyarrow==26.0.1 (lock files)"
    try:
        yield request.param
    finally:
        plot_hist._import_pyarrow = saved


def write(tmp_path, lines, name="moe_routes.jsonl", trailing_newline=True):
    p = tmp_path / name
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    p.write_text(text)
    return str(p)


@pytest.fixture
def good(tmp_path):
    return write(tmp_path, GOOD_LINES)


def run_main(argv, capsys):
    rc = plot_hist.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def shares_of(d):
    return [round(s, 6) for s in d["shares"]]


# --------------------------------------------------------------------------- core numbers


def test_counts_and_stats_hand_computed(good):
    c = plot_hist.load_routes(good)
    assert c.num_experts == 4 and c.top_k == 2
    assert c.layers == [1, 3]
    # layer 1: e0 in all 4 records, e1 twice (a/0, b/0), e2 once (a/1), e3 once (b/1)
    # layer 3: e1 three times (a/0, a/1, b/1), e2 three times (a/0, a/1, b/0), e3 twice
    assert c.counts.tolist() == [[4, 2, 1, 1], [0, 3, 3, 2]]
    assert c.layer_records.tolist() == [4, 4]
    assert c.records == 8
    assert c.requests == 2  # "a", "b"
    assert c.tokens == 4  # a/0 a/1 b/0 b/1
    assert c.cached_records == 1
    assert c.gap_records == 1 and c.gap_positions == 2
    assert c.meta_records == 2

    s = plot_hist.summarize(c)
    o = s["overall"]
    # overall counts e0 4, e1 2+3=5, e2 1+3=4, e3 1+2=3; total 16
    assert o["counts"] == [4, 5, 4, 3]
    assert shares_of(o) == [0.25, 0.3125, 0.25, 0.1875]
    # H = 2*(.25*2) + .3125*log2(3.2) + .1875*log2(5.3333)
    #   = 1.0 + .3125*1.678072 + .1875*2.415037 = 1.0 + 0.524398 + 0.452820 = 1.977217
    assert o["entropy_bits"] == pytest.approx(1.977217, abs=1e-6)
    assert o["entropy_frac"] == pytest.approx(1.977217 / 2, abs=1e-6)  # log2(4) = 2
    assert o["imbalance"] == pytest.approx(1.25)  # 5 / (16/4)
    assert [(t["expert"], t["share"]) for t in o["top3"]] == [(1, 0.3125), (0, 0.25), (2, 0.25)]

    l1, l3 = s["per_layer"]
    assert l1["layer"] == 1 and l3["layer"] == 3
    assert l1["records"] == 4 and l3["records"] == 4
    # layer 1: shares .5 .25 .125 .125 -> H = .5*1 + .25*2 + 2*.125*3 = 1.75 bits
    assert shares_of(l1) == [0.5, 0.25, 0.125, 0.125]
    assert l1["entropy_bits"] == pytest.approx(1.75)
    assert l1["entropy_frac"] == pytest.approx(0.875)
    assert l1["imbalance"] == pytest.approx(2.0)  # 4 / (8/4)
    assert [(t["expert"], t["share"]) for t in l1["top3"]] == [(0, 0.5), (1, 0.25), (2, 0.125)]
    # layer 3: shares 0 .375 .375 .25 -> H = 2*.375*1.415037 + .25*2 = 1.561278
    assert shares_of(l3) == [0.0, 0.375, 0.375, 0.25]
    assert l3["entropy_bits"] == pytest.approx(1.561278, abs=1e-6)
    assert l3["entropy_frac"] == pytest.approx(0.780639, abs=1e-6)
    assert l3["imbalance"] == pytest.approx(1.5)  # 3 / 2
    assert [(t["expert"], t["share"]) for t in l3["top3"]] == [(1, 0.375), (2, 0.375), (3, 0.25)]


def test_layer_selection(good):
    c = plot_hist.load_routes(good, layers=[3])
    assert c.layers == [3]
    assert c.counts.tolist() == [[0, 3, 3, 2]]
    assert c.records == 4 and c.tokens == 4 and c.requests == 2
    assert c.cached_records == 0  # the cached record is in layer 1


def test_request_selection(good):
    c = plot_hist.load_routes(good, requests=["b"])
    # b: layer 1 [0,1] [3,0] -> e0 2, e1 1, e3 1; layer 3 [2,3] [1,3] -> e1 1, e2 1, e3 2
    assert c.counts.tolist() == [[2, 1, 0, 1], [0, 1, 1, 2]]
    assert c.records == 4 and c.requests == 1 and c.tokens == 2
    assert c.gap_records == 0  # the gap belongs to request "a"
    o = plot_hist.summarize(c)["overall"]
    assert shares_of(o) == [0.25, 0.25, 0.125, 0.375]
    assert [t["expert"] for t in o["top3"]] == [3, 0, 1]


def test_weighted(good):
    c = plot_hist.load_routes(good, weighted=True)
    # layer 1: e0 .75+.5+.6+.1 = 1.95, e1 .25+.4 = .65, e2 .5, e3 .9 (total 4)
    # layer 3: every weight .5 -> half of the unweighted counts
    assert c.counts[0].tolist() == pytest.approx([1.95, 0.65, 0.5, 0.9])
    assert c.counts[1].tolist() == pytest.approx([0.0, 1.5, 1.5, 1.0])
    o = plot_hist.summarize(c)["overall"]
    # overall 1.95, 2.15, 2.0, 1.9 of 8
    assert o["shares"] == pytest.approx([0.24375, 0.26875, 0.25, 0.2375])
    assert [t["expert"] for t in o["top3"]] == [1, 2, 0]
    assert o["imbalance"] == pytest.approx(2.15 / 2.0)


def test_cli_weighted_flag(good, tmp_path, capsys):
    js = tmp_path / "w.json"
    rc, out, _ = run_main([good, "--weighted", "--no-plots", "--summary-json", str(js)], capsys)
    assert rc == 0
    s = json.loads(js.read_text())
    assert s["weighted"] is True and s["count_unit"] == "topk_weight"
    assert s["per_layer"][0]["shares"] == pytest.approx([0.4875, 0.1625, 0.125, 0.225])


# --------------------------------------------------------------------------- CLI / outputs

SUMMARY_KEYS = {
    "input",
    "model_id",
    "model_ids",
    "random_weights",
    "num_experts",
    "top_k",
    "weighted",
    "count_unit",
    "selection",
    "records",
    "requests",
    "tokens",
    "layers",
    "layers_logged",
    "cached_records",
    "gap_records",
    "gap_positions",
    "meta_records",
    "lines",
    "truncated_last_line",
    "warnings",
    "uniform_share",
    "entropy_max_bits",
    "overall",
    "per_layer",
}
DIST_KEYS = {"total", "counts", "shares", "entropy_bits", "entropy_frac", "imbalance", "top3"}


def test_cli_subprocess_outputs(good, tmp_path):
    out_dir = tmp_path / "out"
    js = tmp_path / "summary.json"
    r = subprocess.run(
        [sys.executable, SCRIPT, good, "--out-dir", str(out_dir), "--summary-json", str(js)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "records 8" in r.stdout and "requests 2" in r.stdout and "tokens 4" in r.stdout
    assert "e1 31.2%" in r.stdout  # top overall expert
    assert "H=1.977 bits" in r.stdout and "imbalance max/mean 1.250" in r.stdout
    assert "gap records 1" in r.stdout and "cached-position records 1" in r.stdout

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    for name in ("expert_hist.png", "expert_heatmap.png"):
        p = out_dir / name
        assert p.stat().st_size > 0
        img = mpimg.imread(str(p))
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50

    s = json.loads(js.read_text())
    assert SUMMARY_KEYS <= set(s)
    assert DIST_KEYS <= set(s["overall"])
    assert all(DIST_KEYS | {"layer", "records"} <= set(d) for d in s["per_layer"])
    assert json.loads((out_dir / "expert_stats.json").read_text()) == s
    assert s["uniform_share"] == 0.25 and s["entropy_max_bits"] == 2.0


def test_default_out_dir_is_log_dir(good, tmp_path, capsys):
    rc, _, _ = run_main([good], capsys)
    assert rc == 0
    for name in ("expert_hist.png", "expert_heatmap.png", "expert_stats.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_no_plots_and_requests_file(good, tmp_path, capsys):
    rf = tmp_path / "reqs.txt"
    rf.write_text("b\n\n")
    out = tmp_path / "o"
    rc, stdout, _ = run_main(
        [good, "--requests-file", str(rf), "--layers", "1", "--no-plots", "--out-dir", str(out)], capsys
    )
    assert rc == 0
    assert not (out / "expert_hist.png").exists()
    s = json.loads((out / "expert_stats.json").read_text())
    assert s["records"] == 2 and s["overall"]["counts"] == [2, 1, 0, 1]
    assert s["selection"] == {"layers": [1], "requests": ["b"]}


def test_help():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "--weighted" in r.stdout and "examples:" in r.stdout
    assert "python plot_hist.py moe_routes.jsonl" in r.stdout


def test_random_weights_note(tmp_path, capsys):
    p = write(tmp_path, [meta(random_weights=True)] + GOOD_LINES[1:5])
    rc, out, _ = run_main([p, "--no-plots"], capsys)
    assert rc == 0
    assert "RANDOM weights" in out and "mean nothing" in out


# --------------------------------------------------------------------------- bad input


def replace_line(lineno, text):
    lines = list(GOOD_LINES)
    lines[lineno - 1] = text
    return lines


BAD_CASES = [
    ("not_json", replace_line(3, '{"type":"route","req_id":"a",'), 3, "not valid JSON"),
    (
        "layer_str",
        replace_line(4, route("a", 1, 1, [0, 2], [0.5, 0.5]).replace('"layer":1', '"layer":"1"')),
        4,
        "layer",
    ),
    ("id_range", replace_line(2, route("a", 0, 1, [0, 4], [0.75, 0.25])), 2, "outside [0, 4)"),
    ("id_negative", replace_line(8, route("b", 0, 1, [-1, 1], [0.6, 0.4])), 8, "outside [0, 4)"),
    ("ids_len", replace_line(5, route("a", 1, 3, [1, 2, 3], [0.5, 0.5])), 5, "top_k is 2"),
    ("weights_len", replace_line(9, route("b", 0, 3, [2, 3], [1.0])), 9, "top_k is 2"),
    (
        "weight_str",
        replace_line(2, route("a", 0, 1, [0, 1], [0.75, 0.25]).replace("0.25]", '"0.25"]')),
        2,
        "topk_weights[1]",
    ),
    (
        "weight_bad_number",
        replace_line(3, route("a", 0, 3, [1, 2], [0.5, 0.5]).replace("0.5,", "0.5.5,")),
        3,
        "not valid JSON",
    ),
    (
        "leading_zero",
        replace_line(4, route("a", 1, 1, [0, 2], [0.5, 0.5]).replace('"token_idx":1', '"token_idx":01')),
        4,
        "not valid JSON",
    ),
    ("bool_id", replace_line(2, route("a", 0, 1, [0, 1], [0.75, 0.25]).replace("[0,1]", "[true,1]")), 2, "topk_ids[0]"),
    ("missing_meta", GOOD_LINES[1:], 1, "not a meta record"),
    ("meta_disagrees", replace_line(7, meta(num_experts=8)), 7, "disagrees"),
    ("unknown_type", replace_line(6, '{"type":"routes"}'), 6, "unknown record type"),
    ("array_record", replace_line(6, "[1,2]"), 6, "not an object"),
    ("extra_key", replace_line(2, route("a", 0, 1, [0, 1], [0.75, 0.25])[:-1] + ',"x":1}'), 2, "unexpected key"),
    # the first error in file order wins even when a later line is invalid too
    (
        "first_error_wins",
        replace_line(5, "{oops")[:2] + [route("a", 0, 3, [1, 9], [0.5, 0.5])] + replace_line(5, "{oops")[3:],
        3,
        "outside [0, 4)",
    ),
]


@pytest.mark.parametrize("name,lines,lineno,fragment", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_exit_1_with_line_number(tmp_path, capsys, name, lines, lineno, fragment):
    p = write(tmp_path, lines)
    rc, out, err = run_main([p, "--no-plots"], capsys)
    assert rc == 1
    assert f"{p}:{lineno}:" in err, err
    assert fragment in err, err


def test_bad_input_subprocess(tmp_path):
    p = write(tmp_path, replace_line(4, "not json at all"))
    r = subprocess.run([sys.executable, SCRIPT, p, "--no-plots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "moe_routes.jsonl:4:" in r.stderr


def test_empty_file(tmp_path, capsys):
    p = write(tmp_path, [], trailing_newline=False)
    rc, _, err = run_main([p], capsys)
    assert rc == 1 and "no meta record" in err


def test_truncated_last_line_warns_and_uses_rest(tmp_path, capsys):
    lines = GOOD_LINES + ['{"type":"route","req_id":"b","token_idx":2,"lay']
    p = write(tmp_path, lines, trailing_newline=False)
    rc, out, err = run_main([p, "--no-plots"], capsys)
    assert rc == 0
    assert f"{p}:12: truncated last line" in err
    s = json.loads((tmp_path / "expert_stats.json").read_text())
    assert s["records"] == 8 and s["overall"]["counts"] == [4, 5, 4, 3]
    assert s["truncated_last_line"] == 12


def test_complete_last_line_without_newline_is_used(tmp_path):
    p = write(tmp_path, GOOD_LINES, trailing_newline=False)
    c = plot_hist.load_routes(p)
    assert c.records == 8 and c.truncated_line is None


def test_garbage_line_with_newline_in_middle_is_error(tmp_path, capsys):
    p = write(tmp_path, GOOD_LINES[:3] + ['{"type":"route","req_id":"b","tok'] + GOOD_LINES[3:])
    rc, _, err = run_main([p], capsys)
    assert rc == 1 and f"{p}:4:" in err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--layers", "2"], "matches no route record"),
        (["--requests", "zzz"], "matches no route record"),
        (["--layers", "1", "--requests", "nope"], "matches no route record"),
    ],
)
def test_empty_selection(good, capsys, argv, fragment):
    rc, _, err = run_main([good, "--no-plots"] + argv, capsys)
    assert rc == 1
    assert fragment in err


def test_partial_selection_warns(good, capsys):
    rc, _, err = run_main([good, "--no-plots", "--layers", "1,2"], capsys)
    assert rc == 0
    assert "warning" in err and "[2]" in err


# --------------------------------------------------------------------------- data parallel


def _load_fast_and_slow(tmp_path, lines, name):
    """Load `lines` as written (the fast path must take every route line) and re-encoded with json.dumps
    (the per-line path). Returns the fast file's path and both counts; the fast-path guard stays on."""
    fast = write(tmp_path, lines, f"{name}.jsonl")
    slow = write(
        tmp_path,
        [ln if '"route"' not in ln else json.dumps(json.loads(ln), indent=1).replace("\n", "") for ln in lines],
        f"{name}_slow.jsonl",
    )
    b = plot_hist.load_routes(slow)
    a = plot_hist.load_routes(fast)
    assert a.chunks["per_line"] == 0, "fast lines went slow"
    return fast, (a, b)


def test_data_parallel_requests_are_told_apart_by_rank(tmp_path):
    """Each DP rank's caller numbers requests from "0"; records carry dp_rank. Fast and per-line
    paths agree, a request is (dp_rank, req_id), --requests matches the id on every rank."""
    lines = [meta(data_parallel_size=2, data_parallel_rank=0), meta(data_parallel_size=2, data_parallel_rank=1)]
    for rank in (0, 1):
        for tok in range(3):
            for layer in (1, 3):
                lines.append(
                    route("0", tok, layer, [rank, 2], [0.5, 0.5]).replace(
                        '"type":"route",', f'"type":"route","dp_rank":{rank},'
                    )
                )
    lines.append(route("1", 0, 1, [3, 2], [0.5, 0.5]).replace('"type":"route",', '"type":"route","dp_rank":1,'))
    lines.append('{"type":"gap","dp_rank":1,"req_id":"0","token_start":5,"token_end":7,"reason":"test"}')
    fast, (a, b) = _load_fast_and_slow(tmp_path, lines, "dp")
    for c in (a, b):
        assert (c.records, c.requests, c.tokens) == (13, 3, 7)  # dp0/"0", dp1/"0", dp1/"1"
        assert c.counts.tolist() == [[3, 3, 7, 1], [3, 3, 6, 0]]
        assert c.gap_records == 1 and c.gap_positions == 2
    sel = plot_hist.load_routes(fast, requests=["0"])
    assert sel.chunks["per_line"] == 0, "fast lines went slow"
    assert (sel.records, sel.requests, sel.tokens) == (12, 2, 6)
    bad = write(tmp_path, lines[:2] + [lines[2].replace('"dp_rank":0', '"dp_rank":-1')], "bad.jsonl")
    with pytest.raises(plot_hist.RouteLogError, match="dp_rank"):
        plot_hist.load_routes(bad)


def test_completions_of_a_request_are_counted_apart(tmp_path):
    """n > 1: records carry completion_index; the unit counted is the completion, on the fast path and
    the per-line path alike; --requests selects every completion of a request id."""
    lines = [meta()]
    for completion in (0, 1, 2):
        for tok in range(2):
            for layer in (1, 3):
                lines.append(
                    route("0", tok, layer, [completion, 3], [0.5, 0.5]).replace(
                        '"req_id":"0",', f'"req_id":"0","completion_index":{completion},'
                    )
                )
    lines.append(route("1", 0, 1, [0, 1], [0.5, 0.5]))
    lines.append('{"type":"gap","req_id":"0","completion_index":2,"token_start":5,"token_end":9,"reason":"t"}')
    fast, (a, b) = _load_fast_and_slow(tmp_path, lines, "n3")
    for c in (a, b):
        assert (c.records, c.requests, c.tokens) == (13, 4, 7)  # "0"#0, "0"#1, "0"#2, "1"
        assert c.counts.tolist() == [[3, 3, 2, 6], [2, 2, 2, 6]]
        assert c.gap_records == 1 and c.gap_positions == 4
    sel = plot_hist.load_routes(fast, requests=["0"])
    assert sel.chunks["per_line"] == 0, "fast lines went slow"
    assert (sel.records, sel.requests, sel.tokens) == (12, 3, 6)
    bad = write(tmp_path, lines[:2] + [lines[2].replace('"completion_index":0', '"completion_index":"0"')], "bad.jsonl")
    with pytest.raises(plot_hist.RouteLogError, match="completion_index"):
        plot_hist.load_routes(bad)


def test_error_record_marks_the_log_incomplete(tmp_path, capsys):
    lines = GOOD_LINES[:5] + [
        '{"type":"error","error":"OSError: [Errno 28] No space left on device",'
        '"policy":"stop","message":"routing log stopped","writer_id":"x","time_unix":1.0,'
        '"records_dropped":0}'
    ]
    path = write(tmp_path, lines, "stopped.jsonl")
    counts = plot_hist.load_routes(path)
    assert counts.records == 4 and len(counts.error_records) == 1
    assert any("writer stopped" in w and "No space left" in w for w in counts.warnings)
    rc, out, err = run_main([path, "--no-plots", "--out-dir", str(tmp_path)], capsys)
    assert rc == 0 and "INCOMPLETE LOG" in out and "writer stopped" in err
    stats = json.loads((tmp_path / "expert_stats.json").read_text())
    assert stats["error_records"][0]["line"] == 6 and "No space left" in stats["error_records"][0]["error"]


# --------------------------------------------------------------------------- fast path


def test_fast_and_json_paths_agree(tmp_path):
    """Many lines so the chunked fast path is used; same data re-encoded with json.dumps."""
    import random

    rnd = random.Random(1)
    recs = []
    for t in range(300):
        for layer in (1, 3):
            ids = rnd.sample(range(4), 2)
            w = rnd.random()
            recs.append((f"r{t % 7}", t, layer, ids, [w, 1 - w]))
    fast = [meta()] + [route(*r) for r in recs]
    slow = [meta()] + [
        json.dumps(
            {"topk_ids": r[3], "layer": r[2], "type": "route", "req_id": r[0], "token_idx": r[1], "topk_weights": r[4]},
            indent=None,
        )
        for r in recs
    ]
    fast_p, slow_p = write(tmp_path, fast, "fast.jsonl"), write(tmp_path, slow, "slow.jsonl")
    b = plot_hist.load_routes(slow_p, weighted=True)
    a = plot_hist.load_routes(fast_p, weighted=True)
    assert a.chunks["per_line"] == 0, "fast-path lines went through the per-line fallback"
    assert a.counts.ravel().tolist() == pytest.approx(b.counts.ravel().tolist())
    assert (a.records, a.requests, a.tokens) == (b.records, b.requests, b.tokens) == (600, 7, 300)
    total = sum(1 for _ in recs) * 2
    assert plot_hist.load_routes(write(tmp_path, fast, "f2.jsonl")).counts.sum() == total


def test_chunk_boundaries(tmp_path, monkeypatch):
    """Tiny chunks: lines split across reads, errors still get the right line number."""
    monkeypatch.setattr(plot_hist, "CHUNK_BYTES", 37)
    p = write(tmp_path, GOOD_LINES)
    c = plot_hist.load_routes(p)
    assert c.counts.tolist() == [[4, 2, 1, 1], [0, 3, 3, 2]] and c.gap_records == 1
    bad = write(tmp_path, replace_line(10, route("b", 1, 1, [3, 7], [0.9, 0.1])), "bad.jsonl")
    with pytest.raises(plot_hist.RouteLogError) as ei:
        plot_hist.load_routes(bad)
    assert ei.value.lineno == 10


@pytest.mark.parametrize(
    "tok,ok",
    [
        (b"0.5", True),
        (b"-0.25", True),
        (b"1e-05", True),
        (b"3.5E+2", True),
        (b"0", True),
        (b"1.2.3", False),
        (b"01", False),
        (b"-01", False),
        (b"+1", False),
        (b".5", False),
        (b"1.", False),
        (b"1e", False),
        (b"1e2.5", False),
        (b"--1", False),
        (b"1-2", False),
    ],
)
def test_number_validator(tok, ok):
    assert plot_hist._valid_numbers(b"0.5," + tok + b",1") is ok
    assert plot_hist._valid_numbers(tok) is ok


# --------------------------------------------------------------------------- readers


def _outcome(path, reader, **kw):
    """What load_routes gives: the counts' public fields, or the error text."""
    try:
        c = plot_hist.load_routes(path, reader=reader, **kw)
    except (plot_hist.RouteLogError, plot_hist.SelectionError) as exc:
        return type(exc).__name__, str(exc)
    return (
        c.counts.tolist(),
        c.layers,
        c.layer_records.tolist(),
        c.records,
        c.requests,
        c.tokens,
        c.cached_records,
        c.gap_records,
        c.gap_positions,
        c.meta_records,
        c.lines,
        c.truncated_line,
        [w for w in c.warnings if "pyarrow" not in w],
    )


ROUTE_BLOCK = [
    route(f"r{t % 5}", t, layer, [t % 4, (t + 1) % 4], [0.75, 0.25], cached=t % 9 == 0)
    for t in range(40)
    for layer in (1, 3)
]
# route-only text where a line in the middle is altered: the arrow path is tried on the chunk, and each of
# these is a case pyarrow.json alone would accept, coerce or mis-number (or one it rejects): the result
# must be the pure-Python reader's, error message and line number included
SCREEN_CASES = {
    "good": None,
    "cached_false": ROUTE_BLOCK[10][:-1] + ',"cached":false}',
    "cached_null": ROUTE_BLOCK[10][:-1] + ',"cached":null}',
    "layer_null": ROUTE_BLOCK[10].replace('"layer":1', '"layer":null'),
    "dp_rank_null": ROUTE_BLOCK[10].replace('"type":"route",', '"type":"route","dp_rank":null,'),
    "weight_null": ROUTE_BLOCK[10].replace("[0.75,", "[null,"),
    "weight_nan": ROUTE_BLOCK[10].replace("[0.75,", "[NaN,"),
    "weight_inf": ROUTE_BLOCK[10].replace("[0.75,", "[-Infinity,"),
    "weight_int": ROUTE_BLOCK[10].replace("[0.75,0.25]", "[1,0]"),
    "weight_huge": ROUTE_BLOCK[10].replace("[0.75,", "[1e400,"),
    "req_id_number": ROUTE_BLOCK[10].replace('"req_id":"r0"', '"req_id":7'),
    "req_id_escape": ROUTE_BLOCK[10].replace('"req_id":"r0"', '"req_id":"r\\u0030"'),
    "req_id_unicode": ROUTE_BLOCK[10].replace('"req_id":"r0"', '"req_id":"r\u00e9\U0001f600"'),
    "req_id_lone_surrogate": ROUTE_BLOCK[10].replace('"req_id":"r0"', '"req_id":"\\ud800"'),
    "id_float": ROUTE_BLOCK[10].replace('"topk_ids":[', '"topk_ids":[1.0,').replace(",1],", "],", 1),
    "id_bool": ROUTE_BLOCK[10].replace('"topk_ids":[', '"topk_ids":[true,').replace(",1],", "],", 1),
    "id_negative": ROUTE_BLOCK[10].replace('"topk_ids":[', '"topk_ids":[-1,').replace(",1],", "],", 1),
    "id_too_big": ROUTE_BLOCK[10].replace('"topk_ids":[', '"topk_ids":[99999999999999999999,').replace(",1],", "],", 1),
    "ids_three": ROUTE_BLOCK[10].replace('"topk_ids":[', '"topk_ids":[3,'),
    "token_too_big": ROUTE_BLOCK[10].replace('"token_idx":5', '"token_idx":4294967296'),
    "token_negative": ROUTE_BLOCK[10].replace('"token_idx":5', '"token_idx":-5'),
    "layer_too_big": ROUTE_BLOCK[10].replace('"layer":1', '"layer":4'),
    "layer_string": ROUTE_BLOCK[10].replace('"layer":1', '"layer":"1"'),
    "leading_zero": ROUTE_BLOCK[10].replace('"token_idx":5', '"token_idx":05'),
    "duplicate_key": ROUTE_BLOCK[10][:-1] + ',"layer":3}',
    "extra_key": ROUTE_BLOCK[10][:-1] + ',"x":1}',
    "missing_key": ROUTE_BLOCK[10].replace('"layer":1,', ""),
    "type_gap": ROUTE_BLOCK[10].replace('"type":"route"', '"type":"gap"'),
    "key_order_spaces": json.dumps(json.loads(ROUTE_BLOCK[10]), indent=1).replace("\n", ""),
    "leading_space": "  " + ROUTE_BLOCK[10],
    "blank_line": "",
    "whitespace_line": "   ",
    "two_objects_one_line": ROUTE_BLOCK[10] + " " + ROUTE_BLOCK[11],
    "two_objects_and_blank": ROUTE_BLOCK[10] + " " + ROUTE_BLOCK[11] + "\n",
    "gap_record": '{"type":"gap","req_id":"r0","token_start":1,"token_end":3,"reason":"t"}',
    "gap_record_spaces": '{"type": "gap", "req_id": "r1", "dp_rank": 1, "token_start": 1, "token_end": 3, '
    '"reason": "t"}',
    "gap_bad_range": '{"type":"gap","req_id":"r0","token_start":3,"token_end":1,"reason":"t"}',
    "gap_string_start": '{"type":"gap","req_id":"r0","token_start":"1","token_end":3,"reason":"t"}',
    "gap_route_key": '{"type":"gap","req_id":"r0","token_start":1,"token_end":3,"reason":"t","layer":1}',
    "gap_extra_key": '{"type":"gap","req_id":"r0","token_start":1,"token_end":3,"reason":"t","x":[1]}',
    "gap_missing_reason": '{"type":"gap","req_id":"r0","token_start":1,"token_end":3}',
    "route_with_gap_key": ROUTE_BLOCK[10][:-1] + ',"token_start":1}',
    "meta_record": meta(writer={"pid": 9}),
    "error_record": '{"type":"error","error":"stopped","policy":"stop"}',
    "dp_and_completion": ROUTE_BLOCK[10]
    .replace('"type":"route",', '"type":"route","dp_rank":1,')
    .replace('"token_idx"', '"completion_index":2,"token_idx"'),
    "completion_negative": ROUTE_BLOCK[10].replace('"token_idx"', '"completion_index":-2,"token_idx"'),
    "truncated_tail": "TAIL",
}


@pytest.mark.parametrize("reader", ["arrow"], indirect=True)  # compares the readers itself
@pytest.mark.parametrize(
    "select", [{}, {"weighted": True}, {"requests": ["r0", "r3"], "layers": [3]}], ids=["counts", "weighted", "sel"]
)
@pytest.mark.parametrize("case", list(SCREEN_CASES))
def test_arrow_and_regex_readers_agree(tmp_path, case, select, reader):
    lines = list(ROUTE_BLOCK)
    alt = SCREEN_CASES[case]
    trailing = True
    if alt == "TAIL":
        lines.append(ROUTE_BLOCK[10][:50])
        trailing = False
    elif alt is not None:
        lines[10] = alt
    p = tmp_path / "m.jsonl"
    p.write_bytes(("\n".join([meta()] + lines) + ("\n" if trailing else "")).encode("utf-8", "surrogatepass"))
    a, b = _outcome(str(p), "arrow", **select), _outcome(str(p), "regex", **select)
    assert a == b
    if case in ("good", "gap_record", "gap_record_spaces"):  # a chunk of route and gap records: pyarrow's
        assert plot_hist.load_routes(str(p), reader="arrow").chunks == {"arrow": 1, "regex": 0, "per_line": 0}


@pytest.mark.parametrize("reader", ["arrow"], indirect=True)  # compares the readers itself
def test_arrow_and_regex_readers_agree_on_invalid_utf8(tmp_path, reader):
    lines = [meta()] + ROUTE_BLOCK
    raw = ("\n".join(lines) + "\n").encode().replace(b'"req_id":"r3"', b'"req_id":"r\xff"', 1)
    p = tmp_path / "m.jsonl"
    p.write_bytes(raw)
    a, b = _outcome(str(p), "arrow"), _outcome(str(p), "regex")
    assert a == b and a[0] == "RouteLogError" and "not valid JSON" in a[1]


@pytest.mark.parametrize("reader", ["arrow"], indirect=True)  # compares the readers itself
def test_arrow_reader_takes_route_chunks_and_names_lines(tmp_path, reader, monkeypatch):
    """Small chunks: route-only chunks go through pyarrow, the chunk holding the gap and meta records through
    the regex path; a bad value in a pyarrow chunk is reported with the regex path's message and line."""
    monkeypatch.setattr(plot_hist, "CHUNK_BYTES", 2048)
    lines = (
        [meta()]
        + ROUTE_BLOCK[:30]
        + ['{"type":"gap","req_id":"r0","token_start":1,"token_end":3,"reason":"t"}', meta(writer={"pid": 2})]
        + ROUTE_BLOCK[30:]
    )
    p = write(tmp_path, lines)
    c = plot_hist.load_routes(p, reader="arrow")
    assert c.reader == "arrow" and c.chunks["arrow"] >= 2 and c.chunks["regex"] >= 1
    assert c.chunks["per_line"] == 0
    assert _outcome(p, "arrow") == _outcome(p, "regex")
    lines[70] = lines[70].replace('"layer":3', '"layer":9')
    assert '"layer":9' in lines[70]
    bad = write(tmp_path, lines, "bad.jsonl")
    with pytest.raises(plot_hist.RouteLogError) as ei:
        plot_hist.load_routes(bad, reader="arrow")
    assert str(ei.value) == f"{bad}:71: layer 9 >= number of decoder layers 4"


@pytest.mark.parametrize("reader", ["arrow"], indirect=True)  # compares the readers itself
def test_missing_pyarrow(good, capsys, reader):
    """reader="arrow" without pyarrow: a clear error naming the pin; "auto" falls back with a warning."""
    saved = plot_hist._import_pyarrow
    plot_hist._import_pyarrow = lambda: None
    try:
        with pytest.raises(ImportError, match="pip install pyarrow"):
            plot_hist.load_routes(good, reader="arrow")
        c = plot_hist.load_routes(good)
        assert c.reader == "regex" and any("pyarrow is not installed" in w for w in c.warnings)
        rc, _, err = run_main([good, "--no-plots", "--reader", "arrow"], capsys)
        assert rc == 2 and "locks/vllm-<pin>-cpu.txt" in err
    finally:
        plot_hist._import_pyarrow = saved
    assert plot_hist.load_routes(good, reader="regex").reader == "regex"


def test_titles_fit_the_figure(tmp_path, monkeypatch):
    """Each figure's title lies inside the figure (it ran past the right edge with test.sh's tiny model: a long
    absolute model path and the statistics line on a 6-inch figure), measured on the rendered figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long_model = "/home/someone/experiments/run-2026-12-07/out/tiny-random-moe-with-a-rather-long-directory-name"
    lines = [meta(model_id=long_model, random_weights=True), *GOOD_LINES[1:]]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_hist.main([write(tmp_path, lines), "--out-dir", str(tmp_path / "o")]) == 0
    assert len(figures) == 2
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        fig_box = fig.bbox
        (title,) = [t for ax in fig.axes for t in (ax.title,) if t.get_text()]
        box = title.get_window_extent(renderer)
        assert box.x0 >= fig_box.x0 and box.x1 <= fig_box.x1 and box.y1 <= fig_box.y1, (title.get_text(), box)
        assert long_model[:30] in title.get_text().replace("\n", "")
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)
