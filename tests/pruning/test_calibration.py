"""Calibration windows from text and tensor files, the bundled text, and the data hash."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prune2deploy.errors import BadInputError
from prune2deploy.pruning.calibration import bundled_text, chunk_tokens, load_calibration, tokens_sha256


class CharTokenizer:
    """One token per character (its code point): enough to check chunking without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_text_is_cut_into_consecutive_windows(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("abcdefghij", encoding="utf-8")
    data = load_calibration(path, tokenizer=CharTokenizer(), num_samples=2, seq_len=4)
    assert data.input_ids.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]
    assert data.info() == {
        "source": str(path),
        "sha256": data.sha256,
        "num_samples": 2,
        "seq_len": 4,
        "tokens": 8,
    }
    expected = hashlib.sha256(b"(2, 4)" + np.array([[97, 98, 99, 100], [101, 102, 103, 104]], "<i8").tobytes())
    assert data.sha256 == expected.hexdigest()
    few = load_calibration(path, tokenizer=CharTokenizer(), num_samples=5, seq_len=4)
    assert few.num_samples == 2 and few.sha256 == data.sha256  # short text: fewer windows, same data
    assert load_calibration(path, tokenizer=CharTokenizer(), num_samples=1, seq_len=4).sha256 != data.sha256


def test_tensor_files_give_the_same_windows(tmp_path):
    ids = torch.arange(24, dtype=torch.int64).reshape(3, 8)
    torch.save({"input_ids": ids}, tmp_path / "ids.pt")
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    torch.save(ids.reshape(-1), tmp_path / "flat.pt")
    results = [
        load_calibration(tmp_path / name, num_samples=2, seq_len=6) for name in ("ids.pt", "ids.npy", "ids.safetensors")
    ]
    for data in results:
        assert data.input_ids.tolist() == [[0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13]]  # rows cut to seq_len
        assert data.sha256 == results[0].sha256
    flat = load_calibration(tmp_path / "flat.pt", num_samples=10, seq_len=6)
    assert flat.input_ids.shape == (4, 6) and flat.input_ids[1, 0] == 6


def test_bad_inputs_say_what_is_wrong(tmp_path):
    torch.save(torch.rand(2, 4), tmp_path / "float.pt")
    with pytest.raises(BadInputError, match="integer tensor"):
        load_calibration(tmp_path / "float.pt")
    torch.save(torch.tensor([[1, 70]]), tmp_path / "big.pt")
    with pytest.raises(BadInputError, match=r"\[0, 64\)"):
        load_calibration(tmp_path / "big.pt", seq_len=2, vocab_size=64)
    with pytest.raises(BadInputError, match="not found"):
        load_calibration(tmp_path / "missing.txt")
    (tmp_path / "t.txt").write_text("abc")
    with pytest.raises(BadInputError, match="tokenizer"):
        load_calibration(tmp_path / "t.txt")
    with pytest.raises(BadInputError, match="fewer than one window"):
        load_calibration(tmp_path / "t.txt", tokenizer=CharTokenizer(), seq_len=8)
    with pytest.raises(BadInputError, match="fewer than one window"):
        chunk_tokens(torch.arange(3), 4, 1)


def test_bundled_text_is_used_by_default():
    text = bundled_text()
    assert text.startswith("The Declaration of Independence") and not text.startswith("#")
    assert len(text.split()) > 2500
    data = load_calibration(None, tokenizer=CharTokenizer(), num_samples=3, seq_len=16)
    assert data.source == "bundled:calibration.txt" and data.input_ids.shape == (3, 16)
    assert data.sha256 == tokens_sha256(data.input_ids)
    evaluation = bundled_text("evaluation.txt")
    assert evaluation.split(".")[0] not in text  # evaluation text is disjoint from calibration text
