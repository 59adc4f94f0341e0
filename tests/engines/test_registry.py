"""The engine registry: names, lazy classes, options validated by each engine, shape ranges."""

from __future__ import annotations

import pytest

from prune2deploy.engines.registry import DEFAULT_ENGINE, engine_class, engine_names
from prune2deploy.errors import ConfigError
from prune2deploy.spec import CompileOptions


def test_every_engine_is_registered_by_name():
    assert engine_names() == ("onnxruntime", "tensorrt", "tensorrt-rtx", "torch")
    assert DEFAULT_ENGINE == "onnxruntime"
    for name in engine_names():
        assert engine_class(name).name == name
    with pytest.raises(ConfigError, match="unknown engine 'vulkan'"):
        engine_class("vulkan")


def test_engine_options_reach_the_engine_and_are_validated():
    options = CompileOptions(engine="tensorrt", engine_options={"optimization_level": 5, "workspace_mib": 512})
    assert options.engine_options == {"optimization_level": 5, "workspace_mib": 512}
    with pytest.raises(ConfigError, match="optimization_level must be 0-5"):
        CompileOptions(engine="tensorrt", engine_options={"optimization_level": 9})
    with pytest.raises(ConfigError, match="unknown TensorRT build option"):
        CompileOptions(engine="tensorrt-rtx", engine_options={"colour": "red"})
    with pytest.raises(ConfigError, match="engine onnxruntime has no engine options"):
        CompileOptions(engine_options={"device": "cuda"})
    assert CompileOptions(engine="torch", engine_options={"device": "cpu"}).engine_options == {"device": "cpu"}


def test_shape_ranges_come_from_the_engine():
    inputs = [("input_ids", [None, None]), ("pixels", [None, 3, 16, 16])]
    assert engine_class("onnxruntime").shape_ranges(inputs, batches=[1, 8], seqs=[64]) == {}
    ranges = engine_class("tensorrt").shape_ranges(inputs, batches=[1, 8], seqs=[64, 128])
    assert ranges["input_ids"] == ((1, 1), (1, 64), (8, 128))
    assert ranges["pixels"] == ((1, 3, 16, 16), (1, 3, 16, 16), (8, 3, 16, 16))


def test_a_registered_engine_is_built_and_checked_by_compile(mlp_path, tmp_path):
    """docs/architecture.md "Adding an engine", exercised: a throw-away engine registered at run time is a valid
    --engine, built by the compile, and its outputs are verified against the reference."""
    import contextlib

    from prune2deploy import api
    from prune2deploy.engines.base import Availability, BuildResult, Engine
    from prune2deploy.engines.onnxruntime import OrtRunner
    from prune2deploy.engines.registry import register_engine, unregister_engine
    from prune2deploy.ort_session import make_session

    built_in: list = []

    class CopyEngine(Engine):
        """ "Builds" by taking model.onnx as it is; runs it with ONNX Runtime."""

        name = "copy-engine"

        @classmethod
        def available(cls) -> Availability:
            return Availability(True, True)

        def build(self, model_path, options) -> BuildResult:
            built_in.append(options.precision)
            return BuildResult(engine=self.name, artifact=model_path, info={"copied": True})

        @contextlib.contextmanager
        def runner(self, built):
            yield OrtRunner(make_session(built.artifact))

    register_engine("copy-engine", CopyEngine)
    try:
        options = api.CompileOptions(engine="copy-engine", profile=False, quality_windows=0)
        result = api.compile(mlp_path, tmp_path / "out", options)
    finally:
        unregister_engine("copy-engine")
    engine = result.report["engine"]
    assert built_in == ["fp32"] and engine["engine"] == "copy-engine" and engine["info"] == {"copied": True}
    assert (tmp_path / "out" / engine["artifact"]).is_file()
    assert engine["verification"]["passed"] and engine["verification"]["worst"] < 1e-5
    assert "copy-engine" not in engine_names()
    with pytest.raises(RuntimeError, match="already registered"):
        from prune2deploy.engines.registry import register_engine

        register_engine("torch", CopyEngine)
