"""remove-heads: zero heads in the graph, run the pass, check the new head counts and that ORT outputs match."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from prune2deploy.passes.remove_heads import RemoveHeadsPass
from prune2deploy.verify import EXACT_TOLERANCE, verify_models
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import assert_same_outputs, clone, decoder_feeds, fused_attention_model, run, snapshot
from tests.fixtures.results import outcome
from tests.fixtures.zeroing import blocks_by_name, zero_heads

LLAMA = [f"model.layers.{i}.self_attn" for i in range(2)]
BERT = [f"encoder.layer.{i}.attention.self" for i in range(2)]


def _remove(model: ir.Model, **options) -> dict:
    result = RemoveHeadsPass(**options)(model)
    onnx.checker.check_model(ir.to_proto(model))
    return outcome(result)


def _assert_exact(reference: ir.Model, compiled: ir.Model) -> float:
    verification = verify_models(reference, compiled, exact=True)
    assert verification.passed, verification.outputs
    assert verification.worst <= EXACT_TOLERANCE
    return verification.worst


def _counts(model: ir.Model) -> dict[str, tuple[int, int]]:
    return {name: (b.num_heads, b.num_kv_heads) for name, b in blocks_by_name(model).items()}


def test_gqa_uneven_and_whole_group():
    """Layer 0 loses one head of group 0 (Gather map), layer 1 loses all of group 1 (kv head goes)."""
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [1], LLAMA[1]: [2, 3]}, "o")
    reference = clone(model)
    record = _remove(model)
    assert record["heads_removed"] == 3 and record["kv_heads_removed"] == 1 and record["exact"]
    assert record["per_block"][LLAMA[0]]["gathers"] == 2  # K and V map [0, 1, 1] → [0, 0, 1]
    assert record["per_block"][LLAMA[1]]["gathers"] == 0  # uniform: the Expand repeat is kept
    blocks = blocks_by_name(model)
    assert _counts(model) == {LLAMA[0]: (3, 2), LLAMA[1]: (2, 1)}
    assert blocks[LLAMA[0]].kv_map == [0, 1, 1]
    assert blocks[LLAMA[0]].projections["q"].weight.const_value.shape == (64, 48)
    assert blocks[LLAMA[0]].projections["o"].weight.const_value.shape == (48, 64)
    assert blocks[LLAMA[1]].projections["k"].weight.const_value.shape == (64, 16)
    _assert_exact(reference, model)


def test_gqa_zero_value_head():
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [0]}, "v")  # kv head 0: query heads 0 and 1 contribute nothing
    reference = clone(model)
    record = _remove(model)
    assert record["per_block"][LLAMA[0]]["removed_heads"] == [0, 1]
    assert _counts(model) == {LLAMA[0]: (2, 1), LLAMA[1]: (4, 2)}
    _assert_exact(reference, model)


def test_gqa_one_head_from_each_group_keeps_uniform_repeat():
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [0, 3]}, "o")
    reference = clone(model)
    record = _remove(model)
    assert record["per_block"][LLAMA[0]]["gathers"] == 0  # [1, 2] read kv [0, 1]: repeat 1
    assert _counts(model)[LLAMA[0]] == (2, 2)
    _assert_exact(reference, model)


def test_mha_llama():
    model = fresh("llama-mha")
    zero_heads(model, {LLAMA[0]: [0, 2], LLAMA[1]: [3]}, "o")
    reference = clone(model)
    record = _remove(model)
    assert record["kv_heads_removed"] == 3  # MHA: each query head has its own kv head
    assert _counts(model) == {LLAMA[0]: (2, 2), LLAMA[1]: (3, 3)}
    assert all(c["gathers"] == 0 for c in record["per_block"].values())
    _assert_exact(reference, model)


@pytest.mark.parametrize("where", ["o", "v"])
def test_bert_with_biases(where):
    model = fresh("bert")
    zero_heads(model, {BERT[0]: [1, 2], BERT[1]: [0]}, where)
    reference = clone(model)
    record = _remove(model)
    assert _counts(model) == {BERT[0]: (2, 2), BERT[1]: (3, 3)}
    block = blocks_by_name(model)[BERT[0]]
    assert block.projections["q"].bias.const_value.shape == (32,)
    assert block.projections["v"].bias.const_value.shape == (32,)
    assert record["heads_removed"] == 3
    _assert_exact(reference, model)


@pytest.mark.parametrize("where", ["o", "v"])
def test_gpt2_gemm_fused_qkv_with_biases(where):
    """GPT-2: flatten → Gemm(c_attn, bias) → unflatten → Split, then a [-1, H*d] merge into the c_proj Gemm."""
    model = fresh("gpt2")
    names = list(blocks_by_name(model))
    assert names == ["transformer.h.0.attn", "transformer.h.1.attn"]
    zero_heads(model, {names[0]: [0, 3], names[1]: [2]}, where)
    reference = clone(model)
    record = _remove(model)
    assert record["heads_removed"] == 3
    block = blocks_by_name(model)[names[0]]
    assert (block.num_heads, block.num_kv_heads) == (2, 2)
    assert block.projections["q"].unflatten is not None and block.projections["q"].bias is not None
    assert block.projections["q"].weight.const_value.shape == (64, 96)  # fused [in, 3 × 2 heads × 16]
    assert block.projections["o"].weight.const_value.shape == (32, 64)
    _assert_exact(reference, model)


def test_fused_qkv_split_sizes():
    model = fresh("fused-qkv")
    zero_heads(model, {"attn": [2, 3]}, "o")
    reference = clone(model)
    _remove(model)
    (block,) = blocks_by_name(model).values()
    assert (block.num_heads, block.num_kv_heads) == (2, 1)
    assert [(p.offset, p.width) for p in (block.projections[r] for r in "qkv")] == [(0, 16), (16, 8), (24, 8)]
    assert block.projections["q"].weight.const_value.shape == (32, 32)
    _assert_exact(reference, model)


def test_min_heads_keeps_one():
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [0, 1, 2, 3]}, "o")
    reference = clone(model)
    record = _remove(model)
    assert record["per_block"][LLAMA[0]]["removed_heads"] == [1, 2, 3]
    assert _counts(model)[LLAMA[0]] == (1, 1)
    _assert_exact(reference, model)


def test_zero_queries_are_not_removed():
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [0]}, "q")
    record = _remove(model)
    assert record["heads_removed"] == 0 and not record["per_block"]


def test_unsupported_block_is_left_alone():
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [1], LLAMA[1]: [1]}, "o")
    model.graph.outputs.append(blocks_by_name(model)[LLAMA[0]].splits["q"].node.outputs[0])
    reference = clone(model)
    record = _remove(model)
    assert list(record["per_block"]) == [LLAMA[1]]
    assert "carries query heads" in record["refused"][LLAMA[0]]
    _assert_exact(reference, model)


def test_shared_shape_constants_are_cloned():
    """The view target Concat and the repeat constants are shared by layers: the untouched layer keeps them."""
    model = fresh("llama-gqa")
    before = blocks_by_name(model)[LLAMA[1]]
    targets = [before.repeats[0].expand.inputs[1], before.splits["q"].node.inputs[1]]
    zero_heads(model, {LLAMA[0]: [2, 3]}, "o")
    _remove(model)
    after = blocks_by_name(model)[LLAMA[1]]
    assert [after.repeats[0].expand.inputs[1], after.splits["q"].node.inputs[1]] == targets
    assert _counts(model)[LLAMA[1]] == (4, 2)


# -- KV-cache graph ---------------------------------------------------------------------------------------


def _past(kv_heads: list[int], length: int, rng: np.random.Generator, layers: int = 2) -> dict[str, np.ndarray]:
    return {
        f"past_key_values.{i}.{kind}": rng.standard_normal((2, kv_heads[i], length, 16)).astype(np.float32)
        for i in range(layers)
        for kind in ("key", "value")
    }


def test_kv_cache_shrinks_with_removed_kv_head(rng):
    model = fresh("llama-gqa-kv")
    zero_heads(model, {LLAMA[0]: [2, 3]}, "o")
    reference = clone(model)
    record = _remove(model)
    assert record["per_block"][LLAMA[0]]["cache_changed"]
    inputs = {v.name: v.shape for v in model.graph.inputs}
    assert inputs["past_key_values.0.key"][1] == 1 and inputs["past_key_values.1.key"][1] == 2
    ids = rng.integers(0, 128, (2, 3))
    past = _past([2, 2], 5, rng)
    want = run(reference, decoder_feeds(ids, past, 5))
    pruned_past = dict(past)
    for kind in ("key", "value"):
        pruned_past[f"past_key_values.0.{kind}"] = past[f"past_key_values.0.{kind}"][:, :1]
    got = run(model, decoder_feeds(ids, pruned_past, 5))
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["present.0.key"], want["present.0.key"][:, :1], atol=1e-6)
    np.testing.assert_allclose(got["present.1.value"], want["present.1.value"], atol=1e-6)


def test_kv_cache_interface_kept_on_request(rng):
    model = fresh("llama-gqa-kv")
    zero_heads(model, {LLAMA[0]: [2, 3]}, "o")
    reference = clone(model)
    record = _remove(model, allow_cache_change=False)
    assert record["per_block"][LLAMA[0]]["heads_after"] == 2
    assert record["per_block"][LLAMA[0]]["kv_heads_after"] == 2
    ids = rng.integers(0, 128, (2, 3))
    feeds = decoder_feeds(ids, _past([2, 2], 4, rng), 4)
    want, got = run(reference, feeds), run(model, feeds)
    for name, array in want.items():
        np.testing.assert_allclose(got[name], array, atol=1e-5, rtol=1e-5)


# -- SmolLM2-135M (9 query / 3 kv heads, 30 layers) ------------------------------------------------------


@pytest.mark.slow
def test_smollm2_remove_heads_exact(smollm2_onnx, rng):
    model = fresh(smollm2_onnx)
    names = list(blocks_by_name(model))
    assert len(names) == 30
    plan = {names[0]: [0, 1, 2], names[5]: [4], names[17]: [1, 5, 7, 8]}
    zero_heads(model, plan, "o")
    zero_heads(model, {names[29]: [1]}, "v")  # kv head 1 serves query heads 3, 4, 5
    reference = clone(model)
    record = _remove(model)
    counts = _counts(model)
    assert counts[names[0]] == (6, 2) and counts[names[5]] == (8, 3)
    assert counts[names[17]] == (5, 3) and counts[names[29]] == (6, 2) and counts[names[1]] == (9, 3)
    assert record["heads_removed"] == 3 + 1 + 4 + 3
    worst = verify_models(reference, model, exact=True, shapes=((2, 7),)).worst
    assert worst <= EXACT_TOLERANCE


def test_composes_with_remove_channels():
    """The compile pipeline's order (un-share, remove-channels, remove-heads, re-share) stays exact."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from prune2deploy.passes.remove_channels import RemoveChannelsPass
    from prune2deploy.passes.sharing import reshare_initializers, unshare_initializers

    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [1], LLAMA[1]: [0, 1]}, "o")
    for node in model.graph:  # 20 dead MLP neurons per layer: zero rows of down_proj
        if node.op_type == "MatMul" and "mlp.down_proj" in str(node.metadata_props):
            weight = node.inputs[1].const_value.numpy().copy()
            weight[:20] = 0
            value = ir.Value(name=f"{node.inputs[1].name}_dead", shape=ir.Shape(weight.shape), type=node.inputs[1].type)
            value.const_value = ir.tensor(weight, name=value.name)
            model.graph.register_initializer(value)
            node.replace_input_with(1, value)
    reference = clone(model)
    unshare_initializers(model)
    channels = outcome(RemoveChannelsPass()(model))
    record = _remove(model)
    reshare_initializers(model)
    RemoveUnusedNodesPass()(model)
    assert channels["channels_removed"] == 40 and record["heads_removed"] == 3
    assert _counts(model) == {LLAMA[0]: (3, 2), LLAMA[1]: (2, 1)}
    _assert_exact(reference, model)


