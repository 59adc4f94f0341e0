"""The masked torch module of a causal LM, sliced once for every output writer built from it (genai/, hf/, …).

Writers built from the torch module must write the model in ``model.onnx``. The masked module carries what
the exact passes removed (zero neurons, heads, layers: slicing removes them too), and the approximate
passes that can be repeated in torch arrive as a plan (their registrations' ``torch_plan``): ``regroup``
pools K/V the pass's way (:mod:`prune2deploy.outputs.regroup`), ``drop_layer_scopes`` deletes the depth
plan's layers (:mod:`prune2deploy.outputs.depth`). A writer then checks its folder against ``model.onnx``
as well (:attr:`TorchModels.changed`).

Memory: this object holds the compile's only reference to the module, so that a writer can free the masked
module (:meth:`TorchModels.release_masked`) as soon as it has what it needs of it, and the sliced one before
its checks load the written folder (at 1B parameters 4.9 and 3.3 GB). A released module is loaded (and
sliced) again if a later writer asks for it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from typing import Any

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.outputs.fp32 import is_half_precision
from prune2deploy.outputs.slice import SliceResult

__all__ = ["PLAN_KEYS", "TorchModels"]

log = logging.getLogger(__name__)

#: What a pass's ``torch_plan`` may ask of the torch module, and the writers understand.
PLAN_KEYS = ("regroup", "drop_layer_scopes")


#: A masked module at least this large is dropped between taking the references and slicing (and loaded again
#: to slice); a smaller one is kept: re-loading it would cost more time than its pages cost memory.
RELEASE_BEFORE_SLICING_BYTES = 1 << 30


def _module_bytes(module: Any) -> int:
    module = getattr(module, "module", module)
    return sum(t.numel() * t.element_size() for t in module.parameters())


class TorchModels:
    """The masked module (loaded on first use), its sliced copy with the plan repeated, and the tokenizer.

    Args:
        load: () → (masked module, tokenizer); called again after :meth:`release_masked` if needed.
        owned: the loaded module is this compile's own (read from a checkpoint), not the caller's
            ``nn.Module``: only then may slicing empty its layers as it goes (an input is never modified).
        plan: the merged ``torch_plan`` of the approximate passes to repeat (keys in :data:`PLAN_KEYS`).
        progress: one line per long step.
    """

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any]],
        plan: Mapping[str, Any] | None = None,
        *,
        owned: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._load = load
        self._owned = owned
        self._say = progress or (lambda _msg: None)
        self._module: Any = None
        self._sliced: SliceResult | None = None
        self._references: dict[str, Any] = {}
        self._references_taken = False
        self._error: UnsupportedModelError | None = None
        self.tokenizer: Any = None
        self.half = False
        self.regrouped: dict[str, Any] | None = None
        self.dropped: dict[str, Any] | None = None
        plan = dict(plan or {})
        unknown = sorted(set(plan) - set(PLAN_KEYS))
        self._regroup = plan.get("regroup")
        self._drop_layers: list[int] = []
        try:
            if unknown:
                raise UnsupportedModelError(
                    f"a pass asks the torch module for {', '.join(unknown)}, which the writers cannot repeat"
                )
            if plan.get("drop_layer_scopes"):
                from prune2deploy.outputs.depth import layer_indices

                self._drop_layers = layer_indices(plan["drop_layer_scopes"])
        except UnsupportedModelError as exc:
            self._error = exc

    @property
    def changed(self) -> bool:
        """Whether approximate passes are repeated on the sliced module (then it, not the masked module, is
        the model to match, and a writer checks its folder against ``model.onnx`` too). Known from the plan
        before slicing, so that references taken first are taken on the right model."""
        return self._regroup is not None or bool(self._drop_layers)

    def masked(self) -> Any:
        """The masked module (loaded if it is not held)."""
        if self._module is None:
            self._module, self.tokenizer = self._load()
            self.half = is_half_precision(self._module)
        return self._module

    def sliced(self) -> SliceResult:
        """The sliced copy with the plan repeated, made once.

        Raises:
            UnsupportedModelError: the architecture cannot be sliced, or the plan cannot be repeated on it.
        """
        if self._error is not None:
            raise self._error
        if self._sliced is None:
            try:
                self._sliced = self._slice()
            except UnsupportedModelError as exc:
                self._error = exc
                raise
        return self._sliced

    def _slice(self) -> SliceResult:
        from prune2deploy.outputs.slice import slice_causal_lm

        module = self.masked()
        self._say("slicing the masked model physically (torch)")
        # once the references are taken the masked module is not needed after slicing: each layer of one read
        # from a checkpoint is let go as soon as its copy is made (a caller's module is left as it is)
        sliced = slice_causal_lm(module, consume=self._references_taken and self._owned)
        del module
        if self._references_taken:
            self.release_masked()
        if self._drop_layers:  # the graph's order: remove-layers runs before regroup-gqa
            from prune2deploy.outputs.depth import drop_sliced_layers

            self.dropped = drop_sliced_layers(sliced, self._drop_layers)
        if self._regroup is not None:  # layers keep their original indices (the pass's names) in sliced.layers
            from prune2deploy.outputs.regroup import regroup_sliced

            self.regrouped = regroup_sliced(sliced, **self._regroup)
        return sliced

    def target(self) -> Any:
        """The torch model a folder must compute: the sliced one after a repeated plan, else the masked one."""
        return self.sliced().module if self.changed else self.masked()

    def reference(self, key: str, compute: Callable[[Any], Any]) -> Any:
        """What a writer's check compares against, computed once on :meth:`target` and kept (``key`` names it).

        The driver asks every writer for its references before any slicing (:meth:`references_taken`), so the
        masked module is read whole while nothing else is held; a writer asking again later gets the kept
        value.
        """
        if key not in self._references:
            self._references[key] = compute(self.target())
        return self._references[key]

    def references_taken(self) -> None:
        """Every writer's references are computed: a large masked module is dropped now (its pages, all read by
        the forward passes, would sit beside the sliced copy: at 8B 16 GB mapped + 10.4 GB sliced; see
        :data:`RELEASE_BEFORE_SLICING_BYTES`), and any is dropped right after slicing (a writer that asks for it
        later loads it again)."""
        self._references_taken = True
        if self._module is not None and _module_bytes(self._module) >= RELEASE_BEFORE_SLICING_BYTES:
            self.release_masked()

    def release_masked(self) -> None:
        """Drops the masked module (the sliced copy shares only what slicing left unchanged)."""
        self._module = None
        gc.collect()

    def release_sliced(self) -> None:
        self._sliced = None
        gc.collect()

    def note(self, section: dict[str, Any]) -> None:
        """Says in a folder's report section which approximate passes were repeated on the torch module."""
        if self.regrouped is not None:
            section["regrouped"] = self.regrouped
        if self.dropped is not None:
            section["depth_plan"] = self.dropped
