"""prune-hidden: narrow the residual stream; exact for RMSNorm and LayerNorm with zero channels, else approximate."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.feeds import random_feeds
from prune2deploy.graph.scopes import module_of
from prune2deploy.passes.prune_hidden import PruneHiddenPass
from prune2deploy.passes.remove_layers import RemoveLayersPass
from prune2deploy.verify import compare_outputs, verify_models
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import clone, ids_feeds, matmul_weights, run, snapshot
from tests.fixtures.results import lm_metrics, outcome
from tests.fixtures.zeroing import zero_hidden, zero_module

LLAMA_WRITERS = ("o_proj", "down_proj")
BERT_WRITERS = ("attention.output.dense", "output.dense")
LLAMA_FEEDS = ids_feeds(128)
BERT_FEEDS = ids_feeds(100)


def _prune(model, **options) -> dict:
    result = PruneHiddenPass(**options)(model)
    for value in model.graph.initializers.values():  # new constants declare the shape they hold
        assert tuple(value.shape) == tuple(value.const_value.shape), value.name
    return outcome(result)


def _max_rel(reference: bytes, compiled, feeds) -> dict[str, float]:
    return {k: v["max_rel"] for k, v in compare_outputs(run(reference, feeds), run(compiled, feeds)).items()}


def _norm_consts(model) -> tuple[list[float], list[np.ndarray]]:
    """(eps, scale) of every RMSNorm (ReduceMean → Add(eps) ... Mul(scale))."""
    eps = [
        float(np.ravel(v.const_value.numpy())[0])
        for n in model.graph
        if n.op_type == "Add" and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "ReduceMean"
        for v in n.inputs[1:]
    ]
    scales = [
        v.const_value.numpy()
        for n in model.graph
        if n.op_type == "Mul" and module_of(n).endswith(("layernorm", "norm"))
        for v in n.inputs
        if v.const_value is not None and v.const_value.numpy().ndim == 1
    ]
    return eps, scales


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied"])
def test_llama_zero_channels_exact(name, rng):
    model = fresh(name, unshare=True)
    drop = rng.choice(64, 16, replace=False)
    zero_hidden(model, drop, LLAMA_WRITERS)
    eps_before, scales_before = _norm_consts(model)
    reference = snapshot(model)
    record = _prune(model)
    assert record["exact"] and record["removed_channels"] == sorted(drop.tolist())
    assert (record["width_before"], record["width_after"]) == (64, 48)
    assert record["norms"] == {"rms_folded": 5, "rms_mean_scaled": 0, "rms_uncorrected": 0}
    assert record["readers"] == 11 and record["writers"] == 4  # q,k,v,gate,up × 2 + lm_head; o, down × 2
    ((_, head),) = matmul_weights(model, "lm_head")
    ((_, q0),) = matmul_weights(model, "model.layers.0.self_attn.q_proj")
    ((_, down1),) = matmul_weights(model, "model.layers.1.mlp.down_proj")
    table = next(n.inputs[0] for n in model.graph if n.op_type == "Gather" and module_of(n) == "model.embed_tokens")
    assert "model.embed_tokens.weight" not in model.graph.initializers  # the unsliced original is gone
    assert head.shape == (48, 128) and q0.shape == (48, 64) and down1.shape == (96, 48) and table.shape == (128, 48)
    if name == "llama-tied":  # the tied head is the embedding, transposed: both lost the same columns
        np.testing.assert_array_equal(head.const_value.numpy(), table.const_value.numpy().T)
    # the derivation: eps' = eps·d/d', w' = w·sqrt(d/d')
    eps_after, scales_after = _norm_consts(model)
    keep = np.setdiff1d(np.arange(64), drop)
    np.testing.assert_allclose(eps_after, np.asarray(eps_before) * 64 / 48, rtol=1e-6)
    for before, after in zip(scales_before, scales_after, strict=True):
        np.testing.assert_allclose(after, before[keep] * np.sqrt(64 / 48), rtol=1e-6)
    assert max(_max_rel(reference, model, LLAMA_FEEDS).values()) <= 1e-5


def test_head_behind_an_unfolded_transpose(rng):
    """SmolLM2's export keeps the tied head as ``MatMul(x, Transpose(table))``: the table is sliced under it."""
    model = fresh("llama-tied", unshare=True)
    ((head_node, head),) = matmul_weights(model, "lm_head")
    table = ir.Value(name="table_t", shape=ir.Shape(head.shape[::-1]), type=head.type)
    table.const_value = ir.tensor(np.ascontiguousarray(head.const_value.numpy().T), name="table_t")
    model.graph.register_initializer(table)
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name="head_transpose")
    transpose.outputs[0].shape, transpose.outputs[0].type = head.shape, head.type
    model.graph.insert_before(head_node, transpose)
    head_node.replace_input_with(1, transpose.outputs[0])
    drop = rng.choice(64, 12, replace=False)
    zero_hidden(model, drop, LLAMA_WRITERS)
    reference = snapshot(model)
    record = _prune(model)
    assert record["exact"] and record["width_after"] == 52 and record["readers"] == 11
    assert transpose.inputs[0].const_value.shape == (128, 52) and list(transpose.outputs[0].shape) == [52, 128]
    assert max(_max_rel(reference, model, LLAMA_FEEDS).values()) <= 1e-5


