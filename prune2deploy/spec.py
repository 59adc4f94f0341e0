"""Compile options: typed, validated, loadable from a YAML, TOML or JSON config file.

The CLI, config files and the Python API share this one description, so they all mean the same thing.
Each core option is declared once, in :data:`CORE_OPTIONS` (type, default, help, flag — the declaration a
pass option has, :class:`~prune2deploy.passes.registry.PassOption`); every pass adds its own from its
registration (``passes/registry.py``) and every engine validates its own ``engine_options`` — so a new
pass or engine needs no edit here, and the CLI's ``compile`` flags are generated from these declarations.
Validation is pydantic's: each value's type and range is checked and every message names its key; unknown
keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from prune2deploy.engines.registry import DEFAULT_ENGINE, engine_class, engine_names
from prune2deploy.errors import ConfigError
from prune2deploy.io import read_config_file
from prune2deploy.limits import EXPORT_BATCH, EXPORT_SEQ, GENAI_CONTEXT, THREADS_PER_CORE, max_threads
from prune2deploy.passes.registry import PassOption, PassSpec, default_passes, get_pass, load_passes, passes_in_stage

__all__ = [
    "CORE_OPTIONS",
    "CompileOptions",
    "CoreOption",
    "load_config",
    "pass_option_keys",
    "with_passes",
]


@dataclass(frozen=True)
class CoreOption(PassOption):
    """A core compile option: a pass option's declaration, plus how a flag with several values reads them.

    Attributes:
        many: ``"+"``: the flag takes one or more values; ``"append"``: the flag is repeatable, one value
            each; None: one value. Each value is read by ``parse`` (default: the element type's parsing).
        collect: turns the list of parsed values into the option's value (``dict`` for KEY=VALUE pairs).
        choices: the values the flag accepts, when the type does not say (a ``str`` checked elsewhere).
    """

    many: Literal["+", "append"] | None = None
    collect: Callable[[list[Any]], Any] | None = None
    choices: tuple[str, ...] | None = None


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shape_pair(text: str) -> tuple[str, list[int]]:
    """``seq=1:128:2048`` → ``("seq", [1, 128, 2048])``."""
    axis, _, span = text.partition("=")
    try:
        values = [int(v) for v in span.split(":")]
    except ValueError:
        values = []
    if axis not in ("batch", "seq") or len(values) != 3:
        raise ConfigError(
            f"--shapes takes batch=MIN:OPT:MAX and/or seq=MIN:OPT:MAX (e.g. seq=1:128:2048), not '{text}'"
        )
    return axis, values


def _engine_pair(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as a YAML scalar (``3`` is an int, ``true`` a bool)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--engine-option takes KEY=VALUE (e.g. optimization_level=5), not '{text}'")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def _runtime_passes() -> str:
    """The passes that write one runtime's own kernels (what ``portable`` keeps out), for help texts."""
    return ", ".join(name for name, spec in load_passes().items() if spec.engines is not None) or "none"


_PRECISION_PASSES = " or ".join(passes_in_stage("precision")) or "a precision pass"


def _matmul_nbits_block(size: int) -> int:
    """MatMulNBits' block size: a power of two, at least 16."""
    if size < 16 or size & (size - 1):
        raise ValueError("a power of two, at least 16 (MatMulNBits)")
    return size


#: The core options, in the order reports list them; pass options follow (``passes/registry.py``).
CORE_OPTIONS: dict[str, CoreOption] = {
    "masks": CoreOption(
        Path | None, None, "safetensors file of 0/1 masks keyed by torch parameter name", flag="--masks",
        metavar="FILE",
    ),
    "plan": CoreOption(
        Path | None, None, "plan.yaml written by `prune2deploy prune`: brings its masks (unless --masks is given) "
        "and its layer and hidden-width plans", flag="--plan", metavar="PLAN",
    ),
    "baseline": CoreOption(
        str | None, None, "the dense model an already-pruned input (2:4, physically smaller) came from: a model "
        "folder, .gguf/.onnx file or bundled name, loaded like the input without masks; the report adds quality, "
        "measured speedup and GPU predictions against it (same family and vocabulary as the input)",
        flag="--baseline", metavar="DENSE",
    ),
    "passes": CoreOption(
        list[str], list(default_passes()), "the pipeline: registered pass names (`prune2deploy passes`), run in "
        "pipeline order whatever order they are given in; an option given a value (--drop-layers, --regroup-gqa …) "
        f"adds its pass, and {_runtime_passes()} joins by itself where its engine runs it unless --portable",
        flag="--passes", parse=_comma_list, metavar="P1,P2,...",
    ),
    "precision": CoreOption(
        Literal["fp32", "fp16", "bf16"], "fp32", f"fp16/bf16: the precision engines build in; the {DEFAULT_ENGINE} "
        f"engine takes it from tensor types, so it needs the {_PRECISION_PASSES} pass", flag="--precision",
    ),
    "engine": CoreOption(str, DEFAULT_ENGINE, "engine to build", flag="--engine", choices=engine_names()),
    "engine_options": CoreOption(
        dict[str, Any], {}, "an engine option, repeatable, validated by the engine (TensorRT: timing_cache=PATH, "
        "optimization_level=0-5, workspace_mib=N; torch: device=cuda)", flag="--engine-option", parse=_engine_pair,
        many="append", collect=dict, metavar="KEY=VALUE",
    ),
    "profile": CoreOption(
        bool, True, "time the dense reference and the compiled model in the same run; off with --no-profile",
        flag="--no-profile",
    ),
    "profile_batches": CoreOption(
        list[pydantic.PositiveInt], [1], "batch sizes to profile", flag="--batch", many="+", metavar="N",
        constraints={"min_length": 1},
    ),
    "profile_seqs": CoreOption(
        list[pydantic.PositiveInt], [128], "sequence lengths to profile", flag="--seq", many="+", metavar="N",
        constraints={"min_length": 1},
    ),
    "profile_budget_s": CoreOption(
        pydantic.PositiveFloat, 10.0, "seconds of timing per profiled shape at most", flag="--budget", metavar="S"
    ),
    "memory_limit_gib": CoreOption(
        pydantic.PositiveFloat | None, None, "profiling shapes estimated to need more memory than this are refused "
        "before ONNX Runtime allocates (default: half of this machine's memory)", flag="--memory-limit-gib",
        metavar="GIB",
    ),
    "gpus": CoreOption(
        list[str], [], "target GPUs for roofline predictions: catalog keys, aliases or a prefix of exactly one key "
        "(jetson-orin-nano); the catalog is listed by `prune2deploy predict --help` (default: the whole catalog)",
        flag="--gpu", many="+", metavar="GPU",
    ),
    "shapes": CoreOption(
        dict[Literal["batch", "seq"], tuple[pydantic.PositiveInt, pydantic.PositiveInt, pydantic.PositiveInt]], {},
        "input shapes an engine with optimization profiles (TensorRT, TensorRT-RTX) accepts, per axis; an axis left "
        "out gets batch=1:B:8 and seq=1:S:2048 (B, S: the first profiled --batch / --seq; 2048 capped at the "
        "model's maximum positions)", flag="--shapes", parse=_shape_pair, many="+", collect=dict,
        metavar="AXIS=MIN:OPT:MAX",
    ),
    "feeds": CoreOption(
        list[Path], [], ".npz/.safetensors feed files verification uses besides random feeds", flag="--feeds",
        many="+", metavar="FILE",
    ),
    "tolerance": CoreOption(
        float, 1e-4, "relative error allowed for an exact pipeline", flag="--tolerance", metavar="REL",
        constraints={"gt": 0, "lt": 1},
    ),
    "threads": CoreOption(
        Annotated[int, pydantic.Field(ge=1, le=max_threads())] | None, None,
        f"ONNX Runtime intra-op threads for timing, at most {THREADS_PER_CORE} per core (default: ONNX Runtime's)",
        flag="--threads", metavar="N",
    ),
    "overwrite": CoreOption(bool, False, "replace an existing output folder", flag="--overwrite"),
    "keep_reference": CoreOption(bool, True, "also write the masked reference as reference.onnx"),
    "keep_inputs": CoreOption(
        bool, False, "copy the plan and mask file into OUT/inputs/ (the manifest names them there), so the output "
        "folder reproduces itself", flag="--keep-inputs",
    ),
    "export_batch": CoreOption(
        int, 2, "example batch of the torch exporter (at least 2: batch 1 is specialised)",
        constraints={"ge": 1, "le": EXPORT_BATCH},
    ),
    "export_seq": CoreOption(
        int, 8, "example sequence length of the torch exporter", constraints={"ge": 1, "le": EXPORT_SEQ}
    ),
    "portable": CoreOption(
        bool, False, f"keep standard ONNX ops in model.onnx: passes that write one runtime's kernels "
        f"({_runtime_passes()}) stay out, and asking for one is an error", flag="--portable",
    ),
    "genai": CoreOption(
        bool | None, None, "write OUT/genai/ for onnxruntime-genai (default: on for causal LMs given as a model "
        "folder, GGUF, bundled name or module)", flag="--genai",
    ),
    "hf_checkpoint": CoreOption(
        bool, False, "write OUT/hf/: a physically smaller transformers checkpoint (causal LMs; layers whose widths "
        "differ are padded with zero neurons/heads to the widest, exact)", flag="--hf-checkpoint",
    ),
    "hf_nemotron_nas": CoreOption(
        bool, False, "write OUT/hf-nas/: a nemotron-nas (DeciLMForCausalLM, block_configs) checkpoint for vLLM and "
        "TensorRT-LLM with each layer's kv heads and FFN width, attention-/FFN-free layers dropped (Llama-family "
        "causal LMs; query heads and FFN widths padded with zero heads/neurons to the format's rules, exact; "
        "checked with transformers and trust_remote_code)", flag="--hf-nemotron-nas",
    ),
    "gguf": CoreOption(
        list[Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]], [],
        "write OUT/gguf/model-TYPE.gguf for llama.cpp, one file per type (Llama-family causal LMs; llama "
        "architecture when per-layer widths are uniform, deci when they differ; checked in llama.cpp when "
        "llama-cpp-python is installed)", flag="--gguf", parse=_comma_list, metavar="TYPE[,TYPE...]",
    ),
    "genai_context_length": CoreOption(
        Annotated[int, pydantic.Field(ge=1, le=GENAI_CONTEXT)] | None, None,
        f"context length of genai/, at most the model's max_position_embeddings and {GENAI_CONTEXT} (default: "
        f"the model's max_position_embeddings, capped at {GENAI_CONTEXT})",
    ),
    "genai_precision": CoreOption(
        Literal["fp32", "fp16", "int8", "int4"], "fp32", "genai/'s decoder: fp32 (CPU, exact), int8/int4 (CPU: "
        "MatMulNBits weights, symmetric, quantized one weight at a time with ONNX Runtime's quantizer; approximate, "
        "the error is reported), fp16 (for the CUDA provider; checked here on ONNX Runtime's CPU kernels only)",
        flag="--genai-precision",
    ),
    "genai_block_size": CoreOption(
        Annotated[int, pydantic.AfterValidator(_matmul_nbits_block)], 32, "int8/int4 genai/: weights per scale "
        "along K (a power of two >= 16; K is zero-padded to it)", flag="--genai-block-size", metavar="N",
    ),
    "genai_accuracy_level": CoreOption(
        int, 4, "int8/int4 genai/: MatMulNBits accuracy_level (4: int8 activations on CPU, 0: unset)",
        flag="--genai-accuracy-level", metavar="0-4", constraints={"ge": 0, "le": 4},
    ),
    "genai_lm_head": CoreOption(
        Literal["int8", "int4", "float"] | None, None, "genai/'s LM head and embedding table (one tensor when tied): "
        "int8, int4 or float (the decoder's float type) (default: --genai-precision's when it is int8/int4, as "
        "onnxruntime-genai's builder; else float)", flag="--genai-lm-head",
        choices=("int8", "int4", "float"),
    ),
    "export_cache": CoreOption(
        bool, True, "reuse an earlier export of the same checkpoint and export options (HF folders; masks are then "
        "applied to the ONNX weights); off with --no-export-cache (export again)", flag="--no-export-cache",
    ),
    "export_cache_dir": CoreOption(
        Path | None, None, "where exports are cached (default: $P2D_CACHE_DIR, else ~/.cache/prune2deploy/exports)",
        flag="--export-cache-dir", metavar="DIR",
    ),
    "verify_mode": CoreOption(
        Literal["auto", "whole", "blockwise"], "auto", "whole: both models whole on ONNX Runtime, one after the "
        "other; blockwise: one decoder block at a time, fed the reference's activations; auto: blockwise when two "
        "fp32 copies would not fit in the memory available", flag="--verify-mode",
    ),
    "external_data_threshold": CoreOption(
        int, 1 << 30, "weight bytes above which model.onnx and reference.onnx keep their weights in a .data file "
        "beside them (0: always)", constraints={"ge": 0},
    ),
    "quality_windows": CoreOption(
        int, 4, "quality (compiled vs masked reference, and vs dense when masks were applied) on N windows of the "
        "bundled evaluation text: 128 tokens each for causal LMs (KL, top-1, perplexity), 8 sentences for encoders "
        "(embedding cosine); information only, the verdict stays verification's; 0 turns it off",
        flag="--quality-windows", metavar="N", constraints={"ge": 0, "le": 1000},
    ),
}  # fmt: skip


