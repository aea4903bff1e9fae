#!/usr/bin/env python3
"""moe_patch: strict, atomic quilt-series tooling for the moe-routes patch sets.

Patch sets live in patches/<engine>-<pinned version>/ (quilt 'series' file plus
DEP-3-headed git-style patches).  Versions come from PINS only.  Stdlib only.
See `moe_patch.py --help` for the subcommands and examples.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(REPO))
from moe_routes import pins as _pins  # noqa: E402

PROG = "moe_patch"
ENGINES = {
    # pkg: the import package; pin: the PINS key; dist: the PyPI distribution of the pinned release
    "vllm": {"pkg": "vllm", "pin": "VLLM_VERSION", "dist": "vllm"},
    "sglang": {"pkg": "sglang", "pin": "SGLANG_VERSION", "dist": "sglang"},
}
DEP3_REQUIRED = ("Description", "Author", "Origin", "Forwarded", "Last-Update")
NEW_AUTHOR = "moe-routes maintainers"
PIP_NOISE = "is ignored: it is neither a file nor a directory"


class PatchError(Exception):
    """A failure: exit 1."""


class UsageError(Exception):
    """Bad command line: exit 2."""


_QUIET = [False]


def say(msg: str = "", always: bool = False) -> None:
    if _QUIET[0] and not always:
        return
    print(f"{PROG}: {msg}" if msg else "", flush=True)


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


def sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def pins() -> dict[str, str]:
    return _pins.load()


def pin_of(engine: str) -> str:
    p = pins()
    key = ENGINES[engine]["pin"]
    if key not in p:
        raise PatchError(f"PINS has no {key}")
    return p[key]


def series_dir(engine: str) -> Path:
    return REPO / "patches" / f"{engine}-{pin_of(engine)}"


def cache_dir() -> Path:
    base = os.environ.get("MOE_ROUTES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe-routes")
    return Path(base) / "dist"


def git_env(ceiling: Path | None = None) -> dict[str, str]:
    """Environment for git: no inherited GIT_* (GIT_DIR...), no user/system config, and a
    ceiling so that git cannot discover a repository above the staging directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    if ceiling is not None:
        env["GIT_CEILING_DIRECTORIES"] = os.path.realpath(ceiling)
    return env


def run_git(args: list[str], cwd: Path, ceiling: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env=git_env(ceiling), capture_output=True)


# --------------------------------------------------------------------------- patch model

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


@dataclass
class Patch:
    name: str
    path: Path
    raw: bytes
    header: bytes
    body: bytes
    files: list[FilePatch]

    @property
    def sha256(self) -> str:
        return sha256(self.raw)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


_HUNK_RE = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_DIFF_RE = re.compile(rb"^diff --git a/(\S+) b/(\S+)\s*$")


def _check_relpath(p: str, where: str) -> str:
    if p.startswith("/") or "\\" in p or any(part in ("", ".", "..") for part in p.split("/")):
        raise PatchError(f"{where}: bad path {p!r} (must be relative, no '..')")
    return p


def parse_patch(raw: bytes, name: str, path: Path | None = None) -> Patch:
    lines = split_lines(raw)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(b"diff --git ")]
    if not starts:
        raise PatchError(f"{name}: no 'diff --git' block (not a git-style patch?)")
    header = b"".join(lines[: starts[0]])
    body = b"".join(lines[starts[0]:])
    files: list[FilePatch] = []
    i = starts[0]
    n = len(lines)
    while i < n:
        ln = lines[i]
        if not ln.startswith(b"diff --git "):
            i += 1  # trailing text (e.g. a format-patch signature) is ignored, like git apply does
            continue
        m = _DIFF_RE.match(ln.rstrip(b"\n"))
        if not m:
            raise PatchError(f"{name}: line {i + 1}: unsupported diff header {ln.decode(errors='replace').rstrip()!r}")
        a, b = m.group(1).decode(), m.group(2).decode()
        where = f"{name}: line {i + 1}"
        if a != b:
            raise PatchError(f"{where}: renames/copies are not supported ({a} -> {b})")
        fp = FilePatch(_check_relpath(a, where), "modify")
        i += 1
        minus = plus = None
        while i < n and not lines[i].startswith((b"diff --git ", b"@@")):
            ln = lines[i].rstrip(b"\n")
            if ln.startswith(b"new file mode"):
                fp.op = "new"
            elif ln.startswith(b"deleted file mode"):
                fp.op = "delete"
            elif ln.startswith((b"rename ", b"copy ", b"similarity", b"dissimilarity", b"GIT binary", b"Binary files",
                                b"old mode", b"new mode")):
                raise PatchError(f"{name}: {fp.path}: unsupported git extended header {ln.decode(errors='replace')!r}")
            elif ln.startswith(b"--- "):
                minus = ln[4:].split(b"\t")[0].decode()
            elif ln.startswith(b"+++ "):
                plus = ln[4:].split(b"\t")[0].decode()
            i += 1
        exp_minus = "/dev/null" if fp.op == "new" else f"a/{fp.path}"
        exp_plus = "/dev/null" if fp.op == "delete" else f"b/{fp.path}"
        if minus is None and plus is None and fp.op in ("new", "delete"):
            pass  # empty new/deleted file
        elif minus != exp_minus or plus != exp_plus:
            raise PatchError(f"{name}: {fp.path}: expected '--- {exp_minus}' / '+++ {exp_plus}', "
                             f"got '--- {minus}' / '+++ {plus}'")
        while i < n and lines[i].startswith(b"@@"):
            hm = _HUNK_RE.match(lines[i])
            if not hm:
                raise PatchError(f"{name}: {fp.path}: line {i + 1}: malformed hunk header")
            os_, ol, ns, nl = hm.groups()
            h = Hunk(int(os_), 1 if ol is None else int(ol), int(ns), 1 if nl is None else int(nl),
                     lines[i].rstrip(b"\n").decode(errors="replace"))
            hno = len(fp.hunks) + 1
            i += 1
            need_old, need_new = h.old_len, h.new_len
            last: list[list[bytes]] = []
            while i < n and (need_old > 0 or need_new > 0 or lines[i].startswith(b"\\")):
                ln = lines[i]
                if ln.startswith(b"\\"):
                    if not last:
                        raise PatchError(f"{name}: {fp.path}: hunk #{hno}: stray '\\' line")
                    for lst in last:
                        if lst[-1].endswith(b"\n"):
                            lst[-1] = lst[-1][:-1]
                    last = []
                    i += 1
                    continue
                if not ln.endswith(b"\n") and i == n - 1:
                    raise PatchError(f"{name}: {fp.path}: hunk #{hno}: patch file truncated (no final newline)")
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
                    raise PatchError(f"{name}: {fp.path}: hunk #{hno}: unexpected line {i + 1}: "
                                     f"{ln.decode(errors='replace').rstrip()!r} (hunk shorter than its header says)")
                if need_old < 0 or need_new < 0:
                    raise PatchError(f"{name}: {fp.path}: hunk #{hno}: more lines than its header says")
                i += 1
            if need_old > 0 or need_new > 0:
                raise PatchError(f"{name}: {fp.path}: hunk #{hno}: patch ends inside the hunk")
            fp.hunks.append(h)
        if fp.op == "modify" and not fp.hunks:
            raise PatchError(f"{name}: {fp.path}: no hunks")
        if fp.op == "new" and any(h.old_len for h in fp.hunks):
            raise PatchError(f"{name}: {fp.path}: new file with removed lines")
        if fp.op == "delete" and any(h.new_len for h in fp.hunks):
            raise PatchError(f"{name}: {fp.path}: deleted file with added lines")
        if any(f.path == fp.path for f in files):
            raise PatchError(f"{name}: {fp.path} appears twice in the patch")
        files.append(fp)
    return Patch(name, path or Path(name), raw, header, body, files)


