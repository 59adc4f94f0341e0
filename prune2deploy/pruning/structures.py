"""Prunable structures of a transformers model, found from its module tree and config.

A structure (an MLP neuron, an attention head, a hidden channel) is removed by zeroing every tensor that
*produces* it; that is the mask-file contract shared with ``compile --masks``. Each structure family is
therefore described once, as the list of parameter slices ("slots") that belong to one unit of it, and the
same description serves two jobs: summing element scores into a unit score, and writing the 0/1 masks. One
description for both keeps the scores and the masks from drifting apart.

Two naming families are known: Llama-style decoders (Llama, Qwen2, Mistral, SmolLM: ``q_proj`` …
``down_proj``, RMSNorm) and BERT-style encoders (``attention.self.query`` … ``output.dense``, LayerNorm).
A model that matches neither raises :class:`UnsupportedModelError` naming what was missing; guessing a
structure would produce masks that silently break the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prune2deploy.errors import UnsupportedModelError

__all__ = [
    "Family",
    "LayerInfo",
    "ModelStructure",
    "Slot",
    "detect_structure",
    "family_masks",
    "unit_scores",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """Where one unit of a structure lives in one parameter.

    Unit ``u`` owns the indices ``[u * size, (u + 1) * size)`` along ``axis`` of ``param`` (``size`` is the
    head dimension for heads, 1 for neurons and channels).
    """

    param: str
    axis: int
    size: int = 1

    def index(self, ndim: int, units: torch.Tensor) -> tuple:
        """Advanced index that selects every element owned by ``units`` along ``axis``."""
        cols = (units[:, None] * self.size + torch.arange(self.size)).reshape(-1)
        idx: list = [slice(None)] * ndim
        idx[self.axis] = cols
        return tuple(idx)


@dataclass
class Family:
    """One prunable family: ``width`` units of ``kind`` (``mlp``, ``heads``, ``kv_heads``, ``hidden``)."""

    kind: str
    layer: int | None
    width: int
    slots: list[Slot]


@dataclass
class LayerInfo:
    """The module names of one transformer block."""

    index: int
    prefix: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: list[str]  # gate and up (gated) or the single up projection (BERT intermediate.dense)
    mlp_out: str
    norms: list[str]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int


@dataclass
class ModelStructure:
    """What pruning needs to know about a model: its blocks, widths and parameter names."""

    arch: str  # "llama" | "bert"
    hidden: int
    layers: list[LayerInfo]
    embeddings: list[str]  # embedding modules whose columns are hidden channels
    final_norms: list[str]  # norms outside the blocks (final norm, embedding LayerNorm)
    extra_readers: list[str] = field(default_factory=list)  # lm_head (untied), BERT pooler
    params: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def has(self, name: str) -> bool:
        return name in self.params

    def _with_bias(self, module: str, axis_weight: int, size: int = 1) -> list[Slot]:
        slots = [Slot(f"{module}.weight", axis_weight, size)]
        if axis_weight == 0 and self.has(f"{module}.bias"):
            slots.append(Slot(f"{module}.bias", 0, size))
        return slots

    def mlp_family(self, layer: LayerInfo) -> Family:
        """Neuron j: row j of every input projection (and bias), column j of the output projection."""
        slots = [s for name in layer.mlp_in for s in self._with_bias(name, 0)]
        slots.append(Slot(f"{layer.mlp_out}.weight", 1))
        return Family("mlp", layer.index, layer.intermediate, slots)

    def head_family(self, layer: LayerInfo) -> Family:
        """Query head h: rows of q (and its bias) and the columns of o that read the head's output.

        For multi-head attention (one kv head per query head) the head's k and v rows go with it; for GQA
        they are the separate ``kv_heads`` family, removed only when a whole group goes.
        """
        d = layer.head_dim
        slots = [*self._with_bias(layer.q, 0, d), Slot(f"{layer.o}.weight", 1, d)]
        if layer.num_kv_heads == layer.num_heads:
            slots += self._with_bias(layer.k, 0, d) + self._with_bias(layer.v, 0, d)
        return Family("heads", layer.index, layer.num_heads, slots)

    def kv_family(self, layer: LayerInfo) -> Family:
        d = layer.head_dim
        slots = self._with_bias(layer.k, 0, d) + self._with_bias(layer.v, 0, d)
        return Family("kv_heads", layer.index, layer.num_kv_heads, slots)

    def hidden_family(self) -> Family:
        """Hidden channel c: embedding columns, writers' output rows, readers' input columns, norm scales."""
        slots = [Slot(f"{name}.weight", 1) for name in self.embeddings]
        for name in self.final_norms:
            slots += self._norm_slots(name)
        for layer in self.layers:
            for name in (layer.q, layer.k, layer.v, *layer.mlp_in):
                slots.append(Slot(f"{name}.weight", 1))
            for name in (layer.o, layer.mlp_out):
                slots += self._with_bias(name, 0)
            for name in layer.norms:
                slots += self._norm_slots(name)
        for name in self.extra_readers:
            if self.has(f"{name}.weight"):
                slots.append(Slot(f"{name}.weight", 1))
        return Family("hidden", None, self.hidden, [s for s in slots if self.has(s.param)])

    def _norm_slots(self, name: str) -> list[Slot]:
        return [Slot(f"{name}.{p}", 0) for p in ("weight", "bias") if self.has(f"{name}.{p}")]

    def linear_weights(self) -> list[str]:
        """Weights of every Linear inside the blocks: the targets of unstructured and N:M sparsity."""
        names = []
        for layer in self.layers:
            names += [f"{n}.weight" for n in (layer.q, layer.k, layer.v, layer.o, *layer.mlp_in, layer.mlp_out)]
        return names


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _find_layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer", "h") and len(child):
            return name, child
    raise UnsupportedModelError(
        f"{type(module).__name__}: no list of transformer blocks (a ModuleList 'layers' or 'layer') found"
    )


_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_BERT = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
}


def detect_structure(module: nn.Module) -> ModelStructure:
    """Finds blocks, heads, MLP and hidden widths of a Llama-style decoder or a BERT-style encoder.

    Raises:
        UnsupportedModelError: the module tree matches neither naming family, or the config's head counts
            disagree with the weight shapes.
    """
    config = getattr(module, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(module).__name__}: no transformers config; cannot find heads")
    prefix, blocks = _find_layers(module)
    modules = dict(module.named_modules())
    first = f"{prefix}.0"
    if f"{first}.self_attn.q_proj" in modules and f"{first}.mlp.down_proj" in modules:
        arch, names = "llama", _LLAMA
    elif f"{first}.attention.self.query" in modules and f"{first}.intermediate.dense" in modules:
        arch, names = "bert", _BERT
    else:
        raise UnsupportedModelError(
            f"{type(module).__name__}: blocks under '{prefix}' use neither Llama names (self_attn.q_proj, "
            "mlp.down_proj) nor BERT names (attention.self.query, intermediate.dense)"
        )
    heads = _config_int(config, "num_attention_heads", "n_head")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    hidden = _config_int(config, "hidden_size", "n_embd")
    if heads is None or hidden is None:
        raise UnsupportedModelError("config lacks num_attention_heads or hidden_size")
    head_dim = _config_int(config, "head_dim") or hidden // heads
    layers = []
    for index in range(len(blocks)):
        p = f"{prefix}.{index}"
        if arch == "llama":
            mlp_in = [f"{p}.mlp.{n}" for n in ("gate_proj", "up_proj") if f"{p}.mlp.{n}" in modules]
            mlp_out = f"{p}.mlp.down_proj"
            norms = [f"{p}.{n}" for n in ("input_layernorm", "post_attention_layernorm")]
        else:
            mlp_in, mlp_out = [f"{p}.intermediate.dense"], f"{p}.output.dense"
            norms = [f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm"]
        info = LayerInfo(
            index=index,
            prefix=p,
            **{key: f"{p}.{value}" for key, value in names.items()},
            mlp_in=mlp_in,
            mlp_out=mlp_out,
            norms=[n for n in norms if n in modules],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=modules[mlp_out].in_features,
        )
        q_out, k_out = modules[info.q].out_features, modules[info.k].out_features
        if q_out != heads * head_dim or k_out != kv_heads * head_dim:
            raise UnsupportedModelError(
                f"{info.q}: {q_out} outputs but the config says {heads} heads × {head_dim}; "
                f"{info.k}: {k_out} outputs for {kv_heads} kv heads"
            )
        layers.append(info)
    if arch == "llama":
        root = prefix[: -len("layers")]
        embeddings = [f"{root}embed_tokens"]
        final_norms = [f"{root}norm"]
        extra = ["lm_head"]
    else:
        base = prefix[: -len("encoder.layer")]
        embeddings = [
            f"{base}embeddings.{n}" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
        ]
        final_norms = [f"{base}embeddings.LayerNorm"]
        extra = [f"{base}pooler.dense"]
    params = dict(module.named_parameters())
    embeddings = [e for e in embeddings if f"{e}.weight" in params]
    if not embeddings:
        raise UnsupportedModelError(f"{type(module).__name__}: no token embedding found next to '{prefix}'")
    structure = ModelStructure(
        arch=arch,
        hidden=hidden,
        layers=layers,
        embeddings=embeddings,
        final_norms=[n for n in final_norms if n in modules],
        extra_readers=extra,
        params=params,
    )
    log.debug("detected %s: %d layers, %d heads (%d kv), hidden %d", arch, len(layers), heads, kv_heads, hidden)
    return structure


def unit_scores(family: Family, element_score: Callable[[str], torch.Tensor | None]) -> torch.Tensor:
    """Sums element scores over every slot of every unit: the structure score of LLM-Pruner-style criteria.

    ``element_score(param)`` returns a tensor of the parameter's shape, or None to leave that slot out
    (a parameter the criterion has no statistic for).
    """
    total = torch.zeros(family.width, dtype=torch.float64)
    for slot in family.slots:
        scores = element_score(slot.param)
        if scores is None:
            continue
        scores = scores.double()
        other = [a for a in range(scores.ndim) if a != slot.axis]
        per_index = scores.sum(dim=other) if other else scores
        total += per_index.reshape(family.width, slot.size).sum(dim=1)
    return total


def family_masks(
    structure: ModelStructure, family: Family, removed: Iterable[int], masks: dict[str, torch.Tensor]
) -> None:
    """Zeroes the slots of ``removed`` units in ``masks`` (creating all-ones masks on first touch)."""
    units = torch.as_tensor(sorted(set(removed)), dtype=torch.long)
    if units.numel() == 0:
        return
    for slot in family.slots:
        param = structure.params[slot.param]
        mask = masks.get(slot.param)
        if mask is None:
            mask = masks[slot.param] = torch.ones(param.shape, dtype=torch.float32)
        mask[slot.index(mask.ndim, units)] = 0.0
