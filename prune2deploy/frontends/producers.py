"""Checkpoints that pruning tools save in their own layout, read as dense weights plus masks.

transformers loads a folder whose tensors are the model's parameters. Pruning tools often save something
else beside or instead of them (see docs/inputs.md for the table and versions):

- compressed-tensors sparsity (llmcompressor ``save_compressed=True``): ``P.compressed`` + ``P.bitmask``
  (+ ``P.shape``, ``P.row_offsets``) instead of ``P.weight`` — decoded to dense weights with zeros
  (:mod:`prune2deploy.frontends.compressed`).
- ``torch.nn.utils.prune`` without ``prune.remove``: ``P.weight_orig`` + ``P.weight_mask`` instead of
  ``P.weight``. The dense weight is ``weight_orig``; the mask is ``weight_mask``.
- ModelOpt sparsity without ``mts.export``: the dense, unmasked ``P.weight`` plus a bool ``P._weight_mask``.

The attached masks are returned as a mask file would be (keyed by parameter name), so the compile applies
them like ``--masks`` and the dense weights stay available for the report's "vs dense" quality. Tensors
that fit none of these layouts are left to the loader, which refuses names the model does not have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.errors import BadInputError, MaskError
from prune2deploy.frontends.compressed import (
    CompressedConfig,
    compressed_config,
    decode_bitmask,
    decode_sparse24,
    group_compressed,
)

__all__ = ["ProducerLayout", "detect_layout", "read_attached_masks", "read_dense_state_dict"]

log = logging.getLogger(__name__)

_PRUNE_ORIG, _PRUNE_MASK, _MODELOPT_MASK = "_orig", "_mask", "._weight_mask"


@dataclass
class ProducerLayout:
    """How a folder's tensors differ from the model's parameters, and what to read for each parameter."""

    producer: str  # words for the report: "compressed-tensors sparse-24-bitmask (2:4)", …
    files: list[Path]
    compressed: CompressedConfig | None = None
    #: parameter → stored name of its attached mask (torch.nn.utils.prune, ModelOpt)
    mask_of: dict[str, str] = field(default_factory=dict)
    #: parameter → stored name of its dense weight where it differs (``weight_orig``)
    dense_of: dict[str, str] = field(default_factory=dict)
    #: parameter → {part: stored name} for compressed-tensors weights
    compressed_of: dict[str, dict[str, str]] = field(default_factory=dict)
    #: stored name → the file holding it
    stored_in: dict[str, Path] = field(default_factory=dict)

    @property
    def declared_nm(self) -> tuple[int, int] | None:
        return self.compressed.declared_nm if self.compressed else None


def _safetensors_names(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    names[name] = file
        except Exception as exc:  # safetensors raises its own error types
            raise BadInputError(f"{file}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    return names


def detect_layout(folder: Path, config: dict[str, Any]) -> ProducerLayout | None:
    """The producer layout of a model folder's safetensors, or None when transformers can load it as it is.

    Reads only config.json (given) and the safetensors headers.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    compressed = compressed_config(config, str(folder / "config.json"))
    names = _safetensors_names(files) if files else {}
    layout = ProducerLayout(producer="", files=files, compressed=compressed, stored_in=names)
    plain = list(names)
    if compressed is not None and compressed.format != "dense":
        layout.compressed_of, plain = group_compressed(plain, compressed.format)
    present = set(plain)
    for name in plain:
        if name.endswith(_MODELOPT_MASK):
            layout.mask_of[name[: -len(_MODELOPT_MASK)] + ".weight"] = name
        elif name.endswith(_PRUNE_ORIG) and name[: -len(_PRUNE_ORIG)] + _PRUNE_MASK in present:
            param = name[: -len(_PRUNE_ORIG)]
            layout.dense_of[param] = name
            layout.mask_of[param] = param + _PRUNE_MASK
    words = []
    if compressed is not None:
        words.append(compressed.describe() + (f", version {compressed.version}" if compressed.version else ""))
    if layout.dense_of:
        words.append(f"torch.nn.utils.prune masks attached ({len(layout.dense_of)} × *_orig + *_mask)")
    modelopt = len(layout.mask_of) - len(layout.dense_of)
    if modelopt:
        words.append(f"ModelOpt sparsity masks attached ({modelopt} × _weight_mask)")
    if not words:
        return None
    layout.producer = "; ".join(words)
    return layout


def read_dense_state_dict(layout: ProducerLayout) -> dict[str, Any]:
    """Parameter name → torch tensor of the dense weights (compressed ones decoded), one tensor at a time.

    Attached masks are not applied (:func:`read_attached_masks` returns them) and not included.
    """
    from safetensors import safe_open

    skip = set(layout.mask_of.values()) | set(layout.dense_of.values())
    for parts in layout.compressed_of.values():
        skip.update(parts.values())
    rename = {stored: param for param, stored in layout.dense_of.items()}
    state: dict[str, Any] = {}
    for file in layout.files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                if name in rename:
                    state[rename[name]] = handle.get_tensor(name)
                elif name not in skip:
                    state[name] = handle.get_tensor(name)
    for param, parts in layout.compressed_of.items():
        state[param] = _decode(layout, param, parts)
    return state


def _tensor(layout: ProducerLayout, stored: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(layout.stored_in[stored]), framework="pt") as handle:
        return handle.get_tensor(stored)


def _decode(layout: ProducerLayout, param: str, parts: dict[str, str]) -> Any:
    assert layout.compressed is not None
    fmt = layout.compressed.format
    where = f"{layout.files[0].parent}: {fmt} weight {param!r}"
    missing = [p for p in ("compressed", "bitmask", "shape") if p not in parts]
    if fmt == "sparse-bitmask" and "row_offsets" not in parts:
        missing.append("row_offsets")
    if missing:
        raise BadInputError(f"{where}: stored without {', '.join(missing)}")
    values = _tensor(layout, parts["compressed"])
    bitmask = _tensor(layout, parts["bitmask"]).numpy()
    shape = _tensor(layout, parts["shape"]).numpy()
    if fmt == "sparse-24-bitmask":
        dense, _ = decode_sparse24(values, bitmask, shape, where=where)
    else:
        dense, _ = decode_bitmask(values, bitmask, shape, _tensor(layout, parts["row_offsets"]).numpy(), where=where)
    return dense


def read_attached_masks(layout: ProducerLayout) -> dict[str, np.ndarray]:
    """Parameter name → 0/1 mask (uint8) for every mask saved beside the weights.

    Raises:
        MaskError: an attached mask holds values other than 0 and 1.
    """
    masks: dict[str, np.ndarray] = {}
    for param, stored in layout.mask_of.items():
        tensor = _tensor(layout, stored)
        array = tensor.float().numpy() if tensor.dtype.is_floating_point else tensor.numpy()
        if not np.all((array == 0) | (array == 1)):
            raise MaskError(f"{layout.files[0].parent}: attached mask {stored!r} holds values other than 0 and 1")
        masks[param] = array.astype(np.uint8)
    return masks


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a checked JSON object (:func:`prune2deploy.frontends.hf_config.read_hf_config`)."""
    from prune2deploy.frontends.hf_config import read_hf_config

    return read_hf_config(folder)
