"""The pass registry: every pass module declares itself here, and everything else reads it.

A pass module ends with one :func:`register_pass` call naming the pass, its place in the pipeline, its
options (typed, with defaults, help text and CLI flags), when it switches on, and how to build it from the
options. The compile options (``spec.py``), the CLI's flags, the pipeline's order and the README's table
all come from these declarations, so adding a pass means adding its module (and its test) — nothing else.
Modules of this package are discovered by name (:func:`load_passes`); a module that registers nothing is a
helper.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from prune2deploy.errors import ConfigError

__all__ = [
    "STAGES",
    "TORCH_REPEATS",
    "PassOption",
    "PassSpec",
    "default_passes",
    "get_pass",
    "load_passes",
    "pass_names",
    "passes_in_stage",
    "register_pass",
]

#: What kind of change a pass makes; the driver, the CLI and the report ask this instead of a pass's name.
#: ``structural``: removes channels, heads or layers (shapes change: "was anything pruned?" looks here);
#: ``sparsity``: zeroes values in place for sparse tensor cores (shapes stay); ``precision``: changes tensor
#: types; ``finishing``: rewrites the finished graph for one runtime after its cost is taken (the cost model
#: counts standard ops), undone together when the finished graph does not load or verify.
Stage = Literal["structural", "sparsity", "precision", "finishing"]
STAGES: tuple[str, ...] = ("structural", "sparsity", "precision", "finishing")

#: How an output built from the masked torch module (genai/, hf/, …) repeats what the pass did to the graph.
#: ``carried``: the masked module already computes it (an exact removal of zeros; slicing removes them);
#: ``repeat``: :attr:`PassSpec.torch_plan` turns the pass's record into the writers' instructions;
#: ``own-way``: a graph-only change each writer makes its own way or not at all (precision, fusion);
#: ``cannot``: the writers would build a different model than ``model.onnx``, so they are not written.
TorchRepeat = Literal["carried", "repeat", "own-way", "cannot"]
TORCH_REPEATS: tuple[str, ...] = ("carried", "repeat", "own-way", "cannot")


@dataclass(frozen=True)
class PassOption:
    """One option of a pass: a key in compile options and config files, and optionally a CLI flag.

    Attributes:
        type: the value's type as pydantic validates it (``int``, ``list[int] | None``, ``Literal[...]``).
        default: the value when unset (a list default is copied per use).
        help: one line for ``--help`` and the docs.
        flag: the CLI flag (``"--drop-layers"``); None: config file and Python API only.
        parse: turns the flag's string into the value (default: the type's own parsing by pydantic).
        metavar: the flag's placeholder in ``--help``.
        enables: giving the option a non-default value switches the pass on.
        constraints: pydantic ``Field`` constraints (``{"ge": 1}``).
    """

    type: Any
    default: Any
    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    enables: bool = False
    constraints: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    """A pass as the rest of the tool sees it.

    Attributes:
        name: the pass's key (``--passes``, reports).
        order: position in the pipeline (lower runs first): layers first (less to analyse), precision last.
        exactness: for people (README, ``--help``): when the pass is exact.
        summary: what it removes or changes, one line.
        build: options → a configured pass instance (``options`` has every registered option as an
            attribute, plus the core compile options such as ``precision``).
        options: key → :class:`PassOption`.
        default: part of the default pipeline (the exact structural passes, which do nothing where
            nothing is zero).
        switch: a CLI flag that only switches the pass on (``--sparse-2-4``), with its help text.
        auto: core option values → whether the pass joins the pipeline by itself for them (fuse-ort: the
            ONNX Runtime engine in fp32, unless ``portable``). Unlike an option that ``enables`` it, this is
            not a request: a pass that joined this way may find nothing to change.
        check: options → None, or raises :class:`ConfigError` when the options cannot work together.
        stage: what kind of change the pass makes (:data:`STAGES`).
        engines: the engines that can run the graph it writes; None: every engine. A pass that joined by
            itself (``auto``) is left out for other engines; one the user asked for is an error there.
        sparse_weights: its output's weights are laid out for sparse tensor cores (the engine builds with
            sparse tactics).
        in_torch: how output writers built from the torch module repeat a run that was not exact
            (:data:`TORCH_REPEATS`; an exact run is carried by the masked module). The default, ``cannot``,
            is the safe one: a new approximate pass turns genai/ and hf/ off, with the pass named, until it
            says how they repeat it.
        torch_plan: for ``in_torch == "repeat"``: (options, the pass's record) → keyword arguments for the
            output writers (plain data); raises :class:`~prune2deploy.errors.UnsupportedModelError` when
            this run's change cannot be repeated (the writers then say why they were not written).
    """

    name: str
    order: int
    exactness: str
    summary: str
    build: Callable[[Any], Any]
    options: Mapping[str, PassOption] = field(default_factory=dict)
    default: bool = False
    switch: tuple[str, str] | None = None
    auto: Callable[[Mapping[str, Any]], bool] | None = None
    check: Callable[[Any], None] | None = None
    stage: Stage = "structural"
    engines: tuple[str, ...] | None = None
    sparse_weights: bool = False
    in_torch: TorchRepeat = "cannot"
    torch_plan: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise RuntimeError(f"pass {self.name}: stage '{self.stage}' is not one of {STAGES}")
        if self.in_torch not in TORCH_REPEATS:
            raise RuntimeError(f"pass {self.name}: in_torch '{self.in_torch}' is not one of {TORCH_REPEATS}")
        if (self.in_torch == "repeat") != (self.torch_plan is not None):
            raise RuntimeError(f"pass {self.name}: in_torch 'repeat' and torch_plan go together")

    @property
    def structural(self) -> bool:
        """Whether the pass removes structure (channels, heads, layers): what "nothing was pruned" asks."""
        return self.stage == "structural"

    def runs_on(self, engine: str) -> bool:
        """Whether ``engine`` can run the graph this pass writes."""
        return self.engines is None or engine in self.engines

    def enabled_by(self, values: Mapping[str, Any]) -> bool:
        """Whether options given a non-default value switch this pass on."""
        for key, option in self.options.items():
            if option.enables and key in values and values[key] not in (None, [], (), option.default):
                return True
        return False


_REGISTRY: dict[str, PassSpec] = {}
_LOADED = False


def register_pass(spec: PassSpec) -> PassSpec:
    """Adds a pass; its option keys must not collide with another pass's (config keys are flat)."""
    for other in _REGISTRY.values():
        if other.name == spec.name:
            continue
        shared = set(other.options) & set(spec.options)
        if shared:
            raise RuntimeError(f"passes {other.name} and {spec.name} both declare option(s) {sorted(shared)}")
    _REGISTRY[spec.name] = spec
    return spec


def load_passes() -> dict[str, PassSpec]:
    """Imports every module of the passes package once, so each registers itself; name → spec, in order."""
    global _LOADED
    if not _LOADED:
        import prune2deploy.passes as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in ("base", "registry"):
                importlib.import_module(f"{package.__name__}.{info.name}")
        _LOADED = True
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))


def pass_names() -> tuple[str, ...]:
    """Every registered pass, in pipeline order."""
    return tuple(load_passes())


def default_passes() -> tuple[str, ...]:
    """The default pipeline: the exact structural passes."""
    return tuple(name for name, spec in load_passes().items() if spec.default)


def passes_in_stage(*stages: str) -> tuple[str, ...]:
    """The registered passes of the given stages, in pipeline order."""
    return tuple(name for name, spec in load_passes().items() if spec.stage in stages)


def get_pass(name: str) -> PassSpec:
    """The spec of one pass; an unknown name is a :class:`ConfigError` that lists the known ones."""
    passes = load_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass '{name}'; choose from {', '.join(passes)}")
    return passes[name]
