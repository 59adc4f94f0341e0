"""`prune2deploy generate OUT "prompt"`: the same greedy text from onnxruntime-genai and the ONNX Runtime loop,
equal to transformers' on the masked model (a tiny HF folder with a character tokenizer)."""

from __future__ import annotations

import json

import pytest

from prune2deploy import api
from prune2deploy.cli import main
from prune2deploy.errors import BadInputError
from prune2deploy.frontends.masks import apply_masks_torch
from tests.fixtures.zeroing import save_masks
from tests.outputs.test_lm_outputs import _hf_greedy, _llama, _masks

pytest.importorskip("onnxruntime_genai")


def _char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): i + 3 for i in range(125)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])), bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )  # fmt: skip
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
    return tokenizer


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    module, tokenizer = _llama(), _char_tokenizer()
    module.generation_config.eos_token_id = None  # generate the full length: nothing to stop on
    module.save_pretrained(str(tmp / "hf_in"))
    tokenizer.save_pretrained(str(tmp / "hf_in"))
    masks = _masks(module, mlp_keep=[48, 48], heads_removed=[[0, 3], [0, 3]])
    save_masks(masks, tmp / "masks.safetensors")
    code = main(["compile", str(tmp / "hf_in"), "--masks", str(tmp / "masks.safetensors"), "--out",
                 str(tmp / "out"), "--no-profile", "--quiet"])  # fmt: skip
    assert code == 0
    return tmp / "out", apply_masks_torch(module, masks), tokenizer


def test_generate_cli_prints_text_and_tokens_per_s(compiled, capsys):
    out, masked, tokenizer = compiled
    capsys.readouterr()
    assert main(["generate", str(out), "hello world", "--max-new-tokens", "12", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want = _hf_greedy(masked, tokenizer("hello world")["input_ids"], 12)
    assert result["engine"] == "onnxruntime-genai" and result["tokens_per_s"] > 0
    assert result["new_tokens"] == want
    assert result["text"] == tokenizer.decode(want, skip_special_tokens=True)


def test_genai_and_onnxruntime_engines_agree(compiled):
    out, _, _ = compiled
    genai = api.generate(out, "abc", max_new_tokens=10, engine="genai")
    ort = api.generate(out / "genai", "abc", max_new_tokens=10, engine="onnxruntime")
    assert genai.new_tokens == ort.new_tokens and len(ort.new_tokens) == 10
    sampled = api.generate(out, "abc", max_new_tokens=10, do_sample=True, top_k=5, seed=3)
    assert len(sampled.new_tokens) == 10 and all(0 <= t < 128 for t in sampled.new_tokens)
    with pytest.raises(BadInputError, match="sampling needs onnxruntime-genai"):
        api.generate(out, "abc", engine="onnxruntime", do_sample=True)


def test_generate_without_genai_folder_is_a_clear_error(tmp_path):
    assert main(["generate", str(tmp_path), "hi"]) == 2