@pytest.mark.parametrize(
    ("layout", "counts", "fused_width"),
    [("interleaved", (3, 3), 36), ("scaled", (3, 3), 36), ("multi-query", (3, 1), 20)],
)
def test_fused_layouts_lose_a_head_exactly(layout, counts, fused_width):
    """Per-head interleaved, scaled before the split, multi-query: the head's q (and, without a shared kv
    head, k/v) columns leave the one fused weight; Reshape/Slice/GatherND constants are renumbered."""
    rng = np.random.default_rng(0)
    model = fused_attention_model(layout, rng)
    zero_heads(model, {"block": [1]})
    reference = snapshot(model)
    assert _remove(model)["heads_removed"] == 1
    assert _counts(model) == {"block": counts}
    fused = next(n for n in model.graph if n.name == "fused_mm")
    assert fused.inputs[1].const_value.shape == (16, fused_width)
    assert_same_outputs(reference, model, rng)


def test_multi_query_keeps_its_kv_head_until_every_query_head_goes():
    """All four heads read the one kv head: zero V makes every head zero, min_heads keeps one, and the kv
    head stays with it."""
    rng = np.random.default_rng(1)
    model = fused_attention_model("multi-query", rng)
    zero_heads(model, {"block": [0]}, where="v")
    reference = snapshot(model)
    assert _remove(model)["heads_removed"] == 3
    assert _counts(model) == {"block": (1, 1)}
    assert_same_outputs(reference, model, rng)


def test_per_head_constant_is_sliced_with_the_head():
    """A per-head constant on the scores (one temperature per head, like ALiBi slopes) keeps the head axis;
    removing head 1 slices its entry out, and the outputs stay exact (a wrong slice would change them)."""
    rng = np.random.default_rng(2)
    model = fused_attention_model("interleaved", rng, head_scale=True)
    temperature = next(n for n in model.graph if n.name == "per_head").inputs[1].const_value.numpy().copy()
    (block,) = blocks_by_name(model).values()
    assert [(n.name, i, axis, space) for n, i, axis, space in block.head_constants] == [("per_head", 1, 1, "q")]
    zero_heads(model, {"block": [1]})
    reference = snapshot(model)
    assert _remove(model)["heads_removed"] == 1
    sliced = next(n for n in model.graph if n.name == "per_head").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(sliced, temperature[:, [0, 2, 3]])
    assert_same_outputs(reference, model, rng)
