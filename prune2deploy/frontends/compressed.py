"""compressed-tensors sparse checkpoints (llmcompressor ``save_compressed=True``) read without the library.

A folder whose ``config.json`` says ``quantization_config: {quant_method: "compressed-tensors",
sparsity_config: {format: ...}}`` stores its sparse Linear weights compressed. transformers hands such a
folder to the ``compressed-tensors`` package, whose current releases no longer decompress sparsity (the
weights then stay at random initialisation); any pinned version brings its own torch constraints. The
formats are small and fixed, so they are decoded here, one tensor at a time, with numpy for the bits
(layouts checked against compressed-tensors 0.4.0 … 0.12.2, llmcompressor ≤ 0.9):

- ``sparse-24-bitmask`` (2:4): ``P.compressed`` [rows, cols/2] holds the kept values in row-major mask
  order, ``P.bitmask`` uint8 [rows, ceil(cols/8)] the mask (``numpy.packbits(mask, axis=-1,
  bitorder="little")``), ``P.shape`` the dense shape. Exactly 2 of every 4 are kept (the two largest, so a
  kept value may itself be zero).
- ``sparse-bitmask`` (unstructured): the same with a 1-D ``P.compressed`` and ``P.row_offsets``.
- ``dense``: weights stored as they are; only the declared structure is read.

``P`` is the module path (compressed-tensors ≥ 0.9 strips ``.weight``) or the weight's name (earlier
releases). Every release packs the mask bits little-endian (the packing has not changed since the first
commit, April 2024); the file's ``version`` is recorded, not needed.

A checkpoint that is also quantized (``config_groups``: FP8, W8A8, W4A16 …) is refused with its scheme
named: activation quantization cannot be represented by dense weights, and the packed weight formats are
not decoded here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prune2deploy.errors import BadInputError, UnsupportedModelError

__all__ = [
    "SPARSE_FORMATS",
    "CompressedConfig",
    "compressed_config",
    "decode_bitmask",
    "decode_sparse24",
    "group_compressed",
]

#: Sparsity formats decoded here → the tensors each compressed weight is stored as.
SPARSE_FORMATS: dict[str, tuple[str, ...]] = {
    "sparse-24-bitmask": ("compressed", "bitmask", "shape"),
    "sparse-bitmask": ("compressed", "bitmask", "shape", "row_offsets"),
    "dense": (),
}


@dataclass
class CompressedConfig:
    """What ``config.json`` declares: the sparsity format and structure, the library version."""

    format: str
    structure: str | None  # "2:4", "unstructured", … as declared
    version: str | None
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    @property
    def declared_nm(self) -> tuple[int, int] | None:
        """(n, m) when the checkpoint declares N:M sparsity (``2:4``), else None."""
        text = (self.structure or "").strip()
        if ":" in text:
            n, m = text.split(":", 1)
            if n.isdigit() and m.isdigit():
                return int(n), int(m)
        return (2, 4) if self.format == "sparse-24-bitmask" else None

    def describe(self) -> str:
        return f"compressed-tensors {self.format}" + (f" ({self.structure})" if self.structure else "")


def _quant_scheme(group: Mapping[str, Any]) -> str:
    """``W4A16 (int, group 128)``-style words for one config group."""
    weights = group.get("weights") or {}
    acts = group.get("input_activations") or {}
    w = f"W{weights.get('num_bits', '?')}" if weights else "W16"
    a = f"A{acts.get('num_bits', '?')}" if acts else "A16"
    kind = weights.get("type") or "int"
    strategy = weights.get("strategy") or ""
    detail = f"{kind}, {strategy}" + (f" {weights['group_size']}" if weights.get("group_size") else "")
    return f"{w}{a} ({detail.strip(', ')})"


def compressed_config(config: Mapping[str, Any], where: str) -> CompressedConfig | None:
    """The sparsity a compressed-tensors ``config.json`` declares; None when it is not such a checkpoint.

    Raises:
        UnsupportedModelError: the checkpoint is quantized (its scheme named), or its sparsity format is
            one this reader does not decode.
    """
    section = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(section, Mapping) or section.get("quant_method") not in ("compressed-tensors", "sparseml"):
        return None
    groups = section.get("config_groups") or {}
    quantized = {
        name: g
        for name, g in groups.items()
        if isinstance(g, Mapping) and (g.get("weights") or g.get("input_activations"))
    }
    if quantized:
        schemes = ", ".join(f"{name}: {_quant_scheme(g)}" for name, g in sorted(quantized.items()))
        raise UnsupportedModelError(
            f"{where}: a quantized compressed-tensors checkpoint (format {section.get('format')!r}; {schemes}). "
            "prune2deploy reads compressed-tensors sparsity (sparse-24-bitmask, sparse-bitmask, dense) on "
            "unquantized weights only: dense weights cannot hold activation quantization (W8A8, FP8), and "
            "packed quantized weights are not decoded. Compile the sparse checkpoint saved before "
            "quantization (llmcompressor: the sparsity stage's output) and quantize the compiled model "
            "(genai/ int4/int8, or the engine's precision)"
        )
    sparsity = section.get("sparsity_config") or {}
    fmt = str(sparsity.get("format") or section.get("format") or "dense")
    if fmt not in SPARSE_FORMATS:
        raise UnsupportedModelError(
            f"{where}: compressed-tensors sparsity format {fmt!r} is not read; prune2deploy decodes "
            f"{', '.join(sorted(SPARSE_FORMATS))}. Save the model with save_compressed=False (dense weights "
            "with zeros) to compile it"
        )
    return CompressedConfig(
        format=fmt,
        structure=sparsity.get("sparsity_structure"),
        version=section.get("version"),
        targets=list(sparsity.get("targets") or []),
        ignore=list(sparsity.get("ignore") or []),
    )


def group_compressed(names: list[str], fmt: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(weight name → {part: stored name}, plain names) for a compressed checkpoint's tensor names.

    ``model.layers.0.mlp.up_proj.compressed`` (≥ 0.9) and ``….up_proj.weight.compressed`` (earlier) both
    give the weight ``model.layers.0.mlp.up_proj.weight``.
    """
    parts = SPARSE_FORMATS[fmt]
    grouped: dict[str, dict[str, str]] = {}
    plain = []
    for name in names:
        prefix, _, last = name.rpartition(".")
        if prefix and last in parts:
            weight = prefix if prefix.endswith(".weight") else f"{prefix}.weight"
            grouped.setdefault(weight, {})[last] = name
        else:
            plain.append(name)
    return grouped, plain


