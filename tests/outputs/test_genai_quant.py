"""genai/ in int4 / int8 (MatMulNBits, ONNX Runtime's own quantizer, one weight at a time) and fp16 (CUDA):
every projection quantized, onnxruntime-genai loads and generates, the error against the masked model is
reported as approximate and bounded (a corrupted scale is caught), sizes match the bits per weight, and the
memory guard sizes quantized decoders by their real bytes."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx_ir as ir
import pytest
import torch

from prune2deploy.frontends.masks import apply_masks_torch
from prune2deploy.outputs.genai import (
    _verdict,
    check_genai_folder,
    check_memory_shortfall,
    decoder_bytes,
    reference_outputs,
    write_genai_folder,
)
from prune2deploy.outputs.quantize import GenaiPrecision, WeightQuant, quantize_weight
from prune2deploy.outputs.slice import slice_causal_lm
from tests.outputs.test_lm_outputs import _compile, _genai_greedy, _llama, _masks

pytest.importorskip("onnxruntime_genai")

PROJECTIONS = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _weight_bytes(model: ir.Model) -> int:
    """The decoder's weights as written: every initializer but the rotary caches and int64 shape constants."""
    return sum(
        v.const_value.nbytes
        for name, v in model.graph.initializers.items()
        if name not in ("cos_cache", "sin_cache") and v.const_value.dtype != ir.DataType.INT64
    )


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama (tied embeddings) trained for a few seconds on a deterministic next-token rule, masked (50%
    MLP, one query head per kv group): peaked logits like a trained model's, where top-1 agreement means
    something."""
    module = _llama(vocab_size=64, intermediate_size=96, tie_word_embeddings=True)
    module.train()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    start = torch.randint(0, 64, (16, 1), generator=torch.Generator().manual_seed(0))
    steps = torch.arange(16)[None]
    ids = (start * 5 + steps * 7 + (steps // 3) * 11) % 64  # a rule that needs the previous tokens
    for _ in range(40):  # ~2 s
        loss = module(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    masks = _masks(module, mlp_keep=[48, 48], heads_removed=[[0, 3], [0, 3]])
    masked = apply_masks_torch(module, masks)
    return masked, reference_outputs(masked), float(loss.detach())


def test_quantize_weight_is_onnxruntimes_block_quantizer_with_k_padded():
    """Byte for byte what DefaultWeightOnlyQuantizer.qbits_block_quant gives (K = 100 is padded to 128), and
    ONNX Runtime's MatMulNBits on those bytes is the weight within a quantization step (mostly half)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    root.setLevel(level)  # that module's import calls logging.basicConfig(level=INFO)
    root.handlers[:] = handlers
    from prune2deploy.ort_session import make_session

    weight = np.random.default_rng(0).standard_normal((100, 24)).astype(np.float32)
    for bits in (4, 8):
        quant = WeightQuant(bits, 32)
        packed, scales = quantize_weight(weight, quant)
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits)
        want_packed, want_scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight)
        assert packed.shape == (24, 4, 32 * bits // 8) and scales.shape == (24, 4)
        np.testing.assert_array_equal(packed, want_packed)
        np.testing.assert_array_equal(scales, want_scales)
        x = ir.Value(name="x", shape=ir.Shape(["n", 100]), type=ir.TensorType(ir.DataType.FLOAT))
        b = ir.Value(name="b", type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(packed.shape),
                     const_value=ir.tensor(packed, name="b"))  # fmt: skip
        s = ir.Value(name="s", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(scales.shape),
                     const_value=ir.tensor(scales, name="s"))  # fmt: skip
        node = ir.node("MatMulNBits", [x, b, s], attributes=quant.attributes(100, 24), domain="com.microsoft")
        node.outputs[0].name = "y"
        graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[b, s],
                         opset_imports={"": 18, "com.microsoft": 1})  # fmt: skip
        data = ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString()
        dequantized = make_session(data).run(None, {"x": np.eye(100, dtype=np.float32)})[0]
        # one scale per block of K; MLAS's symmetric scale is the block's max-magnitude value / -(2^(bits-1)), so
        # values of the other sign near that magnitude clip to 2^(bits-1) - 1: up to one step off, else half
        error = np.abs(dequantized - weight) / np.abs(np.repeat(scales.T, 32, axis=0)[:100])
        assert error.max() <= 1 + 1e-5 and np.mean(error <= 0.5 + 1e-5) > 0.9