def parse_dep3(header: bytes) -> tuple[dict[str, str], bool]:
    """Returns ({field: value}, has_separator_line)."""
    fields: dict[str, str] = {}
    cur = None
    sep = False
    for raw in header.decode("utf-8", errors="replace").splitlines():
        if raw.rstrip() == "---":
            sep = True
            break
        if raw.startswith((" ", "\t")) and cur:
            fields[cur] += "\n" + raw.strip()
            continue
        m = re.match(r"^([A-Za-z][A-Za-z0-9-]*):\s*(.*)$", raw)
        if m:
            cur = m.group(1)
            fields[cur] = m.group(2).strip()
        else:
            cur = None
    return fields, sep


# --------------------------------------------------------------------------- strict applier

def _find(lines: list[bytes], seq: list[bytes]) -> int | None:
    if not seq:
        return None
    k = len(seq)
    for j in range(len(lines) - k + 1):
        if lines[j] == seq[0] and lines[j:j + k] == seq:
            return j
    return None


def apply_file(content: bytes | None, fp: FilePatch, reverse: bool) -> tuple[bytes | None, list[str]]:
    """Apply one file's hunks at their exact line numbers (no offset, no fuzz, no
    whitespace tolerance).  Returns (new content or None for 'absent', errors)."""
    op = fp.op
    if reverse:
        op = {"new": "delete", "delete": "new"}.get(op, op)

    def sides(h: Hunk):
        if reverse:
            return h.new_start, h.new_len, h.new_lines, h.old_lines
        return h.old_start, h.old_len, h.old_lines, h.new_lines

    if op == "new":
        if content is not None:
            return None, ["file already exists"]
        return b"".join(ln for h in fp.hunks for ln in sides(h)[3]), []
    if content is None:
        return None, ["file does not exist"]
    if op == "delete":
        want = b"".join(ln for h in fp.hunks for ln in sides(h)[2])
        if content != want:
            return None, ["content differs from the file the patch deletes"]
        return None, []
    lines = split_lines(content)
    out: list[bytes] = []
    pos = 0
    errors: list[str] = []
    for no, h in enumerate(fp.hunks, 1):
        start, length, old, new = sides(h)
        idx = start - 1 if length > 0 else start
        if idx >= pos and lines[idx:idx + len(old)] == old:
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


Files = dict[str, "bytes | None"]


def simulate(patches: list[Patch], files: Files, reverse: bool) -> tuple[Files | None, str | None]:
    """Apply (or reverse, in reverse order) the whole series in memory; stop at the first failure."""
    cur = dict(files)
    for p in (reversed(patches) if reverse else patches):
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
    return PatchState(p.name, "partly applied",
                      detail=[f"applied: {', '.join(fwd_bad)}; not applied: {', '.join(rev_bad)}"])


# --------------------------------------------------------------------------- series