def _dense_shape(shape: np.ndarray, where: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in np.asarray(shape).reshape(-1))
    if len(dims) != 2 or min(dims) <= 0:
        raise BadInputError(f"{where}: stored shape {dims} is not a 2-D weight shape")
    return dims


def _unpack(bitmask: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    rows, cols = shape
    if bitmask.dtype != np.uint8 or bitmask.shape != (rows, (cols + 7) // 8):
        raise BadInputError(
            f"{where}: bitmask is {bitmask.dtype} {tuple(bitmask.shape)}; expected uint8 {(rows, (cols + 7) // 8)} "
            f"for a {rows}x{cols} weight"
        )
    return np.unpackbits(bitmask, axis=-1, count=cols, bitorder="little").astype(bool)


def decode_sparse24(values: Any, bitmask: np.ndarray, shape: np.ndarray, *, where: str) -> tuple[Any, np.ndarray]:
    """(dense weight with zeros, bool mask) of one ``sparse-24-bitmask`` weight.

    ``values`` is a torch tensor (bf16/fp16 have no numpy counterpart); the mask is numpy. The mask is
    the file's own, exactly 2 of every 4 along each row (checked): a kept value that is zero stays kept.
    """
    import torch

    dims = _dense_shape(shape, where)
    mask = _unpack(bitmask, dims, where)
    rows, cols = dims
    if cols % 4 or tuple(values.shape) != (rows, cols // 2):
        raise BadInputError(f"{where}: compressed values are {tuple(values.shape)}; expected {(rows, cols // 2)}")
    per_group = mask.reshape(rows, cols // 4, 4).sum(axis=-1)
    if not np.all(per_group == 2):
        bad = int(np.count_nonzero(per_group != 2))
        raise BadInputError(f"{where}: the 2:4 bitmask keeps other than 2 of 4 in {bad} groups; the file is corrupt")
    dense = torch.zeros(dims, dtype=values.dtype)
    dense[torch.from_numpy(mask)] = values.reshape(-1)
    return dense, mask


def decode_bitmask(
    values: Any, bitmask: np.ndarray, shape: np.ndarray, row_offsets: np.ndarray, *, where: str
) -> tuple[Any, np.ndarray]:
    """(dense weight with zeros, bool mask) of one ``sparse-bitmask`` weight; row offsets are checked."""
    import torch

    dims = _dense_shape(shape, where)
    mask = _unpack(bitmask, dims, where)
    counts = mask.sum(axis=-1)
    if int(counts.sum()) != int(values.numel()):
        raise BadInputError(f"{where}: the bitmask marks {int(counts.sum())} values but {values.numel()} are stored")
    expected = np.cumsum(counts) - counts
    if np.asarray(row_offsets).reshape(-1).astype(np.int64).tolist() != expected.tolist():
        raise BadInputError(f"{where}: row_offsets do not match the bitmask's rows; the file is corrupt")
    dense = torch.zeros(dims, dtype=values.dtype)
    dense[torch.from_numpy(mask)] = values.reshape(-1)
    return dense, mask
