"""Running a TensorRT plan: torch CUDA tensors as I/O buffers, CUDA-event timing, per-layer times."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.engines.base import Runner
from prune2deploy.engines.tensorrt_common import CapturingLogger
from prune2deploy.errors import BadInputError, EngineBuildError

__all__ = ["TensorRTRunner"]


class TensorRTRunner(Runner):
    """Runs a plan with torch CUDA tensors as buffers; times with CUDA events, per layer with IProfiler."""

    def __init__(self, trt: Any, plan_path: Path, *, runtime_cache: Path | None = None) -> None:
        import torch

        self.trt, self.torch = trt, torch
        self.logger = CapturingLogger.create(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            errors = [m for s, m in self.logger.records if s in ("ERROR", "INTERNAL_ERROR")]
            raise EngineBuildError(f"cannot load plan {plan_path}: " + "; ".join(errors[-5:]))
        self.runtime_cache_path = runtime_cache
        self._runtime_cache = None
        self.context = self._create_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()

    def _create_context(self) -> Any:
        """An execution context; with TensorRT-RTX, one that loads and later saves the JIT runtime cache."""
        if self.runtime_cache_path is None or not hasattr(self.engine, "create_runtime_config"):
            return self.engine.create_execution_context()
        config = self.engine.create_runtime_config()
        cache = config.create_runtime_cache()
        if self.runtime_cache_path.is_file():
            cache.deserialize(self.runtime_cache_path.read_bytes())
        config.set_runtime_cache(cache)
        self._runtime_cache = cache
        return self.engine.create_execution_context(config)

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def _torch_dtype(self, name: str) -> Any:
        torch = self.torch
        table = {
            "FLOAT": torch.float32,
            "HALF": torch.float16,
            "BF16": torch.bfloat16,
            "INT8": torch.int8,
            "INT32": torch.int32,
            "INT64": torch.int64,
            "BOOL": torch.bool,
            "UINT8": torch.uint8,
        }
        dtype = self.engine.get_tensor_dtype(name)
        if dtype.name not in table:
            raise EngineBuildError(f"tensor {name!r} has type {dtype.name}, which this runner cannot feed.")
        return table[dtype.name]

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        torch = self.torch
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise BadInputError(f"missing feeds for engine inputs {missing}.")
        buffers = {}
        for name in self._inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self._torch_dtype(name))
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            buffers[name] = tensor
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineBuildError(f"output {name!r} has a data-dependent shape {shape}; not supported here.")
            tensor = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, tensor.data_ptr())
            buffers[name] = tensor
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            errors = [m for s, m in self.logger.records if s in ("ERROR", "INTERNAL_ERROR")]
            raise EngineBuildError("TensorRT execution failed: " + "; ".join(errors[-5:]))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        buffers = self._bind(feeds)
        self._execute()
        self.stream.synchronize()
        return {
            name: buffers[name].float().cpu().numpy()
            if buffers[name].dtype == self.torch.bfloat16
            else buffers[name].cpu().numpy()
            for name in self._outputs
        }

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def time(self, feeds: Mapping[str, np.ndarray], *, warmup: int = 10, iters: int = 50) -> list[float]:
        """Milliseconds per run, measured with CUDA events on the runner's stream (buffers bound once)."""
        torch = self.torch
        self._bind_keep = self._bind(feeds)  # keep buffers alive while timing
        for _ in range(warmup):
            self._execute()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._execute()
            end.record(self.stream)
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        return times

    def layer_times(self, feeds: Mapping[str, np.ndarray], *, iters: int = 10) -> dict[str, float]:
        """Mean milliseconds per engine layer, reported by TensorRT's IProfiler over ``iters`` runs."""
        trt = self.trt
        totals: dict[str, float] = {}

        class Profiler(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                totals[layer_name] = totals.get(layer_name, 0.0) + float(ms)

        self._bind_keep = self._bind(feeds)
        self._execute()  # warm-up outside the profile
        self.stream.synchronize()
        self.context.profiler = Profiler()
        try:
            for _ in range(iters):
                self._execute()
                self.stream.synchronize()
        finally:
            self.context.profiler = None
        return {name: total / iters for name, total in totals.items()}

    def close(self) -> None:
        """Saves the TensorRT-RTX runtime cache so that the next process skips the JIT compile."""
        if self._runtime_cache is not None and self.runtime_cache_path is not None:
            with contextlib.suppress(Exception):
                self.runtime_cache_path.write_bytes(bytes(self._runtime_cache.serialize()))
