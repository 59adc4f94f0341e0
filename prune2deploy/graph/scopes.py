"""Map ONNX nodes back to torch module names through the exporter's name-scope metadata.

The dynamo exporter records ``pkg.torch.onnx.name_scopes`` on every node: the chain of module paths from
the root to the op. Mask files and reports speak in module names, so this is the bridge.
"""

from __future__ import annotations

import ast
import re

import onnx_ir as ir

__all__ = ["SCOPE_KEY", "layer_of", "module_of", "name_scopes", "strip_prefix"]

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_NUMBERED = re.compile(r"\.\d+$")


def name_scopes(node: ir.Node) -> list[str]:
    """The module path chain recorded by the exporter ([] when absent)."""
    raw = node.metadata_props.get(SCOPE_KEY)
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    if not isinstance(scopes, (list, tuple)):
        return []
    # The exporter's placeholder for nodes made outside any module (symbolic sizes) is not a scope.
    return [s for s in scopes if isinstance(s, str) and s and not s.startswith("_empty_nn_module_stack")]


def module_of(node: ir.Node) -> str:
    """The innermost module that owns ``node`` (the last scope entry is the op's own name)."""
    scopes = name_scopes(node)[:-1]  # the last entry names the traced op (``linear_3``), not a module
    return scopes[-1] if scopes else ""


def layer_of(node: ir.Node) -> str:
    """The outermost numbered module (e.g. ``model.layers.3``) that owns ``node``, or ``""``.

    Outermost, so that everything inside a decoder block (its attention, its MLP) groups together.
    """
    for scope in name_scopes(node)[:-1]:
        if _NUMBERED.search(scope):
            return scope
    return ""


def strip_prefix(name: str, prefix: str) -> str:
    """Drops an export wrapper's attribute prefix (``m.model.layers.0`` -> ``model.layers.0``)."""
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name
