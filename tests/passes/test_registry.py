"""The pass registry and the pipeline: names, order, options, typed results, errors that keep their code."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from prune2deploy.errors import BadInputError, ConfigError
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import PassOption, PassSpec, default_passes, get_pass, pass_names, register_pass
from prune2deploy.pipeline import build_passes, run_pipeline
from prune2deploy.spec import CompileOptions
from tests.fixtures.graphs import mlp_model


def test_registry_lists_every_pass_in_pipeline_order():
    assert pass_names() == (
        "remove-layers",
        "remove-channels",
        "remove-heads",
        "prune-hidden",
        "regroup-gqa",
        "sparsify-2:4",
        "convert-precision",
        "fuse-ort",
        "pack-matmuls",
    )
    assert default_passes() == ("remove-layers", "remove-channels", "remove-heads", "prune-hidden")
    orders = [get_pass(name).order for name in pass_names()]
    assert orders == sorted(orders)
    with pytest.raises(ConfigError, match=r"unknown pass 'fuse-everything'.*remove-channels"):
        get_pass("fuse-everything")


def test_option_keys_may_not_collide():
    clash = PassSpec(
        name="test-clash",
        order=99,
        exactness="yes",
        summary="declares an option another pass owns",
        options={"multiple_of": PassOption(int, 1, "clashes with remove-channels")},
        build=lambda o: None,
    )
    with pytest.raises(RuntimeError, match="remove-channels and test-clash both declare option"):
        register_pass(clash)
    assert "test-clash" not in pass_names()


def test_options_switch_their_passes_on_and_keep_order():
    options = CompileOptions(passes=["remove-channels"], kv_heads=1, drop_layers=[0])
    # fuse-ort joins by itself for the ONNX Runtime engine in fp32; --portable (or another engine) keeps it out.
    assert options.passes == ["remove-layers", "remove-channels", "regroup-gqa", "fuse-ort"]
    assert "fuse-ort" not in CompileOptions(portable=True).passes
    assert "fuse-ort" not in CompileOptions(engine="torch").passes
    assert "fuse-ort" not in CompileOptions(precision="fp16", passes=["convert-precision"]).passes
    passes = build_passes(options)
    assert [p.name for p in passes] == options.passes
    assert passes[2].groups == 1 and passes[0].layers == [0]


def test_option_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"option 'kv_heads'.*greater than or equal to 1"):
        CompileOptions(kv_heads=0)
    with pytest.raises(ConfigError, match="option 'gqa_grouping'"):
        CompileOptions(gqa_grouping="random")
    with pytest.raises(ConfigError, match="needs kv_heads"):
        CompileOptions(passes=["regroup-gqa"])
    with pytest.raises(ConfigError, match="convert-precision pass needs --precision fp16 or bf16"):
        CompileOptions(passes=["convert-precision"])
    with pytest.raises(ConfigError, match=r"cfg\.yaml: option 'colour': unknown option"):
        CompileOptions.from_dict({"colour": "red"}, source="cfg.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        CompileOptions.from_dict(["remove-channels"], source="cfg.yaml")


def test_a_run_that_changed_nothing_is_exact():
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    assert P2DResult(model, modified=False, exact=False).exact
    assert not P2DResult(model, modified=True, exact=False).exact


def test_pipeline_returns_each_pass_result(rng):
    model = mlp_model(rng, k=8, hidden=16, out=4)
    w2 = model.graph.initializers["W2"].const_value.numpy().copy()
    w2[:, :4] = 0  # fc2 (transB) reads four hidden channels with zero weights
    model.graph.initializers["W2"].const_value = ir.tensor(w2, name="W2")
    ShapeInferencePass()(model)
    options = CompileOptions(passes=["remove-channels", "sparsify-2:4"], sparsity="check", portable=True)
    result = run_pipeline(model, build_passes(options))
    assert [r.name for r in result.passes] == ["remove-channels", "sparsify-2:4"]
    channels, sparsify = result.passes
    assert channels.modified and channels.exact and channels.record["channels_removed"] == 4
    assert not sparsify.modified and sparsify.exact  # check mode changes nothing
    assert result.exact and result.approximate_passes == []
    entry = result.records()[0]
    assert set(entry) == {"pass", "exact", "modified", "record", "refused"}
    fc2 = next(node for node in model.graph if node.name == "fc2")
    assert fc2.inputs[1].const_value.shape == (4, 12)


def test_user_errors_inside_a_pass_keep_their_type(rng):
    class Refuses(P2DPass):
        name = "test-refuses"

        def call(self, model):
            raise BadInputError("remove-layers: no layer 99 in the model")

    with pytest.raises(BadInputError, match="no layer 99"):
        run_pipeline(mlp_model(rng, k=8, hidden=16, out=4), [Refuses()])


def test_refusals_are_one_mapping(rng):
    model = mlp_model(rng, k=8, hidden=16, out=4)
    result = get_pass("sparsify-2:4").build(CompileOptions(sparsity="impose"))(model)
    assert isinstance(result.refused, dict) and all(isinstance(v, str) for v in result.refused.values())
    assert np.isfinite(result.record["sparse_flops_fraction"])
