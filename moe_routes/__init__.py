"""moe-routes: capture per-token MoE routing in pinned vLLM and SGLang releases.

The package holds the tools around the patch series (``moe-routes --help``); the engine-side code is the
series itself, ``patches/<engine>-<pin>/``, with its new modules as real files under ``files/``.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
