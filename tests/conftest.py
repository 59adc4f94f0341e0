"""Shared fixtures: seeded generators and a session cache folder for exported models."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "P2D_CACHE_DIR" not in os.environ:  # exports cached by compile go to a throw-away folder, not ~/.cache
    import tempfile

    os.environ["P2D_CACHE_DIR"] = tempfile.mkdtemp(prefix="p2d-test-cache-")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Exports shared across tests of one session (exports of real models take tens of seconds)."""
    return tmp_path_factory.mktemp("p2d-cache")


@pytest.fixture(scope="session")
def tiny_llama_onnx(cache_dir):
    """Path of an exported 2-layer tiny Llama (dynamic batch and sequence), shared by the session."""
    from tests.tiny_onnx import export_tiny_llama

    return export_tiny_llama(cache_dir)


@pytest.fixture(scope="module")
def mlps():
    """Exported MLP variants (tests/channel_models.py); each test takes its own copy with ``fresh``."""
    from tests.channel_models import exported

    return exported("mlps")


@pytest.fixture(scope="module")
def cnns():
    """Exported CNN variants (tests/channel_models.py)."""
    from tests.channel_models import exported

    return exported("cnns")
