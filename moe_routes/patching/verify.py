"""verify: each series, lint-clean, applies strictly to every layout of the clean pinned release, byte-compiles
and reverses to a byte-identical tree."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moe_routes.patching.apply import patch_state, run_series
from moe_routes.patching.commit import state_problems
from moe_routes.patching.console import quiet, say
from moe_routes.patching.engines import pin_of, series_dir
from moe_routes.patching.errors import PatchError
from moe_routes.patching.lint import lint_dir
from moe_routes.patching.patchfile import Patch
from moe_routes.patching.releases import LAYOUTS, ensure_artifact, extract_release, hash_tree
from moe_routes.patching.series import all_paths, load_patches
from moe_routes.patching.simulate import read_files
from moe_routes.patching.targets import check_version, resolve_tree


def verify(engines: list[str], offline: bool, pdir_override: Path | None) -> int:
    failed = False
    for engine in engines:
        pdir = pdir_override or series_dir(engine)
        probs = lint_dir(pdir, engine)
        if probs:
            say(f"{engine}: FAIL: lint found {len(probs)} problem(s):")
            for p in probs:
                print(f"  - {p}")
            failed = True
            continue
        patches = load_patches(pdir)
        if not patches:
            say(f"{engine}: no patches")
            continue
        for kind, layout in LAYOUTS[engine]:
            label = f"{engine} {layout}"
            tmp = Path(tempfile.mkdtemp(prefix=f"moe-patch-verify-{engine}-{layout}-"))
            try:
                art = ensure_artifact(engine, kind, offline)
                label += f" ({art.name})"
                nclean = _round_trip(engine, layout, art, tmp, pdir, patches)
                say(
                    f"{label}: OK: {len(patches)} patches, {len(all_paths(patches))} files applied, byte-compiled, "
                    f"reversed; {nclean} files byte-identical"
                )
            except PatchError as e:
                say(f"{label}: FAIL: {e}")
                failed = True
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def _round_trip(engine: str, layout: str, art: Path, tmp: Path, pdir: Path, patches: list[Patch]) -> int:
    """Apply and reverse on a fresh extraction; returns how many files came back byte-identical."""
    root = extract_release(engine, layout, art, tmp)
    clean = hash_tree(tmp)
    t = resolve_tree(engine, tmp if layout == "git" else root)  # a git checkout is given by its top dir
    if t.root != root.resolve():
        raise PatchError(f"layout detection picked {t.root}, expected {root}")
    check_version(t, pin_of(engine), False, None)
    with quiet():
        run_series(t, pdir, reverse=False, check=False)
        cur = read_files(t.root, all_paths(patches))
        states = {patch_state(p, cur).state for p in patches}
        if states != {"applied"} or state_problems(t, patches, cur):
            raise PatchError(f"after apply, status is {states} / {state_problems(t, patches, cur)}")
        run_series(t, pdir, reverse=True, check=False)
    after = hash_tree(tmp)
    diff = sorted(k for k in clean.keys() | after.keys() if clean.get(k) != after.get(k))
    if diff:
        raise PatchError(f"tree not byte-identical after reverse: {', '.join(diff[:10])}")
    return len(clean)
