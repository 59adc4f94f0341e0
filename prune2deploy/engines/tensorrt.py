"""TensorRT engines: standard TensorRT (10 and 11) and TensorRT for RTX.

Both parse the compiled ONNX, build a serialized plan and write, next to it, the layer table and the full
build log, because the report must show which layers were eligible for 2:4 sparse math and which got sparse
tactics. The differences that matter:

* Standard TensorRT builds on (and for) the GPU it runs on: no GPU, no build.
* TensorRT for RTX (``tensorrt_rtx``) builds ahead of time *without* a GPU, for chosen compute capabilities
  (sm75, sm80, sm86, sm89, sm120 …, no sm90: it targets RTX GPUs); its runtime JIT-compiles kernels on the
  device. Its builder accepts but ignores ``SPARSE_WEIGHTS`` and its timing cache is a no-op: the build
  info says so rather than pretending.
* TensorRT 11 and TensorRT-RTX have no fp16/bf16/int8 builder flags: networks are strongly typed and the
  precision is the ONNX tensor types. A float32 ONNX is converted first, by the converter the pipeline
  hands over in ``BuildOptions.convert_precision``.

``tensorrt``/``tensorrt_rtx`` are imported only inside functions: the package imports without them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prune2deploy.engines.base import Availability, BuildOptions, BuildResult, Engine
from prune2deploy.engines.tensorrt_common import (
    CapturingLogger,
    TensorRTOptions,
    cuda_available,
    parse_compute_capability,
)
from prune2deploy.engines.tensorrt_run import TensorRTRunner
from prune2deploy.engines.trt_report import layers_from_inspector, layers_from_log, sparsity_from_log
from prune2deploy.errors import BadInputError, ConfigError, EngineBuildError, EngineUnavailable

__all__ = [
    "TensorRTEngine",
    "TensorRTOptions",
    "TensorRTRTXEngine",
    "TensorRTRunner",
    "parse_compute_capability",
]

log = logging.getLogger(__name__)

_ERROR_TAIL = 20  # log lines quoted in an EngineBuildError


class TensorRTEngine(Engine):
    """Standard TensorRT (``pip install tensorrt``): builds and runs on an NVIDIA GPU."""

    name = "tensorrt"
    options_type = TensorRTOptions
    needs_shape_ranges = True
    module_name = "tensorrt"
    install_hint = "pip install tensorrt-cu12  (or tensorrt-cu13; needs an NVIDIA GPU and driver)"
    builds_without_gpu = False

    # -- availability --

    @classmethod
    def _import(cls) -> Any:
        try:
            return importlib.import_module(cls.module_name)
        except Exception as exc:  # ImportError, or OSError for a missing shared library
            raise EngineUnavailable(
                f"engine {cls.name!r} needs the Python module {cls.module_name!r}, which cannot be imported "
                f"({exc}). Install it with: {cls.install_hint}"
            ) from exc

    @classmethod
    def available(cls) -> Availability:
        try:
            module = cls._import()
        except EngineUnavailable as exc:
            return Availability(False, False, str(exc), cls.install_hint)
        gpu = cuda_available()
        version = getattr(module, "__version__", "?")
        if gpu:
            return Availability(True, True, f"{cls.module_name} {version}")
        reason = f"{cls.module_name} {version} is installed but no CUDA GPU is visible"
        if cls.builds_without_gpu:
            return Availability(True, False, reason + ": ahead-of-time builds work, running needs a GPU")
        return Availability(
            False,
            False,
            reason + ": standard TensorRT needs a GPU to build and run",
            "use --engine tensorrt-rtx for GPU-less builds",
        )

    # -- build --

    def _notes(self, trt_options: TensorRTOptions) -> list[str]:
        """What a user of this engine should know about where it runs (nothing for standard TensorRT)."""
        return []

    def build(self, model_path: Path, options: BuildOptions) -> BuildResult:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise BadInputError(f"ONNX file {model_path} does not exist.")
        trt_options = TensorRTOptions.from_extra(options.extra)
        trt = self._import()
        out_dir = Path(options.work_dir) if options.work_dir else model_path.parent / f"{model_path.stem}.{self.name}"
        out_dir.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {
            "library": self.module_name,
            "version": getattr(trt, "__version__", "?"),
            # Files are named relative to the engine folder: a compile builds in a staging folder that is
            # renamed into place, so absolute paths would name a folder that no longer exists.
            "files": {"plan": "engine.plan", "build_log": "build.log", "layers": "layers.json"},
            "notes": [],
        }
        if not self.builds_without_gpu and not cuda_available():
            raise EngineUnavailable(
                "standard TensorRT builds on the GPU it targets and no CUDA GPU is visible here. Build on a "
                "GPU machine, or use --engine tensorrt-rtx (ahead-of-time build without a GPU)."
            )
        if trt_options.compute_capabilities and not self.builds_without_gpu:
            raise ConfigError(
                "compute_capabilities is a TensorRT-RTX option; standard TensorRT builds for the GPU present."
            )

        logger = CapturingLogger.create(trt)
        onnx_path, precision_info = self._prepare_precision(trt, model_path, options, trt_options, out_dir)
        info["precision"] = precision_info
        try:
            builder = trt.Builder(logger)
        except Exception as exc:
            raise EngineBuildError(f"{self.module_name}.Builder could not be created: {exc}") from exc
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [self._parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"{self.name} cannot parse {onnx_path}:\n  " + "\n  ".join(errors))

        config = builder.create_builder_config()
        self._set_precision_flags(trt, config, options.precision, precision_info)
        info["profiles"] = self._add_profile(builder, network, config, options.shape_ranges)
        info["sparsity"] = self._set_sparsity(trt, config, options.sparse_weights, info["notes"])
        self._set_misc(trt, config, trt_options, info)
        info["notes"].extend(self._notes(trt_options))
        timing_cache = self._load_timing_cache(config, trt_options.timing_cache, info)

        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        info["build_seconds"] = round(time.perf_counter() - start, 3)
        messages = [msg for _, msg in logger.records]
        (out_dir / "build.log").write_text("".join(f"[{sev}] {msg}\n" for sev, msg in logger.records))
        if plan is None:
            errors = [msg for sev, msg in logger.records if sev in ("ERROR", "INTERNAL_ERROR")]
            raise EngineBuildError(
                f"{self.name} failed to build {onnx_path} (log: {out_dir / 'build.log'}):\n  "
                + "\n  ".join((errors or messages)[-_ERROR_TAIL:])
            )
        plan_path = out_dir / "engine.plan"
        plan_path.write_bytes(bytes(plan))
        info["plan_bytes"] = plan_path.stat().st_size
        if timing_cache is not None and trt_options.timing_cache is not None:
            trt_options.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))

        layers, source = self._layer_table(trt, logger, plan, messages)
        (out_dir / "layers.json").write_text(json.dumps({"source": source, "layers": layers}, indent=1))
        info["layers"] = {"count": len(layers), "source": source, "file": "layers.json"}
        self._report_sparsity(info["sparsity"], messages, layers, onnx_path)
        (out_dir / "build_info.json").write_text(json.dumps(info, indent=1, default=str))
        log.info("%s: built %s (%d layers) in %.1fs", self.name, plan_path, len(layers), info["build_seconds"])
        return BuildResult(
            engine=self.name,
            artifact=plan_path,
            info=info,
            handle={"runtime_cache": trt_options.runtime_cache},
        )

    @staticmethod
    def _parser_error(error: Any) -> str:
        node = ""
        with contextlib.suppress(Exception):
            node = f" (node {error.node_name()!r}, {error.node_operator()})"
        return f"{error.desc()}{node}"

    @staticmethod
    def _has_precision_flags(trt: Any) -> bool:
        return hasattr(trt.BuilderFlag, "FP16")

    def _prepare_precision(
        self, trt: Any, model_path: Path, options: BuildOptions, trt_options: TensorRTOptions, out_dir: Path
    ) -> tuple[Path, dict[str, Any]]:
        """Returns the ONNX to parse and how its precision is obtained (flags, tensor types, conversion)."""
        precision = options.precision.lower()
        if precision == "fp32" or (precision in ("fp16", "bf16", "int8") and self._has_precision_flags(trt)):
            return model_path, {
                "requested": precision,
                "source": "builder flag" if precision != "fp32" else "fp32",
            }
        if precision == "int8":
            raise EngineBuildError(
                f"{self.module_name} {getattr(trt, '__version__', '')} has no INT8 builder flag: "
                "INT8 needs an "
                "explicitly quantized ONNX (QuantizeLinear/DequantizeLinear nodes)."
            )
        if precision not in ("fp16", "bf16"):
            raise ConfigError(f"precision {precision!r} is not one of fp32, fp16, bf16, int8 for {self.name}.")
        if _float_weight_types(model_path) - {"FLOAT"}:
            return model_path, {"requested": precision, "source": "tensor types of the ONNX"}
        if not trt_options.convert_precision:
            raise EngineBuildError(
                f"{self.module_name} takes precision from tensor types, and {model_path} is float32. Run the "
                f"convert-precision pass ({precision}) first, or allow convert_precision."
            )
        if options.convert_precision is None:
            raise EngineBuildError(
                f"{self.module_name} takes precision from tensor types and {model_path} is float32; no "
                "precision converter was given (the compile driver passes the pipeline's convert-precision)."
            )
        import onnx_ir as ir

        model = ir.load(model_path)
        conversion = options.convert_precision(model, precision, trt_options.keep_fp32_ops)
        converted = out_dir / f"model.{precision}.onnx"
        # Weights go to a data file next to the copy: an external tensor left untouched by the pass still
        # points at the original file, which a relative location would no longer reach.
        ir.save(model, converted, external_data=f"model.{precision}.onnx.data")
        return converted, {
            "requested": precision,
            "source": "converted by convert-precision",
            "converted_onnx": str(converted),
            "conversion": conversion,
        }

    def _set_precision_flags(self, trt: Any, config: Any, precision: str, info: dict[str, Any]) -> None:
        if info.get("source") != "builder flag":
            return
        flag = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}[precision.lower()]
        if not hasattr(trt.BuilderFlag, flag):
            raise EngineBuildError(f"{self.module_name} {trt.__version__} has no BuilderFlag.{flag}.")
        config.set_flag(getattr(trt.BuilderFlag, flag))
        if flag == "INT8":
            info["note"] = "INT8 without calibration: only explicitly quantized (Q/DQ) layers run in INT8."

    def _add_profile(
        self,
        builder: Any,
        network: Any,
        config: Any,
        ranges: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    ) -> dict[str, Any]:
        """One optimisation profile from ``shape_ranges``; every dynamic input must have a range."""
        dynamic = {}
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            shape = tuple(tensor.shape)
            if any(dim < 0 for dim in shape):
                dynamic[tensor.name] = shape
        missing = [name for name in dynamic if name not in ranges]
        if missing:
            examples = ", ".join(f"{n}: dims {list(dynamic[n])} (-1 is dynamic)" for n in missing)
            raise EngineBuildError(
                f"{self.name} needs a (min, opt, max) shape range for every dynamic input; missing for "
                f"{examples}. Pass BuildOptions.shape_ranges, e.g. "
                f"{{'{missing[0]}': ((1, ...), (4, ...), (16, ...))}} with static dims filled in."
            )
        if not dynamic:
            return {}
        profile = builder.create_optimization_profile()
        used = {}
        for name, shape in dynamic.items():
            low, opt, high = (tuple(int(d) for d in s) for s in ranges[name])
            for label, candidate in (("min", low), ("opt", opt), ("max", high)):
                if len(candidate) != len(shape) or any(
                    d >= 0 and c != d for c, d in zip(candidate, shape, strict=True)
                ):
                    raise EngineBuildError(
                        f"shape range {label}={list(candidate)} for input {name!r} does not fit its dims {list(shape)}."
                    )
            if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise EngineBuildError(f"shape range for input {name!r} needs min <= opt <= max, got {ranges[name]}.")
            profile.set_shape(name, low, opt, high)
            used[name] = {"min": list(low), "opt": list(opt), "max": list(high)}
        config.add_optimization_profile(profile)
        return used

    def _set_sparsity(self, trt: Any, config: Any, requested: bool, notes: list[str]) -> dict[str, Any]:
        report: dict[str, Any] = {"requested": bool(requested), "flag_set": False}
        if requested:
            if hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
                config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
                report["flag_set"] = True
            else:
                notes.append(f"{self.module_name} has no BuilderFlag.SPARSE_WEIGHTS: built dense.")
        return report

    def _set_misc(self, trt: Any, config: Any, options: TensorRTOptions, info: dict[str, Any]) -> None:
        config.profiling_verbosity = getattr(trt.ProfilingVerbosity, options.profiling_verbosity.upper())
        if options.optimization_level is not None:
            config.builder_optimization_level = int(options.optimization_level)
        info["optimization_level"] = int(config.builder_optimization_level)
        if options.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
        if options.compute_capabilities:
            info["compute_capabilities"] = self._set_targets(trt, config, options.compute_capabilities)

    def _set_targets(self, trt: Any, config: Any, targets: Sequence[str]) -> list[str]:
        raise ConfigError("compute_capabilities is a TensorRT-RTX option.")  # overridden by the RTX engine

    def _load_timing_cache(self, config: Any, path: Path | None, info: dict[str, Any]) -> Any:
        blob = path.read_bytes() if path is not None and path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
        info["timing_cache"] = {"file": str(path) if path else None, "loaded_bytes": len(blob)}
        return cache

    def _layer_table(self, trt: Any, logger: Any, plan: Any, messages: list[str]) -> tuple[list[dict], str]:
        """Inspector JSON when the plan deserializes here (a GPU), else the build log's layer table."""
        if cuda_available():
            try:
                runtime = trt.Runtime(logger)
                engine = runtime.deserialize_cuda_engine(plan)
                inspector = engine.create_engine_inspector()
                return layers_from_inspector(inspector.get_engine_information(trt.LayerInformationFormat.JSON)), (
                    "engine-inspector"
                )
            except Exception as exc:  # fall back on the log; the plan itself is fine
                log.warning("%s: engine inspector failed (%s); using the build log", self.name, exc)
        return layers_from_log(messages), "build-log"

    def _report_sparsity(
        self, report: dict[str, Any], messages: list[str], layers: list[dict], onnx_path: Path
    ) -> None:
        report.update(sparsity_from_log(messages))
        report["layers_with_sparse_tactic_names"] = [layer["name"] for layer in layers if layer["sparse_tactic"]]
        report["onnx_nodes_tagged_2_4"] = _tagged_24(onnx_path)

    # -- run --

    @contextlib.contextmanager
    def runner(self, built: BuildResult) -> Iterator[TensorRTRunner]:
        trt = self._import()
        if not cuda_available():
            raise EngineUnavailable(
                f"running a {self.name} engine needs an NVIDIA GPU with CUDA, and none is visible here "
                f"(torch.cuda.is_available() is False). The plan {built.artifact} was built; "
                "run it on a GPU machine."
            )
        if built.artifact is None or not Path(built.artifact).is_file():
            raise BadInputError(f"{self.name} plan {built.artifact} does not exist.")
        handle = built.handle if isinstance(built.handle, dict) else {}
        runner = TensorRTRunner(trt, Path(built.artifact), runtime_cache=handle.get("runtime_cache"))
        try:
            yield runner
        finally:
            runner.close()


