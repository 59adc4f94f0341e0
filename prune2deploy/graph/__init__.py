"""Graph utilities shared by the frontends, the analyses and the passes.

Constants, attributes, static dims, fresh initializers and name scopes, each with one documented meaning.
This package imports only ``onnx_ir`` and ``numpy``: everything else in prune2deploy may import it.
"""

from prune2deploy.graph.attributes import attr_value, float_attr, int_attr, ints_attr, string_attr
from prune2deploy.graph.constants import all_zero, const_array, const_value_array, is_const, zero_channels
from prune2deploy.graph.dims import dim_value, rank, same_dim, set_dim, shape_entries, static_dim, value_dim
from prune2deploy.graph.initializers import (
    NameCounter,
    add_initializer,
    owned_array,
    replace_const,
    replace_input_with_array,
    unique_name,
)
from prune2deploy.graph.scopes import SCOPE_KEY, layer_of, module_of, name_scopes, strip_prefix

__all__ = [
    "SCOPE_KEY",
    "NameCounter",
    "add_initializer",
    "all_zero",
    "attr_value",
    "const_array",
    "const_value_array",
    "dim_value",
    "float_attr",
    "int_attr",
    "ints_attr",
    "is_const",
    "layer_of",
    "module_of",
    "name_scopes",
    "owned_array",
    "rank",
    "replace_const",
    "replace_input_with_array",
    "same_dim",
    "set_dim",
    "shape_entries",
    "static_dim",
    "string_attr",
    "strip_prefix",
    "unique_name",
    "value_dim",
    "zero_channels",
]
