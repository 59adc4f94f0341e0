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
