"""The output step's policy: how approximate runs reach the writers built from the torch module."""

from __future__ import annotations

import pytest

from prune2deploy.driver.writers import torch_plan
from prune2deploy.passes import registry as passes
from prune2deploy.spec import CompileOptions


def _entry(name: str, *, modified: bool = True, exact: bool = False, **record) -> dict:
    return {"pass": name, "modified": modified, "exact": exact, "record": record, "refused": {}}


@pytest.fixture
def new_approximate_pass(monkeypatch):
    """A pass registered without saying how the torch module repeats it: ``in_torch`` defaults to cannot."""
    passes.load_passes()
    spec = passes.PassSpec(
        name="smooth-weights", order=95, exactness="no", summary="a new approximate pass", build=lambda o: None
    )
    monkeypatch.setitem(passes._REGISTRY, spec.name, spec)
    return spec


def test_a_new_approximate_pass_keeps_torch_writers_from_writing_and_is_named(new_approximate_pass):
    assert new_approximate_pass.in_torch == "cannot"
    plan = torch_plan([_entry("remove-channels", exact=True), _entry("smooth-weights")], CompileOptions())
    reason = plan.refusal(["hf", "genai"])
    assert plan.cannot == ["smooth-weights"] and "approximate pass(es) smooth-weights" in reason
    assert reason.startswith("hf/ and genai/ are built from the masked transformers module")
    assert plan.refusal(["genai"]).startswith("genai/ is built from") and "it is not written" in plan.refusal(["genai"])
    # a run that changed nothing, or was exact, asks nothing of the torch module
    quiet = torch_plan([_entry("smooth-weights", modified=False), _entry("smooth-weights", exact=True)], None)
    assert quiet.refusal(["genai"]) == "" and quiet.plan == {}


def test_repeated_passes_merge_their_torch_plans_and_own_way_passes_ask_nothing():
    options = CompileOptions(kv_heads=1, drop_layers=[1])
    records = [
        _entry("remove-layers", layers_removed=["model.layers.1"]),
        _entry("regroup-gqa", per_block={}),
        _entry("convert-precision"),
    ]
    plan = torch_plan(records, options)
    assert plan.refusal(["genai"]) == "" and plan.cannot == []
    assert plan.plan == {
        "drop_layer_scopes": ["model.layers.1"],
        "regroup": {"kv_heads": 1, "grouping": "adjacent", "method": "mean"},
    }


def test_checks_left_for_later_run_after_the_torch_modules_are_freed():
    from prune2deploy.driver.writers import _run_later_checks
    from prune2deploy.outputs.registry import OutputCheck, OutputSection

    events = []

    class Models:
        def release_masked(self):
            events.append("masked freed")

        def release_sliced(self):
            events.append("sliced freed")

    def check():
        events.append("checked")
        return OutputSection({"written": True, "checked": True}, check=OutputCheck(True))

    sections = {"hf": OutputSection({"written": True}), "gguf": OutputSection({"written": True}, later=check)}
    done = _run_later_checks(sections, Models())
    assert events == ["masked freed", "sliced freed", "checked"]
    assert done["gguf"].section["checked"] and done["gguf"].check.passed and done["hf"].later is None
    events.clear()  # nothing left for later: the modules stay as they are
    _run_later_checks({"hf": OutputSection({"written": True})}, Models())
    assert events == []


def test_every_writers_references_are_taken_before_the_masked_module_is_freed():
    from types import SimpleNamespace

    from prune2deploy.driver.writers import _take_references
    from prune2deploy.errors import UnsupportedModelError

    events = []

    def refuse(_context):
        raise UnsupportedModelError("not this family")  # left for its own write to report

    specs = [
        SimpleNamespace(name="hf", folder="hf", references=lambda c: events.append(("hf", c))),
        SimpleNamespace(name="gguf", folder="gguf", references=refuse),
        SimpleNamespace(name="genai", folder="genai", references=lambda c: events.append(("genai", c))),
        SimpleNamespace(name="skipped", folder="skipped", references=lambda c: events.append(("skipped", c))),
    ]
    models = SimpleNamespace(references_taken=lambda: events.append("freed"))
    _take_references(specs, {"hf": "ctx-hf", "gguf": "ctx-gguf", "genai": "ctx-genai"}, models)
    assert events == [("hf", "ctx-hf"), ("genai", "ctx-genai"), "freed"]  # a writer not run takes none
