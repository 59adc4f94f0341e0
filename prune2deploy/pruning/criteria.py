"""Importance criteria: which weights, neurons, heads, channels and layers matter least.

Element criteria give one score per weight; a structure's score is the sum over the weights that produce
it (:func:`prune2deploy.pruning.structures.unit_scores`), as in LLM-Pruner's group importance:

- ``magnitude``: |W_ij| (Han et al. 2015, "Learning both Weights and Connections"; summed per structure it
  is the L1-norm filter criterion of Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- ``wanda``: |W_ij| · ||X_j||_2, the weight times the L2 norm of its input feature over all calibration
  tokens (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"). Wanda
  compares scores within each output row, which :mod:`prune2deploy.pruning.sparsity` honours.
- ``taylor``: |W_ij · ∂L/∂W_ij|, the first-order Taylor estimate of the loss change when the weight is
  zeroed, with gradients accumulated over the calibration set (Ma et al. 2023, "LLM-Pruner", element-wise
  first-order importance, summed per group).

Structure criteria score units directly:

- ``minitron``: activation-based importance from forward passes only (Muralidharan et al. 2024, "Compact
  Language Models via Pruning and Knowledge Distillation", §2.2): heads by the L2 norm of each head's
  attention output, MLP neurons by the activation entering the down projection (after the gate product),
  hidden channels by the outputs of every LayerNorm/RMSNorm, layers by Block Importance. Per-token values
  are reduced over the sequence, then over the batch. The paper's ablation (and the follow-up "LLM Pruning
  and Distillation in Practice: The Minitron Approach", Sreenivas et al. 2024, §2) uses the mean over the
  sequence and the L2 norm over the batch; that is the default here, and both are options.
- ``michel``: head importance |∂L/∂ξ_h| with ξ_h a gate (= 1) on head h's output, accumulated over
  calibration examples and L2-normalised per layer (Michel et al. 2019, "Are Sixteen Heads Really Better
  than One?", §4.1–4.2). Each example gets its own gate so the absolute value is taken per example.

Layers are always scored by Block Importance, 1 − cos(x_in, x_out) averaged over tokens (Men et al. 2024,
"ShortGPT"; used by Minitron for depth): a block that barely changes the residual stream is the cheapest
to drop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prune2deploy.errors import ConfigError
from prune2deploy.pruning.structures import ModelStructure

__all__ = [
    "CRITERIA",
    "ELEMENT_CRITERIA",
    "SUPPORTED",
    "Statistics",
    "block_importance",
    "check_criterion",
    "collect_statistics",
    "element_score_fn",
    "magnitude_scores",
    "taylor_scores",
    "wanda_scores",
]

log = logging.getLogger(__name__)

CRITERIA = ("magnitude", "wanda", "taylor", "minitron", "michel")
ELEMENT_CRITERIA = frozenset({"magnitude", "wanda", "taylor"})
#: Which structures each criterion can rank (layers always use Block Importance).
SUPPORTED: dict[str, frozenset[str]] = {
    "magnitude": frozenset({"unstructured", "nm", "mlp", "heads", "hidden", "layers"}),
    "wanda": frozenset({"unstructured", "nm", "mlp", "heads", "hidden", "layers"}),
    "taylor": frozenset({"unstructured", "nm", "mlp", "heads", "hidden", "layers"}),
    "minitron": frozenset({"mlp", "heads", "hidden", "layers"}),
    "michel": frozenset({"heads", "layers"}),
}
_AGGREGATIONS = ("mean", "l2")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the data-free baseline every other criterion is compared with."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ||X_j||_2 for an nn.Linear weight [out, in] and the per-input-feature L2 norm [in].

    An input feature with large activations (LLMs have a few outlier features) makes small weights that
    read it important, which magnitude alone misses.
    """
    if weight.ndim != 2 or input_norm.shape != (weight.shape[1],):
        raise ValueError(f"weight {tuple(weight.shape)} and input norm {tuple(input_norm.shape)} disagree")
    return weight.detach().abs().float() * input_norm.float()[None, :]


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|W · ∂L/∂W|: the first-order estimate of how much the loss changes when W is set to zero."""
    return (weight.detach().float() * grad.float()).abs()


def block_importance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token 1 − cos(x_in, x_out) over the hidden axis (ShortGPT's Block Influence)."""
    cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1, eps=1e-12)
    return 1.0 - cos


