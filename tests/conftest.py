"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

import re

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
# A release's own glue is tested in test_release_vllm_<pin with '_'>[_<topic>].py, collected only in that pin's
# run (its classes exist only in its venv).
RELEASE_TESTS = re.compile(r"test_release_vllm_(\d+_\d+_\d+)(?:_\w+)?\.py")


def pytest_ignore_collect(collection_path, config):
    release = RELEASE_TESTS.fullmatch(collection_path.name)
    if release is not None and config.option.markexpr.strip() != "fast":
        from engine_modules import vllm_pin

        return True if release.group(1) != vllm_pin().replace(".", "_") else None
    if config.option.markexpr.strip() != "fast" or collection_path.suffix != ".py":
        return None
    if collection_path.name.startswith("test_") and b"pytest.mark.fast" not in collection_path.read_bytes():
        return True
    return None
