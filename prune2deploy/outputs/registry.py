"""The output-writer registry: every folder besides ``model.onnx`` (genai/, hf/, …) declares itself here.

A writer module ends with one :func:`register_output` call naming the writer, its folder, what it needs
(a causal LM, the masked torch module, uniform layer widths), when it is on, and its ``write`` function.
The compile driver calls every enabled writer in ``order`` with an :class:`OutputContext`, puts each
:class:`OutputSection` into the report under the writer's name, and raises
:class:`~prune2deploy.errors.VerificationError` for a failed :class:`OutputCheck` after the output folder is
written (so the user can inspect it). Modules of this package are discovered by name
(:func:`load_writers`), like passes and engines; a module that registers nothing is a helper.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prune2deploy.outputs.lm import TorchModels

__all__ = [
    "OutputCheck",
    "OutputContext",
    "OutputSection",
    "OutputSpec",
    "load_writers",
    "not_written",
    "register_output",
]


@dataclass(frozen=True)
class OutputCheck:
    """The verdict of checking a written folder with the runtime that will serve it.

    Attributes:
        passed: the folder computes what ``model.onnx`` (or the masked model) does, within its tolerance.
        problem: what differs, in words, when it did not pass (the error's message; the report has the numbers).
        hint: what to make of it (``"This is a bug."``), appended to the error.
    """

    passed: bool
    problem: str = ""
    hint: str = ""


@dataclass
class OutputSection:
    """What one writer did: its report section (JSON values; ``written`` and, if not, ``reason``) and its check.

    ``check`` is None when the folder was not written, or when the writer's check is information, not a
    verdict.
    """

    section: dict[str, Any]
    check: OutputCheck | None = None
    #: A check that loads the written folder in its runtime, run by the driver after every writer is done and
    #: the torch modules are freed (a runtime's copy of the weights beside them would set the compile's peak
    #: memory: 8B, llama.cpp's 5.5 GB mapped file beside the sliced and masked modules, 24.9 GB); it returns
    #: the finished section.
    later: Callable[[], OutputSection] | None = None

    @property
    def written(self) -> bool:
        return bool(self.section.get("written"))


def not_written(reason: str, **details: Any) -> OutputSection:
    """The section of a folder that was asked for and is not written, with the reason."""
    return OutputSection({"written": False, "reason": reason, **details})


@dataclass
class OutputContext:
    """Everything a writer gets: where to write, the compiled model it must match, and the torch module.

    Attributes:
        folder: ``OUT/<spec.folder>`` inside the compile's staging folder (not created yet).
        model_path: the compile's verified ``model.onnx``.
        options: the compile options (``tolerance``, ``genai_context_length``, …).
        torch: the masked torch module, sliced once for every writer that needs it, with the approximate
            passes that are repeated in torch already repeated (:class:`~prune2deploy.outputs.lm.TorchModels`);
            None for writers that do not declare ``torch_module``.
        progress: one line per long step.
    """

    folder: Path
    model_path: Path
    options: Any
    torch: TorchModels | None = None
    progress: Callable[[str], None] = field(default=lambda _msg: None)


@dataclass(frozen=True)
class OutputSpec:
    """An output writer as the driver sees it.

    Attributes:
        name: its key in the report (``report["genai"]``) and in logs.
        folder: the folder it writes inside the output folder.
        order: writers run in this order (lower first); the ones that free the torch module go last.
        summary: what the folder is, one line (docs, ``--help``).
        write: context → :class:`OutputSection`. Raises
            :class:`~prune2deploy.errors.UnsupportedModelError` for a model it cannot write (the driver
            then removes the folder and reports the reason).
        causal_lm: needs a causal LM.
        torch_module: built from the masked torch module (so approximate passes must be repeated in torch,
            or it is not written).
        uniform_widths: needs every layer to keep the same widths (one config for all layers).
        option: the compile option that switches it (True on, False off, None: ``default``); None: no option.
        default: on, when its option is unset, for every input that has what it needs.
        references: for ``torch_module`` writers, takes what the check compares against with
            ``context.torch.reference(key, compute)`` (the same call in ``write`` then returns it). The driver
            calls every writer's ``references`` before any writer slices the module, then frees the masked
            module: the forward passes read all of it, and beside the sliced copy its pages set the peak.
    """

    name: str
    folder: str
    order: int
    summary: str
    write: Callable[[OutputContext], OutputSection]
    causal_lm: bool = False
    torch_module: bool = False
    uniform_widths: bool = False
    option: str | None = None
    default: bool = False
    references: Callable[[OutputContext], None] | None = None

    def requested(self, options: Any, *, fits: bool) -> bool:
        """Whether this compile asks for the folder: its option when given, else ``default`` where it ``fits``."""
        value = getattr(options, self.option, None) if self.option else None
        return bool(value) if value is not None else self.default and fits


_REGISTRY: dict[str, OutputSpec] = {}
_LOADED = False
_HELPERS = ("registry",)


def register_output(spec: OutputSpec) -> OutputSpec:
    """Adds a writer; two writers may not share a name or a folder."""
    for other in _REGISTRY.values():
        if other.name != spec.name and other.folder == spec.folder:
            raise RuntimeError(f"output writers {other.name} and {spec.name} both write {spec.folder}/")
    _REGISTRY[spec.name] = spec
    return spec


def load_writers() -> Mapping[str, OutputSpec]:
    """Imports every module of the outputs package once, so each registers itself; name → spec, in order."""
    global _LOADED
    if not _LOADED:
        import prune2deploy.outputs as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in _HELPERS:
                importlib.import_module(f"{package.__name__}.{info.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))
