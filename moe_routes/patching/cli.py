"""moe-routes patch: strict, atomic quilt-series tooling for the moe-routes patch sets.

Patch sets live in patches/<engine>-<pinned version>/, one per pin (quilt 'series' file plus DEP-3-headed
git-style patches; the files a series adds live as real sources under its files/, or under
patches/shared/<engine>/files/ when several series add them). Versions come from PINS only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_routes.patching import apply, lint, newfiles, refresh, verify
from moe_routes.patching.console import PROG, say
from moe_routes.patching.engines import (
    ENGINES,
    engine_of_dir,
    engine_pins,
    patches_root,
    series_dir,
    shared_files_dir,
)
from moe_routes.patching.errors import PatchError, UsageError
from moe_routes.patching.series import read_series
from moe_routes.patching.targets import target_from_args

EPILOG = """\
examples:
  # is every series clean and well-formed, are its new-file hunks what files/ and shared/ generate, do the series
  # directories match PINS?  (every pin of both engines; --engine / --pin narrow it)
  moe-routes patch lint
  # prove every series applies/reverses on the clean releases of its pin (downloads into the cache if missing)
  moe-routes verify [--engine vllm] [--pin 0.15.1] [--offline]     # = moe-routes patch verify
  moe-routes verify --compare-wheels                 # .py files that differ between each pin's CPU and GPU wheels
  # patch / inspect / un-patch an installed engine (venv interpreter): the series of the installed version
  moe-routes patch check   --engine vllm --python .venv/bin/python
  moe-routes patch apply   --engine vllm --python .venv/bin/python
  moe-routes patch status  --engine vllm --python .venv/bin/python
  moe-routes patch reverse --engine vllm --python .venv/bin/python
  # source trees: vLLM checkout/unpacked wheel, SGLang sdist dir or git checkout (uses python/sglang)
  moe-routes patch apply --engine sglang --tree ~/src/sglang
  # edited patches/shared/vllm/files/... or patches/vllm-0.15.1/files/...: regenerate the new-file hunks of every
  # vLLM series (no engine tree needed); --pin 0.15.1 for one series
  moe-routes patch refresh --engine vllm
  # write files/ from the committed patches' new-file hunks (after a merge changed a patch, not its source)
  moe-routes patch refresh --engine sglang --extract-new-files
  # regenerate the hook hunks from an edited (patched) tree (the series of the tree's version), create a new
  # patch, assign or drop a file
  moe-routes patch refresh --engine vllm --tree /tmp/vllm-work
  moe-routes patch refresh --engine vllm --tree /tmp/vllm-work --new 0005-route-log.patch \\
      --files vllm/model_executor/layers/fused_moe/layer.py --description "Log MoE routing decisions"
  moe-routes patch refresh --engine vllm --tree /tmp/vllm-work \\
      --add-file vllm/model_executor/layers/fused_moe/cpu_fused_moe.py --to 0002-capture-routing-in-fused-moe.patch
  moe-routes patch refresh --engine vllm --tree /tmp/vllm-work --drop-file vllm/old_name.py
Without installing: python3 -m moe_routes patch ... from the repository root.

