"""regroup-gqa: pooled kv heads (approximate), exact special cases, and the KV-cache graph's shrunken cache."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from prune2deploy.analysis.attention import analyze_attention
from prune2deploy.frontends.decoder import decoder_signature
from prune2deploy.passes.head_layout import apply_head_layout
from prune2deploy.passes.regroup_gqa import RegroupGQAPass, permutation_layout, similarity_groups
from prune2deploy.verify import EXACT_TOLERANCE, verify_models
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import clone, decoder_feeds, fused_attention_model, run
from tests.fixtures.results import outcome
from tests.fixtures.zeroing import blocks_by_name

LLAMA = [f"model.layers.{i}.self_attn" for i in range(2)]


def _regroup(model: ir.Model, groups, **options) -> dict:
    result = RegroupGQAPass(groups, **options)(model)
    onnx.checker.check_model(ir.to_proto(model))
    return outcome(result)


def _kv_heads(model: ir.Model) -> list[int]:
    return [b.num_kv_heads for b in analyze_attention(model).blocks]


@pytest.mark.parametrize("name", ["llama-gqa", "bert", "fused", "gpt2"])
def test_groups_equal_heads_is_unchanged(name):
    """G = H: every query head gets its own copy of the kv head it read, so outputs do not move."""
    model = fresh("fused-qkv") if name == "fused" else fresh(name)
    reference = clone(model)
    record = _regroup(model, 4)
    assert _kv_heads(model) == [4] * len(_kv_heads(model))
    assert all(c["k_weight_rel_error"] == 0 and c["v_weight_rel_error"] == 0 for c in record["per_block"].values())
    assert verify_models(reference, model, exact=True).worst <= EXACT_TOLERANCE


def test_groups_equal_kv_heads_is_a_no_op():
    model = fresh("llama-gqa")
    record = _regroup(model, 2)
    assert record["blocks_changed"] == 0 and _kv_heads(model) == [2, 2]


@pytest.mark.parametrize("name", ["llama-gqa", "bert"])
def test_query_permutation_alone_is_exact(name):
    """Permuting query heads (q columns with the o rows) is exact; a broken GQA group becomes a Gather."""
    model = fresh(name)
    reference = clone(model)
    for block in analyze_attention(model).supported:
        changes = apply_head_layout(model, block, permutation_layout(block, [3, 0, 2, 1]))
        assert changes["gathers"] == 2  # K and V read through the permuted map
    assert verify_models(reference, model, exact=True).worst <= EXACT_TOLERANCE
    expected = [1, 0, 1, 0] if name == "llama-gqa" else [3, 0, 2, 1]
    assert [b.kv_map for b in analyze_attention(model).blocks] == [expected, expected]


def test_similarity_recovers_scrambled_groups():
    """After a permutation, similarity grouping finds the true GQA groups again: pooling is then exact."""
    model = fresh("llama-gqa")
    reference = clone(model)
    for block in analyze_attention(model).supported:
        apply_head_layout(model, block, permutation_layout(block, [0, 2, 1, 3]))  # kv map [0, 1, 0, 1]
    record = _regroup(model, 2, grouping="similarity")
    for changes in record["per_block"].values():
        assert changes["order"] == [0, 2, 1, 3] and changes["permuted"]
        assert changes["k_weight_rel_error"] == 0 and changes["v_weight_rel_error"] == 0
        assert changes["gathers"] == 0  # no new Gather: the existing ones get the uniform indices
    assert [b.kv_map for b in analyze_attention(model).blocks] == [[0, 0, 1, 1]] * 2
    assert verify_models(reference, model, exact=True).worst <= EXACT_TOLERANCE


def test_similarity_groups_balanced():
    features = np.array([[0.0], [10.0], [0.1], [10.1], [5.0], [5.2]])
    assert similarity_groups(features, 3) == [[0, 2], [1, 3], [4, 5]]


@pytest.mark.parametrize("method", ["mean", "first"])
def test_mqa_from_gqa_pools_weights(method):
    model = fresh("llama-gqa")
    blocks = blocks_by_name(model)
    k = blocks[LLAMA[0]].projections["k"].weight_array()
    reference = clone(model)
    record = _regroup(model, 1, method=method)
    assert _kv_heads(model) == [1, 1] and record["kv_heads_before"] == 4 and record["kv_heads_after"] == 2
    pooled = blocks_by_name(model)[LLAMA[0]].projections["k"].weight_array()
    expected = (k[:, :16] + k[:, 16:]) / 2 if method == "mean" else k[:, :16]
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-7)
    assert 0 < record["per_block"][LLAMA[0]]["k_weight_rel_error"] < 1.5
    verification = verify_models(reference, model, exact=False)
    assert not verification.exact and np.isfinite(verification.worst)


def test_bert_biases_pooled_and_mha_gets_gather():
    model = fresh("bert")
    block = analyze_attention(model).blocks[0]
    bias = block.projections["v"].bias_array()
    record = _regroup(model, 2)
    changes = record["per_block"][block.name]
    assert changes["kv_heads_after"] == 2 and changes["gathers"] == 2  # MHA had no repeat to edit
    new = analyze_attention(model).blocks[0]
    np.testing.assert_allclose(
        new.projections["v"].bias_array(),
        np.concatenate([(bias[:16] + bias[16:32]) / 2, (bias[32:48] + bias[48:]) / 2]),
        rtol=1e-6,
    )
    assert new.kv_map == [0, 0, 1, 1]


def test_per_layer_groups_and_bad_divisor():
    model = fresh("llama-gqa")
    record = _regroup(model, {LLAMA[1]: 1})
    assert _kv_heads(model) == [2, 1] and list(record["per_block"]) == [LLAMA[1]]
    record = _regroup(fresh("llama-gqa"), 3)
    assert record["blocks_changed"] == 0 and "do not divide" in record["refused"][LLAMA[0]]


def test_bad_options():
    with pytest.raises(ValueError):
        RegroupGQAPass(2, grouping="random")
    with pytest.raises(ValueError):
        RegroupGQAPass(2, method="median")


def test_kv_cache_graph_shrinks_and_matches_prefill(rng):
    """2 → 1 kv heads on the cache graph: cache shapes shrink, and a prefill + one decode step through the
    cache equal the regrouped no-cache graph on the same tokens (the same pooled weights)."""
    cached, prefill = fresh("llama-gqa-kv"), fresh("llama-gqa")
    _regroup(cached, 1)
    _regroup(prefill, 1)
    signature = decoder_signature(cached)
    assert [layer.kv_heads for layer in signature.layers] == [1, 1]
    assert signature.bytes_per_token == 2 * 2 * 1 * 16 * 4
    ids = rng.integers(0, 128, (2, 6))
    full = run(prefill, {"input_ids": ids, "attention_mask": np.ones((2, 6), dtype=np.int64)})["logits"]
    first = run(cached, decoder_feeds(ids[:, :5], signature.empty_past(2), 0))
    assert first["present.0.key"].shape == (2, 1, 5, 16)
    np.testing.assert_allclose(first["logits"], full[:, :5], atol=1e-4, rtol=1e-4)
    past = {f"past_key_values.{i}.{k}": first[f"present.{i}.{k}"] for i in range(2) for k in ("key", "value")}
    step = run(cached, decoder_feeds(ids[:, 5:], past, 5))
    np.testing.assert_allclose(step["logits"][:, 0], full[:, 5], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_three_to_one(smollm2_onnx, rng):
    """SmolLM2-135M: 9 query heads over 3 kv heads → MQA in every layer; the error is reported, not hidden."""
    model = fresh(smollm2_onnx)
    reference = clone(model)
    record = _regroup(model, 1)
    assert _kv_heads(model) == [1] * 30 and record["kv_heads_before"] == 90 and record["kv_heads_after"] == 30
    errors = [c["k_weight_rel_error"] for c in record["per_block"].values()]
    assert all(0 < e < 1.5 for e in errors)
    verification = verify_models(reference, model, exact=False, shapes=((2, 7),))
    logits = verification.outputs["logits"]
    assert np.isfinite(logits["max_abs"]) and logits["cosine"] > 0
    # same pass on a G = 3 target is a no-op; G = 9 expands to MHA exactly
    expanded = clone(reference)
    _regroup(expanded, 9)
    assert verify_models(reference, expanded, exact=True, shapes=((2, 7),)).worst <= EXACT_TOLERANCE


def test_gpt2_fused_gemm_regroup():
    """MHA with a fused Gemm: the Split sizes and the unflatten width follow the pooled kv heads."""
    model = fresh("gpt2")
    reference = clone(model)
    record = _regroup(model, 2)
    assert record["kv_heads_after"] == 4 and all(c["gathers"] == 2 for c in record["per_block"].values())
    block = analyze_attention(model).blocks[0]
    assert [(block.projections[r].offset, block.projections[r].width) for r in "qkv"] == [(0, 64), (64, 32), (96, 32)]
    assert block.projections["q"].weight.const_value.shape == (64, 128)
    verification = verify_models(reference, model, exact=False)
    assert 0 < verification.worst < 10 and verification.outputs["logits"]["cosine"] > 0.5


def test_bad_layout_is_refused_before_any_edit():
    model = fresh("llama-gqa")
    block = analyze_attention(model).blocks[0]
    layout = permutation_layout(block, [0, 1, 2, 3])
    layout.mapping = [0, 0, 1, 2]  # kv head 2 does not exist
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(ValueError, match="does not fit"):
        apply_head_layout(model, block, layout)
    assert ir.to_proto(model).SerializeToString() == before


def test_per_head_fused_layout_is_refused():
    """GPT-NeoX-style [heads, 3·head_dim] ties every kv head to its query head inside one projection: pooling
    kv heads would have to change that layout, so the block is refused by name and left unchanged."""
    model = fused_attention_model("interleaved", np.random.default_rng(0))
    before = ir.to_proto(model).SerializeToString()
    record = _regroup(model, 2)
    assert record["blocks_changed"] == 0
    assert "share one per-head fused layout" in record["refused"]["block"]
    assert ir.to_proto(model).SerializeToString() == before
