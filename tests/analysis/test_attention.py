"""Attention analysis: blocks, head counts, the query → kv map, zero heads, and what it refuses to prove."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.analysis.attention import analyze_attention
from prune2deploy.graph.scopes import layer_of
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import fused_attention_model
from tests.fixtures.zeroing import blocks_by_name, zero_heads

LLAMA = [f"model.layers.{i}.self_attn" for i in range(2)]
BERT = [f"encoder.layer.{i}.attention.self" for i in range(2)]


def test_llama_gqa_blocks():
    blocks = analyze_attention(fresh("llama-gqa")).blocks
    assert [b.name for b in blocks] == LLAMA
    for block in blocks:
        assert block.supported, block.reasons
        assert (block.num_heads, block.num_kv_heads, block.head_dim) == (4, 2, 16)
        assert block.kv_map == [0, 0, 1, 1]
        assert [r.n_rep for r in block.repeats] == [2, 2] and not block.joins
        assert {p.module for p in block.projections.values()} == {f"{block.name}.{r}_proj" for r in "qkvo"}
        assert block.zero_heads == {}
        assert block.projections["q"].weight.const_value.shape == (64, 64)
        assert block.projections["k"].weight.const_value.shape == (64, 32)


def test_llama_mha_meets_without_repeat():
    for block in analyze_attention(fresh("llama-mha")).blocks:
        assert block.supported, block.reasons
        assert (block.num_heads, block.num_kv_heads) == (4, 4)
        assert not block.repeats and len(block.joins) == 2  # q·kᵀ and p·v
        assert block.kv_map == [0, 1, 2, 3]


def test_bert_biases_and_summary():
    blocks = analyze_attention(fresh("bert")).blocks
    assert [b.name for b in blocks] == BERT
    summary = blocks[0].summary()
    assert summary["supported"] and summary["biases"] == ["k", "q", "v"]
    assert (summary["heads"], summary["kv_heads"], summary["head_dim"], summary["gqa"]) == (4, 4, 16, "mha")
    assert blocks[0].projections["o"].module == "encoder.layer.0.attention.output.dense"


def test_kv_cache_graph_inputs_and_outputs():
    for i, block in enumerate(analyze_attention(fresh("llama-gqa-kv")).blocks):
        assert block.supported, block.reasons
        assert block.cache_inputs["k"].name == f"past_key_values.{i}.key"
        assert block.cache_outputs["v"].name == f"present.{i}.value"
        assert "past cache" in block.v_zero_blocked  # a past V is a graph input, never provably zero


def test_fused_qkv_with_split():
    (block,) = analyze_attention(fresh("fused-qkv")).blocks
    assert block.supported, block.reasons
    assert (block.num_heads, block.num_kv_heads, block.head_dim) == (4, 2, 8)
    q, k, v = (block.projections[r] for r in "qkv")
    assert q.split is not None and q.matmul is k.matmul is v.matmul
    assert [(p.offset, p.width) for p in (q, k, v)] == [(0, 32), (32, 16), (48, 16)]


def test_zero_heads_from_output_rows_and_values():
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [1, 2]}, "o")
    zero_heads(model, {LLAMA[1]: [1]}, "v")  # kv head 1 is read by query heads 2 and 3
    blocks = blocks_by_name(model)
    assert blocks[LLAMA[0]].zero_heads == {1: "output projection rows are zero", 2: "output projection rows are zero"}
    assert blocks[LLAMA[1]].zero_heads == {2: "value heads are zero", 3: "value heads are zero"}


def test_zero_queries_do_not_make_a_zero_head():
    """Zero q columns give uniform attention (the head outputs mean(V)), not a zero contribution."""
    model = fresh("llama-gqa")
    zero_heads(model, {LLAMA[0]: [0, 1]}, "q")  # "q" zeroes columns of the q projection
    assert blocks_by_name(model)[LLAMA[0]].zero_heads == {}


def test_value_bias_keeps_head():
    """V weights zero but bias non-zero: the head outputs the bias through O, a constant, not zero."""
    model = fresh("bert")
    zero_heads(model, {BERT[0]: [2]}, "v")
    assert blocks_by_name(model)[BERT[0]].zero_heads == {2: "value heads are zero"}
    block = blocks_by_name(model)[BERT[0]]
    bias_add, bias = block.projections["v"].bias_add, block.projections["v"].bias
    array = bias.const_value.numpy().copy()
    array[2 * 16] = 0.5
    value = ir.Value(name="v_bias_nonzero", shape=ir.Shape(array.shape), type=bias.type)
    value.const_value = ir.tensor(array, name=value.name)
    model.graph.register_initializer(value)
    bias_add.replace_input_with(list(bias_add.inputs).index(bias), value)
    assert blocks_by_name(model)[BERT[0]].zero_heads == {}


def _find(model: ir.Model, name: str) -> ir.Value:
    for node in model.graph:
        for out in node.outputs:
            if out.name == name:
                return out
    raise KeyError(name)


def test_query_heads_as_graph_output_is_unsupported():
    model = fresh("llama-gqa")
    q_heads = analyze_attention(model).blocks[0].splits["q"].node.outputs[0]
    model.graph.outputs.append(q_heads)
    block = analyze_attention(model).blocks[0]
    assert not block.supported
    assert "carries query heads" in block.reasons[0]
    assert analyze_attention(model).blocks[1].supported  # the other layer is unaffected


def test_op_mixing_heads_is_unsupported():
    model = fresh("llama-gqa")
    block = analyze_attention(model).blocks[1]
    softmax = next(n for n in model.graph if n.op_type == "Softmax" and layer_of(n) == block.layer)
    reduce = ir.node("ReduceSum", [softmax.outputs[0], _axes(model)], attributes={"keepdims": 1}, name="mix_heads")
    reduce.outputs[0].name = "mixed"
    reduce.outputs[0].dtype = ir.DataType.FLOAT
    reduce.outputs[0].shape = ir.Shape([None, 1, None, None])
    model.graph.insert_after(softmax, reduce)
    model.graph.outputs.append(reduce.outputs[0])
    blocks = analyze_attention(model).blocks
    assert blocks[0].supported and not blocks[1].supported
    assert "mix_heads (ReduceSum): reduces over the head axis" in blocks[1].reasons[0]


def _axes(model: ir.Model) -> ir.Value:
    value = ir.Value(name="axes_heads", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
    value.const_value = ir.tensor(np.array([1], dtype=np.int64), name="axes_heads")
    model.graph.register_initializer(value)
    return value


@pytest.mark.parametrize("name", ["llama-gqa", "bert"])
def test_head_tensors_have_consistent_widths(name):
    for block in analyze_attention(fresh(name)).blocks:
        for tensor in block.tensors:
            if tensor.merged or tensor.value.shape is None:
                continue
            dim = tensor.value.shape[tensor.axis]
            if isinstance(dim, int):
                assert dim == (block.num_heads if tensor.space == "q" else block.num_kv_heads)


def test_gpt2_gemm_projections():
    blocks = analyze_attention(fresh("gpt2")).blocks
    assert [b.name for b in blocks] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    block = blocks[0]
    assert block.supported, block.reasons
    assert block.projections["q"].matmul.op_type == "Gemm" and block.projections["q"].unflatten is not None
    assert block.projections["o"].matmul.op_type == "Gemm"
    assert block.merge.outputs[0].shape[-1] == 64 and len(block.merge.outputs[0].shape) == 2  # [-1, H*d]


def test_unrecognised_projection_is_reported():
    """A head split whose projection is not understood is listed with the reason, not silently skipped."""
    model = fresh("llama-gqa")
    block = analyze_attention(model).blocks[0]
    matmul = block.projections["k"].matmul
    weight = matmul.inputs[1]
    identity = ir.node("Identity", [weight], name="runtime_weight")
    identity.outputs[0].name = "k_weight_runtime"
    identity.outputs[0].shape, identity.outputs[0].type = weight.shape, weight.type
    model.graph.insert_before(matmul, identity)
    matmul.replace_input_with(1, identity.outputs[0])
    blocks = analyze_attention(model).blocks
    assert not blocks[0].supported and blocks[1].supported
    assert any("not a constant matrix" in reason for reason in blocks[0].reasons)


def test_attention_without_head_splits_is_reported():
    """A rank-4 Softmax that no proven block covers shows up as an unsupported block with the reason."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="lonely_softmax")],
        "g",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", 4, "s", "s"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", 4, "s", "s"])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    (block,) = analyze_attention(model).blocks
    assert not block.supported and "lonely_softmax" in block.reasons[0]


