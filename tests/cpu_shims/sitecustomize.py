"""Imported by Python at start-up when this directory is on PYTHONPATH (routes_ref puts it there, so that the spawned
engine cores and workers get it too). Each test-only shim loads only when its variable asks for it:
MOE_ROUTES_V2_ON_CPU=1 runs vLLM 0.32.0's Model Runner V2 on CPU (v2_on_cpu.py; routes_ref.runner_env);
MOE_ROUTES_CPU_COLLECTIVES=1 gives vLLM 0.32.0's CPU communicator the two collectives data parallelism needs
(cpu_collectives.py; routes_ref.drive_dp). One file for both: Python imports only the first sitecustomize on the
path, and a data-parallel run on Model Runner V2 needs both."""

import os

if os.environ.get("MOE_ROUTES_V2_ON_CPU") == "1":
    import v2_on_cpu  # noqa: F401

if os.environ.get("MOE_ROUTES_CPU_COLLECTIVES") == "1":
    import cpu_collectives

    cpu_collectives.install()
