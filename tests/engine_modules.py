"""The copy of an engine module's engine-independent half that the tests exercise."""

from __future__ import annotations

import os
from pathlib import Path

from moe_routes.engine_source import VLLM_LOG_MODULE, VLLM_LOG_SOURCE, load_vllm_log_module  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def vllm_pin() -> str:
    """The vLLM pin under test: scripts/run_tests.sh sets MOE_ROUTES_VLLM_PIN for each pin's run; else the default."""
    from moe_routes.pins import default_pin

    return os.environ.get("MOE_ROUTES_VLLM_PIN") or default_pin("vllm")
