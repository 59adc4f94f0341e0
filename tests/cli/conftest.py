"""The CLI tests' shared inputs: one exported tiny Llama and a mask file, made once per session."""

from __future__ import annotations

import pytest

from prune2deploy import api
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama
from tests.fixtures.zeroing import llama_mlp_masks, save_masks


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """An exported tiny Llama (unmasked) and a mask file for it, with the kept MLP widths per layer."""
    import numpy as np

    folder = tmp_path_factory.mktemp("cli")
    module = tiny_llama()
    api.compile(module, folder / "export", CompileOptions(profile=False))
    masks, kept = llama_mlp_masks(module, 0.5, np.random.default_rng(0))
    save_masks(masks, folder / "masks.safetensors")
    return folder / "export" / "reference.onnx", folder / "masks.safetensors", kept


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """A tiny Llama saved as an HF folder (for `prune`)."""
    folder = tmp_path_factory.mktemp("cli-hf") / "hf"
    tiny_llama().save_pretrained(folder)
    return folder
