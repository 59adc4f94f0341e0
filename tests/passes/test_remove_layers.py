"""remove-layers: zero residual branches go exactly; a depth plan removes layers and reports the error."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from prune2deploy.analysis.blocks import find_layers
from prune2deploy.analysis.summary import layer_summary
from prune2deploy.errors import BadInputError
from prune2deploy.feeds import random_feeds
from prune2deploy.passes.remove_layers import RemoveLayersPass, count_layers
from prune2deploy.verify import compare_outputs, verify_models
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import clone, ids_feeds, matmul_weights, run, snapshot
from tests.fixtures.models import tiny_bert, tiny_llama
from tests.fixtures.results import lm_metrics, outcome
from tests.fixtures.zeroing import zero_module

LLAMA_FEEDS = ids_feeds(128)
BERT_FEEDS = ids_feeds(100)


def _remove(model, **options) -> dict:
    return outcome(RemoveLayersPass(**options)(model))


def _assert_same(reference: bytes, compiled, feeds, rtol: float = 1e-5) -> None:
    for name, stats in compare_outputs(run(reference, feeds), run(compiled, feeds)).items():
        assert stats["max_rel"] <= rtol, (name, stats)


def test_zero_sub_blocks_llama_exact():
    model = fresh("llama-gqa", unshare=True)
    zero_module(model, "model.layers.0.self_attn.o_proj")
    zero_module(model, "model.layers.1.mlp.down_proj")
    reference = snapshot(model)
    record = _remove(model)
    assert record["exact"] and record["sub_blocks_removed"] == ["model.layers.0.self_attn", "model.layers.1.mlp"]
    assert record["layers_before"] == record["layers_after"] == 2
    assert not matmul_weights(model, "model.layers.0.self_attn.o_proj")  # the branch is gone, q/k/v too
    assert not matmul_weights(model, "model.layers.0.self_attn.q_proj")
    assert not matmul_weights(model, "model.layers.1.mlp.gate_proj")
    assert matmul_weights(model, "model.layers.0.mlp.down_proj")
    assert matmul_weights(model, "model.layers.1.self_attn.q_proj")
    assert sum(n.op_type == "Softmax" for n in model.graph) == 1
    _assert_same(reference, model, LLAMA_FEEDS)


def test_both_sub_blocks_zero_remove_the_layer_exactly():
    model = fresh("llama-gqa", unshare=True)
    zero_module(model, "model.layers.0.self_attn.o_proj")
    zero_module(model, "model.layers.0.mlp.down_proj")
    reference = snapshot(model)
    record = _remove(model)
    assert record["exact"] and record["layers_after"] == 1 and count_layers(model) == 1
    assert [layer.name for layer in find_layers(model) if layer.blocks] == ["model.layers.1"]
    _assert_same(reference, model, LLAMA_FEEDS)


def test_bert_post_norm_zero_branch_and_constant_branch():
    """Post-norm: the LayerNorm after the Add stays; a zero weight with a bias folds into Add(r, bias)."""
    model = fresh("bert", unshare=True)
    zero_module(model, "encoder.layer.1.output.dense")  # MLP branch adds 0
    zero_module(model, "encoder.layer.0.attention.output.dense", bias=0.3)  # attention adds 0.3 everywhere
    norms = sum(n.op_type == "LayerNormalization" for n in model.graph)
    reference = snapshot(model)
    record = _remove(model)
    assert record["exact"]
    assert record["sub_blocks_removed"] == ["encoder.layer.1.output"]
    assert record["constant_branches_folded"] == ["encoder.layer.0.attention"]
    assert sum(n.op_type == "LayerNormalization" for n in model.graph) == norms
    assert sum(n.op_type == "Softmax" for n in model.graph) == 1
    assert not matmul_weights(model, "encoder.layer.1.intermediate.dense")
    _assert_same(reference, model, BERT_FEEDS)


def test_nonzero_bias_is_reported_as_blocker():
    model = fresh("bert", unshare=True)
    zero_module(model, "encoder.layer.0.attention.output.dense", bias=0.3)
    rows = layer_summary(model)
    assert [r["layer"] for r in rows] == ["encoder.layer.0", "encoder.layer.1"]
    attention = rows[0]["sub_blocks"][0]
    assert attention["kind"] == "attention" and attention["constant"] and not attention["zero"]
    assert "branch output has bias" in attention["blocked_by"]
    assert rows[0]["sub_blocks"][1]["blocked_by"] == "output projection weight is not zero"
    assert rows[0]["hidden_width"] == 64 and not rows[0]["removable"]


def test_layer_summary_llama():
    model = fresh("llama-gqa", unshare=True)
    zero_module(model, "model.layers.1.self_attn.o_proj")
    zero_module(model, "model.layers.1.mlp.down_proj")
    rows = layer_summary(model)
    assert [(r["layer"], r["removable"], r["zero_sub_blocks"]) for r in rows] == [
        ("model.layers.0", False, []),
        ("model.layers.1", True, ["model.layers.1.self_attn", "model.layers.1.mlp"]),
    ]
    assert [b["kind"] for b in rows[0]["sub_blocks"]] == ["attention", "mlp"]
    assert all(r["hidden_width"] == 64 and r["zero_hidden_channels"] == 0 and r["droppable_by_plan"] for r in rows)


def _verify_error(reference: bytes, compiled, probe) -> tuple[float, dict]:
    """verify's reported error on one feed set, and the same error computed here from raw ORT outputs."""
    reported = verify_models(probe, compiled, exact=False, shapes=((3, 11),))
    feeds = random_feeds(probe, batch=3, seq=11, seed=0)
    ref, out = run(reference, feeds), run(compiled, feeds)
    mine = {k: float(np.max(np.abs(ref[k].astype(np.float64) - out[k])) / np.max(np.abs(ref[k]))) for k in ref}
    return reported, mine


