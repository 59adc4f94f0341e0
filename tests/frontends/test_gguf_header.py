"""A GGUF header is read with bounds before transformers builds a model from it (prune2deploy/limits.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.frontends.gguf_header import check_gguf_header


def tiny_gguf(path: Path, *, block_count: int = 2, context: int = 32) -> Path:
    """A llama GGUF of two blocks (f32 tensors of a few bytes), enough for every header check."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(context)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    for block in range(2):
        writer.add_tensor(f"blk.{block}.ffn_up.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_valid_header_passes_and_numbers_beyond_the_limits_do_not(tmp_path):
    check_gguf_header(tiny_gguf(tmp_path / "ok.gguf"))
    with pytest.raises(BadInputError, match=r"'llama\.block_count' is 1000000000, outside 1\.\.1024"):
        check_gguf_header(tiny_gguf(tmp_path / "deep.gguf", block_count=10**9))
    with pytest.raises(BadInputError, match=r"'llama\.block_count' is 3 but the file holds tensors of blocks 0\.\.1"):
        check_gguf_header(tiny_gguf(tmp_path / "three.gguf", block_count=3))
    with pytest.raises(BadInputError, match=r"'llama\.context_length' is 100000000, outside"):
        check_gguf_header(tiny_gguf(tmp_path / "long.gguf", context=10**8))


def test_cut_and_corrupted_files_are_refused_with_the_place(tmp_path):
    data = tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(BadInputError, match=r"tensor 'blk\.1\.ffn_up\.weight' \[8, 16\] needs bytes"):
        check_gguf_header(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:60])
    with pytest.raises(BadInputError, match="the GGUF header is cut or corrupted"):
        check_gguf_header(tmp_path / "header.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(BadInputError, match="not a GGUF file"):
        check_gguf_header(tmp_path / "magic.gguf")