def test_int4_compile_of_nonuniform_llama_quantizes_every_projection_and_genai_generates(tmp_path):
    module = _llama()
    masks = _masks(module, mlp_keep=[48, 64], heads_removed=[[0, 3], [3, 4, 5]])
    result, masked = _compile(tmp_path, module, masks, genai_precision="int4", quality_windows=0)
    genai = result.report["genai"]
    assert genai["written"] and genai["per_layer_heads"] == [[4, 2], [3, 1]]
    assert (genai["precision"], genai["projections"], genai["lm_head"]) == ("int4", "int4", "int4")  # the builder's
    assert (genai["block_size"], genai["accuracy_level"], genai["symmetric"]) == (32, 4, True)
    model = ir.load(str(tmp_path / "out" / "genai" / "model.onnx"))
    ops = _ops(model)
    assert ops["MatMulNBits"] == 2 * len(PROJECTIONS) + 1 and "MatMul" not in ops  # every projection, lm_head
    nbits = {n.name: n.attributes["bits"].value for n in model.graph if n.op_type == "MatMulNBits"}
    assert nbits.pop("lm_head/MatMulNBits") == 4 and set(nbits.values()) == {4}
    assert ops["GatherBlockQuantized"] == 1  # the (untied) embedding table in int4 blocks, like the head
    assert {n.attributes["K"].value for n in model.graph if "down_proj" in n.name} == {48, 64}  # pruned widths
    # approximate, reported, bounded: never "passed" as exact
    check = genai["check"]
    assert check["status"] == "approximate" and "passed" not in check and check["within_bounds"]
    assert 0 < check["kl_mean"] <= check["bounds"]["kl_mean"]
    assert 0 < check["mean_rel_diff"] <= check["bounds"]["mean_rel_diff"]
    # onnxruntime-genai loads and generates; its tokens are compared as an agreement
    tokens = genai["genai"]
    assert tokens["checked"] and tokens["tokens_compared"] == 12 and 0 <= tokens["token_agreement"] <= 1
    assert len(_genai_greedy(tmp_path / "out" / "genai", [5, 17, 33, 90], 8)) == 8
    # file size: the expected bytes of MatMulNBits blocks and scales (+ fp32 embedding, norms, rotary caches)
    assert genai["weight_bytes"] == _weight_bytes(model)
    assert genai["weight_bytes"] < genai["decoder_bytes"] < genai["weight_bytes"] + 40_000
    assert genai["projection_bits_per_weight"] == 5.0  # 4 bits + one fp32 scale per 32 weights
    weights = genai["quantized_weights"]  # each through ONNX Runtime's MatMulNBits while written
    assert weights["passed"] and weights["weights_checked"] == 12 and 0.5 < weights["max_error_steps"] <= 1
    fp32 = decoder_bytes(slice_causal_lm(masked))
    assert genai["weight_bytes"] < 0.4 * fp32


def test_int8_and_int4_of_a_trained_model_agree_with_the_masked_model(tmp_path, trained):
    masked, reference, loss = trained
    assert loss < 1.0  # it learned the rule: logits are peaked
    found = {}
    # int8 in blocks of 64: hidden 96 and the MLP's 48 are padded to the block; int4 with the builder's int4 head
    # (the default) and with an int8 head
    cases = (
        ("int8", GenaiPrecision("int8", block_size=64), 8),
        ("int4", GenaiPrecision("int4"), 4),
        ("int4-head8", GenaiPrecision("int4", lm_head="int8"), 8),
    )
    for name, precision, head_bits in cases:
        section = write_genai_folder(slice_causal_lm(masked), None, tmp_path / name, precision=precision)
        section = check_genai_folder(tmp_path / name, reference, section, precision=precision)
        found[name] = section["check"]
        assert section["check"]["within_bounds"] and _verdict(section).passed
        assert section["genai"]["checked"]
        model = ir.load(str(tmp_path / name / "model.onnx"))
        gather = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")  # the tied head's blocks
        head = f"lm_head.MatMul.weight_Q{head_bits}G{precision.block_size}"
        assert gather.inputs[0].producer().inputs[0] is model.graph.initializers[head]
        assert ("Slice" in _ops(model)) == (name == "int8")
    assert found["int8"]["top1_agreement"] == 1.0 and found["int8"]["kl_mean"] < 1e-3
    assert found["int4-head8"]["top1_agreement"] >= 0.9 and found["int4-head8"]["kl_mean"] < 0.05
    assert found["int4"]["top1_agreement"] >= 0.75 and found["int4"]["kl_mean"] < 0.1
    assert found["int8"]["mean_rel_diff"] < found["int4-head8"]["mean_rel_diff"] < 0.2
    assert found["int4-head8"]["kl_mean"] < found["int4"]["kl_mean"]  # what the int8 head buys


