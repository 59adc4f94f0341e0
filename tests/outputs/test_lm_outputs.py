"""compile → genai/ and hf/ on tiny masked Llama / Qwen2: genai's greedy tokens equal transformers' on the
masked model, the decoder never expands K/V, per-layer head counts decode, and hf/ round-trips."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from prune2deploy import api
from prune2deploy.frontends.masks import apply_masks_torch
from prune2deploy.spec import CompileOptions
from tests.fixtures.zeroing import llama_width_masks, save_masks

og = pytest.importorskip("onnxruntime_genai")

D = 16  # head_dim
FAST = {"profile": False}


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {
        "vocab_size": 128,
        "hidden_size": 96,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **overrides,
    }
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128, hidden_size=96, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    module = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-zero q/k/v biases: slicing must carry them
        for layer in module.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return module


def _masks(module, *, mlp_keep, heads_removed) -> dict[str, np.ndarray]:
    """MLP neurons kept and query heads removed, per layer."""
    plan = {i: (keep, heads) for i, (keep, heads) in enumerate(zip(mlp_keep, heads_removed, strict=True))}
    return llama_width_masks(module, plan, D)


def _compile(tmp_path, module, masks, **options):
    save_masks(masks, tmp_path / "masks.safetensors")
    opts = CompileOptions(masks=tmp_path / "masks.safetensors", **FAST, **options)
    result = api.compile(module, tmp_path / "out", opts)
    return result, apply_masks_torch(module, masks)


def _hf_greedy(module, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = module.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _genai_greedy(folder, prompt, n):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done() and len(tokens) < n:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.load(str(path)).graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _gqa_heads(path) -> list[tuple[int, int]]:
    model = ir.load(str(path))
    return [
        (n.attributes["num_heads"].value, n.attributes["kv_num_heads"].value)
        for n in model.graph
        if n.op_type == "GroupQueryAttention"
    ]


def test_genai_folder_of_masked_llama_generates_transformers_tokens(tmp_path):
    module = _llama(intermediate_size=96)
    # 50% of MLP neurons and the first query head of every GQA group (heads 0 and 3 of 6, G = 3)
    masks = _masks(module, mlp_keep=[48, 48], heads_removed=[[0, 3], [0, 3]])
    result, masked = _compile(tmp_path, module, masks, hf_checkpoint=True)
    genai = result.report["genai"]
    assert genai["written"] and genai["check"]["passed"]
    assert genai["check"]["max_rel_diff"] < 1e-5 and genai["check"]["top1_agreement"] == 1.0
    assert genai["genai"]["greedy_tokens_equal"]
    folder = tmp_path / "out" / "genai"
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_attention_heads"] == 4 and config["model"]["decoder"]["head_size"] == D
    assert _gqa_heads(folder / "model.onnx") == [(4, 2), (4, 2)]
    ops = _ops(folder / "model.onnx")
    assert "Expand" not in ops and ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 4
    assert genai["kv_cache_bytes_per_token"] == 2 * 2 * 2 * D * 4  # layers x K,V x kv heads x head_dim x fp32
    # genai on its own: 24 greedy tokens equal transformers' on the masked model
    prompt = [5, 17, 33, 90, 4, 61, 7]
    assert _genai_greedy(folder, prompt, 24) == _hf_greedy(masked, prompt, 24)


def test_bf16_checkpoint_gets_an_fp32_genai_decoder_and_a_bf16_hf_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from prune2deploy.outputs.fp32 import computing_in_fp32

    module = _llama().to(torch.bfloat16)
    masks = _masks(module, mlp_keep=[48, 48], heads_removed=[[0, 3], [0, 3]])
    result, masked = _compile(tmp_path, module, masks, hf_checkpoint=True)
    genai, hf = result.report["genai"], result.report["hf"]
    # the decoder is fp32 (CPU kernels), checked against the masked bf16 model computed in fp32
    assert genai["written"] and genai["check"]["passed"] and genai["check"]["max_rel_diff"] < 1e-5
    assert genai["genai"]["greedy_tokens_equal"] and "fp32 decoder" in genai["precision_note"]
    weights = [
        v.const_value.dtype for v in ir.load(str(tmp_path / "out" / "genai" / "model.onnx")).graph.initializers.values()
    ]
    assert ir.DataType.BFLOAT16 not in weights and ir.DataType.FLOAT in weights
    # hf/ stays bf16 and computes what the masked model does (compared in fp32)
    assert hf["written"] and hf["check"]["greedy_tokens_equal"] and hf["check"]["max_rel_diff"] < 1e-5
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "hf")).eval()
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    # the masked module is left as it was: bf16, its tensors restored after the fp32 forwards
    assert all(p.dtype == torch.bfloat16 for p in masked.parameters())
    prompt = [5, 17, 33, 90, 4, 61, 7]
    with computing_in_fp32(masked):
        want = _hf_greedy(masked, prompt, 16)
    assert _genai_greedy(tmp_path / "out" / "genai", prompt, 16) == want


def test_hf_checkpoint_round_trips_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    module = _llama()
    masks = _masks(module, mlp_keep=[40, 40], heads_removed=[[0, 3], [0, 3]])
    result, masked = _compile(tmp_path, module, masks, hf_checkpoint=True, genai=False)
    assert "genai" not in result.report
    section = result.report["hf"]
    assert section["written"] and section["check"]["greedy_tokens_equal"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "hf")).eval()
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (4, 2)
    assert loaded.config.intermediate_size == 40 and loaded.config.head_dim == D
    assert loaded.model.layers[0].mlp.down_proj.weight.shape == (96, 40)
    dense_params = sum(p.numel() for p in module.parameters())
    assert sum(p.numel() for p in loaded.parameters()) < dense_params
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = masked(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert float((want - got).abs().max()) <= 1e-5 * float(want.abs().max())
    assert _hf_greedy(loaded, [9, 8, 7, 6], 16) == _hf_greedy(masked, [9, 8, 7, 6], 16)


def test_qwen2_with_qkv_biases_through_genai_and_hf(tmp_path):
    module = _qwen2()
    masks = _masks(module, mlp_keep=[40, 40], heads_removed=[[0, 3], [0, 3]])
    result, masked = _compile(tmp_path, module, masks, hf_checkpoint=True)
    assert result.report["genai"]["check"]["max_rel_diff"] < 1e-5
    assert result.report["genai"]["genai"]["greedy_tokens_equal"]
    assert result.report["hf"]["check"]["greedy_tokens_equal"]
    prompt = [3, 40, 41, 100, 12]
    assert _genai_greedy(tmp_path / "out" / "genai", prompt, 20) == _hf_greedy(masked, prompt, 20)


def test_nonuniform_heads_and_kv_heads_decode_in_genai_and_hf_names_the_layers(tmp_path):
    module = _llama()
    # layer 0: one head per group removed (4 q / 2 kv); layer 1: kv group 1 entirely (3 q / 1 kv), other MLP width
    masks = _masks(module, mlp_keep=[48, 64], heads_removed=[[0, 3], [3, 4, 5]])
    result, masked = _compile(tmp_path, module, masks, hf_checkpoint=True)
    genai = result.report["genai"]
    assert genai["per_layer_heads"] == [[4, 2], [3, 1]]
    assert _gqa_heads(tmp_path / "out" / "genai" / "model.onnx") == [(4, 2), (3, 1)]
    assert genai["check"]["max_rel_diff"] < 1e-5 and genai["genai"]["greedy_tokens_equal"]
    prompt = [11, 12, 13, 14, 15, 16]
    assert _genai_greedy(tmp_path / "out" / "genai", prompt, 24) == _hf_greedy(masked, prompt, 24)
    hf = result.report["hf"]  # padded to one shape: layer 1's 3 query heads split over 2 copies of its kv head
    assert hf["written"] and hf["padding"]["shape"] == {"num_heads": 4, "kv_heads": 2, "intermediate": 64}
    assert hf["check"]["greedy_tokens_equal"] and hf["check"]["max_rel_diff"] < 1e-5


def test_uneven_groups_keep_zero_heads_and_stay_exact(tmp_path):
    module = _llama(num_hidden_layers=1)
    # group 0 loses two heads, group 1 one: each kv head must serve as many query heads → one zero head stays
    masks = _masks(module, mlp_keep=[96], heads_removed=[[0, 1, 3]])
    result, _ = _compile(tmp_path, module, masks)
    genai = result.report["genai"]
    assert genai["per_layer_heads"] == [[4, 2]]
    assert list(genai["padded"]) == ["model.layers.0.self_attn.kv0"]
    assert genai["check"]["max_rel_diff"] < 1e-5 and genai["genai"]["greedy_tokens_equal"]


def test_encoder_writes_no_genai_and_says_why_for_hf(tmp_path):
    from tests.fixtures.models import tiny_bert

    result = api.compile(tiny_bert(), tmp_path / "out", CompileOptions(hf_checkpoint=True, **FAST))
    assert "genai" not in result.report and not (tmp_path / "out" / "genai").exists()
    assert not result.report["hf"]["written"] and "causal LM" in result.report["hf"]["reason"]


def test_regroup_gqa_is_repeated_in_torch_for_genai_and_hf(tmp_path):
    """regroup-gqa is approximate and genai/ is built from the torch module: the pooling is repeated on the
    sliced module (outputs/regroup.py), and the decoder is checked against model.onnx itself, so genai/ and
    hf/ are the model the compile wrote (the decode speed-up of regrouping is genai/'s)."""
    options = CompileOptions(kv_heads=1, hf_checkpoint=True, **FAST)
    result = api.compile(_llama(), tmp_path / "out", options)
    assert next(p for p in result.report["passes"] if p["pass"] == "regroup-gqa")["modified"]
    genai, hf = result.report["genai"], result.report["hf"]
    assert genai["written"] and genai["check"]["passed"] and genai["genai"]["greedy_tokens_equal"]
    against = genai["check"]["vs_model_onnx"]
    assert against["checked"] and against["max_rel_diff"] < 1e-5
    assert genai["regrouped"]["layers"] == {"model.layers.0": [2, 1], "model.layers.1": [2, 1]}
    assert _gqa_heads(tmp_path / "out" / "genai" / "model.onnx") == [(6, 1), (6, 1)]
    assert hf["written"] and hf["check"]["greedy_tokens_equal"] and hf["check"]["max_rel_diff"] < 1e-5
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1


def test_regroup_gqa_of_a_bf16_checkpoint_checks_genai_against_the_torch_model_only(tmp_path):
    result = api.compile(_llama().to(torch.bfloat16), tmp_path / "out", CompileOptions(kv_heads=1, **FAST))
    check = result.report["genai"]["check"]
    assert result.report["genai"]["written"] and check["passed"]
    assert not check["vs_model_onnx"]["checked"] and "bfloat16" in check["vs_model_onnx"]["reason"]


def test_regroup_gqa_with_similarity_grouping_repeats_the_pass_permutation_for_genai_and_hf(tmp_path):
    """Similarity grouping permutes query heads by the graph's weights: genai/ and hf/ apply the pass's own
    permutation (its record) before pooling, and the decoder matches model.onnx (adjacent pooling would not)."""
    options = CompileOptions(kv_heads=2, gqa_grouping="similarity", hf_checkpoint=True, **FAST)
    result = api.compile(_llama(num_key_value_heads=6), tmp_path / "out", options)
    record = next(p for p in result.report["passes"] if p["pass"] == "regroup-gqa")["record"]
    assert any(block["permuted"] for block in record["per_block"].values())  # else this tests adjacent grouping
    genai, hf = result.report["genai"], result.report["hf"]
    assert genai["written"] and genai["check"]["passed"] and genai["genai"]["greedy_tokens_equal"]
    assert genai["check"]["vs_model_onnx"]["checked"] and genai["check"]["vs_model_onnx"]["max_rel_diff"] < 1e-5
    assert genai["regrouped"]["layers"] == {"model.layers.0": [6, 2], "model.layers.1": [6, 2]}
    assert _gqa_heads(tmp_path / "out" / "genai" / "model.onnx") == [(6, 2), (6, 2)]
    assert hf["written"] and hf["check"]["greedy_tokens_equal"] and hf["check"]["max_rel_diff"] < 1e-5


def test_similarity_regrouping_without_the_pass_permutations_is_refused():
    from prune2deploy.errors import UnsupportedModelError
    from prune2deploy.outputs.regroup import regroup_sliced
    from prune2deploy.outputs.slice import slice_causal_lm

    with pytest.raises(UnsupportedModelError, match="permutations were not given"):
        regroup_sliced(slice_causal_lm(_llama()), 1, grouping="similarity")


def test_depth_plan_is_repeated_in_torch_for_genai_and_hf(tmp_path):
    """A depth plan drops non-zero layers (approximate): the module loses the same layers, renumbered (its
    cache slots), and the decoder is checked against model.onnx, so genai/ and hf/ are the shallower model."""
    options = CompileOptions(drop_layers=[1], hf_checkpoint=True, **FAST)
    result = api.compile(_llama(num_hidden_layers=3), tmp_path / "out", options)
    record = next(p for p in result.report["passes"] if p["pass"] == "remove-layers")["record"]
    assert record["approximate_layers"] == ["model.layers.1"]
    genai, hf = result.report["genai"], result.report["hf"]
    assert genai["written"] and genai["check"]["passed"] and genai["genai"]["greedy_tokens_equal"]
    assert genai["check"]["vs_model_onnx"]["checked"] and genai["check"]["vs_model_onnx"]["max_rel_diff"] < 1e-5
    assert genai["depth_plan"] == {"layers_dropped": [1], "layers_before": 3, "layers_after": 2}
    assert _gqa_heads(tmp_path / "out" / "genai" / "model.onnx") == [(6, 2), (6, 2)]
    assert hf["written"] and hf["check"]["greedy_tokens_equal"] and hf["check"]["max_rel_diff"] < 1e-5
    assert json.loads((tmp_path / "out" / "hf" / "config.json").read_text())["num_hidden_layers"] == 2


def test_depth_plan_and_regrouping_are_both_repeated(tmp_path):
    options = CompileOptions(drop_layers=[0], kv_heads=1, **FAST)
    result = api.compile(_llama(num_hidden_layers=3), tmp_path / "out", options)
    genai = result.report["genai"]
    assert genai["written"] and genai["check"]["passed"] and genai["check"]["vs_model_onnx"]["max_rel_diff"] < 1e-5
    assert genai["regrouped"]["layers"] == {"model.layers.1": [2, 1], "model.layers.2": [2, 1]}
    assert _gqa_heads(tmp_path / "out" / "genai" / "model.onnx") == [(6, 1), (6, 1)]


def test_imposed_2_4_writes_no_genai_and_says_why(tmp_path):
    """Other approximate passes are not repeated in torch: genai/ would be a different model than model.onnx."""
    from prune2deploy.passes.registry import default_passes

    options = CompileOptions(passes=[*default_passes(), "sparsify-2:4"], hf_checkpoint=True, **FAST)
    result = api.compile(_llama(), tmp_path / "out", options)
    for key in ("genai", "hf"):
        section = result.report[key]
        assert not section["written"] and "sparsify-2:4" in section["reason"]
        assert not (tmp_path / "out" / key).exists()


def test_a_depth_plan_outside_the_decoder_layers_is_refused():
    from prune2deploy.errors import UnsupportedModelError
    from prune2deploy.outputs.depth import drop_sliced_layers, layer_indices
    from prune2deploy.outputs.slice import slice_causal_lm

    assert layer_indices(["model.layers.3", "model.layers.1", "model.layers.3"]) == [1, 3]
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h\.0"):
        layer_indices(["transformer.h.0"])
    sliced = slice_causal_lm(_llama())
    with pytest.raises(UnsupportedModelError, match="every decoder layer"):
        drop_sliced_layers(sliced, [0, 1])
    with pytest.raises(UnsupportedModelError, match=r"\[5\]"):
        drop_sliced_layers(sliced, [5])


def test_decoder_bytes_are_the_written_decoders_weights():
    """The memory guard's estimate is the decoder's own weights: all of them but the rotary caches."""
    from prune2deploy.outputs.genai import build_genai_decoder, decoder_bytes
    from prune2deploy.outputs.slice import slice_causal_lm

    for module in (_llama(), _llama(tie_word_embeddings=True)):
        decoder = build_genai_decoder(slice_causal_lm(module))
        weights = {name: v.const_value.nbytes for name, v in decoder.graph.initializers.items()}
        caches = weights.pop("cos_cache") + weights.pop("sin_cache")
        floats = sum(n for n in weights.values() if n > 64)  # not the int64 shape constants
        assert caches > 0 and floats == decoder_bytes(slice_causal_lm(module))


def test_genai_that_cannot_be_checked_in_memory_is_not_written_and_hf_still_is(tmp_path, monkeypatch):
    """An 8B decoder (~21 GB fp32) does not fit a 24 GiB machine's check: refused before minutes of writing."""
    import collections

    import psutil

    memory = collections.namedtuple("Memory", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=10_000, total=1 << 34))
    module = _llama()
    masks = _masks(module, mlp_keep=[48, 48], heads_removed=[[0, 3], [0, 3]])
    result, _ = _compile(tmp_path, module, masks, hf_checkpoint=True, verify_mode="whole")
    genai, hf = result.report["genai"], result.report["hf"]
    assert not genai["written"] and "--no-genai" in genai["reason"] and "fp32 decoder" in genai["reason"]
    assert not (tmp_path / "out" / "genai").exists()
    assert hf["written"] and hf["check"]["greedy_tokens_equal"]


def test_a_head_size_onnx_runtimes_gqa_cannot_run_writes_no_genai_and_says_why(tmp_path):
    """ORT's CPU GroupQueryAttention wants head sizes that are multiples of 16: a head size of 8 used to crash
    the compile (exit 3) after the decoder was written; now genai/ is refused first, and the rest is written."""
    from tests.fixtures.models import tiny_llama

    module = tiny_llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    result = api.compile(module, tmp_path / "out", CompileOptions(quality_windows=0, **FAST))
    assert result.passed and not (tmp_path / "out" / "genai").exists()
    assert not result.report["genai"]["written"] and "multiple of 16" in result.report["genai"]["reason"]
