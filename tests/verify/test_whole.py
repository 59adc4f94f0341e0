"""Whole-model verification: fp64 where the kernels allow, fp32 against a noise floor otherwise.

The deep GQA compile (tests/verify/conftest.py) is correct; one wrong channel or one wrong head must fail
it in both precisions, and the correct compile must pass in both.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.verify import (
    EXACT_TOLERANCE,
    NOISE_FACTOR,
    choose_precision,
    noise_floors,
    verdict_line,
    verify_models,
)
from prune2deploy.verify.feeds import feed_sets
from tests.fixtures.graphs import helper_model
from tests.verify.conftest import wrong_channel, wrong_head

SHAPES = ((2, 7),)


def test_correct_uneven_gqa_compile_passes_in_fp64(compiled_pair):
    reference, compiled = compiled_pair
    verification = verify_models(reference, compiled, exact=True, shapes=SHAPES)
    assert verification.precision == "fp64" and verification.status == "passed"
    assert verification.worst < 1e-12  # fp64 rounding only; fp32 rounding of the same compile is ~1e-7
    assert verification.floors == {} and verification.bound() == EXACT_TOLERANCE
    assert "in fp64" in verdict_line(verification.as_dict())


@pytest.mark.parametrize("make_wrong", [wrong_channel, wrong_head], ids=["channel", "head"])
def test_one_wrong_channel_or_head_fails_in_fp64(compiled_pair, make_wrong):
    reference, compiled = compiled_pair
    verification = verify_models(reference, make_wrong(compiled), exact=True, shapes=SHAPES)
    assert verification.precision == "fp64" and verification.status == "failed"
    assert verification.worst > 10 * EXACT_TOLERANCE  # its whole contribution (7e-3 here), not rounding
    assert verification.exceeded() == ["output 'logits'"]


def test_fp32_verdict_is_relative_to_the_measured_floor(compiled_pair):
    reference, compiled = compiled_pair
    correct = verify_models(reference, compiled, exact=True, shapes=SHAPES, precision="fp32")
    floor = correct.floors["logits"]
    assert correct.precision == "fp32" and correct.status == "passed"
    assert 0 < floor < 1e-5 and correct.worst < NOISE_FACTOR * floor  # rounding, at the floor's scale
    assert correct.bound() == max(EXACT_TOLERANCE, NOISE_FACTOR * floor)
    assert any("noise floor measured against the reference in fp64" in n for n in correct.notes)
    wrong = verify_models(reference, wrong_channel(compiled), exact=True, shapes=SHAPES, precision="fp32")
    assert wrong.status == "failed" and wrong.worst > 1000 * floor


def test_noise_floor_against_fp64_is_fp32_rounding(compiled_pair):
    reference, _ = compiled_pair
    sets = feed_sets(reference, shapes=SHAPES)
    floors, how = noise_floors(reference, sets)
    assert how == "fp64" and set(floors) == {"logits"}
    assert 1e-9 < floors["logits"] < 1e-5  # float32's 6e-8 per operation, over 6 layers


def test_approximate_pipeline_is_compared_in_fp32_and_never_passed(compiled_pair):
    reference, compiled = compiled_pair
    verification = verify_models(reference, wrong_channel(compiled), exact=False, shapes=SHAPES)
    assert verification.precision == "fp32" and verification.status == "approximate"
    assert verification.floors == {} and verification.worst > 1e-3


def _erf_model(scale: float = 1.0, output: str = "y") -> ir.Model:
    import onnx.helper as oh
    from onnx import TensorProto

    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Erf", ["h"], [output])]
    w = (np.arange(12, dtype=np.float32).reshape(4, 3) / 10) * scale
    return helper_model(
        nodes,
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [oh.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 3])],
        {"w": w},
    )


def test_ops_without_double_kernels_fall_back_to_fp32_with_a_floor():
    reference, compiled = _erf_model(), _erf_model()
    assert choose_precision(reference, compiled)[0] == "fp32"  # Erf: float only on ONNX Runtime's CPU
    verification = verify_models(reference, compiled, exact=True, shapes=((3, 1),))
    assert verification.precision == "fp32" and verification.status == "passed"
    assert verification.worst == 0.0 and "y" in verification.floors
    assert any("no fp64 CPU kernel for Erf" in n and "unoptimized fp32" in n for n in verification.notes)
    wrong = verify_models(reference, _erf_model(1.01), exact=True, shapes=((3, 1),))
    assert wrong.status == "failed" and wrong.worst > 1e-3


def test_fp64_that_does_not_fit_falls_back(compiled_pair):
    reference, compiled = compiled_pair
    precision, why = choose_precision(reference, compiled, available=1 << 20)
    assert precision == "fp32" and "would not fit" in why


def test_different_interfaces_are_bad_input():
    with pytest.raises(BadInputError, match="different inputs or outputs"):
        verify_models(_erf_model(), _erf_model(output="z"), exact=True, shapes=((2, 1),))
