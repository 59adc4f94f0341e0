"""fp64 copies: exact widening, which ops block it, and feeds cast to what each session declares."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from prune2deploy.ort_session import SessionRunner, make_session
from prune2deploy.verify.precision import cast_float_feeds, fp64_blockers, to_fp64
from tests.fixtures.exports import fresh
from tests.fixtures.graphs import snapshot


def test_llama_widens_to_fp64_and_computes_the_same_function():
    from prune2deploy.feeds import random_feeds

    model = fresh("llama-gqa")
    assert fp64_blockers(model) == []
    feeds = random_feeds(model, batch=2, seq=5, seed=0)
    fp32 = SessionRunner(make_session(snapshot(model))).run(feeds)["logits"]
    wide = to_fp64(fresh("llama-gqa"))
    assert all(v.const_value.dtype != ir.DataType.FLOAT for v in wide.graph.initializers.values())
    session = make_session(ir.to_proto(wide).SerializeToString())
    fp64 = SessionRunner(session).run(cast_float_feeds(session, feeds))["logits"]
    assert fp64.dtype == np.float64
    assert 0 < np.abs(fp64 - fp32).max() / np.abs(fp64).max() < 1e-5  # fp32's rounding, nothing more


def test_fused_and_float_only_ops_block_fp64():
    from tests.verify.test_whole import _erf_model

    assert fp64_blockers(_erf_model()) == ["Erf"]


def test_feeds_follow_the_session_types():
    from tests.verify.test_whole import _erf_model

    session = make_session(snapshot(_erf_model()))
    cast = cast_float_feeds(session, {"x": np.ones((1, 4)), "other": np.ones(2, dtype=np.int64)})
    assert cast["x"].dtype == np.float32 and cast["other"].dtype == np.int64
