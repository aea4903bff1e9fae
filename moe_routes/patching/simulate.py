"""The strict in-memory applier: every hunk at its exact line number, no offset, no fuzz, no whitespace slack.

It predicts the result of a whole series before anything is written (atomicity), tells which patches of a
target are applied, not applied or drifted (status), and names the hunk and the offset where git would have
silently shifted it. ``apply.git_apply_staged`` then proves the prediction with real ``git apply``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from moe_routes.patching.patchfile import FilePatch, Hunk, Patch, split_lines

Files = dict[str, "bytes | None"]  # path -> content, None = absent


def read_files(root: Path, paths: Iterable[str]) -> Files:
    out: Files = {}
    for p in paths:
        f = root / p
        out[p] = f.read_bytes() if f.is_file() else None
    return out


def _find(lines: list[bytes], seq: list[bytes]) -> int | None:
    if not seq:
        return None
    k = len(seq)
    for j in range(len(lines) - k + 1):
        if lines[j] == seq[0] and lines[j : j + k] == seq:
            return j
    return None


def _sides(h: Hunk, reverse: bool) -> tuple[int, int, list[bytes], list[bytes]]:
    if reverse:
        return h.new_start, h.new_len, h.new_lines, h.old_lines
    return h.old_start, h.old_len, h.old_lines, h.new_lines


def apply_file(content: bytes | None, fp: FilePatch, reverse: bool) -> tuple[bytes | None, list[str]]:
    """Apply one file's hunks. Returns (new content or None for 'absent', errors)."""
    op = {"new": "delete", "delete": "new"}.get(fp.op, fp.op) if reverse else fp.op
    if op == "new":
        if content is not None:
            return None, ["file already exists"]
        return b"".join(ln for h in fp.hunks for ln in _sides(h, reverse)[3]), []
    if content is None:
        return None, ["file does not exist"]
    if op == "delete":
        if content != b"".join(ln for h in fp.hunks for ln in _sides(h, reverse)[2]):
            return None, ["content differs from the file the patch deletes"]
        return None, []
    lines = split_lines(content)
    out: list[bytes] = []
    pos = 0
    errors: list[str] = []
    for no, h in enumerate(fp.hunks, 1):
        start, length, old, new = _sides(h, reverse)
        idx = start - 1 if length > 0 else start
        if idx >= pos and lines[idx : idx + len(old)] == old:
            out.extend(lines[pos:idx])
            out.extend(new)
            pos = idx + len(old)
            continue
        msg = f"hunk #{no} ({h.header}) does not match at line {start}"
        at = _find(lines, old)
        if at is not None and at != idx:
            msg += f" (its text is at line {at + 1}, offset {at - idx:+d} lines; offsets are refused)"
        errors.append(msg)
    if errors:
        return None, errors
    out.extend(lines[pos:])
    return b"".join(out), []


def simulate(patches: list[Patch], files: Files, reverse: bool) -> tuple[Files | None, str | None]:
    """Apply (or reverse, in reverse order) the whole series in memory; stop at the first failure."""
    cur = dict(files)
    for p in reversed(patches) if reverse else patches:
        for fp in p.files:
            new, errs = apply_file(cur.get(fp.path), fp, reverse)
            if errs:
                return None, f"patch {p.name}: file {fp.path}: " + "; ".join(errs)
            cur[fp.path] = new
    return cur, None


@dataclass
class PatchState:
    name: str
    state: str  # applied | not applied | drifted | partly applied
    drifted: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)


def classify(p: Patch, files: Files) -> PatchState:
    fwd_bad, rev_bad, detail, drifted = [], [], [], []
    for fp in p.files:
        _, ferr = apply_file(files.get(fp.path), fp, False)
        _, rerr = apply_file(files.get(fp.path), fp, True)
        if ferr:
            fwd_bad.append(fp.path)
        if rerr:
            rev_bad.append(fp.path)
        if ferr and rerr:
            drifted.append(fp.path)
            detail.append(f"{fp.path}: " + "; ".join(ferr))
    if drifted:
        return PatchState(p.name, "drifted", drifted, detail)
    if not fwd_bad:
        return PatchState(p.name, "not applied")
    if not rev_bad:
        return PatchState(p.name, "applied")
    return PatchState(
        p.name, "partly applied", detail=[f"applied: {', '.join(fwd_bad)}; not applied: {', '.join(rev_bad)}"]
    )
