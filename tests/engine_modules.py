"""The copy of an engine module's engine-independent half that the tests exercise."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
VLLM_LOG_MODULE = "vllm.model_executor.layers.moe_routes_log"
# shared by every vLLM series (patches/shared/vllm/files/)
VLLM_LOG_SOURCE = ROOT / "patches/shared/vllm/files" / (VLLM_LOG_MODULE.replace(".", "/") + ".py")


def vllm_pin() -> str:
    """The vLLM pin under test: scripts/run_tests.sh sets MOE_ROUTES_VLLM_PIN for each pin's run; else the default."""
    from moe_routes.pins import default_pin

    return os.environ.get("MOE_ROUTES_VLLM_PIN") or default_pin("vllm")


def load_vllm_log_module() -> ModuleType:
    """In an engine venv (vllm importable): the installed, patched module, i.e. the code the series ships; an
    ImportError there means the series is not applied, which must fail, not fall back. Elsewhere (the light
    dev venv): the source under patches/, which needs only the standard library and numpy."""
    if importlib.util.find_spec("vllm") is not None:
        return importlib.import_module(VLLM_LOG_MODULE)
    name = "moe_routes_log"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, VLLM_LOG_SOURCE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up in sys.modules
        spec.loader.exec_module(module)
    return module
