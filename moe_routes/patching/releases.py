"""The clean pinned releases: downloaded once with pip into the cache, extracted as a wheel, an sdist or a git
checkout layout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from moe_routes.patching.console import say
from moe_routes.patching.engines import ENGINES, cache_dir, pin_of, sha256
from moe_routes.patching.errors import PatchError
from moe_routes.patching.git import git_env

PIP_NOISE = "is ignored: it is neither a file nor a directory"
# the release files verify proves each series on: (artifact kind, layout)
LAYOUTS = {"vllm": [("wheel", "wheel")], "sglang": [("wheel", "wheel"), ("sdist", "sdist"), ("sdist", "git")]}
# the release refresh diffs against: SGLang's sdist carries files its wheel does not
REFRESH_BASE = {"vllm": "wheel", "sglang": "sdist"}


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
        raise PatchError(
            f"{engine} {kind} {dist}=={ver} is not in the cache {cache} (--offline); "
            "run without --offline to download it"
        )
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


def extract_release(engine: str, kind: str, artifact: Path, dest: Path, only: Iterable[str] | None = None) -> Path:
    """Extract a pinned release into dest: all *.py (or only the listed root-relative paths) plus METADATA/PKG-INFO.
    kind: wheel | sdist | git (the sdist laid out as a git checkout: dest/python/<pkg>, git init + tag v<pin>).
    Returns the target root (parent of the package)."""
    pkg, ver = ENGINES[engine]["pkg"], pin_of(engine)
    wanted = set(only) if only is not None else None
    dest.mkdir(parents=True, exist_ok=True)

    def want(rel: str) -> bool:
        return rel.endswith(".py") if wanted is None else rel in wanted

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
    generated = ("PKG-INFO", f"{pkg}/_version.py")  # sdist-only files a git checkout does not have
    with tarfile.open(artifact) as tf:
        for m in tf:
            if not m.isfile() or not m.name.startswith(top) or not _safe_member(m.name):
                continue
            rel = m.name[len(top) :]
            if kind == "git" and (rel in generated or rel.startswith(f"{pkg}.egg-info/")):
                continue
            if want(rel) or rel == "PKG-INFO":
                put(rel, tf.extractfile(m).read(), base)
    if kind == "git":
        _git_init_tagged(dest, f"{pkg} {ver}", f"v{ver}")
    return base


def _git_init_tagged(dest: Path, message: str, tag: str) -> None:
    env = git_env(dest)
    ident = ["-c", "user.name=moe-routes", "-c", "user.email=moe-routes@localhost", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], [*ident, "commit", "-q", "-m", message], [*ident, "tag", tag]):
        r = subprocess.run(["git", *cmd], cwd=dest, env=env, capture_output=True, text=True)
        if r.returncode:
            raise PatchError(f"git {' '.join(cmd)} in {dest} failed: {r.stderr.strip()}")


def hash_tree(root: Path) -> dict[str, str]:
    out = {}
    for dp, dns, fns in os.walk(root):
        dns[:] = [d for d in dns if d != ".git"]
        for fn in fns:
            f = Path(dp) / fn
            out[str(f.relative_to(root))] = sha256(f.read_bytes())
    return out
