"""The one size/range policy (prune2deploy.limits): whole numbers in range, regular files only, genai context."""

from __future__ import annotations

import os

import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.limits import GENAI_CONTEXT, check_regular_file, check_whole, genai_context, max_threads


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "'layers' is True \\(bool\\)"),
        ("64", "'layers' is '64' \\(str\\)"),
        (64.0, "'layers' is 64.0 \\(float\\)"),
        (float("nan"), "'layers' is NaN/Infinity"),
        (0, "'layers' is 0, outside 1..1024 \\(why\\)"),
        (10**12, "'layers' is 1000000000000, outside 1..1024"),
    ],
)
def test_check_whole_refuses_what_is_not_a_number_in_range(value, message):
    with pytest.raises(BadInputError, match=f"cfg.json: {message}"):
        check_whole(value, name="layers", low=1, high=1024, where="cfg.json", why="why")
    assert check_whole(1024, name="layers", low=1, high=1024, where="cfg.json") == 1024


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "weights.data"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="is a FIFO \\(named pipe\\), not a regular file"):
        check_regular_file(fifo, what="external data")  # would block forever if it were opened
    with pytest.raises(BadInputError, match="is a character device"):
        check_regular_file(os.devnull, what="feeds file")
    with pytest.raises(BadInputError, match="is a folder"):
        check_regular_file(tmp_path, what="feeds file")
    (tmp_path / "ok.bin").write_bytes(b"1234")
    os.symlink(tmp_path / "ok.bin", tmp_path / "link.bin")
    assert check_regular_file(tmp_path / "link.bin", what="feeds file").st_size == 4


def test_genai_context_is_capped_by_positions_and_the_limit():
    assert genai_context(None, 128) == 128
    assert genai_context(None, 10**8) == GENAI_CONTEXT  # a config's 1e8 positions: capped, not 50 GB of tables
    assert genai_context(None, None) == 4096
    assert genai_context(64, 128) == 64
    with pytest.raises(BadInputError, match="beyond the model's 128 positions"):
        genai_context(129, 128)
    with pytest.raises(BadInputError, match=f"limit of {GENAI_CONTEXT}"):
        genai_context(GENAI_CONTEXT + 1, None)


def test_max_threads_is_a_few_per_core():
    assert max_threads() == 4 * (os.cpu_count() or 1)