def check_criterion(criterion: str, structures: Sequence[str], *, task: str | None) -> None:
    """Refuses criterion/structure pairs that have no defined score before any model is loaded.

    ``task`` None skips the task check (the task is known only once the model is loaded).
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion: unknown '{criterion}'; choose one of {', '.join(CRITERIA)}")
    unsupported = sorted(set(structures) - SUPPORTED[criterion])
    if unsupported:
        raise ConfigError(
            f"criterion '{criterion}' cannot rank {unsupported}; it supports {sorted(SUPPORTED[criterion])}"
        )
    if criterion in ("taylor", "michel") and task is not None and task != "causal-lm":
        raise ConfigError(
            f"criterion '{criterion}' needs a loss gradient, which this package defines for causal language "
            "models only (next-token loss); use magnitude, wanda or minitron for encoders"
        )


class _SeqBatchAggregate:
    """Reduces per-token values [B, S, K] over the sequence, then over every calibration example."""

    def __init__(self, seq: str, batch: str) -> None:
        self.seq, self.batch = seq, batch
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        per_example = values.mean(dim=1) if self.seq == "mean" else values.pow(2).sum(dim=1).sqrt()
        part = per_example.sum(dim=0) if self.batch == "mean" else per_example.pow(2).sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.count += values.shape[0]

    def result(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no activations were recorded")
        return self.total / self.count if self.batch == "mean" else self.total.sqrt()


@dataclass
class Statistics:
    """What the calibration passes measured; each field is filled only when a criterion needs it."""

    input_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear name -> ||X_j||_2 [in]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> Σ ∂L/∂W
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H] (minitron or michel)
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [I] (minitron)
    hidden: torch.Tensor | None = None  # [D] (minitron)
    layers: torch.Tensor | None = None  # [L] block importance
    tokens: int = 0


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _hooks() -> Iterator[list]:
    handles: list = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def _forward_stats(
    module: nn.Module,
    structure: ModelStructure,
    batches: Sequence[torch.Tensor],
    *,
    input_norms: bool,
    minitron: bool,
    layers: bool,
    seq_agg: str,
    batch_agg: str,
    stats: Statistics,
) -> None:
    """One no-grad pass over the calibration set with every forward hook the criteria need."""
    modules = dict(module.named_modules())
    sq: dict[str, torch.Tensor] = {}
    heads = {layer.index: _SeqBatchAggregate(seq_agg, batch_agg) for layer in structure.layers}
    mlp = {layer.index: _SeqBatchAggregate(seq_agg, batch_agg) for layer in structure.layers}
    norms = {}
    bi_sum = torch.zeros(structure.num_layers, dtype=torch.float64)
    bi_count = 0

    def sq_hook(name):
        def hook(_mod, args):
            x = args[0].detach().double()
            part = x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            sq[name] = part if name not in sq else sq[name] + part

        return hook

    def head_hook(info):
        def hook(_mod, args):
            x = args[0].detach()
            per_head = x.reshape(*x.shape[:-1], info.num_heads, info.head_dim).double().norm(dim=-1)
            heads[info.index].add(per_head)

        return hook

    def mlp_hook(index):
        def hook(_mod, args):
            mlp[index].add(args[0].detach().abs())

        return hook

    def norm_hook(name):
        def hook(_mod, _args, out):
            norms.setdefault(name, _SeqBatchAggregate(seq_agg, batch_agg)).add(_output(out).detach().abs())

        return hook

    def block_hook(index):
        def hook(_mod, args, kwargs, out):
            x_in = _first(args, kwargs, "hidden_states")
            bi_sum[index] += block_importance(x_in, _output(out)).sum()

        return hook

    with _hooks() as handles:
        if input_norms:
            for name, mod in modules.items():
                if isinstance(mod, nn.Linear):
                    handles.append(mod.register_forward_pre_hook(sq_hook(name)))
        if minitron:
            for info in structure.layers:
                handles.append(modules[info.o].register_forward_pre_hook(head_hook(info)))
                handles.append(modules[info.mlp_out].register_forward_pre_hook(mlp_hook(info.index)))
                for name in info.norms:
                    handles.append(modules[name].register_forward_hook(norm_hook(name)))
            for name in structure.final_norms:
                handles.append(modules[name].register_forward_hook(norm_hook(name)))
        if layers:
            for info in structure.layers:
                handles.append(modules[info.prefix].register_forward_hook(block_hook(info.index), with_kwargs=True))
        with torch.no_grad():
            for ids in batches:
                module(input_ids=ids, attention_mask=torch.ones_like(ids))
                bi_count += ids.numel()
    if input_norms:
        stats.input_norms = {name: value.sqrt().float() for name, value in sq.items()}
    if minitron:
        stats.heads = {i: agg.result() for i, agg in heads.items()}
        stats.mlp = {i: agg.result() for i, agg in mlp.items()}
        stats.hidden = torch.stack([agg.result() for agg in norms.values()]).sum(dim=0)
    if layers:
        stats.layers = bi_sum / max(bi_count, 1)


def _loss(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ConfigError(f"{type(module).__name__} returns no loss for labels; gradient criteria need a LM head")
    return loss


@contextlib.contextmanager
def _requires_grad(module: nn.Module, value: bool) -> Iterator[None]:
    old = {name: p.requires_grad for name, p in module.named_parameters()}
    try:
        for p in module.parameters():
            p.requires_grad_(value)
        yield
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(old[name])
            p.grad = None


def _taylor_grads(module: nn.Module, batches: Sequence[torch.Tensor], stats: Statistics) -> None:
    """Σ over calibration batches of ∂L/∂W for every parameter (LLM-Pruner accumulates the same way)."""
    with _requires_grad(module, True), torch.enable_grad():
        module.zero_grad(set_to_none=True)
        for ids in batches:
            _loss(module, ids).backward()
        stats.grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _michel_head_grads(
    module: nn.Module, structure: ModelStructure, batches: Sequence[torch.Tensor], stats: Statistics
) -> None:
    """Σ_x |∂L(x)/∂ξ_h| with one gate per example and head, multiplied into each head's output."""
    modules = dict(module.named_modules())
    gates: dict[int, torch.Tensor] = {}
    totals = {info.index: torch.zeros(info.num_heads, dtype=torch.float64) for info in structure.layers}

    def gate_hook(info):
        def hook(_mod, args):
            x = args[0]
            gate = gates[info.index]
            split = x.reshape(*x.shape[:-1], info.num_heads, info.head_dim)
            return (split * gate[:, None, :, None]).reshape(x.shape), *args[1:]

        return hook

    with _hooks() as handles, _requires_grad(module, False), torch.enable_grad():
        for info in structure.layers:
            handles.append(modules[info.o].register_forward_pre_hook(gate_hook(info)))
        for ids in batches:
            for info in structure.layers:
                gates[info.index] = torch.ones(ids.shape[0], info.num_heads, requires_grad=True)
            # The loss is a mean over the batch's tokens; scale back to a per-example loss gradient.
            (_loss(module, ids) * ids.shape[0]).backward()
            for info in structure.layers:
                totals[info.index] += gates[info.index].grad.detach().abs().double().sum(dim=0)
    for index, total in totals.items():
        norm = total.norm()
        stats.heads[index] = total / norm if norm > 0 else total


