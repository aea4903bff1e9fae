"""refresh: regenerate the series' patch files; patches are never edited by hand.

Without a target it regenerates the new-file hunks of every series of the engine (or ``--pin``'s) from their
sources under ``files/`` and ``shared/`` (no engine tree needed). With ``--tree``/``--python`` it also diffs every
upstream file a patch owns in that edited tree against the clean release of the tree's pin (the series is the
one of that pin). A patch is rewritten, with Last-Update = today, only when its diff changes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moe_routes.patching import newfiles
from moe_routes.patching.commit import write_atomic
from moe_routes.patching.console import say, warn
from moe_routes.patching.engines import ENGINES, new_files_dir, series_dir
from moe_routes.patching.errors import PatchError, UsageError
from moe_routes.patching.gendiff import diff_file
from moe_routes.patching.patchfile import bump_last_update, check_relpath, header_template
from moe_routes.patching.releases import REFRESH_BASE, ensure_artifact, extract_release
from moe_routes.patching.series import file_owners, load_patches
from moe_routes.patching.simulate import read_files
from moe_routes.patching.targets import resolve_tree, target_from_args


def refresh_new_files(pdir: Path, engine: str | None = None) -> int:
    """Regenerate the new-file hunks from files/ and shared/; touches nothing else."""
    patches = load_patches(pdir)
    changed = newfiles.regenerate(pdir, patches, engine)
    for name, data in changed.items():
        write_atomic(pdir / name, data)
    nnew = sum(fp.op == "new" for p in patches for fp in p.files)
    for p in patches:
        if any(fp.op == "new" for fp in p.files):
            what = "regenerated" if p.name in changed else "unchanged"
            say(f"{pdir.name}/{p.name}: {what} (new files from files/, shared/)")
    if not nnew:
        say(f"{pdir.name}: the series adds no files; nothing to regenerate")
    return 0


def extract_new_files(pdir: Path, engine: str | None = None) -> int:
    patches = load_patches(pdir)
    done = newfiles.extract(pdir, patches, engine)
    for path, what in done:
        say(f"{newfiles.shown(pdir, path, engine)}: {what} (from {pdir.name}'s committed patch)")
    if not done:
        say(f"{pdir.name}: the series adds no files; nothing to extract")
    return 0


def _relpath_arg(p: str, root: Path, pkg: str) -> str:
    if os.path.isabs(p):
        p = os.path.relpath(os.path.realpath(p), root)
    p = p.replace(os.sep, "/")
    for pre in ("a/", "b/"):
        if p.startswith(pre + pkg + "/"):
            p = p[2:]
    check_relpath(p, "file argument")
    if not p.startswith(pkg + "/"):
        raise UsageError(f"{p}: files must be given relative to the target root, starting with {pkg}/")
    return p


class _Plan:
    """Which files each patch owns after this refresh's --new / --add-file / --drop-file."""

    def __init__(self, pdir: Path):
        patches = load_patches(pdir)
        self.owner = file_owners(patches)
        self.own: dict[str, list[str]] = {p.name: list(p.paths) for p in patches}
        self.headers: dict[str, bytes] = {p.name: p.header for p in patches}
        self.bodies: dict[str, bytes] = {p.name: p.body for p in patches}
        self.new_name: str | None = None
        self.dropped: list[str] = []

    def add_patch(self, pdir: Path, name: str, files: list[str], description: str) -> None:
        if "/" in name or not name.endswith((".patch", ".diff")):
            raise UsageError("--new NAME must be a file name ending in .patch or .diff")
        if name in self.own or (pdir / name).exists():
            raise PatchError(f"{name} already exists in {pdir}")
        taken = [f"{f} (owned by {self.owner[f]})" for f in files if f in self.owner]
        if taken:
            raise PatchError("files already belong to another patch: " + ", ".join(taken))
        self.own[name] = files
        self.headers[name] = header_template(description)
        self.bodies[name] = b""
        self.new_name = name

    def add_files(self, to: str, files: list[str]) -> None:
        if to not in self.own:
            raise PatchError(f"--to {to}: not in the series")
        for f in files:
            if self.owner.get(f) not in (None, to):
                raise PatchError(f"{f} already belongs to {self.owner[f]}")
            if f not in self.own[to]:
                self.own[to].append(f)

    def drop_files(self, files: list[str]) -> None:
        for f in files:
            if f not in self.owner:
                raise PatchError(f"--drop-file {f}: no patch of the series owns it")
            self.own[self.owner[f]].remove(f)
            self.dropped.append(f)


