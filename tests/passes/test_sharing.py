"""Un-sharing gives each reader a read-only view of one buffer; re-sharing joins them without copies."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from prune2deploy.passes.sharing import reshare_initializers, unshare_initializers
from tests.fixtures.graphs import helper_model, tensor_info


def _tied(rng, tmp_path=None):
    """Two MatMuls reading one weight, held as numpy (or, with ``tmp_path``, as mapped external data) — the
    forms compile's tensors have (a model read from a file, or built by a pass)."""
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["A"], name="first"),
        helper.make_node("MatMul", ["X", "W"], ["B"], name="second"),
        helper.make_node("Add", ["A", "B"], ["Y"], name="add"),
    ]
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    model = helper_model(nodes, [tensor_info("X", ["batch", 8])], [tensor_info("Y", ["batch", 8])], {"W": weight})
    if tmp_path is None:
        value = model.graph.initializers["W"]
        value.const_value = ir.tensor(weight, name="W")
        return model
    ir.save(model, str(tmp_path / "tied.onnx"), external_data="tied.onnx.data", size_threshold_bytes=0)
    return ir.load(str(tmp_path / "tied.onnx"))


@pytest.mark.parametrize("external", [False, True])
def test_unshared_readers_view_one_read_only_buffer_and_rejoin(rng, tmp_path, external):
    model = _tied(rng, tmp_path if external else None)
    assert unshare_initializers(model) == 1
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values()]
    assert len(arrays) == 2 and np.shares_memory(arrays[0], arrays[1])
    with pytest.raises(ValueError, match="read-only"):
        arrays[1][0, 0] = 1.0  # a pass writing in place would change the other reader: it fails instead
    readers = [node.inputs[1] for node in model.graph if node.op_type == "MatMul"]
    assert readers[0] is not readers[1]
    reshare_initializers(model)
    assert len(model.graph.initializers) == 1
    readers = [node.inputs[1] for node in model.graph if node.op_type == "MatMul"]
    assert readers[0] is readers[1]


def test_a_replaced_view_is_not_rejoined(rng):
    model = _tied(rng)
    unshare_initializers(model)
    copy = next(v for name, v in model.graph.initializers.items() if name != "W")
    from prune2deploy.graph.initializers import replace_const

    replace_const(copy, copy.const_value.numpy() * 2)  # what a pass does: new contents, new buffer
    reshare_initializers(model)
    assert len(model.graph.initializers) == 2


def test_distinct_tensors_decoded_per_read_are_never_joined(rng):
    """Protobuf-held tensors decode to a fresh array per read; a freed array's address may be reused by the
    next one, which must not make two different weights look like views of one buffer."""
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=f"m{i}") for i in range(6)]
    weights = {f"W{i}": rng.standard_normal((8, 8)).astype(np.float32) for i in range(6)}
    outputs = [tensor_info(f"Y{i}", ["batch", 8]) for i in range(6)]
    model = helper_model(nodes, [tensor_info("X", ["batch", 8])], outputs, weights)
    reshare_initializers(model)
    assert sorted(model.graph.initializers) == sorted(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)


def test_reshare_takes_strided_views_that_a_rewrite_left():
    import numpy as np
    import onnx_ir as ir

    from prune2deploy.passes.sharing import reshare_initializers

    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = ir.Value(name="x", shape=ir.Shape([4, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    consts = []
    for name in ("a", "b"):  # equal strided views (a transpose): the hashing pass needs contiguous buffers
        value = ir.Value(name=name, shape=ir.Shape([4, 3]), type=ir.TensorType(ir.DataType.FLOAT))
        value.const_value = ir.tensor(base.T, name=name)
        consts.append(value)
    nodes = [ir.node("Add", [x, consts[0]]), ir.node("Add", [x, consts[1]])]
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=consts, opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    reshare_initializers(model)
    assert len(model.graph.initializers) == 1
    np.testing.assert_array_equal(next(iter(model.graph.initializers.values())).const_value.numpy(), base.T)


def _six_weights(rng, tmp_path):
    """Six mapped (external-data) weights: W0 = W1 (equal bytes, separate copies), W2 equal to W0 in its first
    4096+ bytes but not its last, W3-W5 unrelated."""
    first = rng.standard_normal((64, 64)).astype(np.float32)
    late_change = first.copy()
    late_change[-1, -1] += 1.0
    weights = [first, first.copy(), late_change, *(rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))]
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"], name=f"m{i}") for i in range(6)]
    outputs = [tensor_info(f"Y{i}", ["batch", 64]) for i in range(6)]
    inits = {f"W{i}": w for i, w in enumerate(weights)}
    model = helper_model(nodes, [tensor_info("X", ["batch", 64])], outputs, inits)
    ir.save(model, str(tmp_path / "six.onnx"), external_data="six.onnx.data", size_threshold_bytes=0)
    return ir.load(str(tmp_path / "six.onnx")), weights


def test_equal_mapped_weights_join_and_a_late_difference_keeps_them_apart(rng, tmp_path, monkeypatch):
    from prune2deploy.passes import sharing

    model, weights = _six_weights(rng, tmp_path)
    whole_reads = []
    digest = sharing.hashlib.blake2b
    monkeypatch.setattr(
        sharing.hashlib, "blake2b", lambda data, **kw: whole_reads.append(data.nbytes) or digest(data, **kw)
    )
    reshare_initializers(model)
    assert sorted(model.graph.initializers) == ["W0", "W2", "W3", "W4", "W5"]
    readers = {node.name: node.inputs[1].name for node in model.graph}
    assert readers["m1"] == "W0"
    assert len(whole_reads) == 3  # only the group whose first page agrees is read whole: W0, W1, W2
    assert all(
        not isinstance(v.const_value, ir.ExternalTensor) or v.const_value.raw is None
        for name, v in model.graph.initializers.items()
        if name in ("W0", "W2")
    )  # unmapped after the read
    np.testing.assert_array_equal(model.graph.initializers["W2"].const_value.numpy(), weights[2])
