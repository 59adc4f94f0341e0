"""The compile's output step: which registered writers run, and what the torch module must repeat for them.

Writers (:mod:`prune2deploy.outputs.registry`) declare what they need; this module decides, per compile:

- which are asked for: a writer's option when given, else its default where the input has what it needs;
- whether the torch module can be the model in ``model.onnx``: each approximate run (modified, not exact)
  is looked up in the pass registry — ``repeat``: its ``torch_plan`` joins the plan the writers repeat;
  ``own-way``: a graph-only change (precision, fusion) each writer makes its own way; ``cannot``: writers
  built from the torch module are not written, and the report names the pass;
- a folder whose writer cannot write the model (an architecture it does not cover) is removed and the
  reason reported; the rest of the compile is unaffected.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune2deploy.driver.source import Source
from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.registry import OutputContext, OutputSection, OutputSpec, load_writers, not_written

__all__ = ["TorchPlan", "torch_plan", "write_outputs"]

log = logging.getLogger(__name__)


def write_outputs(
    loaded: Source,
    options: Any,
    staging: Path,
    records: Sequence[Mapping[str, Any]],
    progress: Callable[[str], None],
) -> dict[str, OutputSection]:
    """Runs every asked-for writer in order; name → its section (the report's key)."""
    specs = [spec for spec in load_writers().values() if spec.requested(options, fits=not _unmet(spec, loaded))]
    torch_specs = [spec for spec in specs if spec.torch_module]
    plan = torch_plan(records, options) if torch_specs else TorchPlan()
    refusal = plan.refusal([spec.folder for spec in torch_specs])
    if refusal:
        log.warning(refusal)
    models = None
    if torch_specs and not refusal and loaded.causal_lm:
        from prune2deploy.outputs.lm import TorchModels

        owned = loaded.kind != "torch"  # an nn.Module handed to api.compile is the caller's: never emptied
        models = TorchModels(_masked_module(loaded), plan.plan, owned=owned, progress=progress)
    refused, contexts = {}, {}
    for spec in specs:
        unmet = refusal if spec.torch_module and refusal else _unmet(spec, loaded)
        if unmet:
            refused[spec.name] = not_written(unmet)
        else:
            contexts[spec.name] = OutputContext(
                staging / spec.folder, staging / "model.onnx", options, models, progress
            )
    _take_references(specs, contexts, models)
    sections = {
        spec.name: refused[spec.name] if spec.name in refused else _write(spec, contexts[spec.name]) for spec in specs
    }
    return _run_later_checks(sections, models)


def _take_references(specs: Sequence[OutputSpec], contexts: Mapping[str, OutputContext], models: Any) -> None:
    """Every writer's check references from the masked module first, then the module is freed (before slicing).

    A writer whose references cannot be taken (a model it cannot write) is left to fail in its own ``write``.
    """
    takers = [spec for spec in specs if spec.references is not None and spec.name in contexts]
    if models is None or not takers:
        return
    for spec in takers:
        try:
            spec.references(contexts[spec.name])
        except UnsupportedModelError as exc:
            log.debug("%s/: no references taken (%s)", spec.folder, exc)
    models.references_taken()


def _run_later_checks(sections: dict[str, OutputSection], models: Any) -> dict[str, OutputSection]:
    """Runs the checks writers left for after the torch modules are freed (:attr:`OutputSection.later`)."""
    pending = [name for name, section in sections.items() if section.later is not None]
    if pending and models is not None:
        models.release_masked()
        models.release_sliced()
    for name in pending:
        sections[name] = sections[name].later()
    return sections


def _write(spec: OutputSpec, context: OutputContext) -> OutputSection:
    """One writer; a model it cannot write leaves no folder and says why."""
    try:
        if spec.uniform_widths and context.torch is not None:
            sliced = context.torch.sliced()
            reason = sliced.nonuniform_reason()
            if reason:
                log.warning("%s/ not written: %s", spec.folder, reason)
                section = not_written(reason, path=spec.folder, **sliced.summary())
                section.section["nonuniform_layers"] = sliced.nonuniform_layers()
                context.torch.note(section.section)
                return section
        return spec.write(context)
    except UnsupportedModelError as exc:
        shutil.rmtree(context.folder, ignore_errors=True)
        return not_written(str(exc))


@dataclass
class TorchPlan:
    """What writers built from the torch module must repeat, or why they cannot be the model in model.onnx.

    Attributes:
        plan: the merged ``torch_plan`` of the approximate runs to repeat (keys of ``outputs.lm.PLAN_KEYS``).
        cannot: approximate runs of passes that cannot be repeated in torch (``in_torch == "cannot"``).
        error: why a repeatable pass's plan could not be made for this run.
    """

    plan: dict[str, Any] = field(default_factory=dict)
    cannot: list[str] = field(default_factory=list)
    error: str = ""

    def refusal(self, folders: Sequence[str]) -> str:
        """Why ``folders`` (built from the torch module) are not written; '' when they can be."""
        if self.error:
            return self.error
        if not self.cannot:
            return ""
        names = " and ".join(f"{folder}/" for folder in folders)
        many = len(folders) > 1
        return (
            f"{names} {'are' if many else 'is'} built from the masked transformers module, which does not carry "
            f"the changes of the approximate pass(es) {', '.join(self.cannot)} that model.onnx has; "
            f"{'they' if many else 'it'} would be a different model than model.onnx, so "
            f"{'they are' if many else 'it is'} not written (compile without those passes for {names})"
        )


def torch_plan(records: Sequence[Mapping[str, Any]], options: Any) -> TorchPlan:
    """How the approximate runs among ``records`` (report entries) reach the torch module, per the pass
    registry: ``repeat`` runs' ``torch_plan``s merged, ``cannot`` runs named; ``own-way`` and ``carried``
    ask nothing of it."""
    from prune2deploy.passes.registry import get_pass

    result = TorchPlan()
    for entry in records:
        if not entry["modified"] or entry["exact"]:
            continue
        spec = get_pass(entry["pass"])
        if spec.in_torch == "cannot":
            result.cannot.append(spec.name)
        elif spec.in_torch == "repeat":
            try:
                result.plan.update(spec.torch_plan(options, entry["record"]))
            except UnsupportedModelError as exc:
                result.error = result.error or str(exc)
    return result


def _unmet(spec: OutputSpec, loaded: Source) -> str:
    """What the input lacks for this writer, in words ('' when nothing)."""
    if spec.causal_lm and not loaded.causal_lm:
        return (
            f"{spec.folder}/ is built from a transformers causal LM (model folder, GGUF, bundled name or module); "
            f"this input is {loaded.kind}" + (f" ({loaded.task})" if loaded.task else "")
        )
    if spec.torch_module and loaded.module is None and loaded.module_loader is None:
        return f"{spec.folder}/ is built from the transformers module; this input ({loaded.kind}) has none"
    return ""


def _masked_module(loaded: Source) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        """The masked module for the writers, which then hold the compile's only reference to it (freed when
        they are done with it; a cached export re-loads it from the checkpoint when asked again)."""
        module, tokenizer = loaded.masked_module()
        if loaded.module_loader is not None:
            loaded.module = None
        return module, tokenizer

    return load
