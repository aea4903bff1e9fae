"""Route and gap records (schemas/moe_routes.schema.json) from one completion's routing arrays.

The one producer of these records outside the engines: SGLang payloads (moe_routes.sglang_routing) and the
arrays vLLM returns per completion (moe_routes.routed_experts, run_generate's offline and http sources) go
through :func:`iter_route_records`. stdlib + numpy only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np

GAP_REASON = "no routing captured for these KV slots"


def float32_values(row: Sequence[float]) -> list[float]:
    """float32 values as the shortest decimals of 9 significant digits: each maps back to exactly that float32
    (the engine log prints its weights the same way)."""
    return [float(f"{v:.9g}") for v in row]


def iter_route_records(
    req_id: str,
    ids: np.ndarray,
    weights: np.ndarray,
    layers: Sequence[int],
    *,
    token_start: int = 0,
    num_cached_tokens: int = 0,
    missing: Iterable[tuple[int, int]] = (),
    completion_index: int | None = None,
    gap_reason: str = GAP_REASON,
) -> Iterator[dict[str, Any]]:
    """Records of one completion, token-major then layer.

    ids, weights: ``[T, len(layers), K]``, row r = absolute token position ``token_start + r``; ``layers`` are
    the decoder-layer indices of the columns. Positions below ``num_cached_tokens`` were served from the prefix
    cache (``"cached": true``). ``missing``: ``[start, end)`` position ranges without captured routing: one gap
    record each (at its start, clipped to ``token_start``), no route records there. ``completion_index``: set
    when the request has several completions."""
    if ids.ndim != 3 or weights.shape != ids.shape or ids.shape[1] != len(layers):
        raise ValueError(f"ids {ids.shape} / weights {weights.shape} do not match {len(layers)} layers")
    layers = [int(x) for x in layers]
    # a gap that begins before the first row is reported from that row on
    gaps = {max(int(a), token_start): int(b) for a, b in missing if int(b) > token_start}
    skip = np.zeros(ids.shape[0], dtype=bool)
    for a, b in gaps.items():
        skip[a - token_start : b - token_start] = True
    head: dict[str, Any] = {"req_id": str(req_id)}
    if completion_index is not None:
        head["completion_index"] = int(completion_index)
    id_rows, w_rows = ids.tolist(), weights.astype(np.float32, copy=False).tolist()
    for r in range(ids.shape[0]):
        t = token_start + r
        if t in gaps:
            yield {"type": "gap", **head, "token_start": t, "token_end": gaps[t], "reason": gap_reason}
        if skip[r]:
            continue
        for li, layer in enumerate(layers):
            rec = {
                "type": "route",
                **head,
                "token_idx": t,
                "layer": layer,
                "topk_ids": [int(x) for x in id_rows[r][li]],
                "topk_weights": float32_values(w_rows[r][li]),
            }
            if t < num_cached_tokens:
                rec["cached"] = True
            yield rec


def dumps(rec: dict[str, Any]) -> str:
    """One JSONL line (compact, like the engine writer)."""
    return json.dumps(rec, separators=(",", ":")) + "\n"


def write_routes(f: IO[str], meta: dict[str, Any], records: Iterable[dict[str, Any]]) -> int:
    """Write the meta record, then the records; returns the number of records after the meta line."""
    f.write(dumps(meta))
    n = 0
    for rec in records:
        f.write(dumps(rec))
        n += 1
    return n
