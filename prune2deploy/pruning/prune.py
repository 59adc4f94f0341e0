"""The pruning entry point: scores → choices → masks + plan, written atomically to an output folder.

:func:`prune_module` works in memory on a loaded module (tests, benchmarks, the API); :func:`prune_model`
loads a model, calibrates, prunes and writes ``masks.safetensors`` + ``plan.yaml``. The CLI's
``prune2deploy prune`` calls :func:`prune_model` only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune2deploy.errors import ConfigError, OutputExistsError
from prune2deploy.io import atomic_write_bytes, check_not_input
from prune2deploy.pruning.calibration import CalibrationData, load_calibration
from prune2deploy.pruning.criteria import (
    ELEMENT_CRITERIA,
    Statistics,
    check_criterion,
    collect_statistics,
    element_score_fn,
)
from prune2deploy.pruning.plan import (
    HEAD_GROUPINGS,
    STRUCTURE_KEYS,
    LayerChoice,
    Plan,
    Selection,
    dump_plan,
)
from prune2deploy.pruning.selection import (
    GLOBAL_SCALES,
    global_keep_counts,
    kept_count,
    round_half_up,
    round_width,
    select_heads,
    top_units,
)
from prune2deploy.pruning.sparsity import COMPARISON_GROUPS, nm_mask, unstructured_mask
from prune2deploy.pruning.structures import ModelStructure, detect_structure, family_masks, unit_scores

__all__ = ["MASKS_FILE", "PLAN_FILE", "PruneResult", "prune_model", "prune_module", "validate_options"]

log = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
PLAN_FILE = "plan.yaml"


@dataclass
class PruneResult:
    """Where the masks and plan went, the plan itself and a few counts for the CLI's summary."""

    out_dir: Path
    masks_path: Path
    plan_path: Path
    plan: Plan
    summary: dict[str, Any] = field(default_factory=dict)


