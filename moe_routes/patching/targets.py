"""What a command patches: the directory holding the engine package (``--tree`` or an interpreter's install via
``--python``), the engine version found there and the pin (so the series) that goes with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moe_routes.patching.console import warn
from moe_routes.patching.engines import ENGINES, check_pin, pin_of_dir, pins_of, supported
from moe_routes.patching.errors import PatchError, UsageError

_VERSION_RE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)

# Run by the target interpreter, outside the repository so that a source checkout on the cwd cannot shadow it.
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
    pin: str | None = None  # the pin whose series applies (select_pin)

    @property
    def state_file(self) -> Path:
        return self.root / f".moe-routes-{self.engine}.json"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        if not line.strip():
            break
        if line.lower().startswith(key.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _dist_info_version(root: Path, pkg: str) -> tuple[str, str] | None:
    found = []  # (-strength, dist-info, version, name): 2 = top_level.txt/RECORD lists the package, 1 = name only
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
            rec.is_file() and any(ln.startswith(pkg + "/") for ln in rec.read_text().splitlines())
        ):
            strength = 2
        if strength and ver:
            found.append((-strength, d.name, ver, name))
    if not found:
        return None
    _, dname, ver, name = sorted(found)[0]
    return ver, f"{dname}/METADATA (dist {name})"


def detect_tree_version(root: Path, pkg: str, gitdirs: list[Path]) -> tuple[str | None, str]:
    hit = _dist_info_version(root, pkg)
    if hit:
        return hit
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


def resolve_python(engine: str, python: str, pins: list[str] | None = None) -> Target:
    pkg = ENGINES[engine]["pkg"]
    probe_cwd = tempfile.mkdtemp(prefix="moe-patch-probe-")
    try:
        r = subprocess.run([python, "-c", _PY_PROBE, pkg], capture_output=True, text=True, cwd=probe_cwd)
    except OSError as e:
        raise PatchError(f"--python {python}: cannot run it: {e}") from None
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
        ver = next((v for v in distinct if v.split("+")[0] in (pins or [])), distinct[0])
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
        raise PatchError(
            f"cannot determine the {t.engine} version of {t.root} (no dist-info METADATA, PKG-INFO, "
            f"{ENGINES[t.engine]['pkg']}/_version.py or git tag); pass --assume-version VERSION"
        )
    if t.version.split("+")[0] != pin:
        msg = (
            f"version mismatch: the {t.engine}-{pin} series expects {t.engine} {pin} but found "
            f"{t.version} ({t.source}) at {t.root}"
        )
        if not force:
            raise PatchError(msg + "; pass --force-version to apply anyway")
        warn(msg + " (--force-version)")


def select_pin(t: Target, pin: str | None, force: bool, assume: str | None, pdir: Path | None = None) -> str:
    """The pin whose series a command uses on t: --pin, else the pin a --patches-dir is named after, else the
    version found in the target (or --assume-version) when it is pinned. A version without a series is an error
    naming the pinned versions; --force-version applies a series to another version only with an explicit --pin.
    Sets t.pin and checks the version (check_version)."""
    if pin is None and pdir is not None:
        pin = pin_of_dir(pdir)
    if pin is not None:
        if pdir is None:
            check_pin(t.engine, pin)
    else:
        if assume:
            t.version, t.source = assume, "--assume-version"
        if t.version is None:
            check_version(t, "", force, None)  # raises: names --assume-version
        pin = t.version.split("+")[0]
        if pin not in pins_of(t.engine):
            hint = (
                "pass --pin PIN to choose the series (--force-version then applies it to this version)"
                if force
                else "install one of those, or pass --pin PIN --force-version to apply that series anyway"
            )
            raise PatchError(
                f"{t.engine} {t.version} ({t.source}) at {t.root} has no series: the series exist for "
                f"{supported(t.engine)}; {hint}"
            )
    check_version(t, pin, force, assume)
    t.pin = pin
    return pin


def target_from_args(args, need_version: bool = True) -> Target:
    if bool(args.python) == bool(args.tree):
        raise UsageError("give exactly one of --python PATH or --tree DIR")
    if args.python:
        t = resolve_python(args.engine, args.python, pins_of(args.engine))
    else:
        t = resolve_tree(args.engine, Path(args.tree))
    if need_version:
        pdir = Path(args.patches_dir).resolve() if getattr(args, "patches_dir", None) else None
        select_pin(t, getattr(args, "pin", None), args.force_version, args.assume_version, pdir)
    return t
