"""torch ``nn.Module`` → ONNX (torch.onnx dynamo exporter, opset 18, dynamic batch and sequence).

The exported graph keeps ``pkg.torch.onnx.name_scopes`` on every node, which maps nodes back to module
names for mask files and reports. Example inputs use batch 2: the exporter specialises a batch of 1.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from prune2deploy.errors import UnsupportedModelError

__all__ = ["ExportSpec", "bake_torch_prune", "export_module", "has_torch_prune", "hf_export_spec"]

log = logging.getLogger(__name__)

OPSET = 18


@dataclass
class ExportSpec:
    """Example inputs (by forward-argument name), their dynamic axes, and names for the outputs."""

    inputs: dict[str, object]  # name -> torch.Tensor
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)


def hf_export_spec(task: str, *, batch: int = 2, seq: int = 8, vocab_size: int = 100) -> ExportSpec:
    """Prefill-style inputs for a transformers model: ids + attention mask, dynamic batch and sequence."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(2, vocab_size), (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    outputs = ["logits"] if task == "causal-lm" else ["last_hidden_state", "pooler_output"]
    return ExportSpec(
        inputs={"input_ids": ids, "attention_mask": mask},
        dynamic_axes={"input_ids": axes, "attention_mask": axes},
        output_names=outputs,
    )


def bake_torch_prune(module):
    """Returns a copy in which ``torch.nn.utils.prune`` reparametrisations are made permanent.

    A pruned module holds ``weight_orig`` and a ``weight_mask`` buffer and computes their product in a
    forward pre-hook; ``prune.remove`` writes the product into ``weight``, which exports as a plain
    initializer with zeros. The caller's module is left untouched.
    """
    import torch.nn.utils.prune as prune

    def hooks(root):
        for _, sub in root.named_modules():
            for key, hook in list(getattr(sub, "_forward_pre_hooks", {}).items()):
                if isinstance(hook, (prune.BasePruningMethod, prune.PruningContainer)):
                    yield sub, key, hook

    # The masked product (``weight``) is a non-leaf tensor, which deepcopy refuses: set it aside.
    aside = [(sub, hook._tensor_name, getattr(sub, hook._tensor_name)) for sub, _, hook in hooks(module)]
    for sub, name, _ in aside:
        delattr(sub, name)
    try:
        baked = copy.deepcopy(module)
    finally:
        for sub, name, tensor in aside:
            setattr(sub, name, tensor)
    count = 0
    for sub, _, hook in list(hooks(baked)):
        setattr(sub, hook._tensor_name, hook.apply_mask(sub))
        prune.remove(sub, hook._tensor_name)
        count += 1
    if count:
        log.info("made %d torch.nn.utils.prune masks permanent", count)
    return baked


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_module(module, spec: ExportSpec, *, optimize: bool = True) -> ir.Model:
    """Exports ``module`` called as ``module(**spec.inputs)`` and returns the onnx_ir model.

    Outputs are renamed to ``spec.output_names`` (in order) so that reports and verification can name them.
    """
    module = bake_torch_prune(module) if has_torch_prune(module) else module
    module.eval()
    config = getattr(module, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:  # a prefill graph: a cache object in the outputs cannot be exported
        config.use_cache = False
    try:
        return _export(module, spec, optimize=optimize)
    finally:
        if use_cache:
            config.use_cache = use_cache


def _export(module, spec: ExportSpec, *, optimize: bool) -> ir.Model:
    import torch
    from torch.export import Dim

    dims: dict[str, Dim] = {}
    dynamic_shapes = {}
    for name in spec.inputs:
        axes = spec.dynamic_axes.get(name, {})
        dynamic_shapes[name] = {axis: dims.setdefault(label, Dim(label)) for axis, label in axes.items()} or None
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                module,
                (),
                kwargs=dict(spec.inputs),
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                opset_version=OPSET,
                optimize=optimize,
                verbose=False,
            )
        except Exception as exc:
            raise UnsupportedModelError(
                f"torch.onnx.export failed for {type(module).__name__}: {str(exc).splitlines()[0][:500]}"
            ) from exc
    model = program.model
    _name_outputs(model, spec.output_names)
    model.producer_name = "prune2deploy"
    return model


def has_torch_prune(module) -> bool:
    return any(name.endswith("_orig") for name, _ in module.named_parameters())


def _name_outputs(model: ir.Model, names: Sequence[str]) -> None:
    taken = {v.name for v in model.graph.inputs}
    for value, name in zip(model.graph.outputs, names, strict=False):
        if name in taken:
            continue
        value.name = name
        taken.add(name)
