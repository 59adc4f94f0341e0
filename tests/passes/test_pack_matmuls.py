"""pack-matmuls: MatMuls that read one activation become one MatMul over the concatenated weights and a Split,
with the same outputs; shared weights are left alone; the pass is asked for and runs after fuse-ort."""

from __future__ import annotations

import numpy as np
from onnx import helper

from prune2deploy.passes.pack_matmuls import PackMatMulsPass
from prune2deploy.spec import CompileOptions
from tests.fixtures.graphs import helper_model, run, snapshot, tensor_info


def _three_projections(rng: np.random.Generator, *, shared: bool = False):
    """X → q, k, v projections (widths 6, 4, 4) → Concat → Y, and a fourth MatMul on another input."""
    weights = {name: rng.standard_normal((8, n)).astype(np.float32) for name, n in (("Wq", 6), ("Wk", 4), ("Wv", 4))}
    weights["Wo"] = rng.standard_normal((8, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["X", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["X", "Wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["X", "Wv" if not shared else "Wk"], ["v"], name="v_proj"),
        helper.make_node("Concat", ["q", "k", "v"], ["Y"], axis=-1, name="cat"),
        helper.make_node("MatMul", ["Z", "Wo"], ["W_out"], name="other"),
    ]
    inputs = [tensor_info("X", ["batch", "seq", 8]), tensor_info("Z", ["batch", 8])]
    outputs = [tensor_info("Y", ["batch", "seq", 14]), tensor_info("W_out", ["batch", 3])]
    return helper_model(nodes, inputs, outputs, weights)


def _ops(model) -> list[str]:
    return sorted(node.op_type for node in model.graph)


def test_projections_of_one_activation_become_one_matmul_and_a_split():
    rng = np.random.default_rng(0)
    model = _three_projections(rng)
    reference = snapshot(model)
    feeds = {
        "X": rng.standard_normal((2, 5, 8)).astype(np.float32),
        "Z": rng.standard_normal((2, 8)).astype(np.float32),
    }
    result = PackMatMulsPass()(model)
    assert result.modified and result.exact
    assert result.record["packed_matmuls"] == 3 and result.record["groups"] == 1
    assert result.record["widths"] == [[6, 4, 4]]
    assert _ops(model) == ["Concat", "MatMul", "MatMul", "Split"]  # the lone MatMul on Z stays
    assert {"Wq", "Wk", "Wv"}.isdisjoint(model.graph.initializers)  # the old weights are gone
    want, got = run(reference, feeds), run(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_a_shared_weight_and_a_lone_matmul_are_left_alone():
    rng = np.random.default_rng(1)
    model = _three_projections(rng, shared=True)  # k and v read one weight: only q could go, alone
    before = _ops(model)
    result = PackMatMulsPass()(model)
    assert not result.modified and _ops(model) == before


def test_pack_matmuls_is_asked_for_and_runs_after_the_fusions():
    assert "pack-matmuls" not in CompileOptions().passes  # no measurable gain on 2 CPU threads: not a default
    assert CompileOptions(passes=["pack-matmuls"]).passes[-2:] == ["fuse-ort", "pack-matmuls"]
    # standard ONNX ops: another engine may ask for it
    assert "pack-matmuls" in CompileOptions(passes=["pack-matmuls"], engine="tensorrt").passes


def test_compile_with_pack_matmuls_verifies_and_packs_every_layer(tmp_path):
    from prune2deploy import api
    from tests.fixtures.models import tiny_llama

    module = tiny_llama()
    options = CompileOptions(passes=["remove-channels", "pack-matmuls"], profile=False, genai=False)
    result = api.compile(module, tmp_path / "out", options)
    entry = next(p for p in result.report["passes"] if p["pass"] == "pack-matmuls")
    layers = module.config.num_hidden_layers
    assert entry["modified"] and entry["record"]["groups"] == 2 * layers  # Q/K/V and gate/up per layer
    assert result.passed and result.report["verification"]["exact"]
