"""The sweep file: a model, a grid of options, fixed prune and compile options; expanded into variants.

A sweep file is validated like every other option (pydantic; unknown keys are errors naming the key), and
every variant is validated *before* anything is loaded or exported, so a typo in the 12th grid point does
not fail an hour into the sweep. A variant's id is readable (its grid values) and ends in a short hash of
its full options: re-running a sweep skips the variants whose hash already has a finished result.

Example::

    model: minilm-l6
    grid:
      criterion: [magnitude, wanda]
      mlp: [0.25, 0.5]
    prune: {samples: 4, seq_len: 32}
    compile: {batch: [1], seq: [64]}
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prune2deploy.errors import ConfigError
from prune2deploy.io import read_config_file
from prune2deploy.limits import SWEEP_VARIANTS, VARIANT_ID_BYTES
from prune2deploy.pruning.plan import HEAD_GROUPINGS, STRUCTURE_KEYS
from prune2deploy.spec import CompileOptions

__all__ = [
    "COMPILE_ALIASES",
    "GRID_COMPILE_KEYS",
    "PRUNE_KEYS",
    "PruneSettings",
    "QualitySettings",
    "SweepSpec",
    "Variant",
    "count_variants",
    "expand",
    "iter_variants",
    "load_sweep",
    "parse_sweep",
]

#: Grid keys that are prune options (``prune2deploy prune`` flags).
PRUNE_KEYS = (
    "criterion",
    *STRUCTURE_KEYS,
    "nm",
    "per_layer",
    "global_scale",
    "min_keep",
    "round_to",
    "head_grouping",
)
#: Grid keys that are compile options: grid name → CompileOptions key.
GRID_COMPILE_KEYS = {
    "regroup_gqa": "kv_heads",
    "engine": "engine",
    "precision": "precision",
    "gpu": "gpus",
    "genai_precision": "genai_precision",
}
#: Short names accepted in the ``compile:`` section (the CLI's flag names) → CompileOptions keys.
COMPILE_ALIASES = {
    "batch": "profile_batches",
    "seq": "profile_seqs",
    "gpu": "gpus",
    "regroup_gqa": "kv_heads",
    "budget_s": "profile_budget_s",
}
_ID_CHARS = re.compile(r"[a-z0-9][a-z0-9._-]*")
#: Compile options the sweep sets itself (per variant); a sweep file may not set them.
_SWEEP_OWNED = ("masks", "plan", "overwrite")


def _describe(exc: pydantic.ValidationError, where: str) -> str:
    parts = []
    for error in exc.errors()[:5]:
        loc = ".".join(str(p) for p in error["loc"]) or "sweep"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key '{loc}'")
        else:
            parts.append(f"{where}: '{loc}': {message} (got {error.get('input')!r:.60})")
    return "; ".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneSettings(_Strict):
    """What ``prune2deploy prune`` is given, for one variant (see :func:`prune2deploy.pruning.prune.prune_model`).

    Attributes:
        criterion: magnitude, wanda, taylor, minitron or michel.
        unstructured / mlp / heads / hidden / layers: fraction of each structure to remove.
        nm: an N:M pattern (``"2:4"``), or None.
        per_layer: the same ratio in every layer (otherwise one global ranking).
        global_scale / min_keep: with ``per_layer: false``, how layers' scores are put on one scale
            (``standardize`` or ``raw``) and the fraction of every layer that always stays (``prune --global-scale``,
            ``--min-keep``).
        round_to: kept MLP / hidden widths become multiples of this.
        head_grouping: free, uniform or whole-group.
        samples / seq_len / batch_size: calibration windows, their length, windows per forward pass.
        calibration: a text or token-id file (None: the bundled text).
    """

    criterion: Literal["magnitude", "wanda", "taylor", "minitron", "michel"] = "magnitude"
    unstructured: float = Field(0.0, ge=0, lt=1)
    mlp: float = Field(0.0, ge=0, lt=1)
    heads: float = Field(0.0, ge=0, lt=1)
    hidden: float = Field(0.0, ge=0, lt=1)
    layers: float = Field(0.0, ge=0, lt=1)
    nm: tuple[int, int] | None = None
    per_layer: bool = True
    global_scale: Literal["standardize", "raw"] = "standardize"
    min_keep: float = Field(0.0, ge=0, le=1)
    round_to: pydantic.PositiveInt | None = None
    head_grouping: Literal[HEAD_GROUPINGS] = "free"  # type: ignore[valid-type]
    samples: pydantic.PositiveInt = 24
    seq_len: pydantic.PositiveInt = 128
    batch_size: pydantic.PositiveInt = 4
    calibration: Path | None = None

    @field_validator("nm", mode="before")
    @classmethod
    def _parse_nm(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
            if not match:
                raise ValueError("N:M is written like '2:4'")
            return int(match.group(1)), int(match.group(2))
        return value

    def structures(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in STRUCTURE_KEYS if getattr(self, key) > 0}

    def prunes(self) -> bool:
        """Whether the variant prunes anything (a variant that does not compiles the dense model as it is:
        a baseline point, or a compile-only grid such as ``regroup_gqa``)."""
        return bool(self.structures()) or self.nm is not None

    def check(self, where: str) -> None:
        """The checks ``prune_model`` makes before loading anything (criterion vs structures, N:M …)."""
        from prune2deploy.pruning.prune import validate_options

        if not self.prunes():
            return
        try:
            validate_options(
                self.criterion,
                self.structures(),
                round_to=self.round_to,
                nm=self.nm,
                head_grouping=self.head_grouping,
                global_scale=self.global_scale,
                min_keep=self.min_keep,
            )
            if self.per_layer and (self.min_keep or self.global_scale != "standardize"):
                raise ConfigError("global_scale and min_keep shape the global ranking only: set per_layer: false")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


class QualitySettings(_Strict):
    """Quality of each compiled variant against the *dense* model, on the bundled evaluation text.

    Attributes:
        enabled: measure quality (KL / top-1 / perplexity for causal LMs, cosine for encoders).
        window / windows: tokens per window and windows (causal LMs).
        sentences: sentences embedded (encoders).
    """

    enabled: bool = True
    window: pydantic.PositiveInt = 128
    windows: pydantic.PositiveInt = 8
    sentences: pydantic.PositiveInt = 32


class SweepSpec(_Strict):
    """A sweep file.

    Attributes:
        model: an HF folder, a .gguf file or a bundled model name (the same as ``compile``'s input).
        name: a label for the report and the MLflow experiment (default: the file's stem).
        grid: option → list of values; every combination is one variant.
        prune: prune options shared by every variant.
        compile: compile options shared by every variant (CompileOptions keys, or ``batch``, ``seq``, ``gpu``).
        quality: how quality is measured.
    """

    model: str
    name: str | None = None
    grid: dict[str, list[Any]] = Field(min_length=1)
    prune: dict[str, Any] = Field(default_factory=dict)
    compile: dict[str, Any] = Field(default_factory=dict)
    quality: QualitySettings = Field(default_factory=QualitySettings)

    @field_validator("grid")
    @classmethod
    def _grid_keys(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        known = (*PRUNE_KEYS, *GRID_COMPILE_KEYS)
        for key, values in grid.items():
            if key not in known:
                raise ValueError(f"unknown grid key '{key}'; grid keys are {', '.join(known)}")
            if not values:
                raise ValueError(f"grid key '{key}' has no values")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"grid key '{key}' repeats a value: {values}")
        return grid

    @field_validator("prune")
    @classmethod
    def _prune_keys(cls, prune: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(prune) - set(PruneSettings.model_fields))
        if unknown:
            raise ValueError(f"unknown prune option(s) {unknown}; known: {sorted(PruneSettings.model_fields)}")
        return prune

    @field_validator("compile")
    @classmethod
    def _compile_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(data) & set(_SWEEP_OWNED))
        if owned:
            raise ValueError(f"{owned} are set by the sweep for each variant; leave them out")
        return data


@dataclass(frozen=True)
class Variant:
    """One point of the grid: its id, the grid values, and the validated prune and compile options.

    ``compile`` holds CompileOptions keys as given (JSON values), without ``masks`` / ``plan``, which the
    sweep fills in once the variant's masks are written.
    """

    id: str
    hash: str
    point: dict[str, Any]
    prune: PruneSettings
    compile: dict[str, Any]

    def options(self) -> dict[str, Any]:
        """What the variant was run with, for sweep.json and MLflow (JSON values)."""
        return {"grid": self.point, "prune": self.prune.model_dump(mode="json"), "compile": self.compile}

    def compile_options(self, **changes: Any) -> CompileOptions:
        return CompileOptions.from_dict({**self.compile, **changes}, source=f"variant {self.id}")


def _compile_data(section: dict[str, Any]) -> dict[str, Any]:
    data = {}
    for key, value in section.items():
        key = COMPILE_ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if key in ("profile_batches", "profile_seqs", "gpus") and not isinstance(value, list):
            value = [value]
        data[key] = value
    return data


def _catalog_gpus(names: list[str], where: str) -> list[str]:
    """GPU names (keys or aliases) as catalog keys: predictions and Ray placement both need to know them."""
    from prune2deploy.profiling.roofline import load_catalog, resolve_gpus

    try:
        return [spec.key for spec in resolve_gpus(names, load_catalog())]
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_slug(v) for v in value)
    text = "none" if value is None else str(value).lower()
    return re.sub(r"[^a-z0-9.]+", "", text.replace(":", "of")) or "x"


def _hash(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def count_variants(spec: SweepSpec) -> int:
    """How many variants the grid has: the product of its axes' lengths, computed without building one."""
    return math.prod(len(values) for values in spec.grid.values())


def _check_grid_size(spec: SweepSpec, where: str) -> None:
    count = count_variants(spec)
    if count > SWEEP_VARIANTS:
        axes = " × ".join(f"{key} {len(values)}" for key, values in spec.grid.items())
        raise ConfigError(
            f"{where}: the grid has {count:,} variants ({axes}); a sweep runs at most {SWEEP_VARIANTS:,}. Narrow it: "
            "fewer values per key (sample the ratios you care about, e.g. every other one), or split it into "
            "several sweep files run one after another (they share the dense-export cache)"
        )


def _check_id(ident: str, label: str, where: str) -> None:
    """A variant id becomes folder names: refused (before anything runs) when a file system could not hold it."""
    if len(ident.encode()) > VARIANT_ID_BYTES:
        raise ConfigError(
            f"{where}: variant {label}: its id is {len(ident.encode())} bytes; ids are at most {VARIANT_ID_BYTES} "
            "(they name the variant's folders, and file names end at 255 bytes). Use fewer grid keys or shorter "
            f"values: {ident[:80]}…"
        )
    if not _ID_CHARS.fullmatch(ident):
        raise ConfigError(
            f"{where}: variant {label}: id {ident!r} may hold only a-z, 0-9, '.', '_' and '-' and must start "
            "with a letter or digit"
        )


def _variant(spec: SweepSpec, point: dict[str, Any], fixed_compile: dict, source_key: str, where: str) -> Variant:
    """One grid point, validated: prune options, compile options, GPU names and the id."""
    label = ",".join(f"{k}={v}" for k, v in point.items())
    prune_data = {**spec.prune, **{k: v for k, v in point.items() if k in PRUNE_KEYS}}
    try:
        prune = PruneSettings(**prune_data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, f"{where}: variant {label}: prune")) from None
    prune.check(f"{where}: variant {label}")
    compile_data = dict(fixed_compile)
    for key, value in point.items():
        if key in GRID_COMPILE_KEYS:
            compile_data.update(_compile_data({key: value}))
    CompileOptions.from_dict(compile_data, source=f"{where}: variant {label}: compile")  # validates
    if compile_data.get("gpus"):
        compile_data["gpus"] = _catalog_gpus(compile_data["gpus"], f"{where}: variant {label}")
    digest = _hash(
        {
            "source": source_key,
            "prune": prune.model_dump(mode="json"),
            "compile": compile_data,
            "quality": spec.quality.model_dump(mode="json"),
        }
    )
    readable = "_".join(f"{k}-{_slug(v)}" for k, v in point.items())
    ident = f"{readable}_{digest[:8]}"
    _check_id(ident, label, where)
    return Variant(ident, digest, point, prune, compile_data)


def iter_variants(spec: SweepSpec, *, source_key: str = "", where: str = "sweep") -> Iterator[Variant]:
    """The grid's variants one at a time, in grid order, each validated as it is built.

    The grid's size is checked first, from its axes' lengths (:data:`SWEEP_VARIANTS`), so an oversized grid is
    refused without building any variant.

    Raises:
        ConfigError: the grid is too large, or a variant's option or id is wrong (naming the variant).
    """
    _check_grid_size(spec, where)
    keys = list(spec.grid)
    fixed_compile = _compile_data(spec.compile)
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        yield _variant(spec, dict(zip(keys, values, strict=True)), fixed_compile, source_key, where)


def expand(spec: SweepSpec, *, source_key: str = "", where: str = "sweep") -> list[Variant]:
    """Every combination of the grid, validated (prune and compile options, ids), in grid order.

    Args:
        spec: the sweep file.
        source_key: what identifies the dense model (the export cache key); part of each variant's hash,
            so a changed checkpoint never resumes from old results.
        where: the file name, for messages.

    Raises:
        ConfigError: naming the variant and the option that is wrong, or the grid's size and the limit.
    """
    return list(iter_variants(spec, source_key=source_key, where=where))


def parse_sweep(data: Any, *, where: str = "sweep") -> SweepSpec:
    """Validates a mapping with the keys of a sweep file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a sweep is a mapping with model: and grid:")
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ConfigError(f"{where}: unknown key {odd[0]!r}; the keys of a sweep are names such as model: and grid:")
    try:
        return SweepSpec(**data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None


def load_sweep(path: Path | str) -> SweepSpec:
    """Reads and validates a sweep file (.yaml, .yml, .toml or .json)."""
    path = Path(path)
    data = read_config_file(path, what="sweep")  # size, UTF-8 and alias checks, as for config files
    spec = parse_sweep(data, where=str(path))
    changes: dict[str, Any] = {"name": spec.name or path.stem}
    if "\0" in spec.model:
        raise ConfigError(f"{path}: 'model' holds a NUL character; give a model folder, file or bundled name")
    beside = path.parent / spec.model
    try:
        found = not Path(spec.model).is_absolute() and beside.exists()
    except OSError:  # a name no file system holds (too long): not a path beside the sweep file
        found = False
    if found:  # a model path is relative to the sweep file
        changes["model"] = str(beside.resolve())
    return spec.model_copy(update=changes)
