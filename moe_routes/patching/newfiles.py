"""New upstream files as real sources: ``patches/<engine>-<pin>/files/<upstream path>`` (a file only that series
adds) or ``patches/shared/<engine>/files/<upstream path>`` (one copy for every series of the engine that adds the
path) is the only copy anyone edits; the series' new-file hunks (``--- /dev/null``) are generated from it, so each
committed series stays self-contained for a plain ``git apply``. A path is shared while its file exists under
shared/; a path in both places, and a shared file no series adds, are lint errors.

``regenerate`` rewrites those hunks (Last-Update bumped only for a patch whose bytes change), ``stale_problems``
is lint's lock-file check of one series, ``shared_problems`` its check across the series of an engine, ``extract``
writes the sources from the committed hunks (after a merge that changed a patch instead of its source).
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_routes import schema
from moe_routes.patching.engines import (
    engine_of_dir,
    new_files_dir,
    pin_of_dir,
    series_dir,
    shared_files_dir,
    sibling_series,
)
from moe_routes.patching.errors import PatchError
from moe_routes.patching.gendiff import diff_file
from moe_routes.patching.patchfile import FilePatch, Patch, bump_last_update
from moe_routes.patching.series import scan_series

IGNORED_DIRS = {"__pycache__", ".ruff_cache", ".mypy_cache", ".pytest_cache"}


def _walk(root: Path | None) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if root is None or not root.is_dir():
        return out
    for dp, dns, fns in os.walk(root):
        dns[:] = sorted(d for d in dns if d not in IGNORED_DIRS)
        for fn in sorted(fns):
            if not fn.endswith((".pyc", ".pyo")):
                f = Path(dp) / fn
                out[f.relative_to(root).as_posix()] = f
    return out


def own_source_files(pdir: Path) -> dict[str, Path]:
    """{upstream-relative path: source file} under the series' files/ (caches of tools that ran there skipped)."""
    return _walk(new_files_dir(pdir))


def shared_source_files(pdir: Path, engine: str | None = None) -> dict[str, Path]:
    """{upstream-relative path: source file} under shared/<engine>/files/ beside the series: every file there,
    used by every series of the engine whose patches add that path."""
    return _walk(shared_files_dir(pdir, engine))


def source_files(pdir: Path, engine: str | None = None) -> dict[str, Path]:
    """The series' own files plus the shared ones (for a path in both, a lint error, the series' own)."""
    return {**shared_source_files(pdir, engine), **own_source_files(pdir)}


def refresh_command(pdir: Path, *options: str) -> str:
    """The command line that fixes pdir, for messages."""
    engine = engine_of_dir(pdir) or "ENGINE"
    pin = pin_of_dir(pdir)
    custom = "" if pin and series_dir(engine, pin).resolve() == pdir.resolve() else f" --patches-dir {pdir}"
    return " ".join([f"moe-routes patch refresh --engine {engine}{custom}", *options])


