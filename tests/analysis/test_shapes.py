from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from prune2deploy.analysis.cost import model_cost
from prune2deploy.analysis.shapes import concrete_shapes, input_shapes
from prune2deploy.errors import BadInputError
from tests.fixtures.graphs import helper_model, matmul_model


def test_input_shapes_from_batch_seq_and_explicit(rng):
    model = matmul_model(rng.standard_normal((8, 4)))
    assert input_shapes(model, None, 3, 5) == {"X": (3, 5, 8)}
    assert input_shapes(model, {"X": [2, 9, 8]}, 3, 5) == {"X": (2, 9, 8)}
    with pytest.raises(BadInputError, match="rank 3"):
        input_shapes(model, {"X": [2, 8]}, 1, 1)
    info = concrete_shapes(model, batch=3, seq=5)
    assert (info.shapes["Y"], info.source, info.unknown) == ((3, 5, 4), "inference", ())
    assert info.shapes["W"] == (8, 4)


def test_onnxruntime_fallback_for_data_dependent_shapes():
    nodes = [
        helper.make_node("NonZero", ["X"], ["idx"], name="nz"),
        helper.make_node("Cast", ["idx"], ["Y"], name="cast", to=TensorProto.FLOAT),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, "nnz"])
    model = helper_model(nodes, [x], [y], {})
    info = concrete_shapes(model, batch=3, fallback=False)
    assert info.unknown == ("idx", "Y")
    info = concrete_shapes(model, batch=3)
    assert info.source == "inference+onnxruntime"
    assert info.shapes["idx"] == (2, 12)  # random normal feeds have no zeros
    cast = model_cost(model, batch=3).nodes[1]
    assert (cast.flops, cast.bytes_read, cast.bytes_written) == (24, 24 * 8, 24 * 4)
    skipped = model_cost(model, batch=3, fallback_max_bytes=-1)
    assert skipped.unknown == ("idx", "Y")
    assert not skipped.nodes[1].shapes_known


def test_bf16_graph_is_not_run_on_onnxruntime_for_shapes():
    """ORT's CPU has no bf16 Mul: the shape run would fail on every bf16 LLM (logged as a warning twice per
    compile); it is not tried, and the unknown shapes stay lower bounds."""
    import logging

    nodes = [
        helper.make_node("NonZero", ["X"], ["idx"], name="nz"),
        helper.make_node("Cast", ["idx"], ["Y"], name="cast", to=TensorProto.BFLOAT16),
    ]
    x = helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", 4])
    y = helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, [2, "nnz"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("prune2deploy.analysis.shapes")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        info = concrete_shapes(helper_model(nodes, [x], [y], {}), batch=3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (info.source, info.unknown) == ("inference", ("idx", "Y"))
    assert any("cannot run this bf16 graph" in r.getMessage() for r in records)
    assert not [r for r in records if r.levelno >= logging.WARNING]
