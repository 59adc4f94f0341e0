"""Block-by-block verification gives the same verdict as whole models, and says which block is wrong.

On the 2-layer GQA Llama (3 blocks: each block costs sessions and scratch files for both models), compiled
with one head of kv group 0 removed in layer 0 (a kv gather) and a quarter of every MLP.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.verify import BlockwiseUnavailable, block_cuts, verify_blockwise
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import clone
from tests.fixtures.zeroing import zero_heads
from tests.verify.conftest import wrong_channel, zero_mlp

SHAPES = ((2, 7),)
LAYERS = 2


@pytest.fixture(scope="module")
def small_pair() -> tuple[ir.Model, ir.Model]:
    from prune2deploy.passes.remove_channels import RemoveChannelsPass
    from prune2deploy.passes.remove_heads import RemoveHeadsPass
    from prune2deploy.pipeline import run_pipeline

    rng = np.random.default_rng(3)
    model = fresh("llama-gqa")
    for layer in range(LAYERS):
        zero_mlp(model, layer, rng.choice(96, 24, replace=False))
    zero_heads(model, {"model.layers.0.self_attn": [1]}, "o")
    reference = clone(model)
    assert run_pipeline(model, [RemoveChannelsPass(), RemoveHeadsPass()]).exact
    return reference, model


def test_cuts_are_the_residual_stream_after_each_layer(small_pair):
    reference, compiled = small_pair
    cuts = block_cuts(reference, compiled)
    assert len(cuts) == LAYERS  # the last layer's exit feeds the final norm, not a graph output
    names = {v.name for node in compiled.graph for v in node.outputs}
    assert set(cuts) <= names


def test_correct_compile_passes_block_by_block_in_fp64(small_pair):
    reference, compiled = small_pair
    lines = []
    verification = verify_blockwise(reference, compiled, exact=True, shapes=SHAPES, progress=lines.append)
    assert verification.mode == "blockwise" and verification.precision == "fp64"
    assert verification.status == "passed" and verification.worst < 1e-12
    assert len(verification.blocks) == LAYERS + 1 == len(lines)
    assert all(b["precision"] == "fp64" and b["bound"] == 1e-4 for b in verification.blocks)


def test_one_wrong_channel_fails_in_its_own_block(small_pair):
    reference, compiled = small_pair
    layer = 1
    verification = verify_blockwise(reference, wrong_channel(compiled, layer), exact=True, shapes=SHAPES)
    assert verification.status == "failed"
    # Block k computes layer k (block 0 also the embedding); each block is fed the reference's activation.
    assert verification.exceeded() == [f"block {layer}"]
    errors = [b["max_rel"] for b in verification.blocks]
    assert errors[layer] > 1e-3 and max(errors[:layer] + errors[layer + 1 :]) < 1e-12


def test_fp32_blocks_carry_their_floor(small_pair):
    reference, compiled = small_pair
    # No fp64 copy fits in 1 KiB: every block is compared in fp32 against its reference block's floor.
    verification = verify_blockwise(reference, compiled, exact=True, shapes=SHAPES, available=1024)
    assert verification.precision == "fp32" and verification.status == "passed"
    for block in verification.blocks:
        floor = max(block["floors"].values())
        assert 0 <= floor < 1e-5 and block["bound"] == max(1e-4, 20 * floor)
    assert set(verification.floors) == {"logits"}


def test_removed_layers_cannot_be_cut(small_pair):
    reference, compiled = small_pair
    cut = clone(compiled)
    name = block_cuts(reference, compiled)[1]
    for node in cut.graph:
        for value in node.outputs:
            if value.name == name:
                value.name = name + "_renamed"
    with pytest.raises(BlockwiseUnavailable, match="has no value"):
        block_cuts(reference, cut)


def test_blocks_leave_the_mapped_weights_unmapped(small_pair, tmp_path):
    # Each block unmaps the pages it read: otherwise the last block holds both whole models (26 GB at 8B).
    from prune2deploy.frontends.onnx import load_onnx, save_onnx

    models = []
    for name, model in zip(("reference", "compiled"), small_pair, strict=True):
        save_onnx(model, tmp_path / f"{name}.onnx", external_threshold=0)
        models.append(load_onnx(tmp_path / f"{name}.onnx"))
    mapped = [v.const_value for m in models for v in m.graph.initializers.values()]
    mapped = [t for t in mapped if isinstance(t, ir.ExternalTensor)]  # the weights; scalars stay inline
    assert len(mapped) >= 2 * 7 * LAYERS  # at least the seven projections of each layer, in both models
    verification = verify_blockwise(*models, exact=True, shapes=SHAPES)
    assert verification.status == "passed" and verification.worst < 1e-12
    assert all(t.raw is None for t in mapped)  # every mapping closed; read again on demand
    again = verify_blockwise(*models, exact=True, shapes=SHAPES)
    assert again.worst == verification.worst
