"""Unmapping a model's memory-mapped weights: the pages it has read stop counting in the process's memory.

A weight of a model loaded from external data (``frontends.onnx.load_onnx``) is a view of a mapped file; every
page read stays resident, and counts in the RSS, until its mapping closes, whether or not it is read again. A
step that needs only some weights after one that read them all (block-by-block verification after the
passes) holds them all otherwise.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

__all__ = ["release_mapped", "release_tensor"]

log = logging.getLogger(__name__)


def release_mapped(model: ir.Model) -> None:
    """Unmaps the memory-mapped weights of ``model`` (they are mapped again if read later).

    A mapping that arrays still view stays mapped: a rewrite may have made a new tensor as a view of a mapped
    weight (onnxscript's ORT fusions do), and closing the map under it would be an error (``BufferError``).
    """
    viewed = []
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            try:
                value.const_value.release()
            except BufferError:
                viewed.append(value.name)
    if viewed:
        log.debug("still mapped (an array views them): %s", ", ".join(viewed))


def release_tensor(value: ir.Value) -> None:
    """Unmaps ``value``'s weight if it is memory-mapped and no array views it (it maps again if read)."""
    tensor = value.const_value
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            log.debug("still mapped (an array views it): %s", value.name)
