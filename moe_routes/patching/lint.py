"""lint: the series file, each patch (parses, git accepts it, DEP-3 header, one patch per upstream file, paths
under the engine package) and the new-file sources under files/ and shared/ (the committed hunks are what they
generate); across the series of an engine: the shared files (each used, the same hunk everywhere) and the series
directories against the pins in PINS."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tempfile
from pathlib import Path

from moe_routes import pins as pinsfile
from moe_routes.patching import newfiles
from moe_routes.patching.engines import ENGINES, patches_root, pin_of_dir, pins_of, sibling_series, supported
from moe_routes.patching.errors import PatchError
from moe_routes.patching.git import run_git
from moe_routes.patching.patchfile import DEP3_REQUIRED, Patch, parse_dep3
from moe_routes.patching.series import read_series, scan_series


def lint_dir(pdir: Path, engine: str | None) -> list[str]:
    parsed, problems = scan_series(pdir)
    if not (pdir / "series").is_file():
        return problems
    pkg = ENGINES[engine]["pkg"] if engine else None
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-lint-"))
    try:
        for p in parsed:
            r = run_git(["apply", "--numstat", str(p.path.resolve())], cwd=tmp, ceiling=tmp)
            if r.returncode:
                why = r.stderr.decode(errors="replace").strip()
                problems.append(f"{p.name}: git apply --numstat rejects it: {why}")
            problems += _header_problems(p)
            problems += [
                f"{p.name}: {f}: path must start with {pkg}/ (a/{pkg}/..., see README)"
                for f in p.paths
                if pkg and not f.startswith(pkg + "/")
            ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    listed = set(read_series(pdir)[0])
    for f in sorted(pdir.iterdir()):
        if f.is_file() and f.suffix in (".patch", ".diff") and f.name not in listed:
            problems.append(f"{f.name}: orphan patch file (not listed in series)")
    return problems + newfiles.stale_problems(pdir, parsed, engine)


def engine_problems(engine: str, pdirs: list[Path]) -> list[str]:
    """Across the series of one engine: the shared files (newfiles.shared_problems)."""
    return newfiles.shared_problems(sorted({q for d in pdirs for q in sibling_series(d, engine)}), engine)


def pins_problems(engines: list[str]) -> list[str]:
    """PINS itself (every listed vLLM pin has its facts) and patches/ against it: a series directory per pin, and
    no <engine>-<version>/ directory for a version that is not pinned."""
    try:
        problems = pinsfile.check()
    except (OSError, ValueError) as e:
        return [f"cannot read the pins: {e}"]
    root = patches_root()
    for engine in engines:
        try:
            pins = pins_of(engine)
        except PatchError as e:
            problems.append(str(e))
            continue
        for d in sorted(root.glob(f"{engine}-*")):
            pin = pin_of_dir(d)
            if d.is_dir() and pin and pin not in pins:
                problems.append(
                    f"{d}: {engine} {pin} is not pinned (the series exist for {supported(engine)}); add {pin} to "
                    "PINS (its facts and lock files first, see docs/developing.md) or remove the directory"
                )
    return problems


def _header_problems(p: Patch) -> list[str]:
    problems = []
    fields, sep = parse_dep3(p.header)
    for k in DEP3_REQUIRED:
        if not fields.get(k, "").strip():
            problems.append(f"{p.name}: DEP-3 header lacks {k}:")
    lu = fields.get("Last-Update", "").strip()
    if lu:
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", lu):
                raise ValueError(lu)
            dt.date.fromisoformat(lu)
        except ValueError:
            problems.append(f"{p.name}: Last-Update {lu!r} is not a valid YYYY-MM-DD date")
    if not sep:
        problems.append(f"{p.name}: no '---' line between the DEP-3 header and the diff")
    return problems
