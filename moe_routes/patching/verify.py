"""verify: each series of each pin, lint-clean, applies strictly to every layout of its clean pinned release
(vLLM: the GPU wheel, the CPU wheel and, where PyPI has the sdist, a git checkout), byte-compiles and reverses to a
byte-identical tree. A file that differs between a pin's CPU and GPU wheels may be patched only when the series
applied to both; ``--compare-wheels`` lists those files."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moe_routes.patching.apply import patch_state, run_series
from moe_routes.patching.commit import state_problems
from moe_routes.patching.console import quiet, say
from moe_routes.patching.engines import default_pin, engine_pins, pin_of_dir, series_dir
from moe_routes.patching.errors import PatchError
from moe_routes.patching.lint import engine_problems, lint_dir
from moe_routes.patching.patchfile import Patch
from moe_routes.patching.releases import compare_wheels, ensure_artifact, extract_release, hash_tree, verify_layouts
from moe_routes.patching.series import all_paths, load_patches
from moe_routes.patching.simulate import read_files
from moe_routes.patching.targets import check_version, resolve_tree


def verify(engines: list[str], offline: bool, pdir_override: Path | None, pin: str | None = None) -> int:
    failed = False
    for engine in engines:
        if pdir_override:  # tests: one series outside patches/, proven on the releases of its pin
            pins = [pin or pin_of_dir(pdir_override) or default_pin(engine)]
        else:
            pins = engine_pins(engine, pin)
        pdirs = [pdir_override or series_dir(engine, p) for p in pins]
        shared = engine_problems(engine, pdirs)
        if shared:
            say(f"{engine}: FAIL: lint found {len(shared)} problem(s) in the files its series share:")
            for p in shared:
                print(f"  - {p}")
            failed = True
        for p, pdir in zip(pins, pdirs, strict=True):
            failed |= _verify_series(engine, p, pdir, offline)
    return 1 if failed else 0


def _verify_series(engine: str, pin: str, pdir: Path, offline: bool) -> bool:
    """True on failure."""
    probs = lint_dir(pdir, engine)
    if probs:
        say(f"{engine} {pin}: FAIL: lint found {len(probs)} problem(s) in {pdir.name}:")
        for p in probs:
            print(f"  - {p}")
        return True
    patches = load_patches(pdir)
    if not patches:
        say(f"{engine} {pin}: no patches")
        return False
    failed, passed = False, set()
    for kind, layout in verify_layouts(engine, pin):
        label = f"{engine} {pin} {layout}"
        tmp = Path(tempfile.mkdtemp(prefix=f"moe-patch-verify-{engine}-{pin}-{layout}-"))
        try:
            art = ensure_artifact(engine, kind, pin, offline)
            label += f" ({art.name})"
            nclean = _round_trip(engine, pin, layout, art, tmp, pdir, patches)
            say(
                f"{label}: OK: {len(patches)} patches, {len(all_paths(patches))} files applied, byte-compiled, "
                f"reversed; {nclean} files byte-identical"
            )
            passed.add(kind)
        except PatchError as e:
            say(f"{label}: FAIL: {e}")
            failed = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    kinds = {k for k, _ in verify_layouts(engine, pin)}
    if {"wheel", "cpu-wheel"} <= kinds:
        try:
            failed |= _check_wheel_differences(engine, pin, patches, passed, offline)
        except PatchError as e:
            say(f"{engine} {pin} wheels: FAIL: {e}")
            failed = True
    return failed


def _check_wheel_differences(engine: str, pin: str, patches: list[Patch], passed: set[str], offline: bool) -> bool:
    """The series may touch a file that differs between the CPU and GPU wheels only when it applied to both."""
    diff = compare_wheels(engine, pin, offline)
    touched = sorted(set(all_paths(patches)) & (set(diff.differ) | set(diff.only_gpu) | set(diff.only_cpu)))
    both = {"wheel", "cpu-wheel"} <= passed
    label = f"{engine} {pin} wheels"
    if not touched:
        say(f"{label}: OK: the series touches none of the {len(diff.differ)} files that differ between them")
        return False
    if both:
        say(f"{label}: OK: the series touches {', '.join(touched)}, which differ(s) between them; applies to both")
        return False
    say(
        f"{label}: FAIL: the series touches {', '.join(touched)}, which differ(s) between the CPU and GPU wheels, "
        "and does not apply to both (see above); keep those files out of the series or make each hunk fit both"
    )
    return True


def _round_trip(engine: str, pin: str, layout: str, art: Path, tmp: Path, pdir: Path, patches: list[Patch]) -> int:
    """Apply and reverse on a fresh extraction; returns how many files came back byte-identical."""
    root = extract_release(engine, layout, art, tmp, pin)
    clean = hash_tree(tmp)
    t = resolve_tree(engine, tmp if layout == "git" else root)  # a git checkout is given by its top dir
    if t.root != root.resolve():
        raise PatchError(f"layout detection picked {t.root}, expected {root}")
    check_version(t, pin, False, None)
    t.pin = pin
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


def report_wheel_differences(engines: list[str], pin: str | None, offline: bool) -> int:
    """moe-routes verify --compare-wheels: the .py files that differ between each pin's CPU and GPU wheels, and
    which of them the pin's series touches. --pin may name a version that is not pinned yet (a pin in the making)."""
    for engine in engines:
        for p in [pin] if pin else engine_pins(engine, None):
            if not {"wheel", "cpu-wheel"} <= {k for k, _ in verify_layouts(engine, p)}:
                continue
            diff = compare_wheels(engine, p, offline)
            pdir = series_dir(engine, p)
            touched = set(all_paths(load_patches(pdir))) if (pdir / "series").is_file() else set()
            say(
                f"{engine} {p}: {diff.gpu.name} vs {diff.cpu.name}: {diff.identical} .py files identical, "
                f"{len(diff.differ)} differ, {len(diff.only_gpu)} only in the GPU wheel, "
                f"{len(diff.only_cpu)} only in the CPU wheel"
            )
            for f in diff.differ:
                print(f"  differs: {f}" + ("  (patched by the series)" if f in touched else ""))
            for f in diff.only_cpu:
                print(f"  only in the CPU wheel: {f}" + ("  (patched by the series)" if f in touched else ""))
            for f in sorted(touched & set(diff.only_gpu)):
                print(f"  only in the GPU wheel: {f}  (patched by the series)")
    return 0
