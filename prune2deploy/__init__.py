"""prune2deploy: a deployment compiler for pruned neural networks.

Pruning that lives in masks or zeros gives no speed. prune2deploy exports the model to ONNX, makes the
pruning physical with graph passes, verifies the result against the masked reference and builds engines.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