def test_depth_plan_llama_matches_torch_without_the_layer():
    model = fresh("llama-gqa", unshare=True)
    probe = fresh("llama-gqa", unshare=True)
    reference = snapshot(model)
    record = _remove(model, layers=[1])
    assert not record["exact"] and record["layers_removed"] == ["model.layers.1"]
    assert record["approximate_layers"] == ["model.layers.1"] and record["layers_after"] == 1
    # independent: the torch model with layer 1 deleted computes what the compiled graph computes
    module = tiny_llama()
    module.model.layers = torch.nn.ModuleList([module.model.layers[0]])
    with torch.no_grad():
        ids = torch.from_numpy(LLAMA_FEEDS["input_ids"])
        expected = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.numpy()
    got = run(model, LLAMA_FEEDS)["logits"]
    assert np.max(np.abs(expected - got)) <= 1e-4 * np.max(np.abs(expected))
    # the reported error is finite and is what the outputs say
    reported, mine = _verify_error(reference, model, probe)
    assert np.isfinite(reported.worst) and reported.worst > 1e-3 and not reported.exact
    assert reported.outputs["logits"]["max_rel"] == pytest.approx(mine["logits"], rel=1e-5)
    metrics = lm_metrics(run(reference, LLAMA_FEEDS)["logits"], got)
    assert 0 < metrics["kl"] < 1 and 0 <= metrics["top1"] <= 1


def test_depth_plan_bert_last_layer_keeps_output_names():
    """The last layer's output is a graph output: it is re-bound (Identity) to the previous layer's output."""
    model = fresh("bert", unshare=True)
    probe = fresh("bert", unshare=True)
    reference = snapshot(model)
    record = _remove(model, layers=["encoder.layer.1"])
    assert record["layers_removed"] == ["encoder.layer.1"] and record["layers_after"] == 1
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state", "pooler_output"]
    module = tiny_bert()
    module.encoder.layer = torch.nn.ModuleList([module.encoder.layer[0]])
    with torch.no_grad():
        ids = torch.from_numpy(BERT_FEEDS["input_ids"])
        expected = module(input_ids=ids, attention_mask=torch.ones_like(ids))
    got = run(model, BERT_FEEDS)
    for name in ("last_hidden_state", "pooler_output"):
        want = getattr(expected, name).numpy()
        assert np.max(np.abs(want - got[name])) <= 1e-4 * np.max(np.abs(want)), name
    reported, mine = _verify_error(reference, model, probe)
    for name in ("last_hidden_state", "pooler_output"):
        assert reported.outputs[name]["max_rel"] == pytest.approx(mine[name], rel=1e-5)
        assert 0 < mine[name] < np.inf


def test_plan_of_zero_layer_is_exact_and_unknown_layer_is_an_error():
    model = fresh("llama-gqa", unshare=True)
    zero_module(model, "model.layers.0.self_attn.o_proj")
    zero_module(model, "model.layers.0.mlp.down_proj")
    reference = snapshot(model)
    record = _remove(clone(model), layers=[0])
    assert record["exact"] and record["layers_removed"] == ["model.layers.0"]
    record = _remove(model, layers=[0], detect_zero=False)
    assert record["exact"] and record["layers_after"] == 1
    _assert_same(reference, model, LLAMA_FEEDS)
    with pytest.raises(BadInputError, match="no layer 7"):
        _remove(fresh("llama-gqa", unshare=True), layers=[7])


