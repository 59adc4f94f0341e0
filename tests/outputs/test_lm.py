"""TorchModels: references are taken from the masked module before slicing, which then runs without it held."""

from __future__ import annotations

import pytest
import torch

from prune2deploy.outputs.lm import TorchModels
from tests.fixtures.models import tiny_llama


def test_references_come_first_and_the_masked_module_is_not_held_beside_the_sliced_copy(monkeypatch):
    from prune2deploy.outputs import lm

    monkeypatch.setattr(lm, "RELEASE_BEFORE_SLICING_BYTES", 0)  # as for a model of a gigabyte or more
    loads = []

    def load():
        loads.append(tiny_llama())
        return loads[-1], None

    models = TorchModels(load, owned=True)
    seen = models.reference("logits", lambda target: target)
    assert seen is loads[0] and len(loads) == 1
    models.references_taken()
    assert models._module is None  # its pages, all read by the forward, are let go before slicing
    models.sliced()
    assert len(loads) == 2 and models._module is None  # loaded again to slice, dropped right after
    assert models.reference("logits", lambda target: pytest.fail("computed twice")) is loads[0]


def test_a_plan_makes_the_sliced_module_the_reference_before_slicing():
    models = TorchModels(lambda: (tiny_llama(), None), {"drop_layer_scopes": ["model.layers.1"]})
    assert models.changed  # known from the plan, before slicing: references are taken on the changed model
    target = models.reference("layers", lambda target: len(target.model.layers))
    assert target == 1 and models.dropped is not None


def test_a_callers_module_is_never_emptied_by_slicing():
    module = tiny_llama()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    models = TorchModels(lambda: (module, None))  # not owned: what api.compile gets as an nn.Module
    models.reference("x", lambda target: None)
    models.references_taken()
    models.sliced()
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_small_masked_module_is_kept_for_slicing_instead_of_loaded_again():
    loads = []
    models = TorchModels(lambda: (loads.append(1) or tiny_llama(), None), owned=True)
    models.reference("x", lambda target: None)
    models.references_taken()
    models.sliced()
    assert len(loads) == 1
