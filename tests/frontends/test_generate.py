"""Greedy generation on ONNX Runtime with the KV-cache graph reproduces transformers' generate.

Shares the decoder tests' session exports (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.generate import decode_latency, generate, left_pad

VOCAB = 128


def _hf_generate(model, ids, mask, max_new_tokens, eos_token_id, pad_token_id):
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return out.numpy()


def test_left_pad_puts_every_last_token_in_the_last_column():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])


def test_generate_matches_transformers_on_a_left_padded_batch(tiny_llama_decoder, tiny_llama_kv, rng):
    _, path = tiny_llama_kv
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (6, 3, 9)]
    ids, mask = left_pad(prompts, pad_token_id=0)
    ours = generate(make_session(path), ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    theirs = _hf_generate(tiny_llama_decoder, ids, mask, 12, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (3, 9 + 12)
    np.testing.assert_array_equal(ours, theirs)
    # a row's continuation does not depend on its batch neighbours or its padding
    alone = generate(path, [prompts[1]], max_new_tokens=12)
    np.testing.assert_array_equal(alone[0, 3:], ours[1, 9:])


def test_generate_stops_at_eos_and_pads_finished_rows(tiny_llama_kv, rng):
    _, path = tiny_llama_kv
    session = make_session(path)
    ids, mask = left_pad([rng.integers(3, VOCAB, 5).tolist(), rng.integers(3, VOCAB, 4).tolist()], 0)
    free = generate(session, ids, mask, max_new_tokens=10)
    # declare row 0's third new token as EOS: row 0 ends there, row 1 continues until it emits it too
    eos = int(free[0, 5 + 2])
    stopped = generate(session, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    first_eos = [int(np.flatnonzero(row[5:] == eos)[0]) if (row[5:] == eos).any() else None for row in free]
    k = first_eos[0]  # ≤ 2
    row0 = stopped[0, 5:]
    assert row0[k] == eos and (row0[k + 1 :] == 0).all()
    np.testing.assert_array_equal(row0[: k + 1], free[0, 5 : 5 + k + 1])
    if first_eos[1] is None:
        assert stopped.shape[1] == 5 + 10
    else:
        assert stopped.shape[1] == 5 + max(k, first_eos[1]) + 1
        np.testing.assert_array_equal(stopped[1, : 5 + first_eos[1] + 1], free[1, : 5 + first_eos[1] + 1])


def test_decode_latency_reports_the_cache_it_reads(tiny_llama_kv):
    _, path = tiny_llama_kv
    result = decode_latency(path, past_length=64, batch=2, warmup=1, repeats=5, threads=1)
    assert result.median_ms > 0
    assert result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.kv_cache_bytes == 64 * 2 * (2 * 2 * 2 * 16 * 4)


@pytest.mark.slow
def test_generate_reproduces_transformers_on_smollm2(smollm2, smollm2_kv):
    tokenizer = smollm2.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tokenizer(prompt)["input_ids"]], dtype=np.int64)
    mask = np.ones_like(ids)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ours = generate(smollm2_kv, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
    theirs = _hf_generate(smollm2.module, ids, mask, 20, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape[1] > ids.shape[1] + 5  # it generated text, not an immediate EOS


@pytest.mark.slow
def test_generate_left_padded_batch_matches_transformers_on_smollm2(smollm2, smollm2_kv):
    tokenizer = smollm2.tokenizer
    questions = ["Name a primary colour.", "Write one short sentence about the sea and the wind at night."]
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        )["input_ids"]
        for q in questions
    ]
    assert len(prompts[0]) != len(prompts[1])
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, mask = left_pad(prompts, pad_token_id=pad)
    ours = generate(smollm2_kv, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    theirs = _hf_generate(smollm2.module, ids, mask, 12, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_generate_matches_transformers_for_other_families(family, cache_dir, rng):
    """Qwen2 (q/k/v biases) and Mistral with a sliding window shorter than the text (6 < 18 tokens)."""
    import torch
    import transformers

    from prune2deploy.frontends.decoder import export_decoder
    from tests.fixtures.models import DECODER_LLAMA, LLAMA

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    extra = {"sliding_window": 6} if family == "mistral" else {}
    torch.manual_seed(0)
    model = model_cls(config_cls(**(LLAMA | DECODER_LLAMA), **extra)).eval()
    path = cache_dir / f"tiny-{family}-kv.onnx"
    export_decoder(model, path)
    ids, mask = left_pad([rng.integers(3, VOCAB, n).tolist() for n in (5, 8)], pad_token_id=0)
    ours = generate(path, ids, mask, max_new_tokens=10)
    np.testing.assert_array_equal(ours, _hf_generate(model, ids, mask, 10, eos_token_id=None, pad_token_id=0))
