"""Running git so that nothing outside the call can change what it does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_env(ceiling: Path | None = None) -> dict[str, str]:
    """No inherited GIT_* (GIT_DIR...), no user/system config, and a ceiling: `git apply` run inside some other
    repository silently skips the paths that repository does not track, so git must not discover one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    if ceiling is not None:
        env["GIT_CEILING_DIRECTORIES"] = os.path.realpath(ceiling)
    return env


def run_git(args: list[str], cwd: Path, ceiling: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env=git_env(ceiling), capture_output=True)
