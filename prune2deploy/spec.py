"""Compile options: typed, validated, loadable from a YAML, TOML or JSON config file.

The CLI, config files and the Python API share this one description, so they all mean the same thing.
The core options are declared here; every pass adds its own from its registration (``passes/registry.py``)
and every engine validates its own ``engine_options`` — so a new pass or engine needs no edit here.
Validation is pydantic's: each value's type and range is checked and every message names its key; unknown
keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prune2deploy.engines.registry import DEFAULT_ENGINE, engine_class, engine_names
from prune2deploy.errors import ConfigError
from prune2deploy.passes.registry import default_passes, get_pass, load_passes

__all__ = ["MAX_CONFIG_BYTES", "CompileOptions", "load_config", "pass_option_keys"]


class _CoreOptions(BaseModel):
    """Everything ``compile`` needs besides the model and the passes' own options.

    Attributes:
        masks: safetensors mask file keyed by torch parameter name.
        plan: a plan YAML written by ``prune2deploy prune``; its mask file is used when ``masks`` is unset.
        detect_zeros: prune what is already zero in the weights (always true when no masks are given).
        passes: pipeline (registered pass names, run in registry order); default: the exact structural
            passes. A pass option given a value (``drop_layers``, ``kv_heads`` …) adds its pass.
        precision: ``fp16``/``bf16`` for ``convert-precision`` and engines; ``fp32`` otherwise.
        engine: a registered engine (``onnxruntime`` default, ``tensorrt``, ``tensorrt-rtx``, ``torch``).
        engine_options: the engine's own options (e.g. TensorRT's ``timing_cache``, ``optimization_level``,
            ``workspace_mib``), validated by the engine.
        profile / profile_batches / profile_seqs / profile_budget_s: the latency grid (dense reference vs
            compiled, same run) and the seconds spent per point at most.
        gpus: targets for roofline predictions (empty: the whole catalog); catalog keys, aliases or a prefix
            of exactly one key (``jetson-orin-nano``).
        shapes: ``{"batch": [min, opt, max], "seq": [min, opt, max]}``, the input shapes an engine with
            optimization profiles (TensorRT, TensorRT-RTX) accepts; an axis left out gets the deployment
            default: batch 1 / first profiled batch / max(8, largest profiled batch), seq 1 / first profiled
            seq / the model's maximum positions capped at 2048 (at least the largest profiled seq).
        memory_limit_gib: profiling shapes whose estimated memory exceeds this are refused before ONNX
            Runtime allocates (None: half of this machine's memory).
        feeds: user feed files (.npz / .safetensors) used for verification besides random feeds.
        tolerance: relative error allowed for an exact pipeline.
        threads: ONNX Runtime intra-op threads for timing (None: ORT's default).
        overwrite: replace an existing output folder.
        keep_reference: also write the masked reference as ``reference.onnx``.
        export_batch / export_seq: example input shape for the torch exporter (batch ≥ 2: batch 1 is
            specialised).
        portable: keep standard ONNX ops in ``model.onnx``: asking for ``fuse-ort`` as well is an error. Without
            it, an fp32 compile for the ONNX Runtime engine runs ``fuse-ort`` (com.microsoft RMSNorm, rotary,
            attention kernels); where onnxscript's fusions give a graph ONNX Runtime cannot load or that fails
            verification (GPT-2's Gemm), or verification must go block by block, the driver keeps the unfused
            graph and the report says why.
        genai: write ``genai/`` (onnxruntime-genai package) for causal LMs; None: on for causal-LM sources
            given as a model folder, GGUF, bundled name or module.
        hf_checkpoint: write ``hf/``, a physically smaller transformers checkpoint (causal LMs).
        genai_context_length: context length of ``genai/`` (default: the model's max_position_embeddings).
        export_cache: reuse an earlier export of the same checkpoint and export options (HF folders; masks
            are then applied to the ONNX weights); ``export_cache_dir`` is where exports are kept (default
            ``$P2D_CACHE_DIR``, else ``~/.cache/prune2deploy/exports``).
        verify_mode: ``whole`` (both models whole on ONNX Runtime, one after the other), ``blockwise`` (one
            decoder block at a time, fed the reference's activations) or ``auto`` (blockwise when two fp32
            copies would not fit in the memory available).
        quality_windows: how much of the bundled evaluation text the report's ``quality`` section uses
            (compiled vs masked reference, and vs the dense model when masks were applied): windows of 128
            tokens for causal LMs (KL, top-1 agreement, perplexity), 8 sentences each for encoders (embedding
            cosine); 0 turns the section off. Information only: the verdict stays verification's.
        external_data_threshold: weight bytes above which ``model.onnx``/``reference.onnx`` keep their
            weights in a ``.data`` file beside them (0: always).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    masks: Path | None = None
    plan: Path | None = None
    detect_zeros: bool = True
    passes: list[str] = Field(default_factory=lambda: list(default_passes()))
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    engine: str = DEFAULT_ENGINE
    engine_options: dict[str, Any] = Field(default_factory=dict)
    profile: bool = True
    profile_batches: list[pydantic.PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    profile_seqs: list[pydantic.PositiveInt] = Field(default_factory=lambda: [128], min_length=1)
    profile_budget_s: pydantic.PositiveFloat = 10.0
    memory_limit_gib: pydantic.PositiveFloat | None = None
    gpus: list[str] = Field(default_factory=list)
    shapes: dict[Literal["batch", "seq"], tuple[pydantic.PositiveInt, pydantic.PositiveInt, pydantic.PositiveInt]] = (
        Field(default_factory=dict)
    )
    feeds: list[Path] = Field(default_factory=list)
    tolerance: float = Field(1e-4, gt=0, lt=1)
    threads: pydantic.PositiveInt | None = None
    overwrite: bool = False
    keep_reference: bool = True
    export_batch: int = Field(2, ge=1)
    export_seq: int = Field(8, ge=1)
    portable: bool = False
    genai: bool | None = None
    hf_checkpoint: bool = False
    genai_context_length: pydantic.PositiveInt | None = None

    export_cache: bool = True
    export_cache_dir: Path | None = None
    verify_mode: Literal["auto", "whole", "blockwise"] = "auto"
    external_data_threshold: int = Field(1 << 30, ge=0)
    quality_windows: int = Field(4, ge=0, le=1000)

    @pydantic.field_validator("shapes")
    @classmethod
    def _ordered(cls, shapes: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
        for axis, (lo, opt, hi) in shapes.items():
            if not lo <= opt <= hi:
                raise ValueError(f"{axis}: need min <= opt <= max, got {lo}:{opt}:{hi}")
        return shapes

    @model_validator(mode="after")
    def _pipeline(self) -> _CoreOptions:
        registry = load_passes()
        for name in self.passes:
            get_pass(name)  # unknown names are errors
        values = self.model_dump()
        wanted = set(self.passes) | {
            name for name, spec in registry.items() if spec.enabled_by(values) or (spec.auto and spec.auto(values))
        }
        if "fuse-ort" in wanted:  # fused ops are ONNX Runtime's (com.microsoft): not portable, not for other engines
            if self.portable:
                raise ConfigError("--portable keeps standard ONNX ops in model.onnx; drop fuse-ort (--fuse-ort)")
            if self.engine != DEFAULT_ENGINE:
                raise ConfigError(f"fuse-ort writes ONNX Runtime kernels, which engine {self.engine} cannot run")
        # Passes always run in pipeline order: layers first (less to analyse), precision last.
        self.__dict__["passes"] = [name for name in registry if name in wanted]
        for name in self.passes:
            check = registry[name].check
            if check is not None:
                check(self)
        if self.precision != "fp32" and self.engine == DEFAULT_ENGINE and "convert-precision" not in self.passes:
            raise ConfigError(
                f"option 'precision': {self.precision} with the {DEFAULT_ENGINE} engine would leave the model in fp32 "
                "(that engine takes precision from tensor types); add the convert-precision pass "
                f"(--passes ...,convert-precision) or choose an engine that builds in {self.precision}"
            )
        if self.engine not in engine_names():
            raise ConfigError(f"unknown engine '{self.engine}'; choose from {', '.join(engine_names())}")
        engine_class(self.engine).check_options(self.engine_options)
        return self

    def replace(self, **changes: Any) -> CompileOptions:
        """A validated copy with ``changes`` applied (options are values: never edited in place)."""
        # Only what was set is carried over, so defaults stay defaults (a later step can tell a default
        # --seq from one the user gave).
        return CompileOptions.from_dict({**self.model_dump(exclude_unset=True), **changes}, source="options")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "options") -> CompileOptions:
        """Validates a mapping of option names (snake_case) to values; messages name ``source`` and the key."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: options must be a mapping of option names to values, not {type(data).__name__}"
            )
        try:
            return CompileOptions(**{str(k): v for k, v in data.items()})
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (paths as strings), for the report and the manifest."""
        return self.model_dump(mode="json")


def _pass_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for spec in load_passes().values():
        for key, option in spec.options.items():
            default = option.default
            if isinstance(default, (list, dict)):
                fields[key] = (
                    option.type,
                    Field(default_factory=lambda d=default: type(d)(d), description=option.help, **option.constraints),
                )
            else:
                fields[key] = (option.type, Field(default, description=option.help, **option.constraints))
    return fields


def pass_option_keys() -> dict[str, str]:
    """Option key → the pass that declares it."""
    return {key: name for name, spec in load_passes().items() for key in spec.options}


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "options"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = f"unknown option; known: {sorted(CompileOptions.model_fields)}"
        elif error["type"] == "value_error" and message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        value = error.get("input")
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        parts.append(f"option '{where}': {message}" + ("" if error["type"] == "extra_forbidden" else f" (got {shown})"))
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


#: The compile options: the core ones above plus every registered pass's options.
CompileOptions = pydantic.create_model(  # type: ignore[misc]
    "CompileOptions", __base__=_CoreOptions, __module__=__name__, **_pass_fields()
)
CompileOptions.__doc__ = _CoreOptions.__doc__


#: A config file larger than this is refused: option files are a few hundred bytes.
MAX_CONFIG_BYTES = 1 << 20


def _yaml_loader():
    import yaml

    class _NoAliasLoader(yaml.SafeLoader):
        """SafeLoader without anchors and aliases: a 600-byte alias bomb expands to gigabytes."""

        def compose_node(self, parent, index):  # type: ignore[override]
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                mark = event.start_mark
                raise ConfigError(
                    f"line {mark.line + 1}: YAML anchors and aliases (&name / *name) are not allowed in config "
                    "files; write each value out"
                )
            return super().compose_node(parent, index)

    return _NoAliasLoader


def load_config(path: Path | str) -> dict[str, Any]:
    """Reads a YAML, TOML or JSON config; a ``compile:`` section is used when present.

    Refused with a :class:`ConfigError` that names the file (and the key where there is one): a file over
    :data:`MAX_CONFIG_BYTES`, bytes that are not UTF-8, YAML anchors/aliases, a top level or ``compile:``
    section that is not a mapping, and keys that are not strings.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes; config files are at most {MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
            data = {} if data is None else data
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files are .yaml, .toml or .json")
    except ConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse ({str(exc)[:300]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of option names to values, not {type(data).__name__}")
    section = data.get("compile", data) if "compile" in data else data
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: option 'compile' must be a mapping of option names to values, not {type(section).__name__}"
        )
    bad = [k for k in section if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: option names are strings, not {bad[0]!r}")
    return {k.replace("-", "_"): v for k, v in section.items()}
