"""hf-nas/: a tiny masked Llama written as a nemotron-nas (DeciLM ``block_configs``) checkpoint, loaded by
transformers with the folder's own modeling code (trust_remote_code) and compared with the masked model, and
checked against what vLLM's nemotron_nas reader builds from its config.json."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from prune2deploy.errors import UnsupportedModelError
from prune2deploy.frontends.masks import apply_masks_torch
from prune2deploy.outputs.hf_nas import _kv_group, ffn_mult_for
from prune2deploy.outputs.nas_rules import check_vllm_rules, vllm_ffn_width, vllm_nemotron_nas_tensors
from prune2deploy.outputs.slice import LayerWidths
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama
from tests.fixtures.zeroing import llama_width_masks

D = 16  # head_dim of the tiny Llamas below (hidden 64 / 4 heads, hidden 96 / 6 heads)


def _written(tmp_path, masked, tokenizer=None):
    """The registered hf_nas writer on a masked module (what compile's output step does), its deferred
    transformers check run as the driver runs it."""
    from prune2deploy.outputs.lm import TorchModels
    from prune2deploy.outputs.registry import OutputContext, load_writers

    options = CompileOptions(hf_nemotron_nas=True)
    models = TorchModels(lambda: (masked, tokenizer))
    context = OutputContext(tmp_path / "hf-nas", tmp_path / "model.onnx", options, models)
    written = load_writers()["hf_nas"].write(context)
    assert written.check is None and written.later is not None  # transformers' reload waits for the modules to go
    return written.later()


def _generate(model, ids):
    kwargs = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        return model.generate(input_ids=ids, **kwargs)


def test_per_layer_widths_kv_groups_and_free_layers_load_with_remote_code_and_compute_the_masked_model(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    module = tiny_llama(num_hidden_layers=4, intermediate_size=600, vocab_size=128, max_position_embeddings=64)
    # layer 0: dense (600 neurons -> 768); layer 1: kv group 1 gone (2 q / 1 kv), 300 neurons -> 512; layer 2: every
    # head pruned (attention no_op), 200 -> 256; layer 3: every neuron pruned (FFN no_op), query head 1 pruned
    plan = {0: (600, []), 1: (300, [2, 3]), 2: (200, [0, 1, 2, 3]), 3: (0, [1])}
    masked = apply_masks_torch(module, llama_width_masks(module, plan, D))
    result = _written(tmp_path, masked)
    section = result.section
    assert result.check.passed, result.check.problem
    assert section["per_layer"] == [[4, 2, 768], [4, 1, 512], [0, 0, 256], [4, 2, 0]]
    assert section["attention_free_layers"] == [2] and section["ffn_free_layers"] == [3]
    assert section["vllm_rules"]["passed"] and section["vllm_rules"]["problems"] == []
    check = section["check"]
    assert check["max_rel_diff"] < 1e-5 and check["greedy_tokens_equal"] and check["passed"]
    # query heads padded back with zero heads (layer 1: 2 q / 1 kv kept -> 4 q in one group of 4; layer 3's zero
    # head already evened its groups); FFNs padded to whole multiples of 256
    padding = section["padding"]
    assert padding["padded_attention"] == {"model.layers.1.self_attn": [2, 1, 4, 1]}
    assert padding["padded_mlp"] == {
        "model.layers.0.mlp": [600, 768],
        "model.layers.1.mlp": [300, 512],
        "model.layers.2.mlp": [200, 256],
    }
    hidden = 64
    assert padding["params_added"] == 3 * hidden * (168 + 212 + 56) + hidden * D * 2 * (2 + 0)
    assert 0 < padding["params_share"] < 1 and 0 < padding["flops_share"] < 1

    folder = tmp_path / "hf-nas"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    assert config["num_key_value_heads"] is None and config["intermediate_size"] is None
    blocks = config["block_configs"]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 4, None, 2]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, False]
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [18.0, 12.0, 6.0, None]  # 3 * width / (2 * 64)
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, True]
    assert {(folder / name).is_file() for name in ("configuration_decilm.py", "modeling_decilm.py")} == {True}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert tuple(f.get_slice("model.layers.1.self_attn.q_proj.weight").get_shape()) == (4 * D, hidden)
        assert tuple(f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape()) == (1 * D, hidden)
        zero_heads = f.get_tensor("model.layers.1.self_attn.o_proj.weight")[:, 2 * D :]
    assert not zero_heads.any()  # the padded query heads' o_proj columns
    assert not any(n.startswith(("model.layers.2.self_attn.", "model.layers.2.input_layernorm")) for n in names)
    assert not any(n.startswith(("model.layers.3.mlp.", "model.layers.3.post_attention_layernorm")) for n in names)

    # the configuration reads block_configs by attribute (vLLM), as dataclasses (TensorRT-LLM's asdict), and
    # writes the same JSON back
    loaded_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert loaded_config.block_configs[2].attention.no_op and loaded_config.block_configs[1].ffn.ffn_mult == 12.0
    assert dataclasses.asdict(loaded_config.block_configs[3])["ffn"]["no_op"] is True
    again = loaded_config.to_dict()
    assert again["block_configs"] == blocks and again["intermediate_size"] is None
    # transformers builds each layer with its own widths and generates what the masked model generates
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    assert type(loaded).__name__ == "DeciLMForCausalLM"
    layers = loaded.model.layers
    assert layers[2].self_attn is None and layers[3].mlp is None
    assert layers[1].self_attn.k_proj.out_features == D and layers[0].mlp.gate_proj.out_features == 768
    ids = torch.tensor([[3, 17, 99, 4, 56, 7]])
    assert torch.equal(_generate(loaded, ids), _generate(masked, ids))


def test_query_heads_pruned_per_layer_are_padded_back_with_zero_heads_and_kv_heads_follow_the_groups(tmp_path):
    module = tiny_llama(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=128)
    # layer 0: kv group 0 gone (4 q / 2 kv, groups of 2): the largest n_heads_in_group they fit is 3 -> 2 kv heads,
    # each group padded with one zero query head; layer 1: head 5 pruned (slicing keeps a zero head): 6 q / 3 kv
    masked = apply_masks_torch(module, llama_width_masks(module, {0: (128, [0, 1]), 1: (100, [5])}, D))
    result = _written(tmp_path, masked)
    section = result.section
    assert result.check.passed, result.check.problem
    assert section["per_layer"] == [[6, 2, 256], [6, 3, 256]]
    assert [b["attention"] for b in section["block_configs"]] == [
        "6 q / 2 kv (n_heads_in_group 3)",
        "6 q / 3 kv (n_heads_in_group 2)",
    ]
    assert section["padding"]["padded_attention"] == {"model.layers.0.self_attn": [4, 2, 6, 2]}
    assert section["check"]["max_rel_diff"] < 1e-5 and section["check"]["greedy_tokens_equal"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_uniform_plan_is_written_with_one_block_repeated_in_the_checkpoints_dtype(tmp_path, dtype):
    from safetensors import safe_open

    module = tiny_llama()
    masked = apply_masks_torch(module, llama_width_masks(module, {0: (48, []), 1: (48, [])}, D)).to(dtype)
    result = _written(tmp_path, masked)
    assert result.check.passed and result.section["per_layer"] == [[4, 2, 256], [4, 2, 256]]
    assert result.section["check"]["max_rel_diff"] < 1e-5  # bf16 weights, both sides computed in fp32
    config = json.loads((tmp_path / "hf-nas" / "config.json").read_text())
    blocks = config["block_configs"]
    assert blocks[0] == blocks[1] and blocks[0]["ffn"]["ffn_mult"] == 6.0
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    with safe_open(str(tmp_path / "hf-nas" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == dtype


def test_the_folders_modeling_code_refuses_a_block_replaced_with_a_linear_layer(tmp_path):
    """replace_with_linear (never written by prune2deploy; vLLM's reader ignores it) is refused by name on load,
    not built as something else."""
    from transformers import AutoModelForCausalLM

    module = tiny_llama()
    masked = apply_masks_torch(module, llama_width_masks(module, {0: (48, []), 1: (48, [])}, D))
    assert _written(tmp_path, masked).check.passed
    config_path = tmp_path / "hf-nas" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_configs"][1]["ffn"]["replace_with_linear"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"block_configs\[1\]: replace_with_linear is true"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-nas"), trust_remote_code=True)


def test_a_folder_that_differs_or_does_not_load_fails_its_check_with_the_reason(tmp_path, monkeypatch):
    import prune2deploy.outputs.hf_nas as hf_nas
    from prune2deploy.outputs.lm import TorchModels
    from prune2deploy.outputs.registry import OutputContext, load_writers

    module = tiny_llama()
    masked = apply_masks_torch(module, llama_width_masks(module, {0: (48, []), 1: (64, [])}, D))

    def written(name):
        context = OutputContext(
            tmp_path / name, tmp_path / "model.onnx", CompileOptions(), TorchModels(lambda: (masked, None))
        )
        return load_writers()["hf_nas"].write(context)

    pending = written("differs")
    monkeypatch.setattr(hf_nas, "check_hf_checkpoint", lambda *_a, **_k: {"max_rel_diff": 0.5})
    result = pending.later()
    assert not result.check.passed and result.section["check"] == {"max_rel_diff": 0.5, "bound": 1e-4, "passed": False}
    assert "hf-nas/ differs from the model in transformers by 0.5 (bound 0.0001)" in result.check.problem

    def refuse(*_args, **_kwargs):
        raise OSError("no file named model.safetensors")

    pending = written("unloadable")
    monkeypatch.setattr(hf_nas, "check_hf_checkpoint", refuse)
    result = pending.later()
    assert not result.check.passed and "could not load or run hf-nas/" in result.check.problem
    assert result.section["check"]["error"] == "OSError: no file named model.safetensors"
    assert (tmp_path / "unloadable" / "config.json").is_file()  # kept for the user to inspect


def test_the_vllm_rule_check_catches_a_config_its_reader_would_build_differently(tmp_path):
    module = tiny_llama()
    masked = apply_masks_torch(module, llama_width_masks(module, {0: (48, []), 1: (80, [2, 3])}, D))
    _written(tmp_path, masked)
    folder = tmp_path / "hf-nas"
    assert check_vllm_rules(folder)["passed"]

    def broken(name, change):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text())
        change(config["block_configs"])
        (copy / "config.json").write_text(json.dumps(config))
        return check_vllm_rules(copy)

    # ffn_mult 12.0 makes vLLM build 512 neurons where 256 are stored
    wrong_mult = broken("mult", lambda blocks: blocks[0]["ffn"].update(ffn_mult=12.0))
    assert not wrong_mult["passed"]
    gate = "model.layers.0.mlp.gate_proj.weight: vLLM builds [512, 64], the checkpoint stores [256, 64]"
    assert gate in wrong_mult["problems"]
    # 3 does not divide 4 query heads: vLLM's integer division would build another kv-head count
    group = broken("group", lambda blocks: blocks[1]["attention"].update(n_heads_in_group=3))
    assert group["problems"] == ["block_configs[1]: n_heads_in_group=3 does not divide 4 query heads"]
    # an attention marked no_op whose tensors are still stored: vLLM has no parameter for them
    no_op = broken("no-op", lambda blocks: blocks[1]["attention"].update(no_op=True, n_heads_in_group=None))
    stored = "model.layers.1.self_attn.q_proj.weight: stored [64, 64], but vLLM builds no such parameter"
    assert stored in no_op["problems"]
    assert not broken("first", lambda blocks: blocks[0]["attention"].update(no_op=True))["passed"]


@pytest.mark.parametrize(
    ("hidden", "ffn_mult", "width"), [(8192, 5.25, 28672), (8192, 2.625, 14336), (256, 1.3125, 256)]
)
def test_ffn_widths_are_what_vllm_computes_from_nvidia_multipliers(hidden, ffn_mult, width):
    from prune2deploy.outputs.decilm.configuration_decilm import ffn_width

    assert vllm_ffn_width(ffn_mult, hidden) == ffn_width(ffn_mult, hidden) == width


@pytest.mark.parametrize("hidden", [64, 576, 960, 2048, 3072, 4096, 8192])
def test_ffn_mult_is_chosen_so_the_readers_build_exactly_the_padded_width(hidden):
    from prune2deploy.outputs.decilm.configuration_decilm import ffn_width

    for width in range(256, 8 * hidden + 1, 256):
        mult = ffn_mult_for(width, hidden)
        assert vllm_ffn_width(mult, hidden) == width == ffn_width(mult, hidden), (hidden, width, mult)
        assert json.loads(json.dumps(mult)) == mult
    for mult in np.linspace(0.5, 8.0, 61):  # the folder's own formula agrees with vLLM's on any multiplier
        assert ffn_width(float(mult), hidden) == vllm_ffn_width(float(mult), hidden)
    with pytest.raises(ValueError, match="multiple of 256"):
        ffn_mult_for(300, hidden)


@pytest.mark.parametrize(
    ("kept", "heads", "group"),
    [
        ((4, 2), 4, 2),  # untouched GQA keeps its groups
        ((2, 1), 4, 4),  # one kv group left: one kv head for 4 query slots
        ((4, 2), 6, 3),  # two groups of 2 in 6 slots: groups of 3, 2 kv heads
        ((9, 3), 9, 3),
        ((6, 2), 8, 4),  # groups of 3 in 8 slots: 4 divides 8 and fits 2 groups
        ((5, 5), 6, 1),  # MHA with a head pruned: still one kv head per query head
    ],
)
def test_n_heads_in_group_is_the_largest_divisor_the_kept_groups_fit(kept, heads, group):
    assert _kv_group(LayerWidths(0, kept[0], kept[1], 64), heads) == group


def test_vllm_tensors_follow_tied_embeddings_and_no_op_blocks():
    config = {
        "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "tie_word_embeddings": True,
        "block_configs": [
            {"attention": {"no_op": False, "n_heads_in_group": 4}, "ffn": {"no_op": True}},
            {"attention": {"no_op": True}, "ffn": {"no_op": False, "ffn_mult": 6.0}},
        ],
    }  # fmt: skip
    shapes = vllm_nemotron_nas_tensors(config)
    assert "lm_head.weight" not in shapes and shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 64)
    assert "model.layers.0.mlp.up_proj.weight" not in shapes and "model.layers.1.self_attn.q_proj.weight" not in shapes
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (64, 256)


def test_a_model_with_projection_biases_is_refused_with_the_reason(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"'qwen2'.*--hf-checkpoint"):
        _written(tmp_path, Qwen2ForCausalLM(config).eval())
    llama = tiny_llama(attention_bias=True)
    with pytest.raises(UnsupportedModelError, match="projection biases"):
        _written(tmp_path / "bias", llama)


def test_compile_flag_writes_hf_nas_and_reports_it(tiny_hf_llama, tmp_path, capsys):
    from prune2deploy.cli import main
    from prune2deploy.profiling.report import validate_report
    from prune2deploy.profiling.report_outputs import output_tables

    out = tmp_path / "out"
    argv = ["compile", str(tiny_hf_llama), "--out", str(out), "--hf-nemotron-nas", "--no-genai", "--no-profile"]
    assert main([*argv, "--quality-windows", "0"]) == 0
    assert "hf-nas/ written (nemotron-nas, 2 layers)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    section = report["hf_nas"]
    assert section["written"] and section["check"]["passed"] and section["vllm_rules"]["passed"]
    assert section["per_layer"] == [[4, 2, 256], [4, 2, 256]]  # nothing pruned: 96 neurons padded to 256
    assert (out / "hf-nas" / "modeling_decilm.py").is_file() and "hf" not in report
    validate_report(report)
    table = next(t for t in output_tables(report) if t.folder == "hf-nas/")
    assert table.rows[0][:5] == ["yes", 2, "none", "none", "passed"] and table.rows[0][5].startswith("PASSED: max rel.")
    assert any(note.startswith("vLLM: vllm serve hf-nas --trust-remote-code") for note in table.notes)
    assert "hf-nas/" in (out / "report.html").read_text()


@pytest.fixture
def tiny_hf_llama(tmp_path):
    """The default tiny Llama saved as a transformers folder (what `compile` reads from disk)."""
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    return folder
