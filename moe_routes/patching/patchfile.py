"""One git-style patch file: its DEP-3 header and its per-file diff blocks, parsed strictly.

git's own parser would accept more (renames, modes, binary); the series uses none of that, and the strict
applier in ``simulate`` needs every hunk's lines, so the patch is parsed here.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

from moe_routes.patching.engines import sha256
from moe_routes.patching.errors import PatchError

DEP3_REQUIRED = ("Description", "Author", "Origin", "Forwarded", "Last-Update")
NEW_AUTHOR = "moe-routes maintainers"

_HUNK_RE = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_DIFF_RE = re.compile(rb"^diff --git a/(\S+) b/(\S+)\s*$")
_UNSUPPORTED_HEADERS = (
    b"rename ",
    b"copy ",
    b"similarity",
    b"dissimilarity",
    b"GIT binary",
    b"Binary files",
    b"old mode",
    b"new mode",
)


def split_lines(data: bytes) -> list[bytes]:
    """Split on b'\\n' only (keeping it); a last line without newline is kept as is."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


@dataclass
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    header: str
    old_lines: list[bytes] = field(default_factory=list)
    new_lines: list[bytes] = field(default_factory=list)


@dataclass
class FilePatch:
    path: str
    op: str  # modify | new | delete
    hunks: list[Hunk] = field(default_factory=list)
    block: bytes = b""  # its text in the patch, from its `diff --git` line to the next one

    @property
    def new_content(self) -> bytes:
        """The content a new-file block creates."""
        return b"".join(ln for h in self.hunks for ln in h.new_lines)


@dataclass
class Patch:
    name: str
    path: Path
    raw: bytes
    header: bytes
    files: list[FilePatch]

    @property
    def body(self) -> bytes:
        return b"".join(f.block for f in self.files)

    @property
    def sha256(self) -> str:
        return sha256(self.raw)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def check_relpath(p: str, where: str) -> str:
    if p.startswith("/") or "\\" in p or any(part in ("", ".", "..") for part in p.split("/")):
        raise PatchError(f"{where}: bad path {p!r} (must be relative, no '..')")
    return p


def parse_patch(raw: bytes, name: str, path: Path | None = None) -> Patch:
    lines = split_lines(raw)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(b"diff --git ")]
    if not starts:
        raise PatchError(f"{name}: no 'diff --git' block (not a git-style patch?)")
    files: list[FilePatch] = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        fp = _parse_block(lines, start, end, name)
        if any(f.path == fp.path for f in files):
            raise PatchError(f"{name}: {fp.path} appears twice in the patch")
        files.append(fp)
    return Patch(name, path or Path(name), raw, b"".join(lines[: starts[0]]), files)


def _parse_block(lines: list[bytes], start: int, end: int, name: str) -> FilePatch:
    """lines[start:end] is one file's block; text after its last hunk (a format-patch signature) is ignored,
    like git apply does."""
    m = _DIFF_RE.match(lines[start].rstrip(b"\n"))
    where = f"{name}: line {start + 1}"
    if not m:
        header = lines[start].decode(errors="replace").rstrip()
        raise PatchError(f"{where}: unsupported diff header {header!r}")
    a, b = m.group(1).decode(), m.group(2).decode()
    if a != b:
        raise PatchError(f"{where}: renames/copies are not supported ({a} -> {b})")
    fp = FilePatch(check_relpath(a, where), "modify", block=b"".join(lines[start:end]))
    i = start + 1
    minus = plus = None
    while i < end and not lines[i].startswith(b"@@"):
        ln = lines[i].rstrip(b"\n")
        if ln.startswith(b"new file mode"):
            fp.op = "new"
        elif ln.startswith(b"deleted file mode"):
            fp.op = "delete"
        elif ln.startswith(_UNSUPPORTED_HEADERS):
            raise PatchError(f"{name}: {fp.path}: unsupported git extended header {ln.decode(errors='replace')!r}")
        elif ln.startswith(b"--- "):
            minus = ln[4:].split(b"\t")[0].decode()
        elif ln.startswith(b"+++ "):
            plus = ln[4:].split(b"\t")[0].decode()
        i += 1
    want_minus = "/dev/null" if fp.op == "new" else f"a/{fp.path}"
    want_plus = "/dev/null" if fp.op == "delete" else f"b/{fp.path}"
    empty_new_or_deleted = minus is None and plus is None and fp.op in ("new", "delete")
    if not empty_new_or_deleted and (minus != want_minus or plus != want_plus):
        raise PatchError(
            f"{name}: {fp.path}: expected '--- {want_minus}' / '+++ {want_plus}', got '--- {minus}' / '+++ {plus}'"
        )
    while i < end and lines[i].startswith(b"@@"):
        i = _parse_hunk(lines, i, end, name, fp)
    if fp.op == "modify" and not fp.hunks:
        raise PatchError(f"{name}: {fp.path}: no hunks")
    if fp.op == "new" and any(h.old_len for h in fp.hunks):
        raise PatchError(f"{name}: {fp.path}: new file with removed lines")
    if fp.op == "delete" and any(h.new_len for h in fp.hunks):
        raise PatchError(f"{name}: {fp.path}: deleted file with added lines")
    return fp


