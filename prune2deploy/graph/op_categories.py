"""ONNX op types by what they compute: the one table that the rule modules, the cost model and the engines read.

Each op type is in at most one category (tested), so that "is this elementwise?" has one answer across
the channel analysis, the head proof, the zero rules and the cost model; before this table each kept its
own list and they disagreed (LeakyRelu, HardSwish and PRelu were elementwise to one module only).

A module that deliberately handles fewer ops derives its set from these categories and says why next to
it (the head proof follows single-operand ops only, so it leaves out PRelu). Properties that cut across
categories (:data:`ZERO_AT_ZERO`) are subsets of them. An op in no category is "other": the rule modules
have no rule for it and refuse, the cost model counts its bytes but no FLOPs.
"""

from __future__ import annotations

__all__ = [
    "ACTIVATIONS",
    "CATEGORIES",
    "CONTRIB_ACTIVATIONS",
    "CONVS",
    "DATA_MOVEMENT",
    "ELEMENTWISE_BINARY",
    "ELEMENTWISE_UNARY",
    "EQUATION_CONTRACTIONS",
    "FUSED_ATTENTION",
    "MATMULS",
    "NORMALIZATIONS",
    "POOLS",
    "REDUCTIONS",
    "VIEWS",
    "ZERO_AT_ZERO",
    "category_of",
]

#: One data operand, one output element per input element, no operand that could carry a channel
#: (Cast/CastLike read only a type; Dropout is the identity at inference; Clip's bounds are scalars).
ELEMENTWISE_UNARY = frozenset(
    {
        "Abs", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Sin", "Cos", "Tan", "Floor", "Ceil", "Round",
        "Sign", "Not", "IsNaN", "IsInf", "Cast", "CastLike", "Dropout",
    }
)  # fmt: skip

#: Standard ONNX activations: elementwise too; PRelu's slope is a second, broadcast operand.
ACTIVATIONS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "ThresholdedRelu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Elu", "Selu", "Celu", "Mish", "Softplus", "Softsign", "Clip",
    }
)  # fmt: skip

#: ONNX Runtime's (com.microsoft) fused activations; BiasGelu and FastGelu may take a bias operand.
CONTRIB_ACTIVATIONS = frozenset({"FastGelu", "QuickGelu", "BiasGelu"})

#: Elementwise over two or more operands with numpy broadcasting (Where: three; Max, Min, Mean, Sum: any).
ELEMENTWISE_BINARY = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less",
        "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "BitwiseAnd", "BitwiseOr",
        "BitwiseXor",
    }
)  # fmt: skip

#: Normalise over an axis (Softmax included: it normalises to a sum of 1), with the fused ORT variants.
NORMALIZATIONS = frozenset(
    {
        "Softmax", "LogSoftmax", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
        "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BatchNormalization",
        "InstanceNormalization", "GroupNormalization",
    }
)  # fmt: skip

#: Reduce, scan or select along axes (global pooling reduces the spatial axes).
REDUCTIONS = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin", "GlobalAveragePool",
        "GlobalMaxPool", "CumSum", "TopK",
    }
)  # fmt: skip

#: Windowed pooling.
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})

#: Dense contractions against a second operand.
MATMULS = frozenset({"MatMul", "Gemm"})
CONVS = frozenset({"Conv", "ConvTranspose"})
#: Contractions described by an equation; no module reads them as a MatMul.
EQUATION_CONTRACTIONS = frozenset({"Einsum"})

#: Fused attention ops (ONNX Runtime contrib ops): one kernel for the scores, softmax and weighted sum.
FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"})

#: Views and metadata: no arithmetic and no copy on any engine (Identity included).
VIEWS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant"})

#: Move, copy, index or generate data without arithmetic.
DATA_MOVEMENT = frozenset(
    {
        "Transpose", "Gather", "GatherND", "GatherElements", "Concat", "Slice", "Split", "Expand", "Tile",
        "Pad", "ScatterND", "ScatterElements", "DepthToSpace", "SpaceToDepth", "Resize", "Upsample",
        "ConstantOfShape", "Range", "Trilu", "NonZero",
    }
)  # fmt: skip

#: Every category by name, in the order :func:`category_of` reports them.
CATEGORIES: dict[str, frozenset[str]] = {
    "elementwise_unary": ELEMENTWISE_UNARY,
    "activation": ACTIVATIONS,
    "contrib_activation": CONTRIB_ACTIVATIONS,
    "elementwise_binary": ELEMENTWISE_BINARY,
    "normalization": NORMALIZATIONS,
    "reduction": REDUCTIONS,
    "pool": POOLS,
    "matmul": MATMULS,
    "conv": CONVS,
    "equation_contraction": EQUATION_CONTRACTIONS,
    "fused_attention": FUSED_ATTENTION,
    "view": VIEWS,
    "data_movement": DATA_MOVEMENT,
}

#: Single-operand ops with f(0) = 0, so a zero channel stays zero through them (a property, not a
#: category: a subset of the unary ops, activations and views). Sigmoid, Exp, Cos, Softplus … are not.
ZERO_AT_ZERO = frozenset(
    {
        "Relu", "LeakyRelu", "Gelu", "Erf", "Tanh", "HardSwish", "Elu", "Selu", "Celu", "Softsign", "Mish", "Neg",
        "Abs", "Sqrt", "Sin", "Floor", "Ceil", "Round", "Sign", "Identity", "Cast", "Dropout", "ThresholdedRelu",
        "IsNaN", "IsInf",
    }
)  # fmt: skip


def category_of(op_type: str) -> str | None:
    """The category name of ``op_type`` (a key of :data:`CATEGORIES`), or None when it has none."""
    for name, ops in CATEGORIES.items():
        if op_type in ops:
            return name
    return None