def test_rms_correction_is_what_makes_it_exact(rng):
    """The same zero channels without the eps/scale correction: the outputs move (the mean is over d')."""
    model = fresh("llama-gqa", unshare=True)
    zero_hidden(model, rng.choice(64, 16, replace=False), LLAMA_WRITERS)
    reference = snapshot(model)
    record = _prune(model, rescale_norms=False, allow_inexact=True)
    assert not record["exact"] and record["norms"]["rms_uncorrected"] == 5
    assert record["inexact_because"] == ["RMSNorms left uncorrected"]
    assert _max_rel(reference, model, LLAMA_FEEDS)["logits"] > 1e-3


def test_rms_mean_scaling_fallback_is_exact(rng):
    """When the RMSNorm pattern is not the plain chain, the ReduceMean output is scaled by d'/d instead."""
    model = fresh("llama-gqa", unshare=True)
    zero_hidden(model, rng.choice(64, 8, replace=False), LLAMA_WRITERS)
    for node in model.graph:  # break the pattern: Sqrt's output read twice (Reciprocal and an Identity)
        if node.op_type == "Sqrt":
            extra = ir.node("Identity", [node.outputs[0]], name=f"{node.name}_probe")
            extra.outputs[0].shape, extra.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
            model.graph.insert_after(node, extra)
            break
    reference = snapshot(model)
    record = _prune(model)
    assert record["exact"] and record["norms"] == {"rms_folded": 4, "rms_mean_scaled": 1, "rms_uncorrected": 0}
    assert max(_max_rel(reference, model, LLAMA_FEEDS).values()) <= 1e-5


def test_llama_width_plan_is_approximate_and_reports_the_error():
    model = fresh("llama-gqa", unshare=True)
    probe = clone(model)
    reference = snapshot(model)
    drop = list(range(0, 64, 8))
    record = _prune(model, channels=drop)
    assert not record["exact"] and record["width_after"] == 56 and record["removed_channels"] == drop
    assert record["norms"]["rms_uncorrected"] == 5  # width pruning keeps the norms as they are
    reported = verify_models(probe, model, exact=False, shapes=((3, 11),))
    feeds = random_feeds(probe, batch=3, seq=11, seed=0)
    ref, out = run(reference, feeds)["logits"], run(model, feeds)["logits"]
    mine = float(np.max(np.abs(ref.astype(np.float64) - out)) / np.max(np.abs(ref)))
    assert np.isfinite(reported.worst) and reported.worst == pytest.approx(mine, rel=1e-5) and mine > 1e-3
    metrics = lm_metrics(ref, out)
    assert 0 < metrics["kl"] < 1 and 0 <= metrics["top1"] <= 1


def test_plan_of_zero_channels_is_exact(rng):
    model = fresh("llama-gqa", unshare=True)
    drop = sorted(rng.choice(64, 10, replace=False).tolist())
    zero_hidden(model, drop, LLAMA_WRITERS)
    reference = snapshot(model)
    mask = np.ones(64)
    mask[drop[:6]] = 0
    record = outcome(PruneHiddenPass.from_mask(mask)(model))
    assert record["exact"] and record["width_after"] == 58 and record["zero_channels"] == 10
    assert max(_max_rel(reference, model, LLAMA_FEEDS).values()) <= 1e-5
    with pytest.raises(BadInputError, match="out of range"):
        _prune(fresh("llama-gqa", unshare=True), channels=[64])


def test_bert_layernorm_zero_channels_are_exact_and_outputs_keep_their_width(rng):
    """LayerNorm statistics over the kept channels, rescaled (mean·d'/d, variance from both): exact."""
    model = fresh("bert", unshare=True)
    drop = rng.choice(64, 16, replace=False)
    zero_hidden(model, drop, BERT_WRITERS, norms=True)
    reference = snapshot(model)
    record = _prune(model)
    assert record["exact"] and record["removed"] == 16 and record["width_after"] == 48
    assert record["layernorms"] == record["layernorms_rescaled"] == 5 and record["inexact_because"] == []
    assert len(record["embeddings"]) == 3  # word, position, token type
    assert record["outputs_restored"] == ["last_hidden_state"]
    assert not any(n.op_type == "LayerNormalization" for n in model.graph)
    ((_, pooler),) = matmul_weights(model, "pooler.dense")
    assert pooler.shape == (64, 48)  # Gemm transB: K is axis 1
    out = run(model, BERT_FEEDS)
    assert out["last_hidden_state"].shape == (3, 11, 64)
    assert not np.any(out["last_hidden_state"][..., drop])  # restored channels: the LayerNorm bias, zero here
    assert max(_max_rel(reference, model, BERT_FEEDS).values()) <= 1e-4


