"""apply / check / reverse / status of a series on a target.

Order of a change: the strict simulator predicts the whole series' result (nothing applies unless everything
does), real ``git apply`` replays it on staged copies outside any repository and must agree byte for byte,
every patched ``.py`` must byte-compile, and only then ``commit`` swaps the files in. A patch's status is
``git apply --check`` / ``--check -R`` on staged copies; the simulator names the drifted files and hunks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_routes.patching.commit import (
    commit_files,
    read_state,
    state_payload,
    state_problems,
    write_state,
)
from moe_routes.patching.console import say, warn
from moe_routes.patching.errors import PatchError
from moe_routes.patching.git import run_git
from moe_routes.patching.patchfile import Patch
from moe_routes.patching.series import all_paths, load_patches
from moe_routes.patching.simulate import Files, PatchState, classify, read_files, simulate
from moe_routes.patching.targets import Target

_COMPILE_SCRIPT = """\
import json, sys
err = {}
for f in sys.argv[1:]:
    try:
        compile(open(f, "rb").read(), f, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        err[f] = type(e).__name__ + ": " + str(e)
print(json.dumps(err))
"""


def compile_errors(files: dict[str, bytes], python: str | None) -> dict[str, str]:
    """Byte-compile in memory (no __pycache__ written), with the target's interpreter when there is one."""
    if not files:
        return {}
    if python is None:
        errs = {}
        for path, data in files.items():
            try:
                compile(data, path, "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as e:
                errs[path] = f"{type(e).__name__}: {e}"
        return errs
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-compile-"))
    try:
        names = {}
        for i, (path, data) in enumerate(files.items()):
            (tmp / f"{i}.py").write_bytes(data)
            names[str(tmp / f"{i}.py")] = path
        r = subprocess.run([python, "-c", _COMPILE_SCRIPT, *names], capture_output=True, text=True)
        if r.returncode:
            raise PatchError(f"byte-compile with {python} failed: {r.stderr.strip()[-500:]}")
        return {names[k]: v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# git prints this only when it placed a hunk somewhere else than its header says (offset or fuzz)
_MOVED_HUNK = re.compile(r"^Hunk #\d+ succeeded at ", re.M)


def _stage(files: Files, stage: Path) -> Path:
    tree = stage / "tree"
    tree.mkdir()
    for p, data in files.items():
        if data is not None:
            (tree / p).parent.mkdir(parents=True, exist_ok=True)
            (tree / p).write_bytes(data)
    return tree


def git_check(p: Patch, files: Files, reverse: bool) -> bool:
    """`git apply --check [-R]` of one patch on staged copies of its files: True if every hunk applies at its
    exact line."""
    stage = Path(tempfile.mkdtemp(prefix="moe-patch-check-"))
    try:
        tree = _stage({f: files.get(f) for f in p.paths}, stage)
        args = ["apply", "--check", "--verbose", "--whitespace=nowarn"] + (["--reverse"] if reverse else [])
        r = run_git([*args, str(p.path.resolve())], cwd=tree, ceiling=stage)
        return r.returncode == 0 and not _MOVED_HUNK.search((r.stdout + r.stderr).decode(errors="replace"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def patch_state(p: Patch, files: Files) -> PatchState:
    """applied / not applied by git's own check; otherwise the simulator tells drifted from partly applied."""
    if git_check(p, files, reverse=False):
        return PatchState(p.name, "not applied")
    if git_check(p, files, reverse=True):
        return PatchState(p.name, "applied")
    state = classify(p, files)
    if state.state in ("applied", "not applied"):  # the simulator accepts what git refuses: report, never guess
        return PatchState(
            p.name,
            "drifted",
            list(p.paths),
            [f"the strict applier finds it {state.state}, git apply --check refuses that"],
        )
    return state


def git_apply_staged(patches: list[Patch], current: Files, expected: Files, reverse: bool, python: str | None) -> None:
    """Replay the series with real `git apply` on staged copies in a temp dir outside any repository, prove every
    file changed, compare with the strict applier, byte-compile."""
    stage = Path(tempfile.mkdtemp(prefix="moe-patch-stage-"))
    try:
        tree = _stage(current, stage)
        for p in reversed(patches) if reverse else patches:
            before = read_files(tree, p.paths)
            args = ["apply", "--verbose", "--whitespace=nowarn"] + (["--reverse"] if reverse else [])
            r = run_git([*args, str(p.path.resolve())], cwd=tree, ceiling=stage)
            out = (r.stdout + r.stderr).decode(errors="replace")
            if r.returncode:
                raise PatchError(f"patch {p.name}: git apply{' -R' if reverse else ''} failed:\n{out.strip()}")
            if _MOVED_HUNK.search(out):
                raise PatchError(f"patch {p.name}: git apply needed an offset/fuzz (refused):\n{out.strip()}")
            after = read_files(tree, p.paths)
            same = [f for f in p.paths if before[f] == after[f]]
            if same:
                raise PatchError(f"patch {p.name}: git apply left {', '.join(same)} unchanged")
        final = read_files(tree, current.keys())
        bad = [f for f in current if final[f] != expected[f]]
        if bad:
            raise PatchError(f"internal: git apply and the strict applier disagree on {', '.join(bad)}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _require_byte_compile(patches, current, expected, python)


def _require_byte_compile(patches: list[Patch], current: Files, expected: Files, python: str | None) -> None:
    errs = compile_errors({p: d for p, d in expected.items() if p.endswith(".py") and d is not None}, python)
    if not errs:
        return
    # a file that failed to compile before (newer syntax than this interpreter) is not the series' fault
    before_errs = compile_errors({p: current[p] for p in errs if current.get(p) is not None}, python)
    for p in errs:
        if p in before_errs:
            warn(f"{p}: cannot be byte-compiled by {python or sys.executable} even unpatched; not checked")
    real = {p: e for p, e in errs.items() if p not in before_errs}
    if real:
        owner = {fp: pt.name for pt in patches for fp in pt.paths}
        raise PatchError(
            "byte-compile failed after patching: "
            + "; ".join(f"{owner.get(p, '?')}: {p}: {e}" for p, e in real.items())
        )


def _explain_neither(t: Target, pdir: Path, patches: list[Patch], current: Files, verb: str, why: str) -> PatchError:
    """The series neither applies nor reverses: name the drifted or partly applied patches and files."""
    states = [patch_state(p, current) for p in patches]
    lines = []
    for s in states:
        if s.state == "drifted":
            lines.append(
                f"patch {s.name}: {', '.join(s.drifted)} matches neither the pinned original nor "
                f"the patched state (local edit or other release?)"
            )
            lines += [f"    {d}" for d in s.detail]
        elif s.state == "partly applied":
            lines.append(f"patch {s.name}: partly applied ({'; '.join(s.detail)})")
    if lines:
        return PatchError(f"cannot {verb} the {pdir.name} series to {t.root}:\n  " + "\n  ".join(lines))
    ok = [s.name for s in states if s.state == "applied"]
    no = [s.name for s in states if s.state == "not applied"]
    if ok and no:
        return PatchError(
            f"series {pdir.name} is partly applied in {t.root}: applied: {', '.join(ok)}; "
            f"not applied: {', '.join(no)}. Reverse the applied ones or restore a clean install."
        )
    return PatchError(f"cannot {verb} series {pdir.name} to {t.root}: {why or 'unknown failure'}")


def run_series(t: Target, pdir: Path, reverse: bool, check: bool) -> int:
    patches = load_patches(pdir)
    verb = "reverse" if reverse else "apply"
    if not patches:
        say(f"{t.engine}: no patches in {pdir.name}; nothing to {verb}")
        return 0
    paths = all_paths(patches)
    current = read_files(t.root, paths)
    fwd, ferr = simulate(patches, current, reverse=False)
    rev, rerr = simulate(patches, current, reverse=True)
    if fwd is not None and rev is not None:  # a degenerate patch that works both ways: trust the state file
        if read_state(t) and not state_problems(t, patches, current):
            fwd = None
        else:
            rev = None
    applied, todo = rev is not None, fwd is not None
    if not applied and not todo:
        raise _explain_neither(t, pdir, patches, current, verb, (rerr if reverse else ferr) or ferr or rerr)
    if applied and not reverse:
        _already_applied(t, pdir, patches, current, check)
        return 0
    if todo and reverse:
        say(f"{t.engine}: series {pdir.name} is not applied in {t.root}; nothing to reverse")
        if t.state_file.exists() and not check:
            t.state_file.unlink()
            say(f"removed stale state file {t.state_file.name}")
        return 0
    if reverse:
        probs = [x for x in state_problems(t, patches, current) if "changed since apply" in x]
        if probs:
            raise PatchError(
                "refusing to reverse: "
                + "; ".join(probs)
                + f" (local edits would survive the reverse; delete {t.state_file} to override)"
            )
    expected = rev if reverse else fwd
    git_apply_staged(patches, current, expected, reverse, t.python)
    changed = [p for p in paths if expected[p] != current[p]]
    if check:
        say(
            f"{t.engine}: OK: {len(patches)} patches of {pdir.name} would {verb} cleanly to {t.root} "
            f"({len(changed)} files)"
        )
        return 0
    state_before = read_state(t) if reverse else None
    created_dirs = commit_files(t.root, current, expected)
    if reverse:
        t.state_file.unlink(missing_ok=True)
        for d in sorted((state_before or {}).get("created_dirs", []), key=lambda x: -x.count("/")):
            try:
                (t.root / d).rmdir()
            except OSError:
                pass
        say(f"{t.engine}: reversed {len(patches)} patches of {pdir.name} in {t.root} ({len(changed)} files restored)")
    else:
        created = [p for p in paths if current[p] is None and expected[p] is not None]
        write_state(t, state_payload(t, pdir, patches, expected, created, created_dirs))
        say(f"{t.engine}: applied {len(patches)} patches of {pdir.name} to {t.root} ({len(changed)} files)")
    return 0


def _already_applied(t: Target, pdir: Path, patches: list[Patch], current: Files, check: bool) -> None:
    probs = state_problems(t, patches, current)
    say(f"{t.engine}: already applied ({len(patches)} patches of {pdir.name}) in {t.root}")
    for pr in probs:
        warn(pr)
    if probs and not check and all("missing" in x or "different series" in x for x in probs):
        write_state(t, state_payload(t, pdir, patches, current, [], []))
        say(f"rewrote state file {t.state_file.name}")


def status(t: Target, pdir: Path) -> int:
    patches = load_patches(pdir)
    say(f"{t.engine} {t.version} at {t.root} ({t.source}); series {pdir.name}: {len(patches)} patches")
    if not patches:
        print(f"  state file: {'present (stale)' if t.state_file.exists() else 'absent'}")
        return 0
    current = read_files(t.root, all_paths(patches))
    states = [patch_state(p, current) for p in patches]
    for s in states:
        extra = f" ({', '.join(s.drifted)})" if s.drifted else (f" ({'; '.join(s.detail)})" if s.detail else "")
        print(f"  {s.name}: {s.state}{extra}")
    kinds = {s.state for s in states}
    ok = kinds in ({"applied"}, {"not applied"})
    if kinds == {"applied"}:
        probs = state_problems(t, patches, current)
        print(f"  state file: {'consistent' if not probs else 'INCONSISTENT: ' + '; '.join(probs)}")
        ok = ok and not probs
    elif t.state_file.exists():
        print("  state file: present but series not fully applied (stale)")
        ok = False
    else:
        print("  state file: absent")
    return 0 if ok else 1
