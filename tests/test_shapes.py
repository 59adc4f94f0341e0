"""Engine shape ranges: deployment defaults, --shapes, and what the optimization profile gets."""

from __future__ import annotations

import pytest

from prune2deploy.cli import build_parser
from prune2deploy.cli.compile import compile_options
from prune2deploy.driver.compile import deployment_axes
from prune2deploy.engines.registry import engine_class
from prune2deploy.errors import ConfigError
from prune2deploy.spec import CompileOptions


def test_defaults_fit_a_deployment_not_the_profiling_point():
    options = CompileOptions(profile_batches=[1], profile_seqs=[64])
    assert deployment_axes(options, max_positions=8192) == {"batch": (1, 1, 8), "seq": (1, 64, 2048)}
    assert deployment_axes(options, max_positions=512)["seq"] == (1, 64, 512)  # BERT-style position limit
    wide = CompileOptions(profile_batches=[4, 16], profile_seqs=[4096])
    assert deployment_axes(wide, max_positions=None) == {"batch": (1, 4, 16), "seq": (1, 4096, 4096)}


def test_shapes_flag_and_config_key():
    args = build_parser().parse_args(["compile", "m.onnx", "--out", "o", "--shapes", "seq=16:128:1024"])
    options = compile_options(args)
    assert options.shapes == {"seq": (16, 128, 1024)}
    assert deployment_axes(options) == {"batch": (1, 1, 8), "seq": (16, 128, 1024)}
    assert CompileOptions.from_dict({"shapes": {"batch": [2, 4, 32]}}).shapes == {"batch": (2, 4, 32)}
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        CompileOptions(shapes={"batch": [8, 4, 2]})
    with pytest.raises(ConfigError, match="shapes"):
        CompileOptions(shapes={"width": [1, 2, 3]})
    with pytest.raises(ConfigError, match="--shapes takes"):
        compile_options(build_parser().parse_args(["compile", "m.onnx", "--out", "o", "--shapes", "seq=128"]))


def test_tensorrt_profile_uses_the_ranges():
    engine = engine_class("tensorrt-rtx")
    inputs = [("input_ids", [None, None]), ("attention_mask", [None, None]), ("pixel", [None, 3, 224, 224])]
    ranges = engine.shape_ranges(inputs, batches=[1], seqs=[64], axes={"batch": (1, 1, 8), "seq": (1, 64, 2048)})
    assert ranges["input_ids"] == ((1, 1), (1, 64), (8, 2048))
    assert ranges["pixel"] == ((1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224))
    assert engine_class("onnxruntime").shape_ranges(inputs, batches=[1], seqs=[64]) == {}
