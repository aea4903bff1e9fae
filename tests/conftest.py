"""Fixtures shared by the end-to-end test modules."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import tinymoe  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random-weight checkpoints of every architecture scripts/tinymoe.py builds, once per session."""
    root = tmp_path_factory.mktemp("models")
    return {arch: tinymoe.build(arch, root / arch) for arch in tinymoe.ARCHS}