def test_a_broken_quantizer_fails_while_writing(tmp_path, trained, monkeypatch):
    """One block's scale ×1000 from the quantizer: ONNX Runtime's MatMulNBits no longer gives the weight back."""
    import prune2deploy.outputs.quantize as quantize

    masked, reference, _ = trained
    correct = quantize.quantize_weight

    def broken(weight, quant):
        packed, scales = correct(weight, quant)
        scales[0, 0] *= 1000
        return packed, scales

    monkeypatch.setattr(quantize, "quantize_weight", broken)
    precision = GenaiPrecision("int4")
    section = write_genai_folder(slice_causal_lm(masked), None, tmp_path / "genai", precision=precision)
    weights = section["quantized_weights"]
    # measured in the stored (broken) steps, a block 1000x too coarse comes back |q| steps off: up to 8 in int4
    assert not weights["passed"] and weights["max_error_steps"] > 4 and weights["weights_checked"] == 11
    section = check_genai_folder(tmp_path / "genai", reference, section, precision=precision)
    verdict = _verdict(section)
    assert not verdict.passed and "quantization steps" in verdict.problem and verdict.hint == "This is a bug."


def test_a_corrupted_scale_in_a_written_folder_fails_the_check(tmp_path, trained):
    """One block's scale ×1000 in one layer of a written folder: the decoder computes something else, and the
    logits' bounds (the verdict for a folder whose weights were not checked while written) say so."""
    masked, reference, _ = trained
    folder = tmp_path / "genai"
    precision = GenaiPrecision("int4")
    section = write_genai_folder(slice_causal_lm(masked), None, folder, precision=precision)
    assert section["quantized_weights"]["passed"] and section["quantized_weights"]["max_error_steps"] <= 1
    del section["quantized_weights"]
    model = ir.load(str(folder / "model.onnx"))
    value = model.graph.initializers["model.layers.0.mlp.down_proj.MatMul.weight_scale"]
    scales = value.const_value.numpy().copy()
    scales[0, 0] *= 1000
    value.const_value = ir.tensor(scales, name=value.name)
    ir.save(model, str(folder / "corrupt.onnx"), external_data="corrupt.onnx.data")
    del model
    (folder / "model.onnx").unlink()
    (folder / "corrupt.onnx").rename(folder / "model.onnx")  # its data file keeps its own name
    section = check_genai_folder(folder, reference, section, precision=precision)
    check = section["check"]
    assert not check["within_bounds"] and check["top1_agreement"] < 0.9
    verdict = _verdict(section)
    assert not verdict.passed and "further from the masked model" in verdict.problem


