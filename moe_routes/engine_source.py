"""The vLLM routing module's engine-independent half (moe_routes_log.py: stdlib + numpy), for the tools and
tests that need it without an engine."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from moe_routes import REPO_ROOT

VLLM_LOG_MODULE = "vllm.model_executor.layers.moe_routes_log"
# shared by every vLLM series (patches/shared/vllm/files/)
VLLM_LOG_SOURCE = REPO_ROOT / "patches/shared/vllm/files" / (VLLM_LOG_MODULE.replace(".", "/") + ".py")


def load_vllm_log_module() -> ModuleType:
    """With vLLM importable: the installed, patched module, i.e. the code the series ships; an ImportError there
    means the series is not applied, which must fail, not fall back. Elsewhere (the light dev venv): the source
    under patches/, which needs only the standard library and numpy."""
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
