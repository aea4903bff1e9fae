"""New upstream files as real sources: ``patches/<engine>-<pin>/files/<upstream path>`` is the only copy anyone
edits; the series' new-file hunks (``--- /dev/null``) are generated from it, so the committed series stays
self-contained for a plain ``git apply``.

``regenerate`` rewrites those hunks (Last-Update bumped only for a patch whose bytes change), ``stale_problems``
is lint's lock-file check, ``extract`` writes the sources from the committed hunks (after a merge that changed a
patch instead of its source).
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_routes import schema
from moe_routes.patching.engines import engine_of_dir, new_files_dir, series_dir
from moe_routes.patching.errors import PatchError
from moe_routes.patching.gendiff import diff_file
from moe_routes.patching.patchfile import FilePatch, Patch, bump_last_update

IGNORED_DIRS = {"__pycache__", ".ruff_cache", ".mypy_cache", ".pytest_cache"}


def source_files(pdir: Path) -> dict[str, Path]:
    """{upstream-relative path: source file} under files/ (caches of tools that ran there skipped)."""
    root = new_files_dir(pdir)
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for dp, dns, fns in os.walk(root):
        dns[:] = sorted(d for d in dns if d not in IGNORED_DIRS)
        for fn in sorted(fns):
            if not fn.endswith((".pyc", ".pyo")):
                f = Path(dp) / fn
                out[f.relative_to(root).as_posix()] = f
    return out


def refresh_command(pdir: Path, *options: str) -> str:
    """The command line that fixes pdir, for messages."""
    engine = engine_of_dir(pdir) or "ENGINE"
    custom = "" if engine != "ENGINE" and series_dir(engine).resolve() == pdir.resolve() else f" --patches-dir {pdir}"
    return " ".join([f"moe-routes patch refresh --engine {engine}{custom}", *options])


def shown(pdir: Path, path: str) -> str:
    """files/<path> as the user would type it: relative to the cwd when under it."""
    f = new_files_dir(pdir) / path
    try:
        return str(f.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(f)


def generated_block(path: str, content: bytes) -> bytes:
    return diff_file(path, None, content)


def _new_file_patches(patches: list[Patch]) -> list[tuple[Patch, FilePatch]]:
    return [(p, fp) for p in patches for fp in p.files if fp.op == "new"]


def stale_problems(pdir: Path, patches: list[Patch]) -> list[str]:
    """Lint: every new file of the series has a source under files/ that generates exactly its committed hunk, and
    every file under files/ is a new file of exactly one patch."""
    problems = []
    sources = source_files(pdir)
    new_owner = {fp.path: p.name for p, fp in _new_file_patches(patches)}
    touched = {f: p.name for p in patches for f in p.paths}
    for p, fp in _new_file_patches(patches):
        src = sources.get(fp.path)
        if src is None:
            problems.append(
                f"{p.name}: new file {fp.path} has no source {shown(pdir, fp.path)}; "
                f"create it from the patch with `{refresh_command(pdir, '--extract-new-files')}`"
            )
        elif generated_block(fp.path, src.read_bytes()) != fp.block:
            problems.append(
                f"{p.name}: its new-file hunk for {fp.path} differs from what {shown(pdir, fp.path)} generates; "
                f"run `{refresh_command(pdir)}` to regenerate the patch from the source (or, where the patch is the "
                f"newer one, e.g. after a merge, `{refresh_command(pdir, '--extract-new-files')}` to update the source)"
            )
    for path, src in sources.items():
        problems += schema.engine_literal_problems(src)
        if src.read_bytes().endswith(b"\n\n"):
            problems.append(
                f"{shown(pdir, path)} ends with a blank line (git apply warns 'new blank line at EOF'); "
                f"remove it there and run `{refresh_command(pdir)}`"
            )
        if path in new_owner:
            continue
        if path in touched:
            problems.append(
                f"{shown(pdir, path)}: {path} is an upstream file that {touched[path]} modifies; files/ holds only "
                f"files the series adds (remove it)"
            )
        else:
            problems.append(
                f"{shown(pdir, path)}: no patch of the series adds {path}; add it to one with "
                f"`moe-routes patch refresh --tree DIR --add-file {path} --to NAME.patch` or delete it"
            )
    return problems


def regenerate(pdir: Path, patches: list[Patch]) -> dict[str, bytes]:
    """{patch name: new bytes} for each patch whose new-file hunks differ from their sources under files/."""
    sources = source_files(pdir)
    missing = [f"{p.name}: {fp.path}" for p, fp in _new_file_patches(patches) if fp.path not in sources]
    if missing:
        raise PatchError(
            f"new files without a source under {new_files_dir(pdir)}: {', '.join(missing)}; "
            f"create them from the patches with `{refresh_command(pdir, '--extract-new-files')}`"
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


def extract(pdir: Path, patches: list[Patch]) -> list[tuple[str, str]]:
    """Write every new file's content from its committed hunk to files/. Returns [(path, what happened)]."""
    sources = source_files(pdir)
    done = []
    for _, fp in _new_file_patches(patches):
        dest = new_files_dir(pdir) / fp.path
        content = fp.new_content
        if dest.is_file() and dest.read_bytes() == content:
            done.append((fp.path, "unchanged"))
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)
        done.append((fp.path, "updated" if fp.path in sources else "created"))
    return done
