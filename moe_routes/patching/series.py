"""A quilt ``series`` file (one patch name per line, ``-p1`` only) and the patches it lists."""

from __future__ import annotations

from pathlib import Path

from moe_routes.patching.errors import PatchError
from moe_routes.patching.patchfile import Patch, parse_patch


def read_series(pdir: Path) -> tuple[list[str], list[str]]:
    """Returns (entries, problems)."""
    sfile = pdir / "series"
    if not sfile.is_file():
        return [], [f"{sfile}: series file missing"]
    entries, problems = [], []
    for n, raw in enumerate(sfile.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        toks = line.split()
        if len(toks) > 1 and toks[1:] != ["-p1"]:
            problems.append(f"series:{n}: unsupported options {' '.join(toks[1:])!r} (only -p1)")
        if "/" in toks[0]:
            problems.append(f"series:{n}: {toks[0]!r}: patches must sit beside the series file")
        entries.append(toks[0])
    return entries, problems


def scan_series(pdir: Path) -> tuple[list[Patch], list[str]]:
    """The patches the series lists, parsed, and what is wrong with it: bad lines, duplicate entries, missing or
    unparsable patch files, an upstream file touched by two patches (refresh and new-file generation rely on one
    owner per file). The one owner of these checks: load_patches raises on them, lint reports them all."""
    entries, problems = read_series(pdir)
    patches: list[Patch] = []
    seen: set[str] = set()
    owner: dict[str, str] = {}
    for e in entries:
        if e in seen:
            problems.append(f"{e}: duplicate series entry")
            continue
        seen.add(e)
        f = pdir / e
        if not f.is_file():
            problems.append(f"{e}: listed in series but the file is missing")
            continue
        try:
            p = parse_patch(f.read_bytes(), e, f)
        except PatchError as ex:
            problems.append(f"{e}: does not parse: {ex}")
            continue
        patches.append(p)
        for path in p.paths:
            if path in owner:
                problems.append(
                    f"{e}: {path} is already touched by {owner[path]} (one patch per file; refresh relies on it)"
                )
            else:
                owner[path] = e
    return patches, problems


def load_patches(pdir: Path) -> list[Patch]:
    patches, problems = scan_series(pdir)
    if problems:
        raise PatchError(f"{pdir}: " + "; ".join(problems) + " (moe-routes patch lint lists every problem)")
    return patches


def file_owners(patches: list[Patch]) -> dict[str, str]:
    """{upstream path: the one patch that touches it} of a series load_patches accepted."""
    return {f: p.name for p in patches for f in p.paths}


def all_paths(patches: list[Patch]) -> list[str]:
    return sorted({f for p in patches for f in p.paths})
