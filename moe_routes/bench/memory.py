"""Memory the vLLM routing capture holds for one engine, for a model shape: device capture buffers, pinned
staging, and the prefix-cache routing store per KV slot, with the log on or off and weights returned or not.

The numbers come from the installed series' own accounting (``moe_routes_log.footprint``, the function the engine
logs at start-up and sizes its buffers by), next to the layout of the series before issue 17 (device ids int32 +
weights float32 always, 4 pinned staging copies, a store of int16 ids + float32 weights per slot), which this
command keeps as a formula for comparison.

Examples:
  moe-routes bench memory                                   # DeepSeek-V3: 61 layers (58 MoE), 256 experts, top-8
  moe-routes bench memory --kv-slots 4000000 --max-tokens 16384
  moe-routes bench memory --layers 94 --moe-layers 94 --experts 128 --top-k 8   # Qwen3-235B-A22B
"""

from __future__ import annotations

import argparse


def before_issue_17(layers: int, moe_layers: int, top_k: int, max_tokens: int, num_slots: int) -> dict[str, int]:
    """The series at e3b9bf3: capture rows = decoder-layer ids, int32 ids and float32 weights always, 4 pinned
    staging copies of both, a store of int16 ids + float32 weights + a valid flag per KV slot."""
    row = layers * top_k * (4 + 4)
    per_slot = moe_layers * top_k * (2 + 4) + 1
    return {"device": max_tokens * row, "pinned": 4 * max_tokens * row, "store_per_slot": per_slot,
            "store": num_slots * per_slot}  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--layers", type=int, default=61, help="decoder layers")
    ap.add_argument("--moe-layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=65536, help="max_num_batched_tokens (or the largest graph)")
    ap.add_argument("--kv-slots", type=int, default=1_000_000, help="KV slots of the prefix-cache routing store")
    a = ap.parse_args(argv)
    from moe_routes.engine_source import load_vllm_log_module

    ml = load_vllm_log_module()
    print(
        f"shape: {a.layers} decoder layers ({a.moe_layers} MoE), {a.experts} experts, top-{a.top_k}; "
        f"{a.max_tokens:,} batched tokens; {a.kv_slots:,} KV slots"
    )
    old = before_issue_17(a.layers, a.moe_layers, a.top_k, a.max_tokens, a.kv_slots)
    print(
        f"  before issue 17 (every mode)      : device {_mib(old['device'])}  pinned {_mib(old['pinned'])}  "
        f"store {old['store_per_slot']:5d} B/slot = {_mib(old['store'])}"
    )
    for label, weights in (("ids returned, no log", False), ("log, or weights returned", True)):
        new = ml.footprint(
            captured_layers=a.moe_layers,
            buffer_rows=a.layers,
            top_k=a.top_k,
            num_experts=a.experts,
            max_tokens=a.max_tokens,
            num_slots=a.kv_slots,
            weights=weights,
            staging_depth=2,  # async scheduling (the GPU default); 1 without
        )
        print(
            f"  now: {label:29}: device {_mib(new['device'])}  pinned {_mib(new['pinned'])}  "
            f"store {new['store_per_slot']:5d} B/slot = {_mib(new['store'])}  "
            f"(store {old['store_per_slot'] / new['store_per_slot']:.1f}x, pinned "
            f"{old['pinned'] / new['pinned']:.1f}x smaller)"
        )
    print("  (device buffers are allocated while the model is built: the KV cache is sized with them counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