def _parse_hunk(lines: list[bytes], i: int, end: int, name: str, fp: FilePatch) -> int:
    """Parse the hunk whose header is lines[i] into fp; returns the index after it."""
    hm = _HUNK_RE.match(lines[i])
    if not hm:
        raise PatchError(f"{name}: {fp.path}: line {i + 1}: malformed hunk header")
    os_, ol, ns, nl = hm.groups()
    h = Hunk(
        int(os_),
        1 if ol is None else int(ol),
        int(ns),
        1 if nl is None else int(nl),
        lines[i].rstrip(b"\n").decode(errors="replace"),
    )
    where = f"{name}: {fp.path}: hunk #{len(fp.hunks) + 1}"
    i += 1
    need_old, need_new = h.old_len, h.new_len
    last: list[list[bytes]] = []
    while i < end and (need_old > 0 or need_new > 0 or lines[i].startswith(b"\\")):
        ln = lines[i]
        if ln.startswith(b"\\"):
            if not last:
                raise PatchError(f"{where}: stray '\\' line")
            for side in last:
                if side[-1].endswith(b"\n"):
                    side[-1] = side[-1][:-1]
            last = []
            i += 1
            continue
        if not ln.endswith(b"\n") and i == len(lines) - 1:
            raise PatchError(f"{where}: patch file truncated (no final newline)")
        tag, text = ln[:1], ln[1:]
        if ln == b"\n":
            tag, text = b" ", b"\n"  # context line whose single space was stripped
        if tag == b" ":
            h.old_lines.append(text)
            h.new_lines.append(text)
            need_old -= 1
            need_new -= 1
            last = [h.old_lines, h.new_lines]
        elif tag == b"-":
            h.old_lines.append(text)
            need_old -= 1
            last = [h.old_lines]
        elif tag == b"+":
            h.new_lines.append(text)
            need_new -= 1
            last = [h.new_lines]
        else:
            shown = ln.decode(errors="replace").rstrip()
            raise PatchError(f"{where}: unexpected line {i + 1}: {shown!r} (hunk shorter than its header says)")
        if need_old < 0 or need_new < 0:
            raise PatchError(f"{where}: more lines than its header says")
        i += 1
    if need_old > 0 or need_new > 0:
        raise PatchError(f"{where}: patch ends inside the hunk")
    fp.hunks.append(h)
    return i


def parse_dep3(header: bytes) -> tuple[dict[str, str], bool]:
    """Returns ({field: value}, has_separator_line)."""
    fields: dict[str, str] = {}
    cur = None
    for raw in header.decode("utf-8", errors="replace").splitlines():
        if raw.rstrip() == "---":
            return fields, True
        if raw.startswith((" ", "\t")) and cur:
            fields[cur] += "\n" + raw.strip()
            continue
        m = re.match(r"^([A-Za-z][A-Za-z0-9-]*):\s*(.*)$", raw)
        if m:
            cur = m.group(1)
            fields[cur] = m.group(2).strip()
        else:
            cur = None
    return fields, False


def header_template(description: str) -> bytes:
    lines = description.strip("\n").splitlines() or ["(no description)"]
    desc = "Description: " + lines[0].strip() + "".join("\n " + (ln.rstrip() or ".") for ln in lines[1:])
    today = dt.date.today().isoformat()
    return f"{desc}\nAuthor: {NEW_AUTHOR}\nOrigin: vendor\nForwarded: no\nLast-Update: {today}\n---\n".encode()


def bump_last_update(header: bytes) -> bytes:
    today = dt.date.today().isoformat().encode()
    new, n = re.subn(rb"(?m)^Last-Update:[ \t]*.*$", b"Last-Update: " + today, header, count=1)
    if n:
        return new
    new, n = re.subn(rb"(?m)^---[ \t]*$", b"Last-Update: " + today + b"\n---", header, count=1)
    return new if n else header + b"Last-Update: " + today + b"\n---\n"