class TensorRTRTXEngine(TensorRTEngine):
    """TensorRT for RTX (``pip install tensorrt-rtx-cu12``): builds ahead of time without a GPU."""

    name = "tensorrt-rtx"
    module_name = "tensorrt_rtx"
    install_hint = "pip install tensorrt-rtx-cu12  (or tensorrt-rtx-cu13; ~90 MB download, builds without a GPU)"
    builds_without_gpu = True

    def _notes(self, trt_options: TensorRTOptions) -> list[str]:
        targets = ", ".join(trt_options.compute_capabilities) if trt_options.compute_capabilities else "its default"
        return [
            f"TensorRT-RTX engine for RTX GPUs (compute capability target: {targets}); it has no sm90 target, so "
            "it does not run on H100/H200 — build with --engine tensorrt on such a machine instead.",
            "TensorRT-RTX's builder ignores the sparse-weights flag: 2:4 weights run dense here; 2:4 sparse "
            "tensor cores need standard TensorRT (--engine tensorrt).",
        ]

    def _set_sparsity(self, trt: Any, config: Any, requested: bool, notes: list[str]) -> dict[str, Any]:
        report = super()._set_sparsity(trt, config, requested, notes)
        if requested:
            report["honoured"] = False
            notes.append(
                "TensorRT-RTX accepts BuilderFlag.SPARSE_WEIGHTS but its builder ignores it: no 2:4 sparse "
                "tactics are chosen at build time. Use standard TensorRT (tensorrt) "
                "for 2:4 sparse tensor cores."
            )
        return report

    def _set_targets(self, trt: Any, config: Any, targets: Sequence[str]) -> list[str]:
        supported = [name for name in trt.ComputeCapability.__members__ if name != "NONE"]
        names = [parse_compute_capability(t) for t in targets]
        for original, name in zip(targets, names, strict=True):
            if name not in supported:
                hint = " TensorRT-RTX targets RTX GPUs and has no sm90 (Hopper) target;" if name == "SM90" else ""
                raise ConfigError(
                    f"compute capability {original!r} is not a TensorRT-RTX {trt.__version__} target.{hint} "
                    f"Supported: {', '.join(n.lower() for n in supported)}."
                )
        if "CURRENT" in names and not cuda_available():
            raise ConfigError("compute capability 'current' needs a GPU here; name the target (e.g. sm89).")
        config.num_compute_capabilities = len(names)
        for index, name in enumerate(names):
            config.set_compute_capability(getattr(trt.ComputeCapability, name), index)
        return [n.lower() for n in names]

    def _load_timing_cache(self, config: Any, path: Path | None, info: dict[str, Any]) -> Any:
        if path is not None:
            info["notes"].append("TensorRT-RTX ignores the timing cache (a no-op since 1.2); use runtime_cache.")
        info["timing_cache"] = {"file": str(path) if path else None, "ignored": True}
        return None


def _float_weight_types(model_path: Path) -> set[str]:
    """Element types of the model's float initializers (without reading external weight data)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    names = {
        onnx.TensorProto.FLOAT: "FLOAT",
        onnx.TensorProto.FLOAT16: "FLOAT16",
        onnx.TensorProto.BFLOAT16: "BFLOAT16",
    }
    return {names[t.data_type] for t in model.graph.initializer if t.data_type in names}


def _tagged_24(onnx_path: Path) -> list[str]:
    """Names of nodes the 2:4 pass tagged (metadata ``p2d.sparsity == "2:4"``)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [
        node.name
        for node in model.graph.node
        if any(p.key == "p2d.sparsity" and p.value == "2:4" for p in node.metadata_props)
    ]
