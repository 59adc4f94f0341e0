"""The weightless probe copy: shapes and sequence bounds from it equal those of the real model's run."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from prune2deploy.analysis.probe import WEIGHT_MIN_ELEMENTS, weightless_model
from prune2deploy.analysis.shapes import _feeds, input_shapes, sequence_limit
from prune2deploy.ort_session import make_session
from tests.fixtures.exports import fresh


def _all_shapes(model: ir.Model, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """Every node output's shape from one ONNX Runtime run of ``model`` with all of them exposed."""
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for node in model.graph:
        for value in node.outputs:
            if value.name and value.name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=value.name))
    session = make_session(proto.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    feeds = _feeds(model, input_shapes(model, None, batch, seq), 0)
    return {n: a.shape for n, a in zip(names, session.run(names, feeds), strict=True)}


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "bert"])
def test_weightless_copy_runs_to_the_same_shapes(name):
    model = fresh(name)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items() if v.const_value}
    probe = weightless_model(model)
    large = [
        v
        for v in probe.graph.initializers.values()
        if v.const_value is not None and v.const_value.size >= WEIGHT_MIN_ELEMENTS
    ]
    assert all(not v.const_value.dtype.is_floating_point() for v in large)
    generated = sum(
        v.const_value.nbytes
        for v in model.graph.initializers.values()
        if v.const_value.dtype.is_floating_point() and v.const_value.size >= WEIGHT_MIN_ELEMENTS
    )
    assert generated > 0
    size, full = (len(ir.to_proto(m).SerializeToString()) for m in (probe, model))
    assert size <= full - generated + (1 << 16)  # the weights are not in it
    real, probed = _all_shapes(model, 2, 5), _all_shapes(probe, 2, 5)
    assert {k: probed[k] for k in real} == real
    after = {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if v.const_value}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_sequence_bound_is_read_from_the_weightless_run():
    limit = sequence_limit(fresh("gpt2"))
    assert limit is not None and limit.max_seq == 64 and "64 rows" in limit.where


def test_each_generated_weight_waits_for_its_reader_input():
    """A generator with no run-time input would run first in ONNX Runtime: every weight alive at once."""
    probe = weightless_model(fresh("llama-gqa"))
    inputs = set(probe.graph.inputs)

    def reaches_input(value: ir.Value, seen: set[int]) -> bool:
        if value in inputs:
            return True
        node = value.producer()
        if node is None or id(node) in seen:
            return False
        seen.add(id(node))
        return any(v is not None and reaches_input(v, seen) for v in node.inputs)

    generators = [n for n in probe.graph if n.op_type == "Expand" and n.name.startswith("p2d_probe_")]
    assert generators and all(reaches_input(n.outputs[0], set()) for n in generators)