def validate_options(
    criterion: str,
    structures: Mapping[str, float],
    *,
    round_to: int | None,
    nm: tuple[int, int] | None,
    head_grouping: str,
    global_scale: str = "standardize",
    min_keep: float = 0.0,
) -> None:
    """Checks every option that does not need the model, so that bad input fails before a long load."""
    for key, ratio in structures.items():
        if key not in STRUCTURE_KEYS:
            raise ConfigError(f"structures: unknown '{key}'; choose from {', '.join(STRUCTURE_KEYS)}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ConfigError(f"structures.{key}: ratio must be a number in [0, 1), got {ratio!r}")
    if nm is not None:
        if len(nm) != 2 or not 0 < int(nm[0]) < int(nm[1]):
            raise ConfigError(f"nm: needs N:M with 0 < N < M, got {nm!r}")
        if "unstructured" in structures:
            raise ConfigError("choose either unstructured sparsity or N:M, not both")
    if round_to is not None and (isinstance(round_to, bool) or int(round_to) < 1):
        raise ConfigError(f"round_to: must be a positive integer, got {round_to!r}")
    if head_grouping not in HEAD_GROUPINGS:
        raise ConfigError(f"head_grouping: must be one of {', '.join(HEAD_GROUPINGS)}, got '{head_grouping}'")
    if global_scale not in GLOBAL_SCALES:
        raise ConfigError(f"global_scale: must be one of {', '.join(GLOBAL_SCALES)}, got '{global_scale}'")
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0.0 <= min_keep <= 1.0:
        raise ConfigError(f"min_keep: must be a fraction in [0, 1], got {min_keep!r}")
    for key in ("mlp", "heads"):
        if structures.get(key, 0.0) + min_keep > 1.0 + 1e-9:
            raise ConfigError(
                f"min_keep {min_keep} keeps more of every layer than structures.{key} = {structures[key]} "
                "leaves; lower --min-keep below 1 - the ratio"
            )
    if not any(v > 0 for v in structures.values()) and nm is None:
        raise ConfigError("nothing to prune: give at least one structure ratio or an N:M pattern")
    check_criterion(criterion, _names(structures, nm), task=None)


def _names(structures: Mapping[str, float], nm) -> list[str]:
    return [k for k, v in structures.items() if v > 0] + (["nm"] if nm else [])


def _method(structures: Mapping[str, float], nm) -> str:
    parts = []
    if any(structures.get(k, 0) > 0 for k in ("mlp", "heads", "hidden")):
        parts.append("width")
    if structures.get("layers", 0) > 0:
        parts.append("depth")
    if structures.get("unstructured", 0) > 0:
        parts.append("unstructured")
    if nm:
        parts.append(f"{nm[0]}:{nm[1]}")
    return "+".join(parts) or "none"


class _Scorer:
    """Unit scores for one family, from element scores or from the measured statistics."""

    def __init__(self, criterion: str, structure: ModelStructure, stats: Statistics) -> None:
        self.criterion, self.structure, self.stats = criterion, structure, stats
        self.element = element_score_fn(criterion, structure, stats) if criterion in ELEMENT_CRITERIA else None

    def mlp(self, layer) -> torch.Tensor:
        if self.element:
            return unit_scores(self.structure.mlp_family(layer), self.element)
        return self.stats.mlp[layer.index]

    def heads(self, layer) -> torch.Tensor:
        if self.element:
            return unit_scores(self.structure.head_family(layer), self.element)
        return self.stats.heads[layer.index]

    def hidden(self) -> torch.Tensor:
        if self.element:
            return unit_scores(self.structure.hidden_family(), self.element)
        return self.stats.hidden


@dataclass(frozen=True)
class _Ranking:
    """How kept counts are chosen: per layer, or one global ranking on a common scale with a floor."""

    per_layer: bool = True
    scale: str = "standardize"
    min_keep: float = 0.0

    def counts(self, scores: dict[int, torch.Tensor], ratio: float, round_to, width: int) -> dict[int, int]:
        if self.per_layer:
            return {i: kept_count(width, ratio, round_to) for i in scores}
        kept = global_keep_counts(scores, ratio, scale=self.scale, min_keep=self.min_keep)
        return {i: round_width(c, width, round_to) for i, c in kept.items()}


def prune_module(
    module: nn.Module,
    *,
    criterion: str,
    structures: Mapping[str, float],
    per_layer: bool = True,
    round_to: int | None = None,
    nm: tuple[int, int] | None = None,
    calibration: CalibrationData | None = None,
    head_grouping: str = "free",
    task: str = "causal-lm",
    batch_size: int = 4,
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    structure: ModelStructure | None = None,
    global_scale: str = "standardize",
    min_keep: float = 0.0,
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """Scores and chooses structures of a loaded module; returns the plan and the masks (not written).

    Args:
        module: a transformers model (Llama-style decoder or BERT-style encoder); it is not modified.
        criterion: magnitude, wanda, taylor, minitron or michel (see :mod:`.criteria`).
        structures: fraction to remove per structure: ``unstructured``, ``mlp`` (neurons), ``heads``,
            ``hidden`` (channels) and ``layers`` (depth; plan only, no mask).
        per_layer: the same ratio in every layer; otherwise one global ranking across layers.
        round_to: kept MLP and hidden widths become multiples of this (heads are not rounded).
        nm: an N:M pattern along the input dimension of every Linear in the blocks.
        calibration: token windows; required by every criterion except magnitude without layer pruning.
        head_grouping: free, uniform or whole-group (see :func:`.selection.select_heads`).
        task: causal-lm or encoder (gradient criteria need causal-lm).
        batch_size: calibration windows per forward pass.
        seq_agg, batch_agg: Minitron's aggregation over sequence and batch (mean or l2).
        structure: a precomputed :func:`detect_structure` result.
        global_scale: with ``per_layer=False``, ``standardize`` (each layer's scores on a common scale
            before the global ranking) or ``raw`` (see :func:`.selection.global_keep_counts`).
        min_keep: with ``per_layer=False``, the fraction of every layer's units that always stays.
    """
    structures = {k: float(v) for k, v in structures.items()}
    validate_options(
        criterion, structures, round_to=round_to, nm=nm, head_grouping=head_grouping,
        global_scale=global_scale, min_keep=min_keep,
    )  # fmt: skip
    names = _names(structures, nm)
    check_criterion(criterion, names, task=task)
    structure = structure or detect_structure(module)
    batches = calibration.batches(batch_size) if calibration is not None else []
    stats = collect_statistics(
        module,
        structure,
        batches,
        criterion=criterion,
        structures=names,
        seq_agg=seq_agg,
        batch_agg=batch_agg,
    )
    scorer = _Scorer(criterion, structure, stats)
    masks: dict[str, torch.Tensor] = {}
    choices = {layer.index: LayerChoice(layer.index) for layer in structure.layers}
    if per_layer and (min_keep or global_scale != "standardize"):
        raise ConfigError("global_scale and min_keep shape the global ranking only: pass per_layer=False (--global)")
    ranking = _Ranking(per_layer, global_scale, float(min_keep))
    _choose_mlp(structure, scorer, structures.get("mlp", 0.0), ranking, round_to, choices, masks)
    _choose_heads(structure, scorer, structures.get("heads", 0.0), ranking, head_grouping, choices, masks)
    hidden = _choose_hidden(structure, scorer, structures.get("hidden", 0.0), round_to, masks)
    dropped = _choose_dropped_layers(structure, stats, structures.get("layers", 0.0))
    sparsity = _weight_sparsity(criterion, structure, stats, structures.get("unstructured", 0.0), nm, masks)

    masks = {name: mask.contiguous() for name, mask in masks.items() if bool((mask == 0).any())}
    plan = Plan(
        method=_method(structures, nm),
        criterion=criterion,
        ratios=dict(structures),
        per_layer=per_layer,
        round_to=round_to,
        nm=tuple(nm) if nm else None,
        head_grouping=head_grouping,
        calibration=calibration.info() if calibration is not None and batches else None,
        model=_model_info(module, structure, task),
        hidden=hidden,
        dropped_layers=dropped,
        layers=[c for c in choices.values() if c.mlp or c.heads or c.kv_heads],
        sparsity=sparsity,
        options={
            "batch_size": batch_size,
            "seq_agg": seq_agg,
            "batch_agg": batch_agg,
            "layer_criterion": "block-importance",
            **({} if per_layer else {"global_scale": global_scale, "min_keep": float(min_keep)}),
        },
    )
    if stats.layers is not None:
        plan.options["block_importance"] = [round(float(v), 6) for v in stats.layers]
    return plan, masks


def _choose_mlp(
    structure: ModelStructure,
    scorer: _Scorer,
    ratio: float,
    ranking: _Ranking,
    round_to: int | None,
    choices: dict[int, LayerChoice],
    masks: dict[str, torch.Tensor],
) -> None:
    """Keeps the best-scoring MLP neurons of every layer; records the choice and masks the rest.

    Every layer has the same intermediate width, so one kept count per layer (or one global ranking)
    decides the widths, rounded to ``round_to`` for kernels that prefer aligned sizes.
    """
    if ratio <= 0:
        return
    scores = {layer.index: scorer.mlp(layer) for layer in structure.layers}
    width = structure.layers[0].intermediate
    counts = ranking.counts(scores, ratio, round_to, width)
    for layer in structure.layers:
        sel = Selection.from_kept(top_units(scores[layer.index], counts[layer.index]), width)
        choices[layer.index].mlp = sel
        family_masks(structure, structure.mlp_family(layer), sel.removed, masks)


def _choose_heads(
    structure: ModelStructure,
    scorer: _Scorer,
    ratio: float,
    ranking: _Ranking,
    head_grouping: str,
    choices: dict[int, LayerChoice],
    masks: dict[str, torch.Tensor],
) -> None:
    """Keeps the best query heads of every layer, and the KV heads that a kept query head still reads.

    Head counts are never rounded (a head is already a unit of ``head_dim`` channels). Under grouped-query
    attention a KV head is removed only when ``head_grouping`` removes its whole group of query heads, so
    it is masked as its own family.
    """
    if ratio <= 0:
        return
    scores = {layer.index: scorer.heads(layer) for layer in structure.layers}
    width = structure.layers[0].num_heads
    counts = ranking.counts(scores, ratio, None, width)
    for layer in structure.layers:
        kept, kv_removed = select_heads(scores[layer.index], counts[layer.index], layer.num_kv_heads, head_grouping)
        choice = choices[layer.index]
        choice.heads = Selection.from_kept(kept, width)
        family_masks(structure, structure.head_family(layer), choice.heads.removed, masks)
        if layer.num_kv_heads < layer.num_heads:
            kv_kept = [g for g in range(layer.num_kv_heads) if g not in kv_removed]
            choice.kv_heads = Selection.from_kept(kv_kept, layer.num_kv_heads)
            family_masks(structure, structure.kv_family(layer), kv_removed, masks)


def _choose_hidden(
    structure: ModelStructure,
    scorer: _Scorer,
    ratio: float,
    round_to: int | None,
    masks: dict[str, torch.Tensor],
) -> Selection | None:
    """Keeps the best hidden (residual-stream) channels: one choice for the whole model, as every layer
    reads and writes the same stream; None when hidden channels are not pruned."""
    if ratio <= 0:
        return None
    kept = top_units(scorer.hidden(), kept_count(structure.hidden, ratio, round_to))
    hidden = Selection.from_kept(kept, structure.hidden)
    family_masks(structure, structure.hidden_family(), hidden.removed, masks)
    return hidden


def _choose_dropped_layers(structure: ModelStructure, stats: Statistics, ratio: float) -> list[int]:
    """The least important blocks to drop (depth pruning; the plan names them, no mask is written).

    At least one layer always stays; equal importances are ordered by layer index (a stable sort), so
    the same scores always give the same plan.
    """
    if ratio <= 0:
        return []
    n_drop = min(structure.num_layers - 1, round_half_up(structure.num_layers * ratio))
    order = torch.sort(stats.layers, stable=True).indices[:n_drop]
    return sorted(int(i) for i in order)


def _weight_sparsity(criterion, structure, stats, ratio, nm, masks) -> dict | None:
    if not ratio and not nm:
        return None
    score = element_score_fn(criterion, structure, stats)
    group = COMPARISON_GROUPS[criterion]
    params = structure.linear_weights()
    zeros = total = 0
    for name in params:
        scores = score(name)
        if name in masks:
            scores = scores * masks[name]  # structurally removed weights count towards the sparsity
        new = nm_mask(scores, *nm) if nm else unstructured_mask(scores, ratio, group=group)
        masks[name] = new if name not in masks else masks[name] * new
        zeros += int((masks[name] == 0).sum())
        total += masks[name].numel()
    return {
        "kind": f"{nm[0]}:{nm[1]}" if nm else "unstructured",
        "ratio": ratio if not nm else round(1 - nm[0] / nm[1], 6),
        "comparison": "n:m groups along the input dimension" if nm else group,
        "params": len(params),
        "achieved": round(zeros / max(total, 1), 6),
    }


def _model_info(module: nn.Module, structure: ModelStructure, task: str) -> dict[str, Any]:
    first = structure.layers[0]
    return {
        "class": type(module).__name__,
        "arch": structure.arch,
        "task": task,
        "num_layers": structure.num_layers,
        "hidden_size": structure.hidden,
        "num_heads": first.num_heads,
        "num_kv_heads": first.num_kv_heads,
        "head_dim": first.head_dim,
        "intermediate_size": first.intermediate,
    }


def _check_out_dir(out_dir: Path, overwrite: bool, inputs: tuple = ()) -> None:
    """The guard of every command that writes (``io.check_not_input``): never into the model or calibration."""
    check_not_input(out_dir, [Path(i) for i in inputs if isinstance(i, (str, Path)) and Path(i).exists()])
    if out_dir.exists() and not overwrite and (out_dir.is_file() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir}: exists and is not empty; pass overwrite=True (--overwrite)")


def prune_model(
    source,
    *,
    criterion: str,
    structures: Mapping[str, float],
    per_layer: bool = True,
    round_to: int | None = None,
    nm: tuple[int, int] | None = None,
    calibration: Path | str | None = None,
    num_samples: int = 24,
    seq_len: int = 128,
    out_dir: Path | str,
    overwrite: bool = False,
    head_grouping: str = "free",
    batch_size: int = 4,
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    tokenizer=None,
    task: str | None = None,
    global_scale: str = "standardize",
    min_keep: float = 0.0,
) -> PruneResult:
    """Loads ``source``, prunes it and writes ``masks.safetensors`` and ``plan.yaml`` into ``out_dir``.

    Args:
        source: a model folder, a ``.gguf`` file, a bundled name (``smollm2-135m``, ``minilm-l6``), an
            :class:`~prune2deploy.frontends.hf.HFModel` or a transformers module (then pass ``tokenizer``
            for text calibration and ``task``).
        calibration: text or ids file; None uses the bundled text (magnitude-only runs use no data).
        out_dir: output folder; an existing non-empty one is refused unless ``overwrite``.
        The other arguments are those of :func:`prune_module`.

    Raises:
        ConfigError: an invalid option (before anything is loaded).
        OutputExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
    """
    structures = {k: float(v) for k, v in structures.items()}
    validate_options(
        criterion, structures, round_to=round_to, nm=nm, head_grouping=head_grouping,
        global_scale=global_scale, min_keep=min_keep,
    )  # fmt: skip
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite, (source, calibration))
    module, tokenizer, task, label = _load_source(source, tokenizer, task)
    check_criterion(criterion, _names(structures, nm), task=task)
    calib = None
    if criterion != "magnitude" or structures.get("layers", 0) > 0:  # only magnitude scores need no data
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        calib = load_calibration(
            calibration, tokenizer=tokenizer, num_samples=num_samples, seq_len=seq_len, vocab_size=vocab
        )
    plan, masks = prune_module(
        module,
        criterion=criterion,
        structures=structures,
        per_layer=per_layer,
        round_to=round_to,
        nm=nm,
        calibration=calib,
        head_grouping=head_grouping,
        task=task,
        batch_size=batch_size,
        seq_agg=seq_agg,
        batch_agg=batch_agg,
        global_scale=global_scale,
        min_keep=min_keep,
    )
    plan.model["source"] = label
    masks_path, plan_path = _write_outputs(plan, masks, out_dir, criterion)
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    summary = {
        "method": plan.method,
        "masked_tensors": len(masks),
        "zeroed_weights": zeros,
        "dropped_layers": plan.dropped_layers,
        "calibration_sha256": plan.calibration["sha256"] if plan.calibration else None,
    }
    log.info("pruned %s with %s: %s", label, criterion, summary)
    return PruneResult(out_dir=out_dir, masks_path=masks_path, plan_path=plan_path, plan=plan, summary=summary)


def _load_source(source, tokenizer, task: str | None) -> tuple[nn.Module, Any, str, str]:
    """The module, its tokenizer, its task and a label for the plan, from whatever ``source`` is.

    A module handed in directly has no loader to say its task: a language-model head means causal-lm.
    """
    from prune2deploy.frontends.hf import HFModel, load_hf_model

    if isinstance(source, nn.Module):
        task = task or ("causal-lm" if hasattr(source, "lm_head") else "encoder")
        return source, tokenizer, task, type(source).__name__
    loaded = source if isinstance(source, HFModel) else load_hf_model(source, task=task)
    label = str(source) if not isinstance(source, HFModel) else str(loaded.source)
    return loaded.module, tokenizer or loaded.tokenizer, task or loaded.task, label


def _write_outputs(plan: Plan, masks: dict[str, torch.Tensor], out_dir: Path, criterion: str) -> tuple[Path, Path]:
    """Writes the masks, then the plan that names them by digest (so a plan never points at other masks).

    Masks are 0/1, so they are stored as bool: one byte a weight instead of the weights' four (SmolLM2's
    masks were 398 MB in fp32 beside a 261 KB plan); the loaders cast them to each weight's dtype.
    """
    from safetensors.torch import save

    masks = {name: mask.to(torch.bool) for name, mask in masks.items()}
    data = save(masks, metadata={"format": "pt", "producer": "prune2deploy", "criterion": criterion})
    masks_path, plan_path = out_dir / MASKS_FILE, out_dir / PLAN_FILE
    atomic_write_bytes(masks_path, data)
    plan.masks = {"file": MASKS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "tensors": len(masks)}
    dump_plan(plan, plan_path)
    return masks_path, plan_path
