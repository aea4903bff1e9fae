"""moe-routes: capture per-token MoE routing in pinned vLLM and SGLang releases.

The package holds the tools around the patch series (``moe-routes --help``); the engine-side code is the
series itself, ``patches/<engine>-<pin>/``, with its new modules as real files under ``files/``.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Where environments, release artifacts and bench models are cached, shared by every checkout."""
    return Path(os.environ.get("MOE_ROUTES_CACHE") or Path.home() / ".cache" / "moe-routes")