class _CoreOptions(BaseModel):
    """The validation every compile needs besides each value's own type: the pipeline and the engine."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)

    #: The passes asked for (``passes`` as given, or the default pipeline); ``passes`` itself is the pipeline
    #: that runs: these, those an option switched on and those that joined by themselves (``auto``).
    _requested: tuple[str, ...] = PrivateAttr(default=())

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @pydantic.field_validator("shapes", check_fields=False)
    @classmethod
    def _ordered(cls, shapes: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
        for axis, (lo, opt, hi) in shapes.items():
            if not lo <= opt <= hi:
                raise ValueError(f"{axis}: need min <= opt <= max, got {lo}:{opt}:{hi}")
        return shapes

    @model_validator(mode="after")
    def _pipeline(self) -> _CoreOptions:
        if self.engine not in engine_names():
            raise ConfigError(f"unknown engine '{self.engine}'; choose from {', '.join(engine_names())}")
        registry = load_passes()
        for name in self.passes:
            get_pass(name)  # unknown names are errors
        values = self.model_dump()
        requested = tuple(dict.fromkeys(self.passes))
        enabled = {name for name, spec in registry.items() if spec.enabled_by(values)}
        for name in (*requested, *sorted(enabled)):  # asked for: where it cannot run, an error
            if not self._runs_here(registry[name]):
                raise ConfigError(self._cannot_run(registry[name], how=_how_asked(registry[name], name in requested)))
        joined = {  # joined by itself: left out where it cannot run
            name for name, spec in registry.items() if spec.auto and spec.auto(values) and self._runs_here(spec)
        }
        wanted = set(requested) | enabled | joined
        # Passes always run in pipeline order: layers first (less to analyse), precision last.
        self.__dict__["passes"] = [name for name in registry if name in wanted]
        self._requested = requested
        for name in self.passes:
            check = registry[name].check
            if check is not None:
                check(self)
        if (
            self.precision != "fp32"
            and self.engine == DEFAULT_ENGINE
            and not any(registry[name].stage == "precision" for name in self.passes)
        ):
            raise ConfigError(
                f"option 'precision': {self.precision} with the {DEFAULT_ENGINE} engine would leave the model in fp32 "
                f"(that engine takes precision from tensor types); add the {_PRECISION_PASSES} pass "
                f"(--passes ...,{passes_in_stage('precision')[0]}) or choose an engine that builds in {self.precision}"
            )
        engine_class(self.engine).check_options(self.engine_options)
        return self

    def _runs_here(self, spec: PassSpec) -> bool:
        """Whether the chosen engine runs what ``spec`` writes, and ``portable`` allows it."""
        return spec.runs_on(self.engine) and not (self.portable and spec.engines is not None)

    def _cannot_run(self, spec: PassSpec, *, how: str) -> str:
        if self.portable and spec.engines is not None:
            return f"--portable keeps standard ONNX ops in model.onnx; drop {spec.name} ({how})"
        runs = ", ".join(spec.engines or ())
        return (
            f"{spec.name} writes kernels only {runs} runs: engine {self.engine} cannot run them; drop {how}, or "
            f"choose --engine {runs}"
        )

    @property
    def requested_passes(self) -> tuple[str, ...]:
        """The passes asked for: ``passes`` as given (the default pipeline when not given)."""
        return self._requested

    def replace(self, **changes: Any) -> CompileOptions:
        """A validated copy with ``changes`` applied (options are values: never edited in place)."""
        # Only what was set is carried over, so defaults stay defaults (a later step can tell a default
        # --seq from one the user gave); passes are carried as asked for, never as the pipeline they made
        # (a pass that joined by itself for one engine must not become a request for another).
        data = self.model_dump(exclude_unset=True)
        if "passes" in data:
            data["passes"] = list(self._requested)
        return CompileOptions.from_dict({**data, **changes}, source="options")

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


def _how_asked(spec: PassSpec, requested: bool) -> str:
    """How the user asked for a pass, in flags: its switch or --passes, or the option flags that enable it."""
    if requested:
        return f"{spec.switch[0]} (or {spec.name} in --passes)" if spec.switch else f"{spec.name} from --passes"
    flags = [option.flag or key for key, option in spec.options.items() if option.enables]
    return " / ".join(flags) or spec.name


def with_passes(data: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``data`` (option key → value) asking for the passes ``names`` as well as those it asks for (the default
    pipeline when it names none): what a switch such as ``--sparse-2-4`` means."""
    data = dict(data)
    if not names:
        return data
    passes = data.get("passes")
    if passes is None:
        passes = list(default_passes())
    if isinstance(passes, list):  # anything else is left for validation to name
        data["passes"] = passes + [name for name in names if name not in passes]
    return data