def read_series(pdir: Path) -> tuple[list[str], list[str]]:
    """Returns (entries, problems)."""
    sfile = pdir / "series"
    if not sfile.is_file():
        return [], [f"{sfile}: series file missing"]
    entries, problems = [], []
    for n, raw in enumerate(sfile.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        toks = line.split()
        if len(toks) > 1 and toks[1:] != ["-p1"]:
            problems.append(f"series:{n}: unsupported options {' '.join(toks[1:])!r} (only -p1)")
        if "/" in toks[0]:
            problems.append(f"series:{n}: {toks[0]!r}: patches must sit beside the series file")
        entries.append(toks[0])
    return entries, problems


def load_patches(pdir: Path) -> list[Patch]:
    entries, problems = read_series(pdir)
    if problems:
        raise PatchError("; ".join(problems))
    out, seen = [], set()
    for e in entries:
        if e in seen:
            raise PatchError(f"{pdir / 'series'}: duplicate entry {e}")
        seen.add(e)
        f = pdir / e
        if not f.is_file():
            raise PatchError(f"{pdir / 'series'}: {e}: patch file missing")
        out.append(parse_patch(f.read_bytes(), e, f))
    return out


def lint_dir(pdir: Path, engine: str | None) -> list[str]:
    problems: list[str] = []
    entries, problems0 = read_series(pdir)
    problems += problems0
    if not (pdir / "series").is_file():
        return problems
    seen: set[str] = set()
    owner: dict[str, str] = {}
    pkg = ENGINES[engine]["pkg"] if engine else None
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-lint-"))
    try:
        for e in entries:
            if e in seen:
                problems.append(f"{e}: duplicate series entry")
                continue
            seen.add(e)
            f = pdir / e
            if not f.is_file():
                problems.append(f"{e}: listed in series but the file is missing")
                continue
            raw = f.read_bytes()
            try:
                p = parse_patch(raw, e, f)
            except PatchError as ex:
                problems.append(f"{e}: does not parse: {ex}")
                continue
            r = run_git(["apply", "--numstat", str(f.resolve())], cwd=tmp, ceiling=tmp)
            if r.returncode:
                problems.append(f"{e}: git apply --numstat rejects it: {r.stderr.decode(errors='replace').strip()}")
            fields, sep = parse_dep3(p.header)
            for k in DEP3_REQUIRED:
                if not fields.get(k, "").strip():
                    problems.append(f"{e}: DEP-3 header lacks {k}:")
            lu = fields.get("Last-Update", "").strip()
            if lu:
                try:
                    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", lu):
                        raise ValueError
                    _dt.date.fromisoformat(lu)
                except ValueError:
                    problems.append(f"{e}: Last-Update {lu!r} is not a valid YYYY-MM-DD date")
            if not sep:
                problems.append(f"{e}: no '---' line between the DEP-3 header and the diff")
            for fp in p.files:
                if pkg and not fp.path.startswith(pkg + "/"):
                    problems.append(f"{e}: {fp.path}: path must start with {pkg}/ (a/{pkg}/..., see README)")
                if fp.path in owner:
                    problems.append(f"{e}: {fp.path} is already touched by {owner[fp.path]} "
                                    f"(one patch per file; refresh relies on it)")
                else:
                    owner[fp.path] = e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for f in sorted(pdir.iterdir()):
        if f.is_file() and f.suffix in (".patch", ".diff") and f.name not in seen:
            problems.append(f"{f.name}: orphan patch file (not listed in series)")
    return problems


# --------------------------------------------------------------------------- targets

_VERSION_RE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        if not line.strip():
            break
        if line.lower().startswith(key.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return None


def detect_tree_version(root: Path, pkg: str, gitdirs: list[Path]) -> tuple[str | None, str]:
    found = []  # (strength, dist-info): 2 = its top_level.txt/RECORD lists the package, 1 = name only
    for d in sorted(root.glob("*.dist-info")):
        meta = d / "METADATA"
        if not meta.is_file():
            continue
        text = meta.read_text(encoding="utf-8", errors="replace")
        name = _metadata_field(text, "Name") or ""
        ver = _metadata_field(text, "Version")
        strength = 1 if _norm(name).split("-")[0] == pkg else 0
        tl, rec = d / "top_level.txt", d / "RECORD"
        if (tl.is_file() and pkg in tl.read_text().split()) or (
                rec.is_file() and any(ln.startswith(pkg + "/") for ln in rec.read_text().splitlines())):
            strength = 2
        if strength and ver:
            found.append((-strength, d.name, ver, name))
    if found:
        _, dname, ver, name = sorted(found)[0]
        return ver, f"{dname}/METADATA (dist {name})"
    for pk in (root / "PKG-INFO", root / f"{pkg}.egg-info" / "PKG-INFO"):
        if pk.is_file():
            text = pk.read_text(encoding="utf-8", errors="replace")
            if _norm(_metadata_field(text, "Name") or "") == pkg and _metadata_field(text, "Version"):
                return _metadata_field(text, "Version"), str(pk.relative_to(root))
    for vf in (root / pkg / "_version.py", root / pkg / "version.py"):
        if vf.is_file():
            m = _VERSION_RE.search(vf.read_text(encoding="utf-8", errors="replace"))
            if m:
                return m.group(1), str(vf.relative_to(root))
    for g in gitdirs:
        if (g / ".git").exists():
            r = subprocess.run(["git", "describe", "--tags"], cwd=root, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                tag = r.stdout.strip()
                return (tag[1:] if re.match(r"v\d", tag) else tag), f"git describe --tags in {g}"
            break
    return None, ""


_PY_PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, sys
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
pkg = sys.argv[1]
spec = importlib.util.find_spec(pkg)
locs = list(spec.submodule_search_locations or []) if spec else []
dists = sorted(set(md.packages_distributions().get(pkg, [])))
vers = {}
for d in dists:
    try:
        vers[d] = md.version(d)
    except Exception:
        pass
print(json.dumps({"locations": locs, "versions": vers, "executable": sys.executable,
                  "python": "%d.%d" % sys.version_info[:2]}))
"""


@dataclass
class Target:
    engine: str
    root: Path  # the directory that contains the package dir (patch paths are relative to it)
    version: str | None
    source: str
    python: str | None = None

    @property
    def state_file(self) -> Path:
        return self.root / f".moe-routes-{self.engine}.json"


def resolve_tree(engine: str, tree: Path) -> Target:
    pkg = ENGINES[engine]["pkg"]
    tree = tree.resolve()
    if not tree.is_dir():
        raise PatchError(f"--tree {tree}: not a directory")
    if (tree / pkg).is_dir():
        root = tree
    elif engine == "sglang" and (tree / "python" / pkg).is_dir():
        root = tree / "python"
    else:
        hint = " or DIR/python/sglang/ (git checkout)" if engine == "sglang" else ""
        raise PatchError(f"--tree {tree}: no {pkg}/ package directory in it (expected DIR/{pkg}/{hint})")
    ver, src = detect_tree_version(root, pkg, [tree, root])
    return Target(engine, root, ver, src)


def resolve_python(engine: str, python: str, pin: str | None = None) -> Target:
    pkg = ENGINES[engine]["pkg"]
    probe_cwd = tempfile.mkdtemp(prefix="moe-patch-probe-")
    try:
        r = subprocess.run([python, "-c", _PY_PROBE, pkg], capture_output=True, text=True, cwd=probe_cwd)
    except OSError as e:
        raise PatchError(f"--python {python}: cannot run it: {e}")
    finally:
        shutil.rmtree(probe_cwd, ignore_errors=True)
    if r.returncode:
        raise PatchError(f"--python {python}: probe failed: {r.stderr.strip()[-800:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if not info["locations"]:
        raise PatchError(f"--python {python}: package {pkg!r} is not installed for {info['executable']}")
    root = Path(info["locations"][0]).resolve().parent
    vers = info["versions"]
    if vers:
        distinct = sorted(set(vers.values()))
        ver = pin if pin in distinct else distinct[0]
        src = "importlib.metadata: " + ", ".join(f"{d}=={v}" for d, v in sorted(vers.items()))
        if len(distinct) > 1:
            warn(f"several distributions provide {pkg}: {src}; using {ver}")
    else:
        ver, src = detect_tree_version(root, pkg, [])
    return Target(engine, root, ver, src or "", python=python)


def check_version(t: Target, pin: str, force: bool, assume: str | None) -> None:
    if assume:
        t.version, t.source = assume, "--assume-version"
    if t.version is None:
        raise PatchError(f"cannot determine the {t.engine} version of {t.root} (no dist-info METADATA, PKG-INFO, "
                         f"{ENGINES[t.engine]['pkg']}/_version.py or git tag); pass --assume-version VERSION")
    if t.version.split("+")[0] != pin:
        msg = (f"version mismatch: the {t.engine} series expects {t.engine} {pin} (PINS) but found "
               f"{t.version} ({t.source}) at {t.root}")
        if not force:
            raise PatchError(msg + "; pass --force-version to apply anyway")
        warn(msg + " (--force-version)")


def target_from_args(args, need_version: bool = True) -> Target:
    if bool(args.python) == bool(args.tree):
        raise UsageError("give exactly one of --python PATH or --tree DIR")
    t = resolve_python(args.engine, args.python, pin_of(args.engine)) if args.python else resolve_tree(args.engine, Path(args.tree))
    if need_version:
        check_version(t, pin_of(args.engine), args.force_version, args.assume_version)
    return t


# --------------------------------------------------------------------------- apply / reverse engine

def read_files(root: Path, paths) -> Files:
    out: Files = {}
    for p in paths:
        f = root / p
        out[p] = f.read_bytes() if f.is_file() else None
    return out


def _compile_errors(files: dict[str, bytes], python: str | None) -> dict[str, str]:
    """Byte-compile in memory (no __pycache__ written).  With python: compile with that interpreter."""
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
        code = ("import json,sys\nerr={}\nfor f in sys.argv[1:]:\n try:\n  compile(open(f,'rb').read(),f,'exec',"
                "dont_inherit=True)\n except (SyntaxError,ValueError) as e:\n  err[f]=type(e).__name__+': '+str(e)\n"
                "print(json.dumps(err))")
        r = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
        if r.returncode:
            raise PatchError(f"byte-compile with {python} failed: {r.stderr.strip()[-500:]}")
        return {names[k]: v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def git_apply_staged(patches: list[Patch], current: Files, expected: Files, reverse: bool,
                     python: str | None) -> None:
    """Replay the series with real `git apply` on staged copies in a temp dir outside any
    repository, prove every file changed, compare with the strict applier, byte-compile."""
    stage = Path(tempfile.mkdtemp(prefix="moe-patch-stage-"))
    try:
        tree = stage / "tree"
        tree.mkdir()
        for p, data in current.items():
            if data is not None:
                (tree / p).parent.mkdir(parents=True, exist_ok=True)
                (tree / p).write_bytes(data)
        for p in (reversed(patches) if reverse else patches):
            before = read_files(tree, p.paths)
            args = ["apply", "--verbose", "--whitespace=nowarn"] + (["--reverse"] if reverse else [])
            r = run_git(args + [str(p.path.resolve())], cwd=tree, ceiling=stage)
            out = (r.stdout + r.stderr).decode(errors="replace")
            if r.returncode:
                raise PatchError(f"patch {p.name}: git apply{' -R' if reverse else ''} failed:\n{out.strip()}")
            if re.search(r"offset|fuzz", out, re.I):
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
    pyfiles = {p: d for p, d in expected.items() if p.endswith(".py") and d is not None}
    errs = _compile_errors(pyfiles, python)
    if errs:
        # a file that already failed to compile before (e.g. newer syntax than this interpreter) is not our fault
        before_errs = _compile_errors({p: current[p] for p in errs if current.get(p) is not None}, python)
        real = {p: e for p, e in errs.items() if p not in before_errs}
        for p in errs:
            if p in before_errs:
                warn(f"{p}: cannot be byte-compiled by {python or sys.executable} even unpatched; not checked")
        if real:
            owner = {fp: pt.name for pt in patches for fp in pt.paths}
            raise PatchError("byte-compile failed after patching: " +
                             "; ".join(f"{owner.get(p, '?')}: {p}: {e}" for p, e in real.items()))


def write_temp_beside(path: Path, data: bytes, mode: int) -> Path:
    """Write data, fsynced, to a temp file next to path (same filesystem, so os.replace is atomic)."""
    tmp = path.with_name(f".{path.name}.moe-routes-tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    return tmp


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    os.replace(write_temp_beside(path, data, mode), path)


def commit(root: Path, current: Files, final: Files) -> list[str]:
    """Write the changed files: all temp files first, then os.replace each; roll back on error.
    Returns the directories it had to create."""
    changes = {p: d for p, d in final.items() if d != current.get(p)}
    created_dirs: list[str] = []
    temps: list[tuple[Path, Path]] = []
    done: list[str] = []
    try:
        for p, data in sorted(changes.items()):
            if data is None:
                continue
            dest = root / p
            d = dest.parent
            missing = []
            while not d.exists():
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                d.mkdir()
                created_dirs.append(str(d.relative_to(root)))
            mode = stat.S_IMODE(dest.stat().st_mode) if dest.exists() else 0o644
            temps.append((write_temp_beside(dest, data, mode), dest))
        for tmp, dest in temps:
            os.replace(tmp, dest)
            done.append(str(dest.relative_to(root)))
        for p, data in sorted(changes.items()):
            if data is None:
                (root / p).unlink()
                done.append(p)
    except OSError as e:
        for tmp, _ in temps:
            if tmp.exists():
                tmp.unlink()
        for p in done:  # roll back
            if current.get(p) is None:
                (root / p).unlink(missing_ok=True)
            else:
                write_atomic(root / p, current[p])
        raise PatchError(f"writing into {root} failed ({e}); rolled back {len(done)} file(s)")
    return created_dirs


def _state_payload(t: Target, pdir: Path, patches: list[Patch], files: Files, created: list[str],
                   created_dirs: list[str]) -> dict:
    return {
        "tool": PROG, "engine": t.engine, "series": pdir.name, "pin": pin_of(t.engine),
        "target_version": t.version,
        "applied_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "patches": [{"name": p.name, "sha256": p.sha256, "files": p.paths} for p in patches],
        "files": {p: sha256(d) for p, d in sorted(files.items())},
        "created_files": sorted(created), "created_dirs": created_dirs,
    }


def read_state(t: Target) -> dict | None:
    try:
        return json.loads(t.state_file.read_text())
    except (OSError, ValueError):
        return None


def state_problems(t: Target, patches: list[Patch], files: Files) -> list[str]:
    st = read_state(t)
    if st is None:
        return [f"state file {t.state_file.name} missing or unreadable"]
    probs = []
    want = [(p.name, p.sha256) for p in patches]
    have = [(x.get("name"), x.get("sha256")) for x in st.get("patches", [])]
    if want != have:
        probs.append(f"state file records a different series/patch content ({len(have)} patches recorded)")
    for p, h in sorted(st.get("files", {}).items()):
        if sha256(files.get(p) if p in files else read_files(t.root, [p])[p]) != h:
            probs.append(f"{p} changed since apply (sha256 differs from the state file)")
    return probs


def run_series(t: Target, pdir: Path, reverse: bool, check: bool) -> int:
    patches = load_patches(pdir)
    verb = "reverse" if reverse else "apply"
    if not patches:
        say(f"{t.engine}: no patches in {pdir.name}; nothing to {verb}")
        return 0
    paths = sorted({f for p in patches for f in p.paths})
    current = read_files(t.root, paths)
    fwd, ferr = simulate(patches, current, reverse=False)
    rev, rerr = simulate(patches, current, reverse=True)
    if fwd is not None and rev is not None:  # degenerate patch that works both ways: trust the state file
        if read_state(t) and not state_problems(t, patches, current):
            fwd = None
        else:
            rev = None
    applied, todo = (rev is not None), (fwd is not None)
    if not applied and not todo:
        states = [classify(p, current) for p in patches]
        drift = [s for s in states if s.state in ("drifted", "partly applied")]
        if drift:
            lines = []
            for s in drift:
                if s.state == "drifted":
                    lines.append(f"patch {s.name}: {', '.join(s.drifted)} matches neither the pinned original nor "
                                 f"the patched state (local edit or other release?)")
                else:
                    lines.append(f"patch {s.name}: partly applied ({'; '.join(s.detail)})")
                lines += [f"    {d}" for d in s.detail if s.state == "drifted"]
            raise PatchError(f"cannot {verb} the {pdir.name} series to {t.root}:\n  " + "\n  ".join(lines))
        ok = [s.name for s in states if s.state == "applied"]
        no = [s.name for s in states if s.state == "not applied"]
        if ok and no:
            raise PatchError(f"series {pdir.name} is partly applied in {t.root}: applied: {', '.join(ok)}; "
                             f"not applied: {', '.join(no)}. Reverse the applied ones or restore a clean install.")
        raise PatchError(f"cannot {verb} series {pdir.name} to {t.root}: "
                         + ((rerr if reverse else ferr) or ferr or rerr or "unknown failure"))
    if (applied and not reverse) or (todo and reverse):
        if reverse:
            say(f"{t.engine}: series {pdir.name} is not applied in {t.root}; nothing to reverse")
            if t.state_file.exists() and not check:
                t.state_file.unlink()
                say(f"removed stale state file {t.state_file.name}")
        else:
            probs = state_problems(t, patches, current)
            say(f"{t.engine}: already applied ({len(patches)} patches of {pdir.name}) in {t.root}")
            for pr in probs:
                warn(pr)
            if probs and not check and all("missing" in x or "different series" in x for x in probs):
                t.state_file.write_text(json.dumps(_state_payload(t, pdir, patches, current, [], []), indent=1) + "\n")
                say(f"rewrote state file {t.state_file.name}")
        return 0
    if reverse:
        probs = [x for x in state_problems(t, patches, current) if "changed since apply" in x]
        if probs:
            raise PatchError("refusing to reverse: " + "; ".join(probs) +
                             f" (local edits would survive the reverse; delete {t.state_file} to override)")
    expected = rev if reverse else fwd
    git_apply_staged(patches, current, expected, reverse, t.python)
    changed = [p for p in paths if expected[p] != current[p]]
    if check:
        say(f"{t.engine}: OK: {len(patches)} patches of {pdir.name} would {verb} cleanly to {t.root} "
            f"({len(changed)} files)")
        return 0
    st = read_state(t) if reverse else None
    created_dirs = commit(t.root, current, expected)
    if reverse:
        t.state_file.unlink(missing_ok=True)
        for d in sorted((st or {}).get("created_dirs", []), key=lambda x: -x.count("/")):
            try:
                (t.root / d).rmdir()
            except OSError:
                pass
        say(f"{t.engine}: reversed {len(patches)} patches of {pdir.name} in {t.root} ({len(changed)} files restored)")
    else:
        created = [p for p in paths if current[p] is None and expected[p] is not None]
        payload = _state_payload(t, pdir, patches, expected, created, created_dirs)
        write_atomic(t.state_file, (json.dumps(payload, indent=1) + "\n").encode())
        say(f"{t.engine}: applied {len(patches)} patches of {pdir.name} to {t.root} ({len(changed)} files)")
    return 0


def cmd_status(t: Target, pdir: Path) -> int:
    patches = load_patches(pdir)
    say(f"{t.engine} {t.version} at {t.root} ({t.source}); series {pdir.name}: {len(patches)} patches")
    if not patches:
        st = "present (stale)" if t.state_file.exists() else "absent"
        print(f"  state file: {st}")
        return 0
    current = read_files(t.root, sorted({f for p in patches for f in p.paths}))
    states = [classify(p, current) for p in patches]
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


# --------------------------------------------------------------------------- releases / cache

def artifact_glob(engine: str, kind: str) -> str:
    dist, ver = ENGINES[engine]["dist"], pin_of(engine)
    return f"{dist}-{ver}.tar.gz" if kind == "sdist" else f"{dist}-{ver}-*.whl"


def ensure_artifact(engine: str, kind: str, offline: bool = False) -> Path:
    """Return the cached pinned release file (kind: wheel | sdist), downloading it with pip if missing."""
    cache = cache_dir()
    hits = sorted(cache.glob(artifact_glob(engine, kind))) if cache.is_dir() else []
    if hits:
        return hits[0]
    dist, ver = ENGINES[engine]["dist"], pin_of(engine)
    if offline:
        raise PatchError(f"{engine} {kind} {dist}=={ver} is not in the cache {cache} (--offline); "
                         f"run without --offline to download it")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-dl-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(tmp)]
        if kind == "sdist":
            cmd += ["--no-binary", ":all:"]
        else:
            cmd += ["--only-binary", ":all:"]
            if engine == "vllm":
                cmd += ["--platform", "manylinux_2_31_x86_64", "--python-version", "3.12", "--implementation", "cp"]
        cmd.append(f"{dist}=={ver}")
        say(f"downloading {dist}=={ver} ({kind}) into {cache} ...")
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(tmp.glob(artifact_glob(engine, kind)))
        if r.returncode or not got:
            out = "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if PIP_NOISE not in ln)
            raise PatchError(f"pip download of {dist}=={ver} ({kind}) failed:\n{out.strip()[-2000:]}")
        dest = cache / got[0].name
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_member(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def extract_release(engine: str, kind: str, artifact: Path, dest: Path, only=None) -> Path:
    """Extract a pinned release into dest: all *.py (or only the listed root-relative paths)
    plus METADATA/PKG-INFO.  kind: wheel | sdist | git (sdist laid out as a git checkout:
    dest/python/<pkg>, git init + tag v<pin>).  Returns the target root (parent of the package)."""
    pkg, ver = ENGINES[engine]["pkg"], pin_of(engine)
    only = set(only) if only is not None else None
    dest.mkdir(parents=True, exist_ok=True)

    def want(rel: str) -> bool:
        return rel.endswith(".py") if only is None else rel in only

    def put(rel: str, data: bytes, base: Path) -> None:
        f = base / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        os.chmod(f, 0o644)

    if kind == "wheel":
        with zipfile.ZipFile(artifact) as z:
            for info in z.infolist():
                n = info.filename
                if info.is_dir() or not _safe_member(n):
                    continue
                if want(n) or re.fullmatch(r"[^/]+\.dist-info/METADATA", n):
                    put(n, z.read(info), dest)
        return dest
    top = f"{ENGINES[engine]['dist']}-{ver}/"
    base = dest / "python" if kind == "git" else dest / top.rstrip("/")
    with tarfile.open(artifact) as tf:
        for m in tf:
            if not m.isfile() or not m.name.startswith(top) or not _safe_member(m.name):
                continue
            rel = m.name[len(top):]
            if kind == "git" and (rel == "PKG-INFO" or rel.startswith(f"{pkg}.egg-info/")
                                  or rel == f"{pkg}/_version.py"):
                continue  # generated files a git checkout does not have
            if want(rel) or rel == "PKG-INFO":
                put(rel, tf.extractfile(m).read(), base)
    if kind == "git":
        env = git_env(dest)
        ident = ["-c", "user.name=moe-routes", "-c", "user.email=moe-routes@localhost", "-c", "commit.gpgsign=false"]
        for cmd in (["init", "-q"], ["add", "-A"], [*ident, "commit", "-q", "-m", f"{pkg} {ver}"],
                    [*ident, "tag", f"v{ver}"]):
            r = subprocess.run(["git", *cmd], cwd=dest, env=env, capture_output=True, text=True)
            if r.returncode:
                raise PatchError(f"git {' '.join(cmd)} in {dest} failed: {r.stderr.strip()}")
    return base


def hash_tree(root: Path) -> dict[str, str]:
    out = {}
    for dp, dns, fns in os.walk(root):
        dns[:] = [d for d in dns if d != ".git"]
        for fn in fns:
            f = Path(dp) / fn
            out[str(f.relative_to(root))] = sha256(f.read_bytes())
    return out


ARTIFACTS = {"vllm": [("wheel", "wheel")], "sglang": [("wheel", "wheel"), ("sdist", "sdist"), ("sdist", "git")]}


def cmd_verify(engines: list[str], offline: bool, pdir_override: Path | None) -> int:
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
        for art_kind, layout in ARTIFACTS[engine]:
            label = f"{engine} {layout}"
            tmp = Path(tempfile.mkdtemp(prefix=f"moe-patch-verify-{engine}-{layout}-"))
            try:
                art = ensure_artifact(engine, art_kind, offline)
                label += f" ({art.name})"
                root = extract_release(engine, layout, art, tmp)
                clean = hash_tree(tmp)
                t = resolve_tree(engine, tmp if layout == "git" else root)  # a git checkout: its top dir
                if t.root != root.resolve():
                    raise PatchError(f"layout detection picked {t.root}, expected {root}")
                check_version(t, pin_of(engine), False, None)
                _QUIET[0] = True
                run_series(t, pdir, reverse=False, check=False)
                cur = read_files(t.root, sorted({f for p in patches for f in p.paths}))
                states = {classify(p, cur).state for p in patches}
                if states != {"applied"} or state_problems(t, patches, cur):
                    raise PatchError(f"after apply, status is {states} / {state_problems(t, patches, cur)}")
                run_series(t, pdir, reverse=True, check=False)
                _QUIET[0] = False
                after = hash_tree(tmp)
                diff = sorted(k for k in clean.keys() | after.keys() if clean.get(k) != after.get(k))
                if diff:
                    raise PatchError(f"tree not byte-identical after reverse: {', '.join(diff[:10])}")
                n = len({f for p in patches for f in p.paths})
                say(f"{label}: OK: {len(patches)} patches, {n} files applied, byte-compiled, reversed; "
                    f"{len(clean)} files byte-identical")
            except PatchError as e:
                say(f"{label}: FAIL: {e}")
                failed = True
            finally:
                _QUIET[0] = False
                shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------- refresh

def diff_file(path: str, old: bytes | None, new: bytes | None) -> str:
    """One stable `diff --git a/PATH b/PATH` block (no index line, 3 lines context), '' if equal."""
    if old == new:
        return ""
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
        r = run_git(["diff", "--no-index", "--no-prefix", "--no-color", "--no-ext-diff", "--no-textconv",
                     "--no-renames", "--diff-algorithm=myers", "-U3", *args], cwd=tmp, ceiling=tmp)
        if r.returncode not in (0, 1):
            raise PatchError(f"git diff for {path} failed: {r.stderr.decode(errors='replace')}")
        out: list[bytes] = []
        in_hunks = False
        for ln in split_lines(r.stdout):
            if ln.startswith(b"@@"):
                in_hunks = True
            elif in_hunks:
                pass  # hunk content is copied verbatim
            elif ln.startswith(b"diff --git "):
                ln = f"diff --git a/{path} b/{path}\n".encode()
            elif ln.startswith(b"index "):
                continue
            elif ln.startswith(b"--- "):
                ln = b"--- /dev/null\n" if old is None else f"--- a/{path}\n".encode()
            elif ln.startswith(b"+++ "):
                ln = b"+++ /dev/null\n" if new is None else f"+++ b/{path}\n".encode()
            elif ln.startswith((b"Binary files", b"GIT binary")):
                raise PatchError(f"{path}: binary files are not supported")
            out.append(ln)
        return b"".join(out).decode("utf-8", errors="surrogateescape")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def header_template(description: str) -> str:
    lines = description.strip("\n").splitlines() or ["(no description)"]
    desc = "Description: " + lines[0].strip() + "".join("\n " + (ln.rstrip() or ".") for ln in lines[1:])
    return (f"{desc}\nAuthor: {NEW_AUTHOR}\nOrigin: vendor\nForwarded: no\n"
            f"Last-Update: {_dt.date.today().isoformat()}\n---\n")


def bump_last_update(header: bytes) -> bytes:
    today = _dt.date.today().isoformat().encode()
    new, n = re.subn(rb"(?m)^Last-Update:[ \t]*.*$", b"Last-Update: " + today, header, count=1)
    if n:
        return new
    new, n = re.subn(rb"(?m)^---[ \t]*$", b"Last-Update: " + today + b"\n---", header, count=1)
    return new if n else header + b"Last-Update: " + today + b"\n---\n"


def _relpath_arg(p: str, root: Path, pkg: str) -> str:
    if os.path.isabs(p):
        p = os.path.relpath(os.path.realpath(p), root)
    p = p.replace(os.sep, "/")
    for pre in ("a/", "b/"):
        if p.startswith(pre + pkg + "/"):
            p = p[2:]
    _check_relpath(p, "file argument")
    if not p.startswith(pkg + "/"):
        raise UsageError(f"{p}: files must be given relative to the target root, starting with {pkg}/")
    return p


def cmd_refresh(args, pdir: Path) -> int:
    t = target_from_args(args)
    pkg = ENGINES[args.engine]["pkg"]
    entries, problems = read_series(pdir)
    if problems:
        raise PatchError("; ".join(problems))
    patches = load_patches(pdir)
    own: dict[str, list[str]] = {p.name: list(p.paths) for p in patches}
    headers: dict[str, bytes] = {p.name: p.header for p in patches}
    bodies: dict[str, bytes] = {p.name: p.body for p in patches}
    owner: dict[str, str] = {}
    for p in patches:
        for f in p.paths:
            if f in owner:
                raise PatchError(f"{f} is touched by both {owner[f]} and {p.name}; refresh needs one owner per file")
            owner[f] = p.name
    new_name = None
    if args.new:
        new_name = args.new
        if "/" in new_name or not new_name.endswith((".patch", ".diff")):
            raise UsageError("--new NAME must be a file name ending in .patch or .diff")
        if new_name in own or (pdir / new_name).exists():
            raise PatchError(f"{new_name} already exists in {pdir}")
        if not args.files or not args.description:
            raise UsageError("--new needs --files and --description")
        files = sorted({_relpath_arg(f, t.root, pkg) for f in args.files})
        taken = [f"{f} (owned by {owner[f]})" for f in files if f in owner]
        if taken:
            raise PatchError("files already belong to another patch: " + ", ".join(taken))
        own[new_name] = files
        headers[new_name] = header_template(args.description).encode()
        bodies[new_name] = b""
    elif args.files or args.description:
        raise UsageError("--files/--description only go with --new")
    if args.add_file:
        if not args.to:
            raise UsageError("--add-file needs --to NAME.patch")
        if args.to not in own:
            raise PatchError(f"--to {args.to}: not in the series")
        for f in args.add_file:
            f = _relpath_arg(f, t.root, pkg)
            if owner.get(f) not in (None, args.to):
                raise PatchError(f"{f} already belongs to {owner[f]}")
            if f not in own[args.to]:
                own[args.to].append(f)
    elif args.to:
        raise UsageError("--to only goes with --add-file")
    for f in args.drop_file or []:
        f = _relpath_arg(f, t.root, pkg)
        if f not in owner:
            raise PatchError(f"--drop-file {f}: no patch of the series owns it")
        own[owner[f]].remove(f)
    if not own:
        say(f"{args.engine}: no patches in {pdir.name}; use --new to create one")
        return 0
    all_files = sorted({f for fs in own.values() for f in fs})
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-clean-"))
    try:
        if args.clean:
            croot = resolve_tree(args.engine, Path(args.clean)).root
        else:
            croot = extract_release(args.engine, "sdist" if args.engine == "sglang" else "wheel",
                                    ensure_artifact(args.engine, "sdist" if args.engine == "sglang" else "wheel"),
                                    tmp, only=all_files)
        clean = read_files(croot, all_files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    work = read_files(t.root, all_files)
    errors, results = [], {}
    for name, files in own.items():
        blocks = []
        for f in sorted(files):
            if clean[f] is None and work[f] is None:
                errors.append(f"{name}: {f} exists neither in the clean release nor in {t.root}")
                continue
            d = diff_file(f, clean[f], work[f])
            if d:
                blocks.append(d)
            else:
                warn(f"{name}: {f} no longer differs from the clean release; dropped from the patch")
        if not blocks:
            errors.append(f"{name}: no changes left against the clean release (empty patch; "
                          f"remove it from the series instead)")
            continue
        body = "".join(blocks).encode("utf-8", errors="surrogateescape")
        if body == bodies[name]:
            results[name] = None
        else:
            hdr = headers[name] if name == new_name else bump_last_update(headers[name])
            results[name] = hdr + body
    if errors:
        raise PatchError("refresh failed, nothing written:\n  " + "\n  ".join(errors))
    for name, data in results.items():
        if data is not None:
            write_atomic(pdir / name, data)
    if new_name:
        sfile = pdir / "series"
        text = sfile.read_text(encoding="utf-8") if sfile.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomic(sfile, (text + new_name + "\n").encode())
    for name in own:
        st = "created" if name == new_name else ("refreshed" if results[name] is not None else "unchanged")
        say(f"{name}: {st} ({len(own[name])} files)")
    return 0


# --------------------------------------------------------------------------- CLI

EPILOG = """\
examples:
  # is the series clean and well-formed?                     (both engines)
  python scripts/moe_patch.py lint
  # prove every series applies/reverses on the clean pinned releases (downloads into the cache if missing)
  python scripts/moe_patch.py verify [--engine sglang] [--offline]
  # patch / inspect / un-patch an installed engine (venv interpreter)
  python scripts/moe_patch.py check   --engine vllm --python .venv/bin/python
  python scripts/moe_patch.py apply   --engine vllm --python .venv/bin/python
  python scripts/moe_patch.py status  --engine vllm --python .venv/bin/python
  python scripts/moe_patch.py reverse --engine vllm --python .venv/bin/python
  # source trees: vLLM checkout/unpacked wheel, SGLang sdist dir or git checkout (uses python/sglang)
  python scripts/moe_patch.py apply --engine sglang --tree ~/src/sglang
  # regenerate patch files from an edited (patched) tree, create a new patch, assign a file
  python scripts/moe_patch.py refresh --engine vllm --tree /tmp/vllm-work
  python scripts/moe_patch.py refresh --engine vllm --tree /tmp/vllm-work --new 0002-route-log.patch \\
      --files vllm/model_executor/layers/fused_moe/layer.py --description "Log MoE routing decisions"
  python scripts/moe_patch.py refresh --engine vllm --tree /tmp/vllm-work \\
      --add-file vllm/model_executor/layers/fused_moe/cpu_fused_moe.py --to 0002-route-log.patch
  python scripts/moe_patch.py refresh --engine vllm --tree /tmp/vllm-work --drop-file vllm/old_name.py

exit codes: 0 ok, 1 failure, 2 usage.  apply is strict (no fuzz/offset/whitespace slack) and atomic.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moe_patch.py", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    hidden = argparse.ArgumentParser(add_help=False)
    hidden.add_argument("--patches-dir", help=argparse.SUPPRESS)

    tgt = argparse.ArgumentParser(add_help=False, parents=[hidden])
    tgt.add_argument("--engine", required=True, choices=sorted(ENGINES), help="which series: patches/<engine>-<pin>/")
    g = tgt.add_argument_group("target (exactly one)")
    g.add_argument("--python", metavar="PATH", help="interpreter whose installed package is patched")
    g.add_argument("--tree", metavar="DIR", help="source tree / unpacked wheel / sdist dir / site-packages")
    tgt.add_argument("--assume-version", metavar="V", help="version of a tree that carries no version information")
    tgt.add_argument("--force-version", action="store_true", help="apply even if the target version != pin")

    p = sub.add_parser("apply", parents=[tgt], help="apply the series (strict, atomic, idempotent)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--check", action="store_true", help="dry run: change nothing")
    p.add_argument("--reverse", action="store_true", help="reverse the series instead")
    p = sub.add_parser("check", parents=[tgt], help="dry run of apply (alias: apply --check)")
    p.add_argument("--reverse", action="store_true", help="dry run of reverse")
    p = sub.add_parser("reverse", parents=[tgt], help="reverse the series, restoring upstream files")
    p.add_argument("--check", action="store_true", help="dry run: change nothing")
    sub.add_parser("status", parents=[tgt], help="per-patch applied / not applied / drifted")

    p = sub.add_parser("lint", parents=[hidden], help="check series and patch files")
    p.add_argument("--engine", choices=sorted(ENGINES), help="default: both")
    p.add_argument("--dir", metavar="DIR", help="lint this patch directory instead")

    p = sub.add_parser("verify", parents=[hidden], help="apply+reverse every series on the clean pinned releases")
    p.add_argument("--engine", choices=sorted(ENGINES), help="default: both")
    p.add_argument("--offline", action="store_true", help="use the cache only")

    p = sub.add_parser("refresh", parents=[tgt], help="regenerate patch files from a patched tree",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--clean", metavar="DIR", help="clean tree to diff against (default: extract the cached release)")
    p.add_argument("--new", metavar="NAME.patch", help="create a new patch (appended to series)")
    p.add_argument("--files", nargs="+", metavar="PATH", help="with --new: files it owns (root-relative)")
    p.add_argument("--description", help="with --new: DEP-3 Description (first line = summary)")
    p.add_argument("--add-file", nargs="+", metavar="PATH", help="assign file(s) to an existing patch")
    p.add_argument("--to", metavar="NAME.patch", help="the patch --add-file assigns to")
    p.add_argument("--drop-file", nargs="+", metavar="PATH",
                   help="stop patching file(s) (e.g. a new file that moved): their hunks leave the series")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        pdir_override = Path(args.patches_dir).resolve() if getattr(args, "patches_dir", None) else None
        if args.cmd in ("apply", "check", "reverse", "status", "refresh"):
            pdir = pdir_override or series_dir(args.engine)
            if args.cmd == "refresh":
                return cmd_refresh(args, pdir)
            t = target_from_args(args)
            if args.cmd == "status":
                return cmd_status(t, pdir)
            check = args.cmd == "check" or getattr(args, "check", False)
            reverse = args.cmd == "reverse" or getattr(args, "reverse", False)
            return run_series(t, pdir, reverse=reverse, check=check)
        if args.cmd == "lint":
            if args.dir:
                d = Path(args.dir).resolve()
                eng = args.engine or next((e for e in ENGINES if d.name.startswith(e + "-")), None)
                todo = [(eng, d)]
            elif pdir_override:
                todo = [(args.engine, pdir_override)]
            else:
                todo = [(e, series_dir(e)) for e in ([args.engine] if args.engine else sorted(ENGINES))]
            bad = False
            for eng, d in todo:
                probs = lint_dir(d, eng)
                if probs:
                    bad = True
                    say(f"lint {d}: {len(probs)} problem(s):")
                    for pr in probs:
                        print(f"  - {pr}")
                else:
                    n = len(read_series(d)[0])
                    say(f"lint {d.name}: OK ({n} patch{'es' if n != 1 else ''})")
            return 1 if bad else 0
        if args.cmd == "verify":
            return cmd_verify([args.engine] if args.engine else sorted(ENGINES), args.offline, pdir_override)
    except UsageError as e:
        ap.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except PatchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
