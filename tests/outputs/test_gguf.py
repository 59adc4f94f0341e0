"""compile --gguf: tiny masked Llama / Qwen2 as GGUF files, loaded by llama.cpp (llama-cpp-python) and compared
with the masked model: the llama architecture for uniform widths, deci for per-layer widths (one layer
attention-free), FFN widths padded with zero neurons for the 32-value quantization blocks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from prune2deploy import api
from prune2deploy.errors import ConfigError
from prune2deploy.frontends.masks import apply_masks_torch
from prune2deploy.outputs.gguf import GGUF_TYPES, check_gguf, check_tokens, reference_logits
from prune2deploy.spec import CompileOptions
from tests.fixtures.zeroing import llama_width_masks, save_masks

D = 32  # head_dim: attn_output rows (heads × 32) stay whole quantization blocks
FAST = {"profile": False, "genai": False, "quality_windows": 0}


@pytest.fixture
def llama_cpp():
    """llama-cpp-python (the ``gguf`` extra): CI installs it, so there a missing one fails instead of skipping."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[gguf]'); CI installs it")
    return llama_cpp


def _llama(layers=3, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {
        "vocab_size": 256, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, **overrides,
    }  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def _masks(module, plan) -> dict[str, np.ndarray]:
    """plan: layer → (MLP neurons kept, query heads removed)."""
    return llama_width_masks(module, plan, D)


def _compile(tmp_path, module, masks, **options):
    save_masks(masks, tmp_path / "masks.safetensors")
    opts = CompileOptions(masks=tmp_path / "masks.safetensors", **FAST, **options)
    result = api.compile(module, tmp_path / "out", opts)
    return result, apply_masks_torch(module, masks)


def _metadata(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(("deci.", "llama.", "general.architecture")):
            out[key] = field.contents()
    out["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out


def test_nonuniform_widths_write_deci_with_an_attention_free_layer_and_padded_hf(tmp_path, llama_cpp):
    module = _llama()
    # layer 0: 3 q / 2 kv heads, 64 neurons; layer 1: kv group 1 gone (2 q / 1 kv), 40 neurons (padded to 64 for
    # q8_0/q4_0); layer 2: every head pruned (attention-free in deci), 96 neurons
    masks = _masks(module, {0: (64, [1]), 1: (40, [2, 3]), 2: (96, [0, 1, 2, 3])})
    result, masked = _compile(tmp_path, module, masks, gguf=["f32", "q8_0", "q4_0"], hf_checkpoint=True)
    section = result.report["gguf"]
    assert section["written"] and section["arch"] == {"f32": "deci", "q8_0": "deci", "q4_0": "deci"}
    f32, q8 = section["files"]["f32"], section["files"]["q8_0"]
    # layer 0 keeps its uneven groups as one zero head (slicing's rule); layer 2 has no attention at all
    assert f32["per_layer"] == [[4, 2, 64], [2, 1, 40], [0, 0, 96]] and f32["attention_free_layers"] == [2]
    assert q8["per_layer"] == [[4, 2, 64], [2, 1, 64], [0, 0, 96]]
    assert q8["padded_mlp"] == {"model.layers.1.mlp": [40, 64]} and q8["padding_params"] == 3 * 128 * 24
    meta = _metadata(tmp_path / "out" / "gguf" / "model-f32.gguf")
    assert meta["general.architecture"] == "deci"
    assert meta["deci.feed_forward_length"] == [64, 40, 96]
    assert meta["deci.attention.head_count"] == [4, 2, 0] and meta["deci.attention.head_count_kv"] == [2, 1, 0]
    assert "blk.2.attn_q.weight" not in meta["tensors"] and meta["tensors"]["blk.0.attn_q.weight"] == "F32"
    assert _metadata(tmp_path / "out" / "gguf" / "model-q8_0.gguf")["tensors"]["blk.1.ffn_down.weight"] == "Q8_0"
    # llama.cpp agrees with the masked model: f32 near-exactly (a verdict), q8_0 approximately (reported)
    check = f32["check"]
    assert check["checked"] and check["passed"] and check["max_rel_diff"] < 1e-4
    assert q8["check"]["top1_agreement"] >= 0.9 and "passed" not in q8["check"]
    assert section["files"]["q4_0"]["check"]["checked"]
    # the real report fits the schema and report.html shows each file with its check
    from prune2deploy.profiling.report import render_html, validate_report

    validate_report(result.report)
    page = render_html(result.report)
    outputs = page[page.index('<section id="outputs">') :]
    assert "model-q8_0.gguf" in outputs and "PASSED: max rel. error" in outputs and "q8_0 (approximate)" in outputs
    # hf/: padded to the widest layer with zero neurons/heads, exact through transformers
    hf = result.report["hf"]
    assert hf["written"] and hf["padding"]["shape"] == {"num_heads": 4, "kv_heads": 2, "intermediate": 96}
    assert 0 < hf["padding"]["params_share"] < 1 and hf["check"]["max_rel_diff"] < 1e-5
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "hf")).eval()
    assert loaded.config.use_cache is True  # the input's, not the exporter's False
    ids = torch.tensor([[5, 9, 200, 17, 3]])
    with torch.no_grad():
        kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(loaded.generate(input_ids=ids, **kwargs), masked.generate(input_ids=ids, **kwargs))


def test_uniform_widths_write_llama_in_every_type(tmp_path, llama_cpp):
    # Llama 3.1's rope (theta in transformers 5's rope_parameters, per-frequency factors as rope_freqs)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    module = _llama(layers=2, rope_theta=500000.0, rope_scaling={**rope, "original_max_position_embeddings": 16})
    masks = _masks(module, {0: (64, [0, 2]), 1: (64, [0, 2])})  # 2 q / 2 kv heads, 64 neurons in both layers
    result, masked = _compile(tmp_path, module, masks, gguf=list(GGUF_TYPES))
    section = result.report["gguf"]
    assert set(section["arch"].values()) == {"llama"}
    meta = _metadata(tmp_path / "out" / "gguf" / "model-f32.gguf")
    assert meta["llama.feed_forward_length"] == 64 and meta["llama.attention.head_count"] == 2
    assert meta["llama.attention.key_length"] == D and meta["llama.rope.freq_base"] == 500000.0
    assert meta["tensors"]["rope_freqs.weight"] == "F32"
    for kind, entry in section["files"].items():
        assert (tmp_path / "out" / "gguf" / f"model-{kind}.gguf").is_file()
        assert entry["check"]["checked"] and entry["padded_mlp"] == {}, kind
        if kind in ("q4_0", "q4_1", "q5_0", "q5_1"):
            assert set(entry["kept_wider"]) == {"token_embd.weight", "output.weight"}, kind  # in Q8_0
    assert section["files"]["f32"]["check"]["max_rel_diff"] < 1e-4
    assert section["files"]["q8_0"]["check"]["top1_agreement"] >= 0.9
    assert section["files"]["f16"]["check"]["top1_agreement"] >= 0.9
    q4_1 = _metadata(tmp_path / "out" / "gguf" / "model-q4_1.gguf")["tensors"]
    assert q4_1["output.weight"] == "Q8_0" and q4_1["blk.0.ffn_up.weight"] == "Q4_1"
    assert section["files"]["q4_1"]["bytes"] < section["files"]["q8_0"]["bytes"] < section["files"]["f32"]["bytes"]
    # the check is the one a user repeats: teacher-forced logits of the written file
    tokens = check_tokens(256, 16)
    again = check_gguf(tmp_path / "out" / "gguf" / "model-f32.gguf", tokens, reference_logits(masked, tokens))
    assert again["max_rel_diff"] < 1e-4 and again["top1_agreement"] == 1.0


def _writer_section(tmp_path, masked, kinds):
    """The registered gguf writer on a masked module (what compile's output step does), without a compile."""
    from prune2deploy.outputs.lm import TorchModels
    from prune2deploy.outputs.registry import OutputContext, load_writers

    context = OutputContext(
        tmp_path / "gguf", tmp_path / "model.onnx", CompileOptions(gguf=kinds), TorchModels(lambda: (masked, None))
    )
    written = load_writers()["gguf"].write(context)
    assert written.check is None and written.later is not None  # llama.cpp checks after the torch modules go
    return written.later()


def test_qwen2_mlp_pruning_is_written_and_pruned_heads_with_biases_are_refused(tmp_path, llama_cpp):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prune2deploy.errors import UnsupportedModelError

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    module = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-zero q/k/v biases: they must be permuted like the rows
        for layer in module.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    masked = apply_masks_torch(module, _masks(module, {0: (64, []), 1: (96, [])}))
    result = _writer_section(tmp_path, masked, ["f32"])
    entry = result.section["files"]["f32"]
    assert entry["arch"] == "deci" and entry["per_layer"] == [[4, 2, 64], [4, 2, 96]]
    assert result.check.passed and entry["check"]["max_rel_diff"] < 1e-4
    # pruned query heads with q biases: llama.cpp reads a q bias hidden_size wide, so it is refused with the reason
    masked = apply_masks_torch(module, _masks(module, {0: (64, [0, 1]), 1: (64, [0, 1])}))  # kv group 0 gone
    with pytest.raises(UnsupportedModelError, match="q bias as hidden_size"):
        _writer_section(tmp_path / "heads", masked, ["f32"])


def test_a_family_llama_cpp_blocks_do_not_compute_is_refused_with_the_reason(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prune2deploy.errors import UnsupportedModelError

    config = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"'qwen3'.*convert_hf_to_gguf"):
        _writer_section(tmp_path, Qwen3ForCausalLM(config).eval(), ["q8_0"])


def test_gguf_types_are_validated():
    assert CompileOptions(gguf=["q8_0", "q4_1"]).gguf == ["q8_0", "q4_1"]
    assert CompileOptions().gguf == []
    with pytest.raises(ConfigError, match="gguf"):
        CompileOptions(gguf=["q4_k"])


def test_cli_flag_takes_a_comma_list(tmp_path, capsys):
    from prune2deploy.cli import main

    code = main(["compile", "no-such-model", "--out", str(tmp_path / "o"), "--gguf", "q8_0,q3_0"])
    assert code == 2 and "gguf" in capsys.readouterr().err


def test_a_byte_level_bpe_tokenizer_is_carried_so_llama_cpp_tokenizes_as_transformers(tmp_path, llama_cpp):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prune2deploy.outputs.lm import TorchModels
    from prune2deploy.outputs.registry import OutputContext, load_writers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog, 1234 times!"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    module = _llama(layers=1, vocab_size=304)  # 4 embedding rows the tokenizer never produces
    options = CompileOptions(gguf=["q8_0"])
    context = OutputContext(tmp_path, tmp_path / "model.onnx", options, TorchModels(lambda: (module, tokenizer)))
    section = load_writers()["gguf"].write(context).section
    assert section["tokenizer"]["model"] == "gpt2" and section["tokenizer"]["pre"] == "gpt-2"
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-q8_0.gguf"), vocab_only=True, verbose=False)
    for text in ("the lazy fox, quick!", "brown dogs jump 12 times"):
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    assert llm.token_eos() == tokenizer.eos_token_id


def test_a_bf16_checkpoint_is_written_from_its_own_values(tmp_path, llama_cpp):
    """bf16 weights are exact in f32: the f32 file of a bf16 checkpoint computes its fp32 forward in llama.cpp."""
    module = _llama(layers=2).to(torch.bfloat16)
    masked = apply_masks_torch(module, _masks(module, {0: (64, [1]), 1: (96, [])}))
    result = _writer_section(tmp_path, masked, ["f32", "bf16"])
    files = result.section["files"]
    assert result.check.passed and files["f32"]["check"]["max_rel_diff"] < 1e-4
    # the bf16 file holds the checkpoint's own values, but llama.cpp rounds activations to bf16 for its matmuls
    assert files["bf16"]["check"]["max_rel_diff"] < 2e-2 and files["bf16"]["check"]["top1_agreement"] >= 0.9
    assert next(masked.parameters()).dtype == torch.bfloat16  # computed in fp32 without converting the module


def test_a_file_llama_cpp_cannot_load_fails_the_check_and_says_so(tmp_path, llama_cpp, monkeypatch):
    module = _llama(layers=1)
    masked = apply_masks_torch(module, _masks(module, {0: (64, [])}))

    def refuse(*_args, **_kwargs):
        raise ValueError("Failed to load model from file")

    monkeypatch.setattr(llama_cpp, "Llama", refuse)
    result = _writer_section(tmp_path, masked, ["q8_0"])
    assert not result.check.passed and "could not load gguf/model-q8_0.gguf" in result.check.problem
    assert (tmp_path / "gguf" / "model-q8_0.gguf").is_file()  # kept for the user to inspect
