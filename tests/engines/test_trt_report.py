"""Parsing of TensorRT build logs and inspector output (no TensorRT needed)."""

from __future__ import annotations

import json

from prune2deploy.engines.trt_report import layers_from_inspector, layers_from_log, sparsity_from_log

_LOG = [
    "Some other message",
    "(Sparsity) Layers eligible for sparse math: conv1, conv2, conv3",
    "(Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3",
]


def test_sparsity_lines():
    assert sparsity_from_log(_LOG) == {
        "eligible": ["conv1", "conv2", "conv3"],
        "sparse_tactics": ["conv2", "conv3"],
    }
    assert sparsity_from_log(["nothing here"]) == {"eligible": [], "sparse_tactics": []}


def test_layer_table_from_verbose_log():
    message = (
        "Layers:\n"
        "Name: __mye259_0_myl0_0, LayerType: shape_call, Inputs: [], Constants: [], Outputs: [], "
        "TacticName: , "
        "StreamId: 0, Metadata: \n"
        "Name: __myl_FcAddRelu_myl0_1, LayerType: runtime_fusion, Inputs: [ { Name: x, Dimensions: [-1,64], "
        "Datatype: Half, Format: (Linear) Row major linear format }], "
        "Constants: [ { Name: w, Datatype: Half }], "
        "Outputs: [ { Name: y, Datatype: Float }], TacticName: sm80_sparse_gemm, StreamId: 0, "
        "Metadata: [ONNX Layer: /0/Gemm][ONNX Layer: /1/Relu]\n\nI/O Tensors:\n Name: x, IOMode: Input"
    )
    layers = layers_from_log(["Engine generation completed", message])
    assert [layer["type"] for layer in layers] == ["shape_call", "runtime_fusion"]
    fused = layers[1]
    assert fused["onnx_nodes"] == ["/0/Gemm", "/1/Relu"]
    assert fused["datatypes"] == ["Float", "Half"]
    assert fused["sparse_tactic"] is True and layers[0]["sparse_tactic"] is False


def test_layer_table_from_inspector_json():
    info = {
        "Layers": [
            {
                "Name": "gemm1",
                "LayerType": "CaskGemmMatrixMultiply",
                "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}],
                "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize128x128x64_sparse",
                "Metadata": "[ONNX Layer: node_linear]",
            },
            "reformat_2",
        ],
        "Bindings": ["x", "y"],
    }
    layers = layers_from_inspector(json.dumps(info))
    assert layers[0]["onnx_nodes"] == ["node_linear"] and layers[0]["sparse_tactic"] is True
    assert layers[0]["datatypes"] == ["Row major linear FP16 format"]
    assert layers[1]["name"] == "reformat_2" and layers[1]["type"] == ""