def _user_path(f: Path) -> str:
    try:
        return str(f.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(f)


def source_path(pdir: Path, path: str, engine: str | None = None) -> Path:
    """Where the source of a new file is, or would be: the series' files/, or shared/ where the file is shared."""
    own = new_files_dir(pdir) / path
    shared = shared_files_dir(pdir, engine)
    if not own.is_file() and shared is not None and (shared / path).is_file():
        return shared / path
    return own


def shown(pdir: Path, path: str, engine: str | None = None) -> str:
    """The source of a new file as the user would type it: relative to the cwd when under it."""
    return _user_path(source_path(pdir, path, engine))


def generated_block(path: str, content: bytes) -> bytes:
    return diff_file(path, None, content)


def _new_file_patches(patches: list[Patch]) -> list[tuple[Patch, FilePatch]]:
    return [(p, fp) for p in patches for fp in p.files if fp.op == "new"]


def _file_problems(pdir: Path, path: str, src: Path, engine: str | None) -> list[str]:
    problems = schema.engine_literal_problems(src)
    if src.read_bytes().endswith(b"\n\n"):
        problems.append(
            f"{shown(pdir, path, engine)} ends with a blank line (git apply warns 'new blank line at EOF'); "
            f"remove it there and run `{refresh_command(pdir)}`"
        )
    return problems


def stale_problems(pdir: Path, patches: list[Patch], engine: str | None = None) -> list[str]:
    """Lint: every new file of the series has a source (files/ or shared/) that generates exactly its committed
    hunk, every file under the series' files/ is a new file of exactly one patch, and no path is both a series file
    and a shared one."""
    problems = []
    own = own_source_files(pdir)
    shared = shared_source_files(pdir, engine)
    sources = {**shared, **own}
    new_owner = {fp.path: p.name for p, fp in _new_file_patches(patches)}
    touched = {f: p.name for p in patches for f in p.paths}
    for path in sorted(own.keys() & shared.keys()):
        problems.append(
            f"{_user_path(own[path])} and {_user_path(shared[path])}: {path} is both a series file and a shared one; "
            "keep one copy (shared/ when several series add it, files/ of the series otherwise) and delete the other"
        )
    for p, fp in _new_file_patches(patches):
        src = sources.get(fp.path)
        if src is None:
            problems.append(
                f"{p.name}: new file {fp.path} has no source {shown(pdir, fp.path, engine)}; "
                f"create it from the patch with `{refresh_command(pdir, '--extract-new-files')}`"
            )
        elif generated_block(fp.path, src.read_bytes()) != fp.block:
            problems.append(
                f"{p.name}: its new-file hunk for {fp.path} differs from what {shown(pdir, fp.path, engine)} "
                f"generates; run `{refresh_command(pdir)}` to regenerate the patch from the source (or, where the "
                f"patch is the newer one, e.g. after a merge, `{refresh_command(pdir, '--extract-new-files')}` to "
                "update the source)"
            )
    for path, src in shared.items():
        if path in new_owner and path not in own:
            problems += _file_problems(pdir, path, src, engine)
    for path, src in own.items():
        problems += _file_problems(pdir, path, src, engine)
        if path in new_owner:
            continue
        if path in touched:
            problems.append(
                f"{shown(pdir, path, engine)}: {path} is an upstream file that {touched[path]} modifies; files/ holds "
                "only files the series adds (remove it)"
            )
        else:
            problems.append(
                f"{shown(pdir, path, engine)}: no patch of the series adds {path}; add it to one with "
                f"`moe-routes patch refresh --tree DIR --add-file {path} --to NAME.patch` or delete it"
            )
    return problems


def shared_problems(pdirs: list[Path], engine: str) -> list[str]:
    """Lint across the series of one engine that share a shared/ directory: every shared file is added by at least
    one of them, and the series that add a shared file carry the same new-file hunk for it."""
    if not pdirs:
        return []
    shared = shared_source_files(pdirs[0], engine)
    hunks = _shared_hunks(pdirs, engine, set(shared))
    problems = []
    for path, src in shared.items():
        users = hunks.get(path, [])
        if not users:
            problems.append(
                f"{_user_path(src)}: no {engine} series adds {path} (series: "
                f"{', '.join(d.name for d in pdirs)}); add it to one with `moe-routes patch refresh --tree DIR "
                f"--add-file {path} --to NAME.patch` or delete it"
            )
        elif len({fp.block for _, _, fp in users}) > 1:
            names = ", ".join(f"{d.name}/{p.name}" for d, p, _ in users)
            problems.append(
                f"{path}: the new-file hunks of {names} differ; a shared file is the same in every series: run "
                f"`moe-routes patch refresh --engine {engine}` to regenerate them all from {_user_path(src)}"
            )
    return problems


def _shared_hunks(pdirs: list[Path], engine: str, paths: set[str]) -> dict[str, list[tuple[Path, Patch, FilePatch]]]:
    """{shared path: [(series dir, patch, its new-file hunk)]} of the series that add a shared path."""
    out: dict[str, list[tuple[Path, Patch, FilePatch]]] = {}
    for d in pdirs:
        own = own_source_files(d)
        for p, fp in _new_file_patches(scan_series(d)[0]):
            if fp.path in paths and fp.path not in own:
                out.setdefault(fp.path, []).append((d, p, fp))
    return out


def regenerate(pdir: Path, patches: list[Patch], engine: str | None = None) -> dict[str, bytes]:
    """{patch name: new bytes} for each patch whose new-file hunks differ from their sources (files/, shared/)."""
    own, shared = own_source_files(pdir), shared_source_files(pdir, engine)
    sources = {**shared, **own}
    new = _new_file_patches(patches)
    missing = [f"{p.name}: {fp.path}" for p, fp in new if fp.path not in sources]
    if missing:
        raise PatchError(
            f"new files without a source under {new_files_dir(pdir)} or {shared_files_dir(pdir, engine)}: "
            f"{', '.join(missing)}; create them from the patches with "
            f"`{refresh_command(pdir, '--extract-new-files')}`"
        )
    both = sorted(fp.path for _, fp in new if fp.path in own and fp.path in shared)
    if both:
        raise PatchError(
            f"{', '.join(both)}: both under {new_files_dir(pdir)} and {shared_files_dir(pdir, engine)}; keep one copy "
            "(moe-routes patch lint names them)"
        )
    changed = {}
    for p in patches:
        blocks = [
            generated_block(fp.path, sources[fp.path].read_bytes()) if fp.op == "new" else fp.block for fp in p.files
        ]
        body = b"".join(blocks)
        if body != p.body:
            changed[p.name] = bump_last_update(p.header) + body
    return changed


def extract(pdir: Path, patches: list[Patch], engine: str | None = None) -> list[tuple[str, str]]:
    """Write every new file's content from its committed hunk to its source: shared/ for a path that has a file
    there, the series' files/ otherwise. A shared path whose hunk differs between the series that add it is an
    error, and then nothing is written. Returns [(path, what happened)]."""
    own = own_source_files(pdir)
    shared = shared_source_files(pdir, engine)
    new = _new_file_patches(patches)
    shared_paths = {fp.path for _, fp in new if fp.path in shared and fp.path not in own}
    if shared_paths:
        others = [d for d in sibling_series(pdir, engine) if d != pdir.resolve()]
        mine = {fp.path: (p, fp) for p, fp in new}
        for path, users in sorted(_shared_hunks(others, engine or engine_of_dir(pdir), shared_paths).items()):
            p, fp = mine[path]
            bad = [f"{d.name}/{q.name}" for d, q, other in users if other.new_content != fp.new_content]
            if bad:
                raise PatchError(
                    f"{path} is shared ({_user_path(shared[path])}) but the new-file hunk of {pdir.name}/{p.name} "
                    f"differs from that of {', '.join(bad)}; nothing written. Make the committed patches agree "
                    "(take one side of the merge), or merge the shared file by hand and run "
                    f"`moe-routes patch refresh --engine {engine or engine_of_dir(pdir)}`"
                )
    done = []
    for _, fp in new:
        src = source_path(pdir, fp.path, engine)
        content = fp.new_content
        if src.is_file() and src.read_bytes() == content:
            done.append((fp.path, "unchanged"))
            continue
        existed = src.is_file()
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(content)
        done.append((fp.path, "updated" if existed else "created"))
    return done
