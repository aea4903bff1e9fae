"""Fixtures shared by the end-to-end test modules."""
from __future__ import annotations

import pytest

from moe_routes import tinymoe


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random-weight checkpoints of every architecture moe_routes/tinymoe.py builds, once per session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: tinymoe.build(arch, root / arch) for arch in tinymoe.ARCHS}
