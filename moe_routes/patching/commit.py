"""Swap a series' result into a target all-or-nothing, and the state file that records what was applied.

The state file ``.moe-routes-<engine>.json`` sits beside the patched package; the engines copy its patch names
and hashes into every log's meta record.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

from moe_routes.patching.console import PROG
from moe_routes.patching.engines import sha256
from moe_routes.patching.errors import PatchError
from moe_routes.patching.patchfile import Patch
from moe_routes.patching.simulate import Files, read_files
from moe_routes.patching.targets import Target


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


def commit_files(root: Path, current: Files, final: Files) -> list[str]:
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
            missing = []
            d = dest.parent
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
        for p in done:
            if current.get(p) is None:
                (root / p).unlink(missing_ok=True)
            else:
                write_atomic(root / p, current[p])
        raise PatchError(f"writing into {root} failed ({e}); rolled back {len(done)} file(s)") from None
    return created_dirs


def state_payload(
    t: Target, pdir: Path, patches: list[Patch], files: Files, created: list[str], created_dirs: list[str]
) -> dict:
    return {
        "tool": PROG,
        "engine": t.engine,
        "series": pdir.name,
        "pin": t.pin,
        "target_version": t.version,
        "applied_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "patches": [{"name": p.name, "sha256": p.sha256, "files": p.paths} for p in patches],
        "files": {p: sha256(d) for p, d in sorted(files.items())},
        "created_files": sorted(created),
        "created_dirs": created_dirs,
    }


def write_state(t: Target, payload: dict) -> None:
    write_atomic(t.state_file, (json.dumps(payload, indent=1) + "\n").encode())


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
