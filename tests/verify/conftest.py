"""A deep GQA Llama compiled with uneven head removal, shared by the verification tests.

Six layers so that rounding accumulates as in a real decoder; 4 query heads over 2 kv heads, so that
removing one head of a kv group makes the compiled graph gather kv heads (the case whose fp32 rounding
tripped the old fixed tolerance on SmolLM2). Exported once per session (~10 s), compiled once per module.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from tests.fixtures.graphs import clone, matmul_weights, set_initializer
from tests.fixtures.zeroing import blocks_by_name, zero_heads

LAYERS = 6


@pytest.fixture(scope="session")
def deep_gqa_bytes() -> bytes:
    """The serialized export of a 6-layer tiny GQA Llama (hidden 64, MLP 96, 4 query / 2 kv heads)."""
    from prune2deploy.frontends.torch import export_module, hf_export_spec
    from tests.fixtures.models import tiny_llama

    module = tiny_llama(3, random_norms=True, num_hidden_layers=LAYERS)
    module.config.use_cache = False
    model = export_module(module, hf_export_spec("causal-lm", vocab_size=module.config.vocab_size))
    return ir.to_proto(model).SerializeToString()


def zero_mlp(model: ir.Model, layer: int, channels) -> None:
    """Zeroes MLP neurons of one layer (gate/up columns, down rows), as a pruning mask would."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        ((_, weight),) = matmul_weights(model, f"model.layers.{layer}.mlp.{proj}")
        array = weight.const_value.numpy().copy()
        if proj == "down_proj":
            array[channels, :] = 0
        else:
            array[:, channels] = 0
        set_initializer(weight, array)


@pytest.fixture(scope="module")
def compiled_pair(deep_gqa_bytes) -> tuple[ir.Model, ir.Model]:
    """(masked reference, compiled): a quarter of every MLP and one head of kv group 0 in every layer removed.

    Tests take ``clone()``s before changing either.
    """
    from prune2deploy.passes.remove_channels import RemoveChannelsPass
    from prune2deploy.passes.remove_heads import RemoveHeadsPass
    from prune2deploy.pipeline import run_pipeline

    rng = np.random.default_rng(7)
    model = ir.from_proto(onnx.ModelProto.FromString(deep_gqa_bytes))
    for layer in range(LAYERS):
        zero_mlp(model, layer, rng.choice(96, 24, replace=False))
    zero_heads(model, {name: [int(rng.integers(0, 2))] for name in blocks_by_name(model)}, "o")
    reference = clone(model)
    pipeline = run_pipeline(model, [RemoveChannelsPass(), RemoveHeadsPass()])
    assert pipeline.exact
    assert all(b.kv_map is not None and len(b.kv_map) == 3 for b in blocks_by_name(model).values())
    return reference, model


def wrong_channel(compiled: ir.Model, layer: int = LAYERS // 2) -> ir.Model:
    """The compiled model with one kept MLP channel of ``layer`` removed too (zeroed): one wrong channel."""
    wrong = clone(compiled)
    zero_mlp(wrong, layer, [0])
    return wrong


def wrong_head(compiled: ir.Model, layer: int = LAYERS // 2) -> ir.Model:
    """The compiled model with one kept query head of ``layer`` zeroed: one wrong head."""
    wrong = clone(compiled)
    zero_heads(wrong, {list(blocks_by_name(wrong))[layer]: [0]}, "o")
    return wrong