def _field(option: PassOption) -> tuple[Any, Any]:
    """A pydantic field from an option's declaration (a list or dict default is copied per use)."""
    default = option.default
    if isinstance(default, (list, dict)):
        return option.type, Field(
            default_factory=lambda d=default: type(d)(d), description=option.help, **option.constraints
        )
    return option.type, Field(default, description=option.help, **option.constraints)


def _pass_fields() -> dict[str, Any]:
    return {key: _field(option) for spec in load_passes().values() for key, option in spec.options.items()}


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
    "CompileOptions",
    __base__=_CoreOptions,
    __module__=__name__,
    **{key: _field(option) for key, option in CORE_OPTIONS.items()},
    **_pass_fields(),
)
CompileOptions.__doc__ = (
    "Everything ``compile`` needs besides the model: one attribute per option (config keys are the same).\n\n"
    "Attributes:\n"
    + "\n".join(f"    {key}: {option.help}" for key, option in {**CORE_OPTIONS, **{
        k: o for spec in load_passes().values() for k, o in spec.options.items()}}.items())
)  # fmt: skip


def load_config(path: Path | str) -> dict[str, Any]:
    """Reads a YAML, TOML or JSON config; a ``compile:`` section is used when present.

    Refused with a :class:`ConfigError` that names the file (and the key where there is one): a file over
    :data:`~prune2deploy.limits.CONFIG_BYTES`, bytes that are not UTF-8, YAML anchors/aliases, a top level or
    ``compile:`` section that is not a mapping, and keys that are not strings.
    """
    path = Path(path)
    data = read_config_file(path, what="config")
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