A version with no series is refused, naming the pinned ones; --pin P --force-version applies P's series anyway.
exit codes: 0 ok, 1 failure, 2 usage.  apply is strict (no fuzz/offset/whitespace slack) and atomic.
"""

TARGET_COMMANDS = ("apply", "check", "reverse", "status")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=fmt)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    hidden = argparse.ArgumentParser(add_help=False)
    hidden.add_argument("--patches-dir", help=argparse.SUPPRESS)  # tests: a series outside patches/
    pin_help = "the pin whose series to use (default: {})"

    def target_options(required: bool) -> argparse.ArgumentParser:
        tgt = argparse.ArgumentParser(add_help=False, parents=[hidden])
        tgt.add_argument(
            "--engine",
            required=required,
            choices=sorted(ENGINES),
            help="which series: patches/<engine>-<pin>/" + ("" if required else " (default: both)"),
        )
        tgt.add_argument(
            "--pin",
            metavar="VERSION",
            help=pin_help.format("the target's version" + ("" if required else "; without a target: every pin")),
        )
        g = tgt.add_argument_group("target" + (" (exactly one)" if required else " (at most one)"))
        g.add_argument("--python", metavar="PATH", help="interpreter whose installed package is patched")
        g.add_argument("--tree", metavar="DIR", help="source tree / unpacked wheel / sdist dir / site-packages")
        tgt.add_argument("--assume-version", metavar="V", help="version of a tree that carries no version information")
        tgt.add_argument(
            "--force-version", action="store_true", help="with --pin: apply even if the target version != pin"
        )
        return tgt

    tgt = target_options(required=True)
    p = sub.add_parser(
        "apply", parents=[tgt], help="apply the series (strict, atomic, idempotent)", formatter_class=fmt, epilog=EPILOG
    )
    p.add_argument("--check", action="store_true", help="dry run: change nothing")
    p.add_argument("--reverse", action="store_true", help="reverse the series instead")
    p = sub.add_parser(
        "check", parents=[tgt], formatter_class=fmt, epilog=EPILOG, help="dry run of apply (alias: apply --check)"
    )
    p.add_argument("--reverse", action="store_true", help="dry run of reverse")
    p = sub.add_parser(
        "reverse",
        parents=[tgt],
        formatter_class=fmt,
        epilog=EPILOG,
        help="reverse the series, restoring upstream files",
    )
    p.add_argument("--check", action="store_true", help="dry run: change nothing")
    sub.add_parser(
        "status", parents=[tgt], formatter_class=fmt, epilog=EPILOG, help="per-patch applied / not applied / drifted"
    )

    p = sub.add_parser(
        "lint",
        parents=[hidden],
        formatter_class=fmt,
        epilog=EPILOG,
        help="check series, patch files and files/ sources",
    )
    p.add_argument("--engine", choices=sorted(ENGINES), help="default: both")
    p.add_argument("--pin", metavar="VERSION", help=pin_help.format("every pin"))
    p.add_argument("--dir", metavar="DIR", help="lint this patch directory (and what it shares) instead")

    p = sub.add_parser(
        "verify",
        parents=[hidden],
        formatter_class=fmt,
        epilog=EPILOG,
        help="apply+reverse every series on the clean pinned releases",
    )
    p.add_argument("--engine", choices=sorted(ENGINES), help="default: both")
    p.add_argument("--pin", metavar="VERSION", help=pin_help.format("every pin"))
    p.add_argument("--offline", action="store_true", help="use the cache only")
    p.add_argument(
        "--compare-wheels",
        action="store_true",
        help="only list the .py files that differ between each pin's CPU and GPU wheels",
    )

    p = sub.add_parser(
        "refresh",
        parents=[target_options(required=False)],
        help="regenerate patch files: new-file hunks from files/, hook hunks from an edited tree",
        description="Without --tree/--python: regenerate the new-file hunks of the series from files/ (no engine "
        "tree needed). With one: also diff every upstream file a patch owns in that edited tree against the clean "
        "pinned release. A patch is rewritten, with Last-Update = today, only when its bytes change.",
        formatter_class=fmt,
        epilog=EPILOG,
    )
    p.add_argument(
        "--extract-new-files",
        action="store_true",
        help="the other way round: write files/ from the committed new-file hunks (no target)",
    )
    p.add_argument("--clean", metavar="DIR", help="clean tree to diff against (default: extract the cached release)")
    p.add_argument("--new", metavar="NAME.patch", help="create a new patch (appended to series)")
    p.add_argument("--files", nargs="+", metavar="PATH", help="with --new: files it owns (root-relative)")
    p.add_argument("--description", help="with --new: DEP-3 Description (first line = summary)")
    p.add_argument("--add-file", nargs="+", metavar="PATH", help="assign file(s) to an existing patch")
    p.add_argument("--to", metavar="NAME.patch", help="the patch --add-file assigns to")
    p.add_argument(
        "--drop-file",
        nargs="+",
        metavar="PATH",
        help="stop patching file(s) (e.g. a new file that moved): their hunks, and a new file's source, go",
    )
    return ap


def _run_refresh(args, pdir_override: Path | None) -> int:
    if args.python or args.tree:
        if not args.engine:
            raise UsageError("refresh with --python/--tree needs --engine")
        if args.extract_new_files:
            raise UsageError("--extract-new-files reads the committed patches: give no --python/--tree")
        return refresh.refresh_from_tree(args, pdir_override)
    tree_only = [o for o, v in (("--clean", args.clean), ("--new", args.new), ("--files", args.files),
                                ("--description", args.description), ("--add-file", args.add_file),
                                ("--to", args.to), ("--drop-file", args.drop_file)) if v]  # fmt: skip
    if tree_only:
        raise UsageError(f"{', '.join(tree_only)}: only with an edited tree (add --tree DIR or --python PATH)")
    if pdir_override:
        todo = [(args.engine, pdir_override)]
    else:
        todo = [(e, series_dir(e, p)) for e in _engines(args) for p in engine_pins(e, args.pin)]
    for engine, pdir in todo:
        if args.extract_new_files:
            refresh.extract_new_files(pdir, engine)
        else:
            refresh.refresh_new_files(pdir, engine)
    return 0


def _run_lint(args, pdir_override: Path | None) -> int:
    bad = False
    if args.dir:
        d = Path(args.dir).resolve()
        todo = [(args.engine or engine_of_dir(d), d)]
    elif pdir_override:
        todo = [(args.engine, pdir_override)]
    else:
        probs = lint.pins_problems(_engines(args))
        if probs:
            bad = True
            say(f"lint PINS / {patches_root()}: {len(probs)} problem(s):")
            for pr in probs:
                print(f"  - {pr}")
        todo = [(e, series_dir(e, p)) for e in _engines(args) for p in engine_pins(e, args.pin)]
    for engine, d in todo:
        probs = lint.lint_dir(d, engine)
        if probs:
            bad = True
            say(f"lint {d}: {len(probs)} problem(s):")
            for pr in probs:
                print(f"  - {pr}")
        else:
            n = len(read_series(d)[0])
            say(f"lint {d.name}: OK ({n} patch{'es' if n != 1 else ''})")
    for engine in dict.fromkeys(e for e, _ in todo if e):
        dirs = [d for e, d in todo if e == engine]
        probs = lint.engine_problems(engine, dirs)
        shared = shared_files_dir(dirs[0], engine)
        if probs:
            bad = True
            say(f"lint {shared}: {len(probs)} problem(s):")
            for pr in probs:
                print(f"  - {pr}")
        elif shared is not None and shared.is_dir():
            n = len(newfiles.shared_source_files(dirs[0], engine))
            say(f"lint shared/{engine}: OK ({n} shared file{'s' if n != 1 else ''})")
    return 1 if bad else 0


def _engines(args) -> list[str]:
    """--engine E, or every engine when it is not given."""
    return [args.engine] if args.engine else sorted(ENGINES)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if getattr(args, "pin", None) and not args.engine:
            raise UsageError("--pin needs --engine")
        pdir_override = Path(args.patches_dir).resolve() if args.patches_dir else None
        if args.cmd in TARGET_COMMANDS:
            t = target_from_args(args)
            pdir = pdir_override or series_dir(args.engine, t.pin)
            if args.cmd == "status":
                return apply.status(t, pdir)
            check = args.cmd == "check" or getattr(args, "check", False)
            reverse = args.cmd == "reverse" or getattr(args, "reverse", False)
            return apply.run_series(t, pdir, reverse=reverse, check=check)
        if args.cmd == "refresh":
            return _run_refresh(args, pdir_override)
        if args.cmd == "lint":
            return _run_lint(args, pdir_override)
        if args.cmd == "verify":
            if args.compare_wheels:
                return verify.report_wheel_differences(_engines(args), args.pin, args.offline)
            return verify.verify(_engines(args), args.offline, pdir_override, args.pin)
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
