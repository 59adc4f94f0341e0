"""The pruning plan: what was chosen, how and from which data, as a YAML file next to the masks.

The masks say *which weights* are zero; the plan says *why* and carries what masks cannot: the dropped
layers (depth pruning is plan-only), the GQA grouping, the rounding and the calibration hash. The compiler
reads it back with :func:`load_plan`, whose errors name the offending field, because a plan edited by
hand is a common input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import yaml

from prune2deploy.errors import BadInputError, ConfigError
from prune2deploy.io import atomic_write_text, read_config_file
from prune2deploy.limits import PLAN_BYTES

__all__ = [
    "PLAN_VERSION",
    "LayerChoice",
    "Plan",
    "Selection",
    "dump_plan",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
]

PLAN_VERSION = 1
STRUCTURE_KEYS = ("unstructured", "mlp", "heads", "hidden", "layers")
HEAD_GROUPINGS = ("free", "uniform", "whole-group")


@dataclass
class Selection:
    """Kept and removed unit indices of one family; together they cover ``range(width)``."""

    kept: list[int]
    removed: list[int]

    @property
    def width(self) -> int:
        return len(self.kept) + len(self.removed)

    @classmethod
    def from_kept(cls, kept, width: int) -> Selection:
        kept_set = {int(k) for k in kept}
        return cls(sorted(kept_set), [i for i in range(width) if i not in kept_set])


@dataclass
class LayerChoice:
    """The structures chosen in one block (``None`` where that structure was not pruned)."""

    index: int
    mlp: Selection | None = None
    heads: Selection | None = None
    kv_heads: Selection | None = None


@dataclass
class Plan:
    """A pruning plan. ``ratios`` are the requested fractions to remove per structure."""

    method: str
    criterion: str
    ratios: dict[str, float]
    per_layer: bool = True
    round_to: int | None = None
    nm: tuple[int, int] | None = None
    head_grouping: str = "free"
    calibration: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    hidden: Selection | None = None
    dropped_layers: list[int] = field(default_factory=list)
    layers: list[LayerChoice] = field(default_factory=list)
    sparsity: dict[str, Any] | None = None
    masks: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION


def _selection_dict(sel: Selection | None) -> dict | None:
    return None if sel is None else {"width": sel.width, "kept": list(sel.kept), "removed": list(sel.removed)}


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Plain data in a fixed key order (the YAML reads top-down: what, how, from what, then choices)."""
    layers = []
    for choice in plan.layers:
        entry: dict[str, Any] = {"layer": choice.index}
        for key in ("mlp", "heads", "kv_heads"):
            sel = getattr(choice, key)
            if sel is not None:
                entry[key] = _selection_dict(sel)
        layers.append(entry)
    return {
        "version": plan.version,
        "method": plan.method,
        "criterion": plan.criterion,
        "ratios": dict(plan.ratios),
        "per_layer": plan.per_layer,
        "round_to": plan.round_to,
        "nm": list(plan.nm) if plan.nm else None,
        "head_grouping": plan.head_grouping,
        "options": dict(plan.options),
        "calibration": plan.calibration,
        "model": dict(plan.model),
        "masks": plan.masks,
        "sparsity": plan.sparsity,
        "dropped_layers": list(plan.dropped_layers),
        "hidden": _selection_dict(plan.hidden),
        "layers": layers,
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a shared object out again instead of as an anchor and alias, which load_plan refuses."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_plan(plan: Plan, path: Path) -> None:
    """Writes the plan atomically; index lists stay on one line each (flow style)."""
    text = yaml.dump(plan_to_dict(plan), Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None, width=120)
    atomic_write_text(Path(path), text)


class _Fields:
    """Typed reads from a mapping; every error names the field's full path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: field '{path}' {message}")

    def get(self, data: dict, key: str, path: str, types, *, required: bool = True, default=None):
        if not isinstance(data, dict):
            raise self.fail(path.rsplit(".", 1)[0] or path, "must be a mapping")
        if key not in data or data[key] is None:
            if required:
                raise self.fail(path, "is missing")
            return default
        value = data[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(path, f"must be {_type_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(path, f"must be {_type_names(types)}, got {type(value).__name__} {value!r}")
        return value

    def int_list(self, data: dict, key: str, path: str) -> list[int]:
        values = self.get(data, key, path, list)
        for i, value in enumerate(values):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self.fail(f"{path}[{i}]", f"must be a non-negative integer, got {value!r}")
        if len(set(values)) != len(values):
            raise self.fail(path, "has repeated indices")
        return [int(v) for v in values]

    def selection(self, data: dict, key: str, path: str, width: int | None) -> Selection | None:
        raw = self.get(data, key, path, dict, required=False)
        if raw is None:
            return None
        kept = self.int_list(raw, "kept", f"{path}.kept")
        removed = self.int_list(raw, "removed", f"{path}.removed")
        declared = self.get(raw, "width", f"{path}.width", int, required=False)
        total = width if width is not None else declared
        if declared is not None and width is not None and declared != width:
            raise self.fail(f"{path}.width", f"is {declared} but the model's width is {width}")
        if total is None:
            total = len(kept) + len(removed)
        if len(kept) + len(removed) != total:  # before range(total): a width of 10**12 must not allocate
            raise self.fail(path, f"kept and removed must together cover 0..{total - 1} exactly")
        if set(kept) & set(removed):
            raise self.fail(path, f"lists indices both kept and removed: {sorted(set(kept) & set(removed))[:8]}")
        if set(kept) | set(removed) != set(range(total)):
            raise self.fail(path, f"kept and removed must together cover 0..{total - 1} exactly")
        return Selection(sorted(kept), sorted(removed))


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(
        {
            "int": "an integer",
            "float": "a number",
            "str": "a string",
            "dict": "a mapping",
            "list": "a list",
            "bool": "true or false",
        }.get(t.__name__, t.__name__)
        for t in types
    )


def plan_from_dict(data: Any, where: str = "plan") -> Plan:
    """Validates plain data (from YAML) into a :class:`Plan`.

    Raises:
        ConfigError: a field is missing, of the wrong type or inconsistent; the message names the field.
    """
    from prune2deploy.pruning.criteria import CRITERIA

    f = _Fields(where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a plan must be a mapping at the top level")
    version = f.get(data, "version", "version", int)
    if version != PLAN_VERSION:
        raise f.fail("version", f"is {version}; this prune2deploy reads version {PLAN_VERSION}")
    method = f.get(data, "method", "method", str)
    criterion = f.get(data, "criterion", "criterion", str)
    if criterion not in CRITERIA:
        raise f.fail("criterion", f"must be one of {list(CRITERIA)}, got '{criterion}'")
    # Fields are checked in the file's order, so that a plan with several errors reports the first one.
    ratios = _ratios(f, data)
    per_layer = f.get(data, "per_layer", "per_layer", bool, required=False, default=True)
    round_to = f.get(data, "round_to", "round_to", int, required=False)
    if round_to is not None and round_to < 1:
        raise f.fail("round_to", f"must be a positive integer, got {round_to}")
    nm = _nm_pattern(f, data)
    grouping = f.get(data, "head_grouping", "head_grouping", str, required=False, default="free")
    if grouping not in HEAD_GROUPINGS:
        raise f.fail("head_grouping", f"must be one of {list(HEAD_GROUPINGS)}, got '{grouping}'")
    model = f.get(data, "model", "model", dict, required=False, default={})
    num_layers = model.get("num_layers") if isinstance(model.get("num_layers"), int) else None
    calibration = _calibration(f, data)
    dropped = _dropped_layers(f, data, num_layers)
    hidden = f.selection(data, "hidden", "hidden", model.get("hidden_size"))
    layers = _layer_choices(f, data, model, num_layers)
    return Plan(
        method=method,
        criterion=criterion,
        ratios=ratios,
        per_layer=per_layer,
        round_to=round_to,
        nm=nm,
        head_grouping=grouping,
        calibration=calibration,
        model=model,
        hidden=hidden,
        dropped_layers=dropped,
        layers=layers,
        masks=_masks(f, data),
        sparsity=f.get(data, "sparsity", "sparsity", dict, required=False),
        options=f.get(data, "options", "options", dict, required=False, default={}),
        version=version,
    )


def _ratios(f: _Fields, data: dict) -> dict[str, float]:
    """The pruned fraction per structure: known structure names, each a number in [0, 1)."""
    ratios = {}
    for key, value in f.get(data, "ratios", "ratios", dict).items():
        if key not in STRUCTURE_KEYS:
            raise f.fail(f"ratios.{key}", f"is not a structure; use one of {list(STRUCTURE_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise f.fail(f"ratios.{key}", f"must be a number in [0, 1), got {value!r}")
        ratios[key] = float(value)
    return ratios


def _nm_pattern(f: _Fields, data: dict) -> tuple[int, int] | None:
    """The N:M pattern as a pair of integers with 0 < N < M, or None when the plan has none."""
    nm_raw = f.get(data, "nm", "nm", list, required=False)
    if nm_raw is None:
        return None
    if len(nm_raw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in nm_raw):
        raise f.fail("nm", f"must be [N, M] with two integers, got {nm_raw!r}")
    if not 0 < nm_raw[0] < nm_raw[1]:
        raise f.fail("nm", f"needs 0 < N < M, got {nm_raw[0]}:{nm_raw[1]}")
    return (int(nm_raw[0]), int(nm_raw[1]))


def _calibration(f: _Fields, data: dict) -> dict | None:
    """The calibration record; its hash must be a full SHA-256, since it is how runs are compared."""
    calibration = f.get(data, "calibration", "calibration", dict, required=False)
    if calibration is not None:
        sha = f.get(calibration, "sha256", "calibration.sha256", str)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise f.fail("calibration.sha256", "must be 64 lowercase hex digits")
    return calibration


def _masks(f: _Fields, data: dict) -> dict | None:
    """The mask file the plan names: a relative path (it is read beside the plan, never elsewhere) and the
    sha256 that binds it to the plan; whether the path stays inside the plan's folder is checked where the
    file is opened (``driver/preflight.py``), since only the file system can say where symlinks lead."""
    masks = f.get(data, "masks", "masks", dict, required=False)
    if masks is None:
        return None
    name = f.get(masks, "file", "masks.file", str, required=False)
    bad = name is not None and (not name.strip() or "\0" in name or PureWindowsPath(name).drive)
    if bad or (name is not None and Path(name).is_absolute()):
        raise f.fail("masks.file", f"must be a file name relative to the plan's folder, got {name!r}")
    sha = f.get(masks, "sha256", "masks.sha256", str, required=False)
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise f.fail("masks.sha256", "must be 64 lowercase hex digits")
    tensors = f.get(masks, "tensors", "masks.tensors", int, required=False)
    if tensors is not None and tensors < 0:
        raise f.fail("masks.tensors", f"must be a non-negative integer, got {tensors}")
    return masks


def _dropped_layers(f: _Fields, data: dict, num_layers: int | None) -> list[int]:
    """The dropped layer indices, sorted; inside the model and never all of it, where its depth is known."""
    dropped = f.int_list(data, "dropped_layers", "dropped_layers") if data.get("dropped_layers") else []
    if num_layers is not None:
        for i, index in enumerate(dropped):
            if index >= num_layers:
                raise f.fail(f"dropped_layers[{i}]", f"is {index} but the model has {num_layers} layers")
        if len(dropped) >= num_layers:
            raise f.fail("dropped_layers", "drops every layer")
    return sorted(dropped)


def _layer_choices(f: _Fields, data: dict, model: dict, num_layers: int | None) -> list[LayerChoice]:
    """Each layer's MLP, head and KV-head selections, checked against the model's widths.

    A layer may appear once; under grouped-query attention the query and KV choices must agree
    (:func:`_check_gqa`), since a KV head cannot go while a query head still reads it.
    """
    layers, seen = [], set()
    for i, entry in enumerate(f.get(data, "layers", "layers", list, required=False, default=[])):
        path = f"layers[{i}]"
        index = f.get(entry, "layer", f"{path}.layer", int)
        if index in seen or index < 0 or (num_layers is not None and index >= num_layers):
            raise f.fail(f"{path}.layer", f"is {index}: repeated or outside the model's {num_layers} layers")
        seen.add(index)
        choice = LayerChoice(
            index=index,
            mlp=f.selection(entry, "mlp", f"{path}.mlp", model.get("intermediate_size")),
            heads=f.selection(entry, "heads", f"{path}.heads", model.get("num_heads")),
            kv_heads=f.selection(entry, "kv_heads", f"{path}.kv_heads", model.get("num_kv_heads")),
        )
        if choice.heads is not None and choice.kv_heads is not None:
            _check_gqa(f, path, choice)
        layers.append(choice)
    return layers


def _check_gqa(f: _Fields, path: str, choice: LayerChoice) -> None:
    """A kv head may be removed only when every query head it serves is removed, and vice versa."""
    heads, kv = choice.heads, choice.kv_heads
    group = heads.width // kv.width if kv.width else 0
    if not group or heads.width % kv.width:
        raise f.fail(f"{path}.kv_heads", f"width {kv.width} does not divide {heads.width} query heads")
    kept_groups = {h // group for h in heads.kept}
    for g in kv.removed:
        if g in kept_groups:
            raise f.fail(f"{path}.kv_heads.removed", f"removes kv head {g} while its query heads are still kept")
    for g in kv.kept:
        if g not in kept_groups:
            raise f.fail(f"{path}.kv_heads.kept", f"keeps kv head {g} but removes all its query heads")


def load_plan(path: Path | str) -> Plan:
    """Reads and validates a plan YAML written by :func:`dump_plan` (or by hand)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: plan file not found")
    data = read_config_file(path, what="plan", max_bytes=PLAN_BYTES, default_format="YAML")
    return plan_from_dict(data, where=str(path))
