"""Benchmarks: each prints ratios measured side by side in one run (``moe-routes bench NAME --help``).

Examples:
  moe-routes bench overhead --repeats 5
  moe-routes bench writer --help
"""

import sys

from moe_routes.cli import dispatch

BENCHMARKS = {
    "overhead": ("moe_routes.bench.overhead", "log vs no-log throughput of run_generate on a CPU bench model"),
    "imports": ("moe_routes.bench.imports", "import cost of the patched vLLM, logging off, vs the series reversed"),
    "writer": ("moe_routes.bench.writer", "route records/s of the patched vLLM routing-log writer on one core"),
    "steps": ("moe_routes.bench.steps", "host work per engine step that logging / the per-request return add"),
    "memory": ("moe_routes.bench.memory", "device / pinned / per-KV-slot memory of the capture for a model shape"),
    "plot": ("moe_routes.bench.plot", "plot_hist.py log readers (pyarrow.json, pure Python, ...) on one log"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch(
        "moe-routes bench", BENCHMARKS, list(sys.argv[1:] if argv is None else argv), __doc__.split("\n\n", 1)[1]
    )
