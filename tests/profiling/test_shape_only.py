"""Shape-only prediction refuses configs that cannot describe a model, with the key, before any arithmetic."""

from __future__ import annotations

import json

import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.profiling.shape_only import load_config, shape_from_config

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 10**12}, "'num_hidden_layers' is 1000000000000, outside 1..1024"),
        ({"num_hidden_layers": 10**9}, "'num_hidden_layers' is 1000000000, outside"),
        ({"num_attention_heads": 0}, "'num_attention_heads' is 0, outside 1..4096"),
        ({"num_attention_heads": -2}, "'num_attention_heads' is -2"),
        ({"hidden_size": True}, "'hidden_size' is True \\(bool\\)"),
        ({"hidden_size": "64"}, "'hidden_size' is '64' \\(str\\)"),
        ({"hidden_size": 64.5}, "'hidden_size' is 64.5 \\(float\\)"),
        ({"vocab_size": 0}, "'vocab_size' is 0"),
        ({"intermediate_size": -5}, "'intermediate_size' is -5"),
        ({"head_dim": 0}, "'head_dim' is 0"),
        ({"num_attention_heads": 5, "num_key_value_heads": 5}, "'hidden_size' 64 is not a multiple of"),
        ({"num_key_value_heads": 3}, "'num_attention_heads' 4 is not a multiple of 'num_key_value_heads' 3"),
        ({"architectures": None}, "'architectures' is None"),
        ({"architectures": []}, "'architectures' is \\[\\]"),
        ({"architectures": "LlamaForCausalLM"}, "'architectures' is 'LlamaForCausalLM'"),
        ({"hidden_size": None}, "has no 'hidden_size'"),
        ({"text_config": {"num_hidden_layers": -1}}, "'text_config.num_hidden_layers' is -1"),
    ],
)
def test_configs_that_describe_no_model_are_bad_input(change, message):
    with pytest.raises(BadInputError, match=f"^config: {message}|^config {message}"):
        shape_from_config({**LLAMA, **change})


def test_a_valid_config_still_gives_its_shape():
    shape = shape_from_config(LLAMA)
    assert (shape.hidden, shape.head_dim, shape.vocab, len(shape.layers)) == (64, 16, 100, 2)
    assert shape.layers[0].kv_heads == 2 and shape.layers[0].intermediate == 128
    explicit = {**LLAMA, "num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": 16}
    assert shape_from_config(explicit).head_dim == 16  # heads need not divide hidden when head_dim is given


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "an HF config is a JSON object, not a list"),
        ("null", "an HF config is a JSON object, not a NoneType"),
        ('{"hidden_size": ', "cannot parse"),
        ("[" * 100_000 + "]" * 100_000, "cannot parse"),  # deep nesting: json's RecursionError, not exit 3
    ],
)
def test_config_files_that_are_not_objects_are_bad_input(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(BadInputError, match=message):
        load_config(path)


def test_config_file_bytes_nan_and_fifo_are_bad_input(tmp_path):
    import os

    path = tmp_path / "config.json"
    path.write_bytes(b'{"architectures": ["\xff"]}')
    with pytest.raises(BadInputError, match="not UTF-8"):
        load_config(path)
    path.write_text(json.dumps(LLAMA).replace('"hidden_size": 64', '"hidden_size": NaN'))
    with pytest.raises(BadInputError, match="'hidden_size' is NaN/Infinity"):
        shape_from_config(load_config(path), where=str(path))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="is a FIFO"):
        load_config(fifo)


def test_a_plan_for_another_model_is_bad_input():
    plan = {"layers": [{"index": 5, "mlp": {"kept": [0, 1]}}]}
    with pytest.raises(BadInputError, match="widths for layer 5, but config has 2 layers"):
        shape_from_config(LLAMA, plan)
    assert shape_from_config(LLAMA, {"layers": [{"index": 1, "mlp": {"kept": [0, 1]}}]}).layers[1].intermediate == 2


def test_a_prediction_beyond_the_models_positions_is_bad_input():
    """`predict --seq` (or a decode step's position) beyond max_position_embeddings is a run the model cannot
    make: exit 2 naming the bound, not a latency."""
    from prune2deploy.profiling.shape_only import config_rows

    config = {**LLAMA, "max_position_embeddings": 256}
    assert config_rows(config, gpus=["a100"], seq=256)
    bound = r"positions \(max_position_embeddings / n_positions = 256\)"
    with pytest.raises(BadInputError, match=f"position 257, beyond the model's {bound}"):
        config_rows(config, gpus=["a100"], seq=257)
    with pytest.raises(BadInputError, match="position 301, beyond"):
        config_rows(config, gpus=["a100"], decode=True, past=300)
    assert config_rows(LLAMA, gpus=["a100"], seq=4096)  # no bound given: nothing to check
    assert config_rows({**LLAMA, "max_position_embeddings": 64}, gpus=["a100"])[0]["seq"] == 64  # default
