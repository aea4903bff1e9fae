"""Imported by Python at start-up when this directory is on PYTHONPATH (tests/vllm_driver.py puts it there for a
run with "runner": "v2", so that a spawned engine core gets it too): with MOE_ROUTES_V2_ON_CPU=1, the shim that
lets vLLM 0.32.0's Model Runner V2 run on CPU (v2_on_cpu.py)."""

import os

if os.environ.get("MOE_ROUTES_V2_ON_CPU") == "1":
    import v2_on_cpu  # noqa: F401