def test_branch_not_ending_in_a_projection_is_left_alone():
    """A residual branch that ends in something other than a Linear is reported, not guessed at."""
    model = fresh("llama-gqa", unshare=True)
    zero_module(model, "model.layers.0.mlp.down_proj")
    ((down, _),) = matmul_weights(model, "model.layers.0.mlp.down_proj")
    uses = list(down.outputs[0].uses())
    relu = ir.node("Relu", [down.outputs[0]], name="extra_relu", metadata_props=dict(down.metadata_props))
    relu.outputs[0].shape, relu.outputs[0].type = down.outputs[0].shape, down.outputs[0].type
    for use in uses:
        use.node.replace_input_with(use.idx, relu.outputs[0])
    model.graph.insert_after(down, relu)
    rows = layer_summary(model)
    mlp = rows[0]["sub_blocks"][1]
    assert not mlp["removable"] and "not a linear projection" in mlp["blocked_by"]
    record = _remove(model)
    assert record["sub_blocks_removed"] == [] and record["layers_after"] == 2
    assert [where.split(" ")[0] for where in record["refused"]] == ["model.layers.0"]
    assert "not a linear projection" in next(iter(record["refused"].values()))


@pytest.mark.slow
def test_smollm2_six_zero_layers_removed_exactly(smollm2_onnx):
    """SmolLM2-135M (30 layers): six layers whose o_proj and down_proj are zero go, exactly."""
    model = fresh(smollm2_onnx, unshare=True)
    zeroed = [2, 7, 12, 17, 22, 27]
    for index in zeroed:
        zero_module(model, f"model.layers.{index}.self_attn.o_proj")
        zero_module(model, f"model.layers.{index}.mlp.down_proj")
    reference = snapshot(model)
    record = _remove(model)
    assert record["exact"] and (record["layers_before"], record["layers_after"]) == (30, 24)
    assert len(record["sub_blocks_removed"]) == 12 and record["refused"] == {}
    remaining = {layer.name for layer in find_layers(model) if layer.blocks}
    assert remaining == {f"model.layers.{i}" for i in range(30) if i not in zeroed}
    feeds = ids_feeds(49152, batch=2, seq=16)
    _assert_same(reference, model, feeds)


@pytest.mark.slow
def test_smollm2_depth_plan_reports_agreement(smollm2_onnx):
    """Minitron-style: drop two late layers of the real model; top-1 agreement stays high, KL is small."""
    model = fresh(smollm2_onnx, unshare=True)
    reference = snapshot(model)
    record = _remove(model, layers=[25, 26])
    assert not record["exact"] and record["layers_after"] == 28
    feeds = ids_feeds(49152, batch=2, seq=32, seed=1)
    metrics = lm_metrics(run(reference, feeds)["logits"], run(model, feeds)["logits"])
    assert np.isfinite(metrics["kl"]) and 0 < metrics["kl"] < 5 and metrics["top1"] > 0.2, metrics


def test_parallel_blocks_are_not_dropped_by_plan():
    """GPT-J-style parallel layer (x + attn(x) + mlp(x)): the exit is not the last residual Add found, so a
    depth plan must refuse the layer (with the reason) rather than cut it at the wrong value."""
    model = fresh("llama-gqa", unshare=True)
    layer = find_layers(model)[0]
    attn_add, mlp_add = (block.add for block in layer.blocks)
    x, h = attn_add.inputs[0], attn_add.outputs[0]
    for use in list(h.uses()):  # the MLP's norm reads x instead of h
        if use.node is not mlp_add:
            use.node.replace_input_with(use.idx, x)
    zero_module(model, "model.layers.0.self_attn.o_proj")
    reference = snapshot(model)
    (row, _) = layer_summary(model)
    assert not row["droppable_by_plan"] and "read inside the layer" in row["blocked_by"]
    assert len(row["sub_blocks"]) == 1 and row["sub_blocks"][0]["zero"]
    record = _remove(model, layers=[0])
    assert record["layers_removed"] == [] and list(record["refused"]) == ["model.layers.0"]
    assert record["exact"] and record["sub_blocks_removed"] == ["model.layers.0.self_attn"]  # exact part still runs
    _assert_same(reference, model, LLAMA_FEEDS)


def test_depth_plan_dropping_every_layer_is_refused_by_the_models_own_depth(tmp_path):
    """A plan without ``model.num_layers`` that drops both layers of the tiny Llama passes load_plan (it cannot
    know the depth) and is refused by the pass, which counts the graph's layers: exit 2, nothing removed."""
    from prune2deploy.driver.compile import resolve_plan
    from prune2deploy.pruning.plan import Plan, dump_plan
    from prune2deploy.spec import CompileOptions

    dump_plan(Plan("depth", "magnitude", {"layers": 0.5}, dropped_layers=[0, 1]), tmp_path / "plan.yaml")
    options = resolve_plan(CompileOptions(plan=tmp_path / "plan.yaml"))
    assert options.drop_layers == [0, 1]
    model = fresh("llama-gqa", unshare=True)
    with pytest.raises(BadInputError, match=r"drops all 2 layers of the model") as info:
        RemoveLayersPass(layers=options.drop_layers)(model)
    assert info.value.exit_code == 2 and count_layers(model) == 2
    assert _remove(fresh("llama-gqa", unshare=True), layers=[1])["layers_after"] == 1  # one of two still goes
