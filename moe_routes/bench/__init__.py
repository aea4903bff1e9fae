"""Benchmarks: each prints ratios measured side by side in one run (``moe-routes bench NAME --help``)."""

import importlib
import sys

BENCHMARKS = {
    "overhead": "log vs no-log throughput of run_generate on a CPU bench model (or --model)",
    "imports": "import cost of the patched vLLM with logging off vs the same install with the series reversed",
    "writer": "route records/s of the patched vLLM routing-log writer on one core",
    "plot": "plot_hist.py log readers (pyarrow.json, pure Python, orjson, polars, duckdb) on one 10M-line log",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        rows = "\n".join(f"  {name:<9} {summary}" for name, summary in BENCHMARKS.items())
        print(
            f"usage: moe-routes bench NAME [ARGS...]\n\nbenchmarks:\n{rows}\n\nExamples:\n"
            "  moe-routes bench overhead --repeats 5\n  moe-routes bench writer --help"
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"moe_routes.bench.{argv[0]}").main(argv[1:])
