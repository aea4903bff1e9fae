"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

import pytest

from moe_routes import tinymoe


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random-weight checkpoints of every architecture moe_routes/tinymoe.py builds, once per session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: tinymoe.build(arch, root / arch) for arch in tinymoe.ARCHS}


# `-m fast` runs in the light dev venv (no torch, vLLM or SGLang), where importing an engine test module would
# fail at collection: only modules that mark tests fast are collected there. Every other run collects all of
# them and fails loudly if an engine is missing.
def pytest_ignore_collect(collection_path, config):
    if config.option.markexpr.strip() != "fast" or collection_path.suffix != ".py":
        return None
    if collection_path.name.startswith("test_") and b"pytest.mark.fast" not in collection_path.read_bytes():
        return True
    return None
