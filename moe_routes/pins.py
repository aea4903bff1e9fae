"""Load the repository's PINS file (KEY=VALUE lines, '#' comments) into a dict, and the vLLM pins in it.

moe-routes pins VLLM_VERSIONS                 # prints 0.15.1 (several pins: space-separated, oldest first)
moe-routes pins --vllm                        # prints the default vLLM pin (the newest)
moe-routes pins --vllm 0.15.1 TORCH_CPU       # prints a per-pin fact (key VLLM_0_15_1_TORCH_CPU)
moe-routes pins --check                       # every listed pin has every fact
moe-routes pins                               # prints every KEY=VALUE

MOE_ROUTES_PINS=FILE reads another PINS file (tests: a fixture with a second pin).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from moe_routes import REPO_ROOT

PINS_PATH = REPO_ROOT / "PINS"
KEY_RE = re.compile(r"[A-Z][A-Z0-9_]*")
VLLM_PINS_KEY = "VLLM_VERSIONS"
# the facts every listed vLLM pin must have (VLLM_<pin>_<FACT>)
VLLM_FACTS = ("TORCH_GPU", "TORCH_CPU", "INTEL_OPENMP", "CUDA", "MIN_NVIDIA_DRIVER")
# the key of each engine's pins (space-separated, oldest first)
ENGINE_PINS_KEYS = {"vllm": VLLM_PINS_KEY, "sglang": "SGLANG_VERSION"}


def pins_path() -> Path:
    return Path(os.environ.get("MOE_ROUTES_PINS") or PINS_PATH)


def load(path: str | Path | None = None) -> dict[str, str]:
    """Return the pins as {KEY: VALUE}; raises ValueError on a malformed line."""
    p = Path(path) if path is not None else pins_path()
    pins: dict[str, str] = {}
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or key != key.strip() or value != value.strip():
            raise ValueError(f"{p}:{n}: expected KEY=VALUE without spaces, got {raw!r}")
        if not KEY_RE.fullmatch(key):
            raise ValueError(f"{p}:{n}: key {key!r} must match {KEY_RE.pattern} (shell scripts source these lines)")
        if re.search(r"[\'\"$`\\]", value):
            raise ValueError(f"{p}:{n}: {key}: no quotes, '$', '`' or '\\' in values (scripts/pins.sh quotes them)")
        if key in pins:
            raise ValueError(f"{p}:{n}: duplicate key {key}")
        pins[key] = value
    return pins


def version_key(v: str) -> tuple:
    """Order of release versions (0.9.2 < 0.15.1 < 0.32.0; a post/rc suffix sorts after its release)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"[.+-]", v))


def engine_pins(engine: str, pins: dict[str, str] | None = None) -> list[str]:
    """The pins of an engine, oldest first (the last is the default); ValueError when missing or unordered."""
    pins = load() if pins is None else pins
    key = ENGINE_PINS_KEYS[engine]
    if key not in pins:
        raise ValueError(f"{pins_path()} has no {key}")
    vs = pins[key].split()
    if not vs:
        raise ValueError(f"{pins_path()}: {key} is empty")
    if len(set(vs)) != len(vs) or vs != sorted(vs, key=version_key):
        raise ValueError(f"{pins_path()}: {key}={pins[key]!r} must list distinct versions, oldest first")
    return vs


def default_pin(engine: str, pins: dict[str, str] | None = None) -> str:
    return engine_pins(engine, pins)[-1]


def fact_key(pin: str, fact: str) -> str:
    """VLLM_0_15_1_TORCH_CPU for (0.15.1, TORCH_CPU): the key a shell script can name."""
    return "VLLM_" + re.sub(r"[^A-Za-z0-9]", "_", pin).upper() + "_" + fact


def vllm_fact(pin: str, fact: str, pins: dict[str, str] | None = None) -> str:
    pins = load() if pins is None else pins
    k = fact_key(pin, fact)
    if k not in pins:
        raise ValueError(f"{pins_path()} has no {k} (vLLM {pin}'s {fact})")
    return pins[k]


def check(pins: dict[str, str] | None = None) -> list[str]:
    """What is wrong with PINS: unordered pin lists, a listed vLLM pin without one of its facts."""
    pins = load() if pins is None else pins
    problems = []
    for engine in ENGINE_PINS_KEYS:
        try:
            engine_pins(engine, pins)
        except ValueError as e:
            problems.append(str(e))
    if not problems:
        for pin in engine_pins("vllm", pins):
            problems += [
                f"{pins_path()}: vLLM {pin} has no {fact_key(pin, f)}"
                for f in VLLM_FACTS
                if fact_key(pin, f) not in pins
            ]
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        pins = load()
        if argv == ["--check"]:
            problems = check(pins)
            for p in problems:
                print(f"pins: {p}", file=sys.stderr)
            return 1 if problems else 0
        if argv[:1] == ["--vllm"]:
            if len(argv) == 1:
                print(default_pin("vllm", pins))
                return 0
            if len(argv) == 3 and not argv[2].startswith("-"):
                print(vllm_fact(argv[1], argv[2], pins))
                return 0
            print("usage: moe-routes pins --vllm [PIN FACT]", file=sys.stderr)
            return 2
    except (OSError, ValueError) as e:
        print(f"pins: error: {e}", file=sys.stderr)
        return 1
    if not argv:
        for k, v in pins.items():
            print(f"{k}={v}")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: moe-routes pins [KEY | --vllm [PIN FACT] | --check]", file=sys.stderr)
        return 2
    if argv[0] not in pins:
        print(f"pins: error: no key {argv[0]!r} in {pins_path()} (have: {', '.join(pins)})", file=sys.stderr)
        return 1
    print(pins[argv[0]])
    return 0
