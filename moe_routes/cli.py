"""moe-routes: one entry point for the project's tools; each subcommand has its own --help.

Examples:
  moe-routes patch apply --engine vllm --python .venv/bin/python   # patch an installed engine
  moe-routes verify                                                  # every series on the clean pinned releases
  moe-routes generate --num-prompts 25 --out-dir out                 # the GSM8K run (needs a patched engine)
  moe-routes plot out/moe_routes.jsonl --out-dir out                 # histogram + statistics
  moe-routes pins --vllm                                             # the default (newest) vLLM pin
Without installing: python -m moe_routes <command> ... from the repository root.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, summary). Modules are imported only when their command runs: the patch tooling must work
# with nothing but the stdlib, `plot` needs numpy/matplotlib, `generate` an engine.
COMMANDS: dict[str, tuple[str, str]] = {
    "patch": ("moe_routes.patching.cli", "apply / check / reverse / status / lint / verify / refresh a series"),
    "verify": ("moe_routes.patching.cli", "every series applies and reverses byte-identically on its releases"),
    "generate": ("moe_routes.generate", "GSM8K prompts with and without logging -> moe_routes.jsonl, timing.json"),
    "plot": ("moe_routes.plot", "expert histogram and statistics from a moe_routes.jsonl"),
    "pins": ("moe_routes.pins", "print pinned versions from PINS"),
    "tiny-model": ("moe_routes.tinymoe", "build a tiny random-weight MoE checkpoint + tokenizer (no hub)"),
    "sglang-validate": ("moe_routes.sglang_validate", "GPU box: check the SGLang series end to end on a real model"),
    "sglang-decode": ("moe_routes.sglang_routing", "SGLang expert_routing payload (JSON file) -> JSONL route records"),
    "bench": ("moe_routes.bench", "benchmarks: overhead, imports, writer, plot (ratios measured side by side)"),
}


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str], examples: str) -> int:
    """Run `commands[argv[0]]`'s module main(argv[1:]); usage (exit 0 on --help, 2 otherwise) when there is no
    known command."""
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        rows = "\n".join(f"  {name.ljust(width)}  {summary}" for name, (_, summary) in commands.items())
        print(f"usage: {prog} COMMAND [ARGS...]\n\ncommands:\n{rows}\n\n{examples}")
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"{prog}: error: unknown command {argv[0]!r} (have: {', '.join(commands)})", file=sys.stderr)
        return 2
    return importlib.import_module(commands[argv[0]][0]).main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["verify"]:
        argv = ["patch", *argv]
    return dispatch("moe-routes", COMMANDS, argv, __doc__.split("\n\n", 1)[1])