def test_fp16_is_written_for_cuda_and_checked_on_cpu_kernels_only(tmp_path, trained):
    masked, reference, _ = trained
    folder = tmp_path / "genai"
    precision = GenaiPrecision("fp16")
    section = write_genai_folder(slice_causal_lm(masked), None, folder, reference=reference, precision=precision)
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "0"}}]
    model = ir.load(str(folder / "model.onnx"))
    floats = {v.const_value.dtype for v in model.graph.initializers.values()} - {ir.DataType.INT64}
    assert floats == {ir.DataType.FLOAT16}
    assert {v.type.dtype for v in (*model.graph.inputs[2:], *model.graph.outputs)} == {ir.DataType.FLOAT16}
    assert "MatMulNBits" not in _ops(model) and section["lm_head"] == "fp16"
    assert section["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers x K,V x kv heads x head_dim x fp16
    assert section["weight_bytes"] == _weight_bytes(model) == decoder_bytes(slice_causal_lm(masked)) // 2
    check = section["check"]
    assert check["status"] == "approximate" and "needs a GPU" in check["runtime"] and check["within_bounds"]
    assert check["top1_agreement"] == 1.0 and check["max_rel_diff"] < 5e-3
    assert not section["genai"]["checked"] and "CUDA" in section["genai"]["reason"]


def test_decoder_bytes_of_quantized_decoders_are_the_written_weights(tmp_path):
    """Tied embeddings: the table stays fp32 (a Gather), the LM head is int8; block 64 with K = 96 pads."""
    from prune2deploy.outputs.genai import build_genai_decoder

    for module in (_llama(), _llama(tie_word_embeddings=True)):
        sliced = slice_causal_lm(module)
        for precision in (GenaiPrecision("int4", block_size=64), GenaiPrecision("int8", lm_head="int4"),
                          GenaiPrecision("fp32", lm_head="int8")):  # fmt: skip
            model = build_genai_decoder(sliced, precision=precision)
            assert decoder_bytes(sliced, precision) == _weight_bytes(model), precision


def test_memory_guard_sizes_int4_by_its_real_bytes():
    """An 8B bf16 Llama-3.1 (meta tensors: shapes only): its fp32 decoder does not fit a 24 GiB machine's check,
    its int4 one (4 + 1 bits per weight; with the int8 lm_head and embedding table, 8 + 1 there) does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        module = LlamaForCausalLM(config).to(torch.bfloat16)

    class Sliced:  # decoder_bytes and the guard read only the module's parameters
        pass

    sliced = Sliced()
    sliced.module = module
    params = sum(p.numel() for p in module.parameters())
    assert 8.0e9 < params < 8.1e9
    fp32, int4 = decoder_bytes(sliced), decoder_bytes(sliced, GenaiPrecision("int4", lm_head="int8"))
    assert fp32 == 4 * params
    assert 5.4e9 < int4 < 5.7e9  # projections 4.36 GB (5 bits a weight), lm_head and embedding int8 0.59 GB each
    assert 4.9e9 < decoder_bytes(sliced, GenaiPrecision("int4")) < 5.1e9  # the default int4 head: 0.33 GB each
    machine = {"available": 4 << 30, "total": 24 << 30}  # the bf16 module (16 GB) is freed before the check
    assert "--genai-precision int4" in check_memory_shortfall(sliced, **machine)
    assert check_memory_shortfall(sliced, GenaiPrecision("int4"), **machine) == ""
    assert check_memory_shortfall(sliced, GenaiPrecision("fp16"), available=0, total=1) == ""  # not run here


def test_genai_precision_is_an_option_a_flag_and_a_sweep_grid_key():
    from prune2deploy.cli import build_parser
    from prune2deploy.errors import ConfigError
    from prune2deploy.spec import CompileOptions
    from prune2deploy.sweep.spec import expand, parse_sweep

    options = CompileOptions(genai_precision="int4", genai_block_size=64, genai_lm_head="float")
    assert GenaiPrecision.from_options(options) == GenaiPrecision("int4", 64, 4, "float")
    assert GenaiPrecision.from_options(CompileOptions()) == GenaiPrecision("fp32", 32, 4, None)
    with pytest.raises(ConfigError, match="genai_block_size"):
        CompileOptions(genai_block_size=48)
    args = build_parser().parse_args(
        ["compile", "m", "--out", "out", "--genai-precision", "int8", "--genai-block-size", "128"]
    )
    assert (args.genai_precision, args.genai_block_size) == ("int8", 128)
    spec = parse_sweep({"model": "m", "grid": {"genai_precision": ["fp32", "int4"]}})
    assert [v.compile["genai_precision"] for v in expand(spec, source_key="k")] == ["fp32", "int4"]
