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


def test_pass_kinds_are_declared_on_the_registry():
    """Driver, CLI and report ask these instead of spelling pass names."""
    from prune2deploy.passes.registry import load_passes, passes_in_stage

    specs = load_passes()
    assert passes_in_stage("finishing") == ("fuse-ort", "pack-matmuls")
    assert [n for n, s in specs.items() if s.structural] == [
        "remove-layers",
        "remove-channels",
        "remove-heads",
        "prune-hidden",
        "regroup-gqa",
    ]
    assert [n for n, s in specs.items() if s.sparse_weights] == ["sparsify-2:4"]
    assert specs["fuse-ort"].runs_on("onnxruntime") and not specs["fuse-ort"].runs_on("tensorrt")
    assert specs["sparsify-2:4"].runs_on("tensorrt")
    assert {n for n, s in specs.items() if s.in_torch == "repeat"} == {"remove-layers", "regroup-gqa"}
    assert specs["sparsify-2:4"].in_torch == "cannot"


def test_torch_plans_turn_records_into_writer_instructions():
    from types import SimpleNamespace

    depth = get_pass("remove-layers").torch_plan
    assert depth(None, {"layers_removed": ["model.layers.3", "model.layers.7"]}) == {
        "drop_layer_scopes": ["model.layers.3", "model.layers.7"]
    }
    regroup = get_pass("regroup-gqa").torch_plan
    options = SimpleNamespace(kv_heads=1, gqa_grouping="similarity", gqa_method="mean")
    plan = regroup(options, {"per_block": {"model.layers.0": {"order": [2, 0, 1]}}})
    assert plan == {
        "regroup": {"kv_heads": 1, "grouping": "similarity", "method": "mean", "orders": {"model.layers.0": [2, 0, 1]}}
    }


def test_a_spec_must_say_how_to_repeat_what_it_repeats():
    with pytest.raises(RuntimeError, match="in_torch 'repeat' and torch_plan go together"):
        PassSpec(name="x", order=1, exactness="no", summary="", build=lambda o: None, in_torch="repeat")
    with pytest.raises(RuntimeError, match="stage 'fusing'"):
        PassSpec(name="x", order=1, exactness="no", summary="", build=lambda o: None, stage="fusing")


def test_readme_pass_table_is_the_registry():
    """The README's pass table lists every registered pass, in pipeline order, with its exactness."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\s*\| `([a-z0-9:-]+)` \| ([^|]+) \|", readme, flags=re.M)
    assert [name for name, _ in rows] == list(pass_names())
    for name, exactness in rows:
        assert exactness.replace("`", "").strip() == get_pass(name).exactness.replace("`", "").strip(), name


def test_a_registered_pass_runs_in_a_compile_and_is_reported(mlp_path, tmp_path):
    """docs/architecture.md "Adding a pass", exercised: a throw-away pass registered at run time is a valid
    --passes name, runs at its order, and its record reaches report.json. (Its options would need its module
    in the package: CompileOptions is built from the registry when first imported.)"""
    from prune2deploy import api
    from prune2deploy.passes import registry

    class CountNodesPass(P2DPass):
        name = "test-count-nodes"

        def __init__(self, *, at_least: int) -> None:
            super().__init__()
            self.at_least = at_least

        def call(self, model: ir.Model) -> P2DResult:
            return self.result(model, modified=False, nodes=len(model.graph), at_least=self.at_least)

    register_pass(
        PassSpec(
            name="test-count-nodes",
            order=15,
            exactness="yes",
            summary="counts nodes",
            build=lambda o: CountNodesPass(at_least=3),
        )
    )
    try:
        options = api.CompileOptions(
            passes=["remove-channels", "test-count-nodes"], portable=True, profile=False, quality_windows=0
        )
        assert options.passes == ["test-count-nodes", "remove-channels"]
        report = api.compile(mlp_path, tmp_path / "out", options).report
    finally:
        registry._REGISTRY.pop("test-count-nodes")
    entry = next(p for p in report["passes"] if p["pass"] == "test-count-nodes")
    assert entry["record"]["at_least"] == 3 and entry["record"]["nodes"] > 0 and entry["exact"]
    assert "test-count-nodes" not in pass_names()
