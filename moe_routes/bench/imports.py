"""Import cost of the patched vLLM with VLLM_LOG_MOE unset, against the same install with the series reversed.

Copies the installed `vllm` package to a temp dir, reverses the patch series there (moe-routes patch reverse), then
times `python -c "from vllm import LLM"` for both, alternating (clean, patched, patched, clean, ...) so that
drift on the machine hits both alike, and prints the medians and the ratio patched / clean.

Examples:
  moe-routes bench imports                          # the interpreter running this script
  moe-routes bench imports --python ~/.cache/moe-routes/venv-cpu-*/bin/python --repeats 10
  moe-routes bench imports --statement "import vllm"
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_routes import REPO_ROOT as ROOT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter whose installed vllm carries the series")
    ap.add_argument("--repeats", type=int, default=7, help="timed imports per variant (default: %(default)s)")
    ap.add_argument("--statement", default="from vllm import LLM")
    a = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE") and k != "PYTHONPATH"}
    site = (
        subprocess.run(
            [a.python, "-c", "import vllm, os; print(os.path.dirname(os.path.dirname(vllm.__file__)))"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    with tempfile.TemporaryDirectory(prefix="moe-bench-import-") as tmp:
        shutil.copytree(Path(site) / "vllm", Path(tmp) / "vllm")
        shutil.copy2(Path(site) / ".moe-routes-vllm.json", Path(tmp) / ".moe-routes-vllm.json")
        subprocess.run(
            [sys.executable, "-m", "moe_routes", "patch", "reverse", "--engine", "vllm", "--tree", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        variants = {"clean": dict(env, PYTHONPATH=tmp), "patched": env}
        times: dict[str, list[float]] = {"clean": [], "patched": []}
        for name in ("clean", "patched"):  # warm the page cache and the bytecode caches, untimed
            subprocess.run([a.python, "-c", a.statement], env=variants[name], capture_output=True, check=True)
        for r in range(a.repeats):
            for name in ("clean", "patched") if r % 2 == 0 else ("patched", "clean"):
                t0 = time.perf_counter()
                subprocess.run([a.python, "-c", a.statement], env=variants[name], capture_output=True, check=True)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"`{a.statement}` with VLLM_LOG_MOE unset, {a.repeats} alternating runs each ({a.python}):")
    for name in ("clean", "patched"):
        print(f"  {name:>7}: median {med[name]:.3f} s  (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"  ratio patched / clean: {med['patched'] / med['clean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