def test_layernorm_plan_of_live_channels_is_approximate(rng):
    model = fresh("bert")
    drop = sorted(rng.choice(64, 16, replace=False).tolist())
    probe = clone(model)
    reference = snapshot(model)
    record = _prune(model, channels=drop)
    assert not record["exact"] and record["width_after"] == 48 and record["layernorms_rescaled"] == 0
    assert record["inexact_because"] == [
        "16 dropped channels are not zero in the stream",
        "5 LayerNorms now average over 48 of 64 channels",
    ]
    # the reported error is finite, non-zero, and what the raw outputs say
    reported = verify_models(probe, model, exact=False, shapes=((3, 11),))
    feeds = random_feeds(probe, batch=3, seq=11, seed=0)
    ref, new = run(reference, feeds), run(model, feeds)
    for name in ref:
        mine = float(np.max(np.abs(ref[name].astype(np.float64) - new[name])) / np.max(np.abs(ref[name])))
        assert 0 < mine < 1 and reported.outputs[name]["max_rel"] == pytest.approx(mine, rel=1e-5)


def test_layers_then_hidden_compose_exactly(rng):
    model = fresh("llama-gqa", unshare=True)
    zero_module(model, "model.layers.1.self_attn.o_proj")
    zero_module(model, "model.layers.1.mlp.down_proj")
    zero_hidden(model, rng.choice(64, 24, replace=False), LLAMA_WRITERS)
    reference = snapshot(model)
    layers = outcome(RemoveLayersPass()(model))
    record = _prune(model)
    assert layers["layers_after"] == 1 and record["width_after"] == 40 and record["exact"]
    assert record["readers"] == 6 and record["norms"]["rms_folded"] == 3
    assert max(_max_rel(reference, model, LLAMA_FEEDS).values()) <= 1e-5


def test_nothing_to_do_and_blocked_stream():
    model = fresh("llama-gqa", unshare=True)
    record = _prune(model)
    assert record["removed"] == 0 and record["width_after"] == 64
    # a graph input that carries the hidden width cannot shrink: the pass refuses and says why
    blocked = fresh("llama-gqa", unshare=True)
    embed = next(n for n in blocked.graph if n.op_type == "Gather" and module_of(n) == "model.embed_tokens")
    embed.outputs[0].name = "embedding"
    hidden_in = ir.Value(name="extra_hidden", shape=embed.outputs[0].shape, type=embed.outputs[0].type)
    blocked.graph.inputs.append(hidden_in)
    add = ir.node("Add", [embed.outputs[0], hidden_in], name="add_extra")
    add.outputs[0].shape, add.outputs[0].type = embed.outputs[0].shape, embed.outputs[0].type
    uses = list(embed.outputs[0].uses())
    blocked.graph.insert_after(embed, add)
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    record = _prune(blocked, channels=[0, 1])
    assert record["removed"] == 0 and "graph input 'extra_hidden'" in record["refused"]["hidden stream"]


def test_cnn_stream_is_left_to_remove_channels():
    """ConvNeXt's residual stream is [N, C, H, W]: its last axis is spatial. The pass refuses with the reason
    (it used to take the width W for the hidden width and stop at the first Transpose)."""
    from tests.fixtures import cnn_families

    model = cnn_families.fresh("convnext", "stream")
    record = _prune(model, channels=[0])
    assert record["removed"] == 0 and "is 4-D" in record["refused"]["hidden stream"]


@pytest.mark.slow
def test_smollm2_zero_hidden_channels_exact(smollm2_onnx, rng):
    """SmolLM2-135M: 64 of 576 hidden channels zeroed in the embedding and every writer go exactly."""
    model = fresh(smollm2_onnx, unshare=True)
    drop = rng.choice(576, 64, replace=False)
    zero_hidden(model, drop, LLAMA_WRITERS)
    reference = snapshot(model)
    record = _prune(model)
    assert record["exact"] and (record["width_before"], record["width_after"]) == (576, 512)
    assert record["norms"]["rms_folded"] == 61 and record["readers"] == 30 * 5 + 1
    feeds = ids_feeds(49152, batch=2, seq=16)
    # 30 layers of float32 sums over 512 instead of 576 terms: rounding reaches ~1e-5 of the logit scale
    assert max(_max_rel(reference, model, feeds).values()) <= 1e-4
