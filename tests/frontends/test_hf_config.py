"""An HF folder's config.json is range-checked and compared with the safetensors headers before transformers
builds anything from it (a config asking for 10^9 layers would allocate until the machine runs out)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.frontends.hf_config import check_against_weights, read_hf_config, safetensors_shapes

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
    "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 10, "max_position_embeddings": 32,
}  # fmt: skip


def _folder(tmp_path, **change):
    """config.json and a safetensors file holding a [10, 8] embedding and layers 0 and 1 (headers are all
    the checks read)."""
    from safetensors.numpy import save_file

    tensors = {"model.embed_tokens.weight": np.zeros((10, 8), np.float32)}
    tensors |= {f"model.layers.{i}.mlp.up_proj.weight": np.zeros((16, 8), np.float32) for i in range(2)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **change}))
    return tmp_path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 10**9}, "'num_hidden_layers' is 1000000000, outside 1..1024"),
        ({"num_hidden_layers": 1e9}, "'num_hidden_layers' is 1000000000, outside"),  # JSON's 1e9 is a float
        ({"num_hidden_layers": 3}, "'num_hidden_layers' is 3 but the weights hold layers 0..1"),
        ({"vocab_size": 11}, "'vocab_size' is 11 but the weights' token embedding is \\[10, 8\\]"),
        ({"hidden_size": 16}, "'hidden_size' is 16 but the weights' token embedding is \\[10, 8\\]"),
        ({"max_position_embeddings": 10**8}, "'max_position_embeddings' is 100000000, outside 1..16777216"),
        ({"num_attention_heads": 1.5}, "'num_attention_heads' is 1.5 \\(float\\)"),
        ({"architectures": None}, "'architectures' is None"),
    ],
)
def test_configs_that_do_not_fit_the_weights_are_refused(tmp_path, change, message):
    folder = _folder(tmp_path, **change)
    with pytest.raises(BadInputError, match=f"config.json: {message}"):
        check_against_weights(folder, read_hf_config(folder))


def test_a_matching_folder_and_own_embedding_widths_pass(tmp_path):
    folder = _folder(tmp_path)
    check_against_weights(folder, read_hf_config(folder))
    assert safetensors_shapes(folder)["model.embed_tokens.weight"] == (10, 8)
    albert = _folder(tmp_path, hidden_size=16, embedding_size=8)  # ALBERT: the table is narrower than the model
    check_against_weights(albert, read_hf_config(albert))
    lists = _folder(tmp_path, intermediate_size=[16, 16])  # per-layer widths are transformers' to read
    check_against_weights(lists, read_hf_config(lists))


def test_cut_safetensors_headers_and_list_configs_are_refused(tmp_path):
    folder = _folder(tmp_path)
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(BadInputError, match="header claims 1000000000000 bytes in a file of 10"):
        safetensors_shapes(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(BadInputError, match="an HF config is a JSON object, not a list"):
        read_hf_config(folder)


def test_loading_a_folder_whose_config_asks_for_1e9_layers_fails_fast(tmp_path):
    from prune2deploy.frontends.hf import load_hf_model
    from tests.fixtures.models import tiny_llama

    folder = tmp_path / "hf"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    start = time.perf_counter()
    with pytest.raises(BadInputError, match="'num_hidden_layers' is 1000000000"):
        load_hf_model(folder)
    assert time.perf_counter() - start < 30  # refused from the file, before transformers builds a layer
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    with pytest.raises(BadInputError, match="but the weights hold layers 0"):
        load_hf_model(folder)


def test_genai_context_beyond_the_positions_is_refused_before_loading(tmp_path):
    from prune2deploy.frontends.hf_config import check_genai_context

    folder = _folder(tmp_path)
    check_genai_context(folder, 32)
    check_genai_context(folder, None)
    with pytest.raises(BadInputError, match="genai_context_length is 33, beyond the model's 32 positions"):
        check_genai_context(folder, 33)
