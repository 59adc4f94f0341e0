"""Name scopes moved to :mod:`prune2deploy.graph.scopes`; this module re-exports them for old imports."""

from prune2deploy.graph.scopes import SCOPE_KEY, layer_of, module_of, name_scopes, strip_prefix

__all__ = ["SCOPE_KEY", "layer_of", "module_of", "name_scopes", "strip_prefix"]
