from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.analysis.nm import is_nm, nm_mask
from prune2deploy.errors import ConfigError
from prune2deploy.passes.registry import get_pass
from prune2deploy.passes.sparsify_nm import SparsifyNMPass
from tests.fixtures.graphs import conv_model, matmul_model, mlp_model, run
from tests.fixtures.results import outcome


def test_check_mode_reports_and_changes_nothing(rng):
    model = mlp_model(rng, k=8, hidden=16, out=4)
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    result = SparsifyNMPass(mode="check")(model)
    assert not result.modified
    record = outcome(result)
    assert (record["pass"], record["exact"]) == ("sparsify-2:4", True)
    assert (record["nodes"], record["eligible"], record["already_nm"], record["made_nm"]) == (3, 3, 0, 0)
    by_node = {w["node"]: w for w in record["weights"]}
    assert by_node["fc2"]["axis"] == 1 and by_node["fc2"]["k"] == 16 and by_node["fc2"]["shape"] == [4, 16]
    assert by_node["fc1"]["violations"] == 2 * 16  # dense: every group of 4 along K breaks 2:4
    assert record["sparse_flops_fraction"] == 0.0
    for name, array in before.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    assert all("p2d.sparsity" not in n.metadata_props for n in model.graph)


def test_impose_copies_shared_weight_and_tags_nodes(rng):
    model = mlp_model(rng, k=8, hidden=16, out=4)
    w1 = model.graph.initializers["W1"].const_value.numpy().copy()
    w2 = model.graph.initializers["W2"].const_value.numpy().copy()
    x = rng.standard_normal((3, 8)).astype(np.float32)
    dense = run(model, {"X": x})
    result = SparsifyNMPass(mode="impose", skip=["shared_*"])(model)
    assert result.modified
    record = outcome(result)
    assert record["exact"] is False
    by_node = {w["node"]: w for w in record["weights"]}
    assert by_node["shared_reader"]["skipped"] == "matches skip pattern 'shared_*'"
    assert by_node["fc1"]["copied"] and by_node["fc1"]["initializer"] == "W1_2of4"
    assert by_node["fc2"]["made_nm"] and not by_node["fc2"]["copied"]
    np.testing.assert_array_equal(model.graph.initializers["W1"].const_value.numpy(), w1)  # untouched
    new_w1 = model.graph.initializers["W1_2of4"].const_value.numpy()
    np.testing.assert_array_equal(new_w1, w1 * nm_mask(np.abs(w1), axis=0))
    new_w2 = model.graph.initializers["W2"].const_value.numpy()
    np.testing.assert_array_equal(new_w2, w2 * nm_mask(np.abs(w2), axis=1))  # transB=1: K is axis 1
    assert is_nm(new_w2, axis=1) and not is_nm(new_w2, axis=0)
    tags = {n.name: n.metadata_props.get("p2d.sparsity") for n in model.graph}
    assert tags == {"fc1": "2:4", "relu": None, "fc2": "2:4", "add": None, "shared_reader": None}
    # fc1 (256) + fc2 (128) of the 640 GEMM FLOPs at batch 1
    assert record["sparse_flops_fraction"] == pytest.approx(384 / 640)
    sparse = run(model, {"X": x})
    np.testing.assert_array_equal(sparse["H2"], dense["H2"])  # the skipped reader is unchanged
    expected = np.maximum(x @ new_w1, 0) @ new_w2.T * 2
    np.testing.assert_allclose(sparse["Y"], expected, rtol=1e-5, atol=1e-5)


def test_wanda_scores_use_activation_norms():
    weight = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    magnitude = matmul_model(weight)
    SparsifyNMPass(mode="impose", compute_cost=False)(magnitude)
    kept = magnitude.graph.initializers["W"].const_value.numpy()[:, 0]
    np.testing.assert_array_equal(kept, [0, 0, 3, 4])

    wanda = matmul_model(weight)
    norms = {"X": np.array([10.0, 10.0, 1.0, 1.0])}  # scores 10, 20, 3, 4
    SparsifyNMPass(mode="impose", criterion="wanda", norms=norms, compute_cost=False)(wanda)
    np.testing.assert_array_equal(wanda.graph.initializers["W"].const_value.numpy()[:, 0], [1, 2, 0, 0])


def test_wanda_errors_and_missing_norms():
    weight = np.ones((4, 2), np.float32)
    with pytest.raises(ConfigError, match="needs calibration norms"):
        SparsifyNMPass(mode="impose", criterion="wanda")
    with pytest.raises(ConfigError, match="K=4"):
        SparsifyNMPass(mode="impose", criterion="wanda", norms={"X": np.ones(3)})(matmul_model(weight))
    sparsify = SparsifyNMPass(mode="impose", criterion="wanda", norms={"other": np.ones(4)}, compute_cost=False)
    model = matmul_model(weight)
    result = sparsify(model)
    assert not result.modified
    assert result.record["weights"][0]["skipped"] == "no Wanda calibration norms for activation 'X'"


def test_conv_and_options(rng):
    model = conv_model(rng.standard_normal((3, 8, 3, 3)))
    sparsify = SparsifyNMPass(n=1, m=4, mode="impose", min_k=4)
    result = sparsify(model)
    assert sparsify.name == "sparsify-1:4" and result.name == "sparsify-1:4"
    weight = model.graph.initializers["W"].const_value.numpy()
    assert is_nm(weight, n=1, m=4, axis=1)
    assert np.count_nonzero(weight) == 3 * 2 * 9  # one of every four input channels kept
    assert result.record["sparse_flops_fraction"] == 1.0
    small = SparsifyNMPass(mode="impose", min_k=16)(conv_model(rng.standard_normal((3, 8, 3, 3))))
    assert small.record["weights"][0]["skipped"] == "K=8 is below min_k=16"
    assert small.refused == {"W": "K=8 is below min_k=16"}
    with pytest.raises(ConfigError, match="mode"):
        SparsifyNMPass(mode="sparsify")
    assert get_pass("sparsify-2:4").exactness == "no when imposing"


def test_already_sparse_weight_is_reported_not_rewritten(rng):
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    weight *= nm_mask(np.abs(weight), axis=0)
    model = matmul_model(weight)
    result = SparsifyNMPass(mode="impose")(model)
    assert not result.modified and result.exact
    assert result.record["already_nm"] == 1 and result.record["made_nm"] == 0
    assert next(iter(model.graph)).metadata_props["p2d.sparsity"] == "2:4"


def test_tiny_llama_skip_lm_head(tiny_llama_onnx):
    model = ir.load(str(tiny_llama_onnx))
    record = SparsifyNMPass(mode="impose", skip=["*lm_head"], cost_seq=16)(model).record
    assert (record["eligible"], record["made_nm"]) == (15, 14)
    skipped = [w for w in record["weights"] if w["skipped"]]
    assert [w["node"] for w in skipped] == ["node_linear_14"]
    assert 0.5 < record["sparse_flops_fraction"] < 1.0
