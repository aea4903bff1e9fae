"""Decode SGLang ``meta_info["expert_routing"]`` (moe-routes patch series) to numpy.

stdlib + numpy only; importable without sglang.

Encoding ("sglang-expert-routing/v1", written by sglang/srt/layers/moe/expert_routing.py):
a JSON object with
  format             "sglang-expert-routing/v1"
  num_tokens         T = prompt_len + generated_len - 1 (routed positions 0..T-1, absolute)
  layers             decoder-layer indices of the MoE layers (length L; dense layers absent)
  num_experts        E (routed experts; shared experts never appear)
  top_k              K (routed top-k; fused shared-expert slots are truncated)
  shape              [T, L, K]
  byte_order         "little"
  ids_dtype          "uint8" if E <= 255, "int16" if E <= 32767, else "int32"
  weights_dtype      "float32" (or "float16" with the server flag --expert-routing-weights-dtype float16)
  ids, weights       standard base64 of the C-order [T, L, K] arrays
  num_cached_tokens  positions [0, n) were served from the prefix (radix) cache
  missing            list of [start, end) position ranges without captured routing
                     (their ids are the dtype's max value, weights NaN)
  weights_include_routed_scaling_factor, routed_scaling_factor
                     true when the top-k kernel multiplied the weights by routed_scaling_factor
                     (TopK apply_routed_scaling_factor_on_output); when false and the factor is not
                     null, the model multiplies the MoE output by it after the experts; null when
                     the kernel chosen per call decides (unknown at load: APPENDIX section 1)
or {"format": ..., "error": "..."} when the server could not capture routing.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from moe_routes.records import iter_route_records

FORMAT = "sglang-expert-routing/v1"
_ID_DTYPES = {"uint8", "int16", "int32"}
_W_DTYPES = {"float32", "float16"}


def _payload(entry: Any) -> dict[str, Any]:
    """Accept the payload itself, a meta_info dict, or a whole generate() output dict."""
    if isinstance(entry, (str, bytes)):
        entry = json.loads(entry)
    if not isinstance(entry, dict):
        raise TypeError(f"expected a dict, got {type(entry).__name__}")
    if "meta_info" in entry and isinstance(entry["meta_info"], dict):
        entry = entry["meta_info"]
    if "format" not in entry and "expert_routing" in entry:
        entry = entry["expert_routing"]
    if not isinstance(entry, dict):
        raise ValueError("no expert_routing payload (did the request set return_expert_routing=True?)")
    return entry


def decode_expert_routing(meta_info_entry: Any) -> dict[str, Any]:
    """-> {"topk_ids": int32 [T,L,K], "topk_weights": float32 [T,L,K], "layers": int64 [L],
    "num_experts": int, "top_k": int, "num_tokens": int, "num_cached_tokens": int,
    "missing": [(start, end), ...], "weights_include_routed_scaling_factor": bool | None,
    "routed_scaling_factor": float | None}"""
    p = _payload(meta_info_entry)
    if p.get("format") != FORMAT:
        raise ValueError(f"unknown expert routing format {p.get('format')!r}")
    if "error" in p:
        raise ValueError(f"server could not capture expert routing: {p['error']}")
    shape = tuple(int(s) for s in p["shape"])
    if len(shape) != 3 or shape[0] != p["num_tokens"] or shape[1] != len(p["layers"]) or shape[2] != p["top_k"]:
        raise ValueError(f"inconsistent shape {shape}")
    if p["ids_dtype"] not in _ID_DTYPES or p["weights_dtype"] not in _W_DTYPES:
        raise ValueError(f"unsupported dtypes {p['ids_dtype']}/{p['weights_dtype']}")
    if p.get("byte_order", "little") != "little":
        raise ValueError("only little-endian payloads are defined")
    ids = np.frombuffer(base64.b64decode(p["ids"]), dtype=np.dtype(p["ids_dtype"]).newbyteorder("<"))
    w = np.frombuffer(base64.b64decode(p["weights"]), dtype=np.dtype(p["weights_dtype"]).newbyteorder("<"))
    n = shape[0] * shape[1] * shape[2]
    if ids.size != n or w.size != n:
        raise ValueError(f"payload size mismatch: {ids.size}/{w.size} values for shape {shape}")
    return {
        "topk_ids": ids.reshape(shape).astype(np.int32),
        "topk_weights": w.reshape(shape).astype(np.float32),
        "layers": np.asarray(p["layers"], dtype=np.int64),
        "num_experts": int(p["num_experts"]),
        "top_k": int(p["top_k"]),
        "num_tokens": shape[0],
        "num_cached_tokens": int(p.get("num_cached_tokens", 0)),
        "missing": [(int(a), int(b)) for a, b in p.get("missing", [])],
        "weights_include_routed_scaling_factor": p.get("weights_include_routed_scaling_factor"),
        "routed_scaling_factor": p.get("routed_scaling_factor"),
    }


def iter_jsonl_records(req_id: str, decoded: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Route records of one decoded payload (moe_routes.records, the one producer of records outside the engines)."""
    return iter_route_records(
        str(req_id),
        decoded["topk_ids"],
        decoded["topk_weights"],
        [int(x) for x in decoded["layers"]],
        num_cached_tokens=decoded.get("num_cached_tokens", 0),
        missing=decoded.get("missing", []),
    )


def to_jsonl_records(req_id: str, decoded: dict[str, Any]) -> list[dict[str, Any]]:
    """Route records (schema moe_routes v1), token-major then layer; gap records for missing ranges."""
    return list(iter_jsonl_records(str(req_id), decoded))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Examples:\n  moe-routes sglang-decode response.json > routes.jsonl\n"
        "  moe-routes sglang-decode meta_info.json --req-id r7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("input", help="JSON file: a generate() output, a list of them, or a meta_info dict")
    ap.add_argument("--req-id", default=None)
    a = ap.parse_args(argv)
    with open(a.input) as f:
        data = json.load(f)
    items = data if isinstance(data, list) else [data]
    for i, item in enumerate(items):
        meta = item.get("meta_info", item)
        rid = a.req_id or meta.get("id", str(i))
        for rec in iter_jsonl_records(rid, decode_expert_routing(item)):
            sys.stdout.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
