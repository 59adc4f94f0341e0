"""The op-category table: exclusive categories, and every op a rule module or engine handles is in one."""

from __future__ import annotations

import itertools

import pytest

from prune2deploy.analysis import attention, axis_rules, cost, head_axis, zero_rules
from prune2deploy.graph import op_categories as oc

ALL = frozenset().union(*oc.CATEGORIES.values())


def test_categories_are_exclusive():
    for (a, ops_a), (b, ops_b) in itertools.combinations(oc.CATEGORIES.items(), 2):
        assert not ops_a & ops_b, f"{sorted(ops_a & ops_b)} are both {a} and {b}"


def test_category_of_names_the_one_category():
    assert oc.category_of("LeakyRelu") == "activation"
    assert oc.category_of("Add") == "elementwise_binary"
    assert oc.category_of("Reshape") == "view"
    assert oc.category_of("NoSuchOp") is None


def test_zero_at_zero_is_a_subset_of_the_one_operand_ops():
    assert oc.ZERO_AT_ZERO <= oc.ELEMENTWISE_UNARY | oc.ACTIVATIONS | oc.VIEWS
    assert not oc.ZERO_AT_ZERO & {"Sigmoid", "Exp", "Cos", "Softplus", "HardSigmoid", "Not", "Reciprocal"}


@pytest.mark.parametrize(
    ("module", "ops"),
    [
        ("axis_rules.RULES", set(axis_rules.RULES)),
        ("head_axis", head_axis._UNARY | head_axis._NARY | head_axis._REDUCE),
        ("zero_rules", zero_rules._ZERO_PRESERVING | set(zero_rules._UNARY) | set(zero_rules._BINARY_EVAL)),
        ("zero_rules._CONST_LAYOUT", set(zero_rules._CONST_LAYOUT)),
        ("attention", set(attention._ZERO_PRESERVING)),
        ("cost.FLOPS_PER_ELEMENT", set(cost.FLOPS_PER_ELEMENT)),
    ],
)
def test_every_handled_op_is_categorised(module, ops):
    assert not ops - ALL, f"{module} handles ops the table does not categorise: {sorted(ops - ALL)}"


def test_every_torch_engine_op_is_categorised():
    onnx_ops = pytest.importorskip("prune2deploy.engines.onnx_ops")
    missing = set(onnx_ops.OPS) - ALL
    assert not missing, f"the torch engine implements uncategorised ops: {sorted(missing)}"


def test_the_elementwise_users_agree():
    """The lists that used to disagree: each user now reads the same elementwise ops."""
    unary = oc.ELEMENTWISE_UNARY | oc.ACTIVATIONS
    assert unary <= set(axis_rules._UNARY)
    assert set(axis_rules._BINARY) >= oc.ELEMENTWISE_BINARY
    assert unary - {"PRelu", "CastLike"} <= head_axis._UNARY  # both have a second operand (see head_axis)
    assert oc.ELEMENTWISE_BINARY == head_axis._NARY
    for op in ("LeakyRelu", "HardSwish", "PRelu", "Gelu", "Add", "Where"):
        assert cost._kind(op) == "elementwise"
    assert cost._kind("Reshape") == "free" and cost._kind("Transpose") == "data"


def test_the_cost_model_prices_exactly_the_normalizations():
    assert set(cost.FLOPS_PER_ELEMENT) == oc.NORMALIZATIONS