def collect_statistics(
    module: nn.Module,
    structure: ModelStructure,
    batches: Sequence[torch.Tensor],
    *,
    criterion: str,
    structures: Sequence[str],
    seq_agg: str = "mean",
    batch_agg: str = "l2",
) -> Statistics:
    """Runs the calibration passes ``criterion`` needs for ``structures`` and returns what they measured.

    ``batches`` are input-id tensors [batch, seq]; magnitude without layer pruning needs none.
    """
    if seq_agg not in _AGGREGATIONS or batch_agg not in _AGGREGATIONS:
        raise ConfigError(f"aggregation: seq and batch must each be one of {_AGGREGATIONS}")
    stats = Statistics(tokens=sum(int(b.numel()) for b in batches))
    need_layers = "layers" in structures
    need_norms = criterion == "wanda"
    need_minitron = criterion == "minitron" and bool(set(structures) - {"layers"})
    if (need_layers or need_norms or need_minitron or criterion in ("taylor", "michel")) and not batches:
        raise ConfigError(f"criterion '{criterion}' (or layer pruning) needs calibration data")
    was_training = module.training
    module.eval()
    try:
        if need_layers or need_norms or need_minitron:
            _forward_stats(
                module,
                structure,
                batches,
                input_norms=need_norms,
                minitron=need_minitron,
                layers=need_layers,
                seq_agg=seq_agg,
                batch_agg=batch_agg,
                stats=stats,
            )
        if criterion == "taylor":
            _taylor_grads(module, batches, stats)
        if criterion == "michel" and "heads" in structures:
            _michel_head_grads(module, structure, batches, stats)
    finally:
        module.train(was_training)
    return stats


def element_score_fn(criterion: str, structure: ModelStructure, stats: Statistics):
    """Returns ``param name -> element scores`` for an element criterion.

    Parameters without the statistic a criterion needs (embeddings and norm scales have no Linear input
    norm) fall back to magnitude, so a hidden channel's score still counts its embedding column.
    """
    if criterion not in ELEMENT_CRITERIA:
        raise ConfigError(f"criterion '{criterion}' has no per-weight score")

    def score(param: str) -> torch.Tensor:
        weight = structure.params[param]
        if criterion == "wanda" and weight.ndim == 2:
            norm = stats.input_norms.get(param.rsplit(".", 1)[0])
            if norm is not None:
                return wanda_scores(weight, norm)
        if criterion == "taylor":
            grad = stats.grads.get(param)
            if grad is not None:
                return taylor_scores(weight, grad)
        return magnitude_scores(weight)

    return score
