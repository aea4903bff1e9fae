"""The engines a series exists for, their pinned versions (from PINS only) and the directories that go with them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from moe_routes import REPO_ROOT, cache_root, pins
from moe_routes.patching.errors import PatchError

ENGINES = {
    # pkg: the import package; pin: the PINS key; dist: the PyPI distribution of the pinned release
    "vllm": {"pkg": "vllm", "pin": "VLLM_VERSION", "dist": "vllm"},
    "sglang": {"pkg": "sglang", "pin": "SGLANG_VERSION", "dist": "sglang"},
}
NEW_FILES_DIR = "files"


def pin_of(engine: str) -> str:
    key = ENGINES[engine]["pin"]
    try:
        return pins.load()[key]
    except KeyError:
        raise PatchError(f"{pins.PINS_PATH} has no {key}") from None
    except (OSError, ValueError) as e:
        raise PatchError(f"cannot read the pins: {e}") from None


def series_dir(engine: str) -> Path:
    return REPO_ROOT / "patches" / f"{engine}-{pin_of(engine)}"


def new_files_dir(pdir: Path) -> Path:
    """Where the series keeps the files it adds, at their upstream-relative paths (the only copy to edit)."""
    return pdir / NEW_FILES_DIR


def engine_of_dir(pdir: Path) -> str | None:
    return next((e for e in ENGINES if pdir.name.startswith(e + "-")), None)


def cache_dir() -> Path:
    return cache_root() / "dist"


def sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()
