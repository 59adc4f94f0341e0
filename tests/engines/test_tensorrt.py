"""TensorRT engines: availability without the library, clear failures, and real TensorRT-RTX AOT builds.

TensorRT-RTX builds engines without a GPU, so the build tests run on CPU-only CI where ``tensorrt_rtx`` is
installed (``pip install tensorrt-rtx-cu12``); they are skipped, with that reason, where it is not.
Running an engine needs a GPU: without one the runner must refuse clearly; with one it must match ORT.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from prune2deploy.engines.base import BuildOptions
from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.engines.tensorrt import (
    TensorRTEngine,
    TensorRTOptions,
    TensorRTRTXEngine,
    parse_compute_capability,
)
from prune2deploy.errors import ConfigError, EngineBuildError, EngineUnavailable
from prune2deploy.feeds import random_feeds
from prune2deploy.pipeline import convert_precision
from tests.fixtures.exports import export_mlp

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="TensorRT-RTX not installed (pip install tensorrt-rtx-cu12)",
)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


LLAMA_RANGES = {name: ((1, 2), (2, 16), (4, 64)) for name in ("input_ids", "attention_mask")}


@pytest.fixture(scope="session")
def mlp24_tagged_path(cache_dir):
    """The 2:4 MLP, with its Gemm nodes tagged as the sparsify-2:4 pass tags them."""
    path = cache_dir / "mlp_24_tagged.onnx"
    if not path.exists():
        model = ir.load(export_mlp(cache_dir, sparse_24=True))
        for node in model.graph:
            if node.op_type == "Gemm":
                node.metadata_props["p2d.sparsity"] = "2:4"
        ir.save(model, path)
    return path


# -- without the library --


def test_compute_capability_spellings():
    assert [parse_compute_capability(t) for t in ("sm86", "sm_89", "8.6", "120", "current")] == [
        "SM86",
        "SM89",
        "SM86",
        "SM120",
        "CURRENT",
    ]
    with pytest.raises(ConfigError, match="ampere"):
        parse_compute_capability("ampere")


def test_unknown_extra_option_is_a_config_error():
    with pytest.raises(ConfigError, match="optimisation_level"):
        TensorRTOptions.from_extra({"optimisation_level": 3})
    with pytest.raises(ConfigError, match="0-5"):
        TensorRTOptions.from_extra({"optimization_level": 9})


def test_missing_library_is_reported_not_raised(monkeypatch, mlp_path, tmp_path):
    monkeypatch.setattr(TensorRTEngine, "module_name", "tensorrt_not_installed_here")
    availability = TensorRTEngine.available()
    assert not availability.can_build and not availability.can_run
    assert "tensorrt_not_installed_here" in availability.reason and "pip install" in availability.install_hint
    with pytest.raises(EngineUnavailable, match="pip install tensorrt"):
        TensorRTEngine().build(mlp_path, BuildOptions(work_dir=tmp_path))


@pytest.mark.skipif(_has_gpu(), reason="checks the GPU-less refusal of standard TensorRT")
def test_standard_tensorrt_without_gpu_is_unavailable(mlp_path, tmp_path):
    assert not TensorRTEngine.available().can_build
    with pytest.raises(EngineUnavailable, match=r"GPU|tensorrt"):
        TensorRTEngine().build(mlp_path, BuildOptions(work_dir=tmp_path, shape_ranges={"x": ((1, 64),) * 3}))


# -- TensorRT-RTX ahead-of-time builds --


def _layers(result) -> list[dict]:
    return json.loads((result.artifact.parent / "layers.json").read_text())["layers"]


@needs_rtx
def test_rtx_available_builds_without_gpu():
    availability = TensorRTRTXEngine.available()
    assert availability.can_build
    assert availability.can_run == _has_gpu()


@needs_rtx
def test_rtx_mlp_fp32(mlp_path, tmp_path):
    ranges = {"x": ((1, 64), (8, 64), (256, 64))}
    result = TensorRTRTXEngine().build(
        mlp_path,
        BuildOptions(shape_ranges=ranges, work_dir=tmp_path, extra={"compute_capabilities": ["sm86"]}),
    )
    assert result.artifact.stat().st_size > 10_000  # the weights (64·128 + 128·32 floats) are in the plan
    assert (tmp_path / "build.log").read_text().count("Layers:") == 1
    info = result.info
    assert info["compute_capabilities"] == ["sm86"]
    assert info["profiles"] == {"x": {"min": [1, 64], "opt": [8, 64], "max": [256, 64]}}
    assert info["precision"]["source"] == "fp32"
    layers = _layers(result)
    covered = {name for layer in layers for name in layer["onnx_nodes"]}
    gemms = {n.name for n in onnx.load(str(mlp_path)).graph.node if n.op_type == "Gemm"}
    assert gemms <= covered  # every Gemm is in some engine layer
    assert all("Half" not in layer["datatypes"] for layer in layers)


@needs_rtx
def test_rtx_sparse_request_is_reported_as_ignored(mlp24_tagged_path, tmp_path):
    options = BuildOptions(
        precision="fp16",
        convert_precision=convert_precision,
        sparse_weights=True,
        shape_ranges={"x": ((1, 64), (8, 64), (64, 64))},
        work_dir=tmp_path,
    )
    result = TensorRTRTXEngine().build(mlp24_tagged_path, options)
    sparsity = result.info["sparsity"]
    assert sparsity["requested"] and sparsity["flag_set"] and sparsity["honoured"] is False
    assert sparsity["eligible"] == [] and sparsity["sparse_tactics"] == []
    assert len(sparsity["onnx_nodes_tagged_2_4"]) == 2  # what the 2:4 pass tagged, shown next to what TRT did
    assert any("ignores" in note for note in result.info["notes"])
    # fp16 came from tensor types: the float32 ONNX was converted, and the engine's GEMMs are Half.
    assert result.info["precision"]["source"] == "converted by convert-precision"
    assert any("Half" in layer["datatypes"] for layer in _layers(result))


@needs_rtx
def test_rtx_llama_dynamic_batch_and_seq_fp16(tiny_llama_onnx, tmp_path):
    options = BuildOptions(
        precision="fp16",
        convert_precision=convert_precision,
        shape_ranges=LLAMA_RANGES,
        work_dir=tmp_path,
        extra={"compute_capabilities": ["sm89", "sm120"], "optimization_level": 2},
    )
    result = TensorRTRTXEngine().build(tiny_llama_onnx, options)
    info = result.info
    assert info["compute_capabilities"] == ["sm89", "sm120"] and info["optimization_level"] == 2
    assert set(info["profiles"]) == {"input_ids", "attention_mask"}
    conversion = info["precision"]["conversion"]
    assert conversion["kept_fp32_ops"]["Softmax"] == 2
    layers = _layers(result)
    covered = {name for layer in layers for name in layer["onnx_nodes"]}
    matmuls = {n.name for n in ir.load(tiny_llama_onnx).graph if n.op_type == "MatMul"}
    assert matmuls <= covered
    assert any(layer["type"] == "gemm" for layer in layers)


@needs_rtx
def test_rtx_cnn(cnn_path, tmp_path):
    result = TensorRTRTXEngine().build(
        cnn_path,
        BuildOptions(shape_ranges={"pixels": ((1, 3, 16, 16), (4, 3, 16, 16), (32, 3, 16, 16))}, work_dir=tmp_path),
    )
    covered = {name for layer in _layers(result) for name in layer["onnx_nodes"]}
    convs = {n.name for n in onnx.load(str(cnn_path)).graph.node if n.op_type == "Conv"}
    assert convs <= covered


@needs_rtx
def test_rtx_dynamic_input_without_range_names_it(tiny_llama_onnx, tmp_path):
    ranges = {"input_ids": LLAMA_RANGES["input_ids"]}
    with pytest.raises(EngineBuildError, match="attention_mask"):
        TensorRTRTXEngine().build(tiny_llama_onnx, BuildOptions(shape_ranges=ranges, work_dir=tmp_path))


@needs_rtx
def test_rtx_bad_range_is_explained(mlp_path, tmp_path):
    with pytest.raises(EngineBuildError, match="min <= opt <= max"):
        TensorRTRTXEngine().build(
            mlp_path, BuildOptions(shape_ranges={"x": ((8, 64), (1, 64), (16, 64))}, work_dir=tmp_path)
        )
    with pytest.raises(EngineBuildError, match="does not fit"):
        TensorRTRTXEngine().build(
            mlp_path, BuildOptions(shape_ranges={"x": ((1, 32), (2, 32), (4, 32))}, work_dir=tmp_path)
        )


@needs_rtx
def test_rtx_has_no_sm90_target(mlp_path, tmp_path):
    options = BuildOptions(
        shape_ranges={"x": ((1, 64),) * 3}, work_dir=tmp_path, extra={"compute_capabilities": ["sm90"]}
    )
    with pytest.raises(ConfigError, match=r"no sm90.*Supported: .*sm86"):
        TensorRTRTXEngine().build(mlp_path, options)


@needs_rtx
def test_rtx_refuses_float32_onnx_when_conversion_is_off(mlp_path, tmp_path):
    options = BuildOptions(
        precision="fp16",
        convert_precision=convert_precision,
        shape_ranges={"x": ((1, 64),) * 3},
        work_dir=tmp_path,
        extra={"convert_precision": False},
    )
    with pytest.raises(EngineBuildError, match="convert-precision"):
        TensorRTRTXEngine().build(mlp_path, options)


@needs_rtx
def test_rtx_runner(mlp_path, tmp_path):
    result = TensorRTRTXEngine().build(
        mlp_path, BuildOptions(shape_ranges={"x": ((1, 64), (4, 64), (16, 64))}, work_dir=tmp_path)
    )
    if not _has_gpu():
        with pytest.raises(EngineUnavailable, match="GPU"), TensorRTRTXEngine().runner(result):
            pass
        return
    feeds = random_feeds(ir.load(mlp_path), batch=3)
    with TensorRTRTXEngine().runner(result) as runner:
        got = runner.run(feeds)["output"]
        times = runner.time(feeds, warmup=2, iters=5)
        per_layer = runner.layer_times(feeds, iters=3)
    ref = make_session(mlp_path).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert per_layer and all(t >= 0 for t in per_layer.values())


@needs_rtx
def test_rtx_bf16_from_converted_onnx_and_ignored_timing_cache(tiny_llama_onnx, tmp_path):
    from prune2deploy.passes.precision import ConvertPrecisionPass

    model = ir.load(tiny_llama_onnx)
    ConvertPrecisionPass("bf16")(model)
    converted = tmp_path / "llama_bf16.onnx"
    ir.save(model, converted)
    options = BuildOptions(
        precision="bf16",
        convert_precision=convert_precision,
        shape_ranges=LLAMA_RANGES,
        work_dir=tmp_path / "out",
        extra={"timing_cache": tmp_path / "timing.cache"},
    )
    result = TensorRTRTXEngine().build(converted, options)
    assert result.info["precision"]["source"] == "tensor types of the ONNX"  # not converted twice
    datatypes = {d for layer in _layers(result) for d in layer["datatypes"]}
    assert "BFloat16" in datatypes and "Half" not in datatypes
    assert result.info["timing_cache"]["ignored"] is True
    assert any("timing cache" in note for note in result.info["notes"])
