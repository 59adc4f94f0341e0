"""Loading what the user gives (HF folder, GGUF, bundled name, .onnx, nn.Module) as a masked reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.errors import BadInputError
from prune2deploy.io import sha256_file

__all__ = ["Progress", "Source", "check_finite_weights", "input_record", "load_source", "options_export_spec"]

Progress = Callable[[str], None]


@dataclass
class Source:
    """A loaded input: the masked reference graph plus where it came from."""

    model: ir.Model
    kind: str  # "hf" | "onnx" | "torch"
    path: Path | None
    task: str | None = None
    masks_applied: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def load_source(source: Any, options: Any, *, progress: Progress | None = None) -> Source:
    """Turns any supported input into a masked reference ONNX model (in memory)."""
    from prune2deploy.frontends import hf, masks
    from prune2deploy.frontends import torch as torch_frontend
    from prune2deploy.frontends.onnx import load_onnx

    say = progress or (lambda _msg: None)
    mask_tensors = masks.load_masks(options.masks) if options.masks else None
    mask_source = str(options.masks) if options.masks else ""
    if not isinstance(source, (str, Path)):  # an nn.Module (Python API)
        module = source
        if mask_tensors:
            module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
        spec = options_export_spec(module, options)
        say("exporting module to ONNX")
        model = torch_frontend.export_module(module, spec)
        check_finite_weights(model, f"<nn.Module {type(module).__name__}>")
        return Source(
            model, "torch", None, masks_applied=len(mask_tensors or {}), extra={"module": type(module).__name__}
        )
    text = str(source)
    path = Path(text)
    if path.suffix == ".onnx" or (path.is_file() and path.suffix != ".gguf"):
        say(f"loading {path}")
        model = load_onnx(path)
        check_finite_weights(model, str(path))
        applied = masks.apply_masks_onnx(model, mask_tensors, source=mask_source) if mask_tensors else 0
        return Source(model, "onnx", path, masks_applied=applied)
    if text in hf.BUNDLED_MODELS or hf.is_hf_folder(path) or path.suffix == ".gguf":
        say(f"loading {text}")
        loaded = hf.load_hf_model(text if text in hf.BUNDLED_MODELS else path)
        module = loaded.module
        if mask_tensors:
            module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
        module.config.use_cache = False
        vocab = getattr(module.config, "vocab_size", 100)
        spec = torch_frontend.hf_export_spec(
            loaded.task, batch=options.export_batch, seq=options.export_seq, vocab_size=vocab
        )
        say("exporting to ONNX (dynamo, opset 18)")
        model = torch_frontend.export_module(module, spec)
        check_finite_weights(model, text)
        where = text if text in hf.BUNDLED_MODELS else None
        return Source(
            model,
            "hf",
            hf.bundled_model_path(text) if where else path,
            task=loaded.task,
            masks_applied=len(mask_tensors or {}),
            extra={"bundled": where},
        )
    if not path.exists():
        raise BadInputError(f"{source}: no such file or folder (and not a bundled model name: smollm2-135m, minilm-l6)")
    raise BadInputError(f"{source}: not an .onnx file, a .gguf file or a Hugging Face model folder")


def check_finite_weights(model: ir.Model, source: str) -> None:
    """NaN/Inf in the input's weights is bad input: no compiled model can match such a reference.

    Raises:
        BadInputError: naming the first few tensors and how many values are not finite.
    """
    import numpy as np

    bad = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not value.dtype or not value.dtype.is_floating_point():
            continue
        array = tensor.numpy()
        count = int(array.size - np.count_nonzero(np.isfinite(array.astype(np.float32, copy=False))))
        if count:
            bad.append(f"'{value.name}' ({count} of {array.size})")
    if bad:
        raise BadInputError(
            f"{source}: weights hold NaN/Inf values: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else "")
            + ". Fix the checkpoint (a diverged training run or a broken conversion) before compiling"
        )


def options_export_spec(module: Any, options: Any) -> Any:
    """Export spec for a bare module: transformers models get ids + mask; others must bring their own."""
    from prune2deploy.frontends.torch import ExportSpec, hf_export_spec

    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        task = "causal-lm" if type(module).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"
        config.use_cache = False
        return hf_export_spec(task, batch=options.export_batch, seq=options.export_seq, vocab_size=config.vocab_size)
    example = getattr(module, "example_inputs", None)
    if isinstance(example, ExportSpec):
        return example
    raise BadInputError(
        f"{type(module).__name__}: not a transformers model; set module.example_inputs = "
        "prune2deploy.frontends.torch.ExportSpec(...) to say what its inputs look like, then call api.compile"
    )


def input_record(loaded: Source) -> dict[str, Any]:
    """Where the input came from, for the report and the manifest.

    Computed once per load (the first call) and reused, so the manifest hashes the input as it was read.
    """
    if "input_record" in loaded.extra:
        return dict(loaded.extra["input_record"])
    record: dict[str, Any] = {
        "kind": loaded.kind,
        "path": str(loaded.path) if loaded.path else f"<nn.Module {loaded.extra.get('module')}>",
        "masks_applied": loaded.masks_applied,
    }
    if loaded.path is not None and loaded.path.exists():
        record["sha256"] = sha256_file(loaded.path)
    if loaded.extra.get("bundled"):
        record["bundled"] = loaded.extra["bundled"]
    loaded.extra["input_record"] = dict(record)
    return record
