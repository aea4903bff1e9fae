"""Load the repository's PINS file (KEY=VALUE lines, '#' comments) into a dict.

moe-routes pins VLLM_VERSION     # prints 0.15.1
moe-routes pins                  # prints every KEY=VALUE
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_routes import REPO_ROOT

PINS_PATH = REPO_ROOT / "PINS"


def load(path: str | Path | None = None) -> dict[str, str]:
    """Return the pins as {KEY: VALUE}; raises ValueError on a malformed line."""
    p = Path(path) if path is not None else PINS_PATH
    pins: dict[str, str] = {}
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or key != key.strip() or value != value.strip():
            raise ValueError(f"{p}:{n}: expected KEY=VALUE without spaces, got {raw!r}")
        if key in pins:
            raise ValueError(f"{p}:{n}: duplicate key {key}")
        pins[key] = value
    return pins


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        pins = load()
    except (OSError, ValueError) as e:
        print(f"pins: error: {e}", file=sys.stderr)
        return 1
    if not argv:
        for k, v in pins.items():
            print(f"{k}={v}")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: moe-routes pins [KEY]", file=sys.stderr)
        return 2
    if argv[0] not in pins:
        print(f"pins: error: no key {argv[0]!r} in {PINS_PATH} (have: {', '.join(pins)})", file=sys.stderr)
        return 1
    print(pins[argv[0]])
    return 0
