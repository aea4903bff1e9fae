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


def load_patches(pdir: Path) -> list[Patch]:
    entries, problems = read_series(pdir)
    if problems:
        raise PatchError("; ".join(problems))
    out, seen = [], set()
    for e in entries:
        if e in seen:
            raise PatchError(f"{pdir / 'series'}: duplicate entry {e}")
        seen.add(e)
        f = pdir / e
        if not f.is_file():
            raise PatchError(f"{pdir / 'series'}: {e}: patch file missing")
        out.append(parse_patch(f.read_bytes(), e, f))
    return out


def file_owners(patches: list[Patch]) -> dict[str, str]:
    """{upstream path: the one patch that touches it}; refresh and new-file generation rely on one owner."""
    owner: dict[str, str] = {}
    for p in patches:
        for f in p.paths:
            if f in owner:
                raise PatchError(f"{f} is touched by both {owner[f]} and {p.name}; the series needs one owner per file")
            owner[f] = p.name
    return owner


def all_paths(patches: list[Patch]) -> list[str]:
    return sorted({f for p in patches for f in p.paths})
