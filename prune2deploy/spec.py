"""Compile options: typed, validated, loadable from a YAML, TOML or JSON config file.

The CLI and the Python API share this one description, so a config file, a command line and a script
all mean the same thing. Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune2deploy.errors import ConfigError

__all__ = ["DEFAULT_PASSES", "PASS_NAMES", "CompileOptions", "load_config"]

#: Passes that `compile` can run, in pipeline order.
PASS_NAMES = (
    "remove-layers",
    "remove-channels",
    "remove-heads",
    "prune-hidden",
    "regroup-gqa",
    "sparsify-2:4",
    "convert-precision",
)

#: The exact structural passes: each removes only what contributes nothing, and does nothing otherwise.
DEFAULT_PASSES = ("remove-layers", "remove-channels", "remove-heads", "prune-hidden")


@dataclass
class CompileOptions:
    """Everything ``compile`` needs besides the model.

    Attributes:
        masks: safetensors mask file keyed by torch parameter name.
        plan: a plan YAML written by ``prune2deploy prune``; its mask file is used when ``masks`` is unset.
        detect_zeros: prune what is already zero in the weights (always true when no masks are given).
        passes: pipeline, from :data:`PASS_NAMES` (run in that order); default :data:`DEFAULT_PASSES`.
        multiple_of: round kept channel widths up to a multiple (keeps zero channels; exact).
        drop_layers: depth plan for ``remove-layers``: layer indices or scopes removed even if non-zero
            (approximate; zero branches are removed exactly without being listed).
        drop_hidden: width plan for ``prune-hidden``: residual-stream channels to remove (exact when they
            are zero and the norms are RMSNorm; None removes only channels detected as zero).
        min_heads: ``remove-heads`` keeps at least this many query heads per layer.
        kv_heads / gqa_grouping / gqa_method: ``regroup-gqa`` target kv heads per layer, how query heads are
            grouped (``adjacent`` as in Ainslie et al. 2023, or ``similarity``), and how a group's K/V heads
            become one (``mean``, the paper's, or ``first``, its baseline).
        sparsity: ``impose`` 2:4 on eligible weights or only ``check`` them (pass ``sparsify-2:4``).
        precision: ``fp16``/``bf16`` for ``convert-precision`` and engines; ``fp32`` otherwise.
        engine: ``onnxruntime`` (default), ``tensorrt``, ``tensorrt-rtx`` or ``torch``.
        profile_batches / profile_seqs: the latency grid (dense reference vs compiled, same run).
        profile: measure latency at all (off for quick compiles).
        gpus: targets for roofline predictions (empty: the whole catalog).
        feeds: user feed files (.npz / .safetensors) used for verification besides random feeds.
        tolerance: relative error allowed for an exact pipeline.
        threads: ONNX Runtime intra-op threads for timing (None: ORT's default).
        overwrite: replace an existing output folder.
        keep_reference: also write the masked reference as ``reference.onnx``.
    """

    masks: Path | None = None
    plan: Path | None = None
    detect_zeros: bool = True
    passes: list[str] = field(default_factory=lambda: list(DEFAULT_PASSES))
    multiple_of: int = 1
    drop_layers: list[int | str] = field(default_factory=list)
    drop_hidden: list[int] | None = None
    min_heads: int = 1
    kv_heads: int | None = None
    gqa_grouping: str = "adjacent"
    gqa_method: str = "mean"
    sparsity: str = "impose"
    precision: str = "fp32"
    engine: str = "onnxruntime"
    profile: bool = True
    profile_batches: list[int] = field(default_factory=lambda: [1])
    profile_seqs: list[int] = field(default_factory=lambda: [128])
    profile_budget_s: float = 10.0
    gpus: list[str] = field(default_factory=list)
    feeds: list[Path] = field(default_factory=list)
    tolerance: float = 1e-4
    threads: int | None = None
    overwrite: bool = False
    keep_reference: bool = True
    export_batch: int = 2
    export_seq: int = 8

    def validate(self) -> CompileOptions:
        for name in self.passes:
            if name not in PASS_NAMES:
                raise ConfigError(f"unknown pass '{name}'; choose from {', '.join(PASS_NAMES)}")
        # Passes always run in pipeline order: layers first (less to analyse), precision last.
        self.passes = sorted(dict.fromkeys(self.passes), key=PASS_NAMES.index)
        if self.gqa_grouping not in ("adjacent", "similarity"):
            raise ConfigError(f"gqa_grouping must be 'adjacent' or 'similarity', not '{self.gqa_grouping}'")
        if self.gqa_method not in ("mean", "first"):
            raise ConfigError(f"gqa_method must be 'mean' or 'first', not '{self.gqa_method}'")
        if "regroup-gqa" in self.passes and (self.kv_heads is None or self.kv_heads < 1):
            raise ConfigError("the regroup-gqa pass needs kv_heads (--kv-heads N): kv heads per layer after regrouping")
        if self.sparsity not in ("impose", "check"):
            raise ConfigError(f"sparsity must be 'impose' or 'check', not '{self.sparsity}'")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"precision must be fp32, fp16 or bf16, not '{self.precision}'")
        if self.engine not in ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch"):
            raise ConfigError(f"engine must be onnxruntime, tensorrt, tensorrt-rtx or torch, not '{self.engine}'")
        if self.multiple_of < 1:
            raise ConfigError("multiple_of must be ≥ 1")
        if any(b < 1 for b in self.profile_batches) or any(s < 1 for s in self.profile_seqs):
            raise ConfigError("profile batch sizes and sequence lengths must be ≥ 1")
        if not 0 < self.tolerance < 1:
            raise ConfigError("tolerance must be between 0 and 1")
        if self.masks is not None:
            self.masks = Path(self.masks)
        if self.plan is not None:
            self.plan = Path(self.plan)
        self.feeds = [Path(f) for f in self.feeds]
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "options") -> CompileOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "feeds" else v)
            for k, v in dataclasses.asdict(self).items()
        }


def load_config(path: Path | str) -> dict[str, Any]:
    """Reads a YAML, TOML or JSON config; a ``compile:`` section is used when present."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files are .yaml, .toml or .json")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of option names to values")
    section = data.get("compile", data)
    return {k.replace("-", "_"): v for k, v in section.items()}
