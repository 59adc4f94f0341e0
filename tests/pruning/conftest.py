"""Calibration tokens for the pruning tests (their models come from tests/conftest.py and tests/fixtures)."""

from __future__ import annotations

import pytest
import torch

from prune2deploy.pruning.calibration import CalibrationData, tokens_sha256


def calibration(vocab: int, samples: int = 6, seq: int = 12, seed: int = 0) -> CalibrationData:
    ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(seed))
    return CalibrationData(ids, "test", tokens_sha256(ids))


@pytest.fixture
def llama_calib():
    return calibration(64)