def _head_columns(start: int, stride: int, heads: int, d: int) -> list[list[int]]:
    return [[start + h * stride + j for j in range(d)] for h in range(heads)]


@pytest.mark.parametrize("order", ["qkv", "kvq"])
def test_fused_interleaved_roles_come_from_the_graph(order):
    """[heads, 3·head_dim] then Split: each role's columns follow from the graph, whatever the role order
    inside a head; module names (``block.fused``) say nothing."""
    (block,) = analyze_attention(fused_attention_model("interleaved", np.random.default_rng(0), order=order)).blocks
    assert block.supported, block.reasons
    assert (block.num_heads, block.num_kv_heads, block.head_dim, block.kv_map) == (4, 4, 4, [0, 1, 2, 3])
    for role in "qkv":
        columns = block.projections[role].columns.tolist()
        assert columns == _head_columns(order.index(role) * 4, 12, 4, 4), role
    assert block.summary()["fused_qkv"] and block.route is not None


def test_fused_multi_query_one_kv_head_broadcasts():
    """[heads + 2, head_dim]: q is a Slice of the head axis, k and v one head each (GatherND)."""
    (block,) = analyze_attention(fused_attention_model("multi-query", np.random.default_rng(0))).blocks
    assert block.supported, block.reasons
    assert (block.num_heads, block.num_kv_heads, block.kv_map) == (4, 1, [0, 0, 0, 0])
    assert block.projections["q"].columns.tolist() == _head_columns(0, 4, 4, 4)
    assert block.projections["k"].columns.tolist() == [list(range(16, 20))]
    assert block.projections["v"].columns.tolist() == [list(range(20, 24))]
    assert len(block.joins) == 2 and not block.repeats


def test_scaling_between_projection_and_head_split():
    (block,) = analyze_attention(fused_attention_model("scaled", np.random.default_rng(0))).blocks
    assert block.supported, block.reasons
    assert [n.name for n in block.projections["q"].scales] == ["pre_scale"]


def test_fused_columns_read_before_the_role_split_are_refused():
    """A reader of the fused [heads, 3·head_dim] tensor other than the role split mixes roles: refused."""
    model = fused_attention_model("interleaved", np.random.default_rng(0))
    heads = next(n for n in model.graph if n.name == "heads_t").outputs[0]
    spy = ir.node("ReduceSum", [heads], attributes={"keepdims": 0}, name="spy")
    spy.outputs[0].name = "spy_out"
    model.graph.append(spy)
    model.graph.outputs.append(spy.outputs[0])
    (block,) = analyze_attention(model).blocks
    assert not block.supported
    assert any("spy (ReduceSum) reads fused q/k/v columns before they are split by role" in r for r in block.reasons)
