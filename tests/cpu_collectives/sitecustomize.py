"""Imported by Python at start-up when this directory is on PYTHONPATH (routes_ref.drive_dp puts it there on vLLM
0.32.0, so that the spawned engine cores and workers get it too): with MOE_ROUTES_CPU_COLLECTIVES=1, the shim that
gives vLLM 0.32.0's CPU communicator the two collectives data parallelism needs (cpu_collectives.py)."""

import os

if os.environ.get("MOE_ROUTES_CPU_COLLECTIVES") == "1":
    import cpu_collectives

    cpu_collectives.install()
