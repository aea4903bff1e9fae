"""One stable ``diff --git a/PATH b/PATH`` block: git's Myers diff, 3 lines of context, no index line, so that
regenerating an unchanged file gives the same bytes on any machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from moe_routes.patching.errors import PatchError
from moe_routes.patching.git import run_git
from moe_routes.patching.patchfile import split_lines


def diff_file(path: str, old: bytes | None, new: bytes | None) -> bytes:
    """The block that turns old into new (None = absent); b'' if they are equal."""
    if old == new:
        return b""
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-diff-"))
    try:
        args = []
        for side, data in (("a", old), ("b", new)):
            if data is None:
                args.append("/dev/null")
            else:
                f = tmp / side / path
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
                os.chmod(f, 0o644)
                args.append(f"{side}/{path}")
        r = run_git(
            [
                "diff",
                "--no-index",
                "--no-prefix",
                "--no-color",
                "--no-ext-diff",
                "--no-textconv",
                "--no-renames",
                "--diff-algorithm=myers",
                "-U3",
                *args,
            ],
            cwd=tmp,
            ceiling=tmp,
        )
        if r.returncode not in (0, 1):
            raise PatchError(f"git diff for {path} failed: {r.stderr.decode(errors='replace')}")
        out = []
        in_hunks = False
        for ln in split_lines(r.stdout):
            in_hunks = in_hunks or ln.startswith(b"@@")
            out.append(ln if in_hunks else _normalise_header(ln, path, old, new))  # hunk lines verbatim
        return b"".join(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _normalise_header(ln: bytes, path: str, old: bytes | None, new: bytes | None) -> bytes:
    if ln.startswith(b"diff --git "):
        return f"diff --git a/{path} b/{path}\n".encode()
    if ln.startswith(b"index "):
        return b""
    if ln.startswith(b"--- "):
        return b"--- /dev/null\n" if old is None else f"--- a/{path}\n".encode()
    if ln.startswith(b"+++ "):
        return b"+++ /dev/null\n" if new is None else f"+++ b/{path}\n".encode()
    if ln.startswith((b"Binary files", b"GIT binary")):
        raise PatchError(f"{path}: binary files are not supported")
    return ln
