"""Torch engine: the compiled ONNX replayed as a torch.fx module, for GPUs without TensorRT.

It runs the *compiled* graph (smaller matrices, fewer heads) rather than the original module, and puts
2:4 constant MatMul/Gemm weights on sparse tensor cores (``torch.sparse.to_sparse_semi_structured``,
sm80+, fp16/bf16). On CPU everything runs dense; the build info lists each 2:4 layer with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.engines.base import Availability, BuildOptions, BuildResult, Engine, Runner
from prune2deploy.errors import BadInputError, ConfigError, EngineUnavailable

__all__ = ["TorchEngine", "TorchOptions", "TorchRunner"]

log = logging.getLogger(__name__)


@dataclass
class TorchOptions:
    """Torch-engine options, read from ``BuildOptions.extra``.

    Attributes:
        device: ``"cuda"``, ``"cuda:1"`` or ``"cpu"``; None picks CUDA when present.
        keep_fp32_ops: op types kept in float32 when ``precision`` converts the graph (None: default).
    """

    device: str | None = None
    keep_fp32_ops: list[str] | None = None

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> TorchOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown torch engine option(s) {unknown}; known: {sorted(known)}.")
        return cls(**dict(extra))


class TorchEngine(Engine):
    """Builds a torch.fx module from the ONNX; runs on CUDA when present, else on CPU (dense)."""

    name = "torch"
    options_type = TorchOptions

    @classmethod
    def available(cls) -> Availability:
        try:
            import torch
        except ImportError:
            return Availability(False, False, "torch is not installed", "pip install torch")
        try:
            cuda = bool(torch.cuda.is_available())
        except Exception:  # a broken driver must not make available() raise
            cuda = False
        where = "CUDA" if cuda else "CPU only (2:4 layers run dense)"
        return Availability(True, True, f"torch {torch.__version__}, {where}")

    def build(self, model_path: Path, options: BuildOptions) -> BuildResult:
        import onnx_ir as ir
        import torch

        from prune2deploy.engines.onnx_to_torch import onnx_to_torch

        model_path = Path(model_path)
        if not model_path.is_file():
            raise BadInputError(f"ONNX file {model_path} does not exist.")
        engine_options = TorchOptions.from_extra(options.extra)
        device = torch.device(engine_options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable(f"device {device} was asked for, but torch sees no CUDA GPU here.")
        model = ir.load(model_path)
        precision = self._convert_precision(model, options, engine_options)
        if options.threads and device.type == "cpu":
            torch.set_num_threads(int(options.threads))
        start = time.perf_counter()
        converted = onnx_to_torch(model, device=device, semi_structured=options.sparse_weights)
        info = {
            "device": str(device),
            "precision": precision,
            "ops": converted.op_counts,
            "build_seconds": round(time.perf_counter() - start, 3),
            "sparsity": {
                "requested": bool(options.sparse_weights),
                "semi_structured": converted.semi_structured,
                "dense_24": converted.dense_24,
            },
        }
        if device.type == "cpu":
            info["notes"] = ["runs dense on CPU: 2:4 semi-structured kernels need an sm80+ GPU"]
        log.info(
            "torch engine: %d nodes on %s, %d 2:4 layers sparse",
            sum(converted.op_counts.values()),
            device,
            len(converted.semi_structured),
        )
        return BuildResult(engine=self.name, artifact=model_path, info=info, handle=converted)

    @staticmethod
    def _convert_precision(model: Any, options: BuildOptions, engine_options: TorchOptions) -> dict[str, Any]:
        """fp16/bf16 come from tensor types, as in TensorRT 11: a float32 graph is converted first."""
        precision = options.precision.lower()
        if precision == "fp32":
            return {"requested": "fp32", "source": "fp32"}
        if precision not in ("fp16", "bf16"):
            raise ConfigError(f"the torch engine runs fp32, fp16 or bf16 graphs, not {precision!r}.")
        if options.convert_precision is None:
            raise ConfigError(
                f"the torch engine needs a precision converter for {precision} (the compile driver passes the "
                "pipeline's convert-precision in BuildOptions.convert_precision)."
            )
        conversion = options.convert_precision(model, precision, engine_options.keep_fp32_ops)
        return {"requested": precision, "source": "converted by convert-precision", "conversion": conversion}

    @contextlib.contextmanager
    def runner(self, built: BuildResult) -> Iterator[TorchRunner]:
        yield TorchRunner(built.handle)


class TorchRunner(Runner):
    """Feeds numpy arrays to the fx module on its device; times with CUDA events on GPU."""

    def __init__(self, converted: Any) -> None:
        import torch

        self.torch = torch
        self.converted = converted
        self.module = converted.module
        buffers = list(self.module.buffers()) + list(self.module.parameters())
        self.device = buffers[0].device if buffers else torch.device("cpu")

    @property
    def input_names(self) -> list[str]:
        return list(self.converted.input_names)

    def _inputs(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        missing = [n for n in self.converted.input_names if n not in feeds]
        if missing:
            raise BadInputError(f"missing feeds for inputs {missing}.")
        return [
            self.torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.converted.input_names
        ]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            outputs = self.module(*self._inputs(feeds))
        result = {}
        for name, tensor in zip(self.converted.output_names, outputs, strict=True):
            tensor = tensor.detach()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            result[name] = tensor.cpu().numpy()
        return result

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def time(self, feeds: Mapping[str, np.ndarray], *, warmup: int = 10, iters: int = 50) -> list[float]:
        """Milliseconds per forward pass (inputs on the device): CUDA events on GPU, else wall clock."""
        torch = self.torch
        inputs = self._inputs(feeds)
        times = []
        with torch.inference_mode():
            for _ in range(warmup):
                self.module(*inputs)
            self.synchronize()
            for _ in range(iters):
                if self.device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    self.module(*inputs)
                    end.record()
                    end.synchronize()
                    times.append(float(start.elapsed_time(end)))
                else:
                    begin = time.perf_counter()
                    self.module(*inputs)
                    times.append((time.perf_counter() - begin) * 1e3)
        return times