def refresh_from_tree(args, pdir_override: Path | None) -> int:
    t = target_from_args(args)
    pdir = pdir_override or series_dir(args.engine, t.pin)
    pkg = ENGINES[args.engine]["pkg"]
    plan = _Plan(pdir)
    if args.new:
        if not args.files or not args.description:
            raise UsageError("--new needs --files and --description")
        plan.add_patch(pdir, args.new, sorted({_relpath_arg(f, t.root, pkg) for f in args.files}), args.description)
    elif args.files or args.description:
        raise UsageError("--files/--description only go with --new")
    if args.add_file:
        if not args.to:
            raise UsageError("--add-file needs --to NAME.patch")
        plan.add_files(args.to, [_relpath_arg(f, t.root, pkg) for f in args.add_file])
    elif args.to:
        raise UsageError("--to only goes with --add-file")
    plan.drop_files([_relpath_arg(f, t.root, pkg) for f in args.drop_file or []])
    if not plan.own:
        say(f"{args.engine}: no patches in {pdir.name}; use --new to create one")
        return 0
    all_files = sorted({f for fs in plan.own.values() for f in fs})
    clean = _clean_release_files(args, t.pin, all_files)
    work = read_files(t.root, all_files)
    sources, new_sources, errors = _new_file_contents(pdir, args.engine, t.root, clean, work)
    results, errors2 = _diff_patches(plan, clean, {**work, **sources}, t.root)
    errors += errors2
    if errors:
        raise PatchError("refresh failed, nothing written:\n  " + "\n  ".join(errors))
    for path, data in new_sources.items():
        dest = new_files_dir(pdir) / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        say(f"{newfiles.shown(pdir, path, args.engine)}: created from {t.root / path}; edit it there from now on")
    for path in plan.dropped:
        src = new_files_dir(pdir) / path
        if src.is_file():
            shown = newfiles.shown(pdir, path, args.engine)
            src.unlink()
            say(f"{shown}: removed (dropped from the series)")
        elif newfiles.source_path(pdir, path, args.engine).is_file():
            say(f"{newfiles.shown(pdir, path, args.engine)}: kept (shared; lint reports it once no series adds it)")
    for name, data in results.items():
        if data is not None:
            write_atomic(pdir / name, data)
    if plan.new_name:
        sfile = pdir / "series"
        text = sfile.read_text(encoding="utf-8") if sfile.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomic(sfile, (text + plan.new_name + "\n").encode())
    for name in plan.own:
        st = "created" if name == plan.new_name else ("refreshed" if results[name] is not None else "unchanged")
        say(f"{name}: {st} ({len(plan.own[name])} files)")
    return 0


def _clean_release_files(args, pin: str, paths: list[str]) -> dict[str, bytes | None]:
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-clean-"))
    try:
        if args.clean:
            croot = resolve_tree(args.engine, Path(args.clean)).root
        else:
            kind = REFRESH_BASE[args.engine]
            art = ensure_artifact(args.engine, kind, pin)
            croot = extract_release(args.engine, "wheel" if kind.endswith("wheel") else kind, art, tmp, pin, only=paths)
        return read_files(croot, paths)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _new_file_contents(pdir: Path, engine: str, root: Path, clean: dict, work: dict) -> tuple[dict, dict, list[str]]:
    """The content of each file the series adds comes from files/ or shared/, never from the tree. Returns
    (contents from the sources, first-time sources to create from the tree under the series' files/, errors)."""
    sources, created, errors = {}, {}, []
    existing = newfiles.source_files(pdir, engine)
    for path in (p for p in work if clean[p] is None):
        if path in existing:
            sources[path] = existing[path].read_bytes()
            if work[path] is not None and work[path] != sources[path]:
                errors.append(
                    f"{root / path} differs from its source {newfiles.shown(pdir, path, engine)}, the only copy to "
                    f"edit: move your change there (cp {root / path} {newfiles.shown(pdir, path, engine)}), then "
                    "refresh again"
                )
        elif work[path] is not None:
            created[path] = work[path]
    return sources, created, errors


def _diff_patches(plan: _Plan, clean: dict, work: dict, root: Path) -> tuple[dict[str, bytes | None], list[str]]:
    errors, results = [], {}
    for name, files in plan.own.items():
        blocks = []
        for f in sorted(files):
            if clean[f] is None and work[f] is None:
                errors.append(f"{name}: {f} exists neither in the clean release nor in {root}")
                continue
            d = diff_file(f, clean[f], work[f])
            if d:
                blocks.append(d)
            else:
                warn(f"{name}: {f} no longer differs from the clean release; dropped from the patch")
        if not blocks:
            errors.append(
                f"{name}: no changes left against the clean release (empty patch; remove it from the series instead)"
            )
            continue
        body = b"".join(blocks)
        if body == plan.bodies[name]:
            results[name] = None
        else:
            results[name] = plan.headers[name] if name == plan.new_name else bump_last_update(plan.headers[name])
            results[name] += body
    return results, errors
