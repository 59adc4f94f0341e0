"""Feed sets for verification: random at several shapes, user feeds checked before any model runs."""

from __future__ import annotations

import numpy as np
import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.verify.feeds import check_feeds, feed_sets, load_feeds
from tests.fixtures.exports import fresh


@pytest.fixture(scope="module")
def llama():
    return fresh("llama-gqa")


def test_random_sets_at_each_shape_then_the_users(llama):
    user = {"input_ids": np.ones((1, 5), dtype=np.int64), "attention_mask": np.ones((1, 5), dtype=np.int64)}
    sets = feed_sets(llama, shapes=((2, 8), (3, 17)), user_feeds=[user])
    assert [label for label, _ in sets] == ["random batch=2 seq=8", "random batch=3 seq=17", "user feeds #1"]
    assert sets[0][1]["input_ids"].shape == (2, 8) and sets[1][1]["input_ids"].shape == (3, 17)
    assert sets[0][1]["input_ids"].max() < 128  # ids index the 128-token embedding
    again = feed_sets(llama, shapes=((2, 8),))
    np.testing.assert_array_equal(again[0][1]["input_ids"], sets[0][1]["input_ids"])  # seeded


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"input_ids": np.ones((1, 5), dtype=np.int64)}, "missing \\['attention_mask'\\]"),
        ({"input_ids": np.ones((1, 5), np.int32), "attention_mask": np.ones((1, 5), np.int64)}, "is int32"),
        ({"input_ids": np.ones(5, np.int64), "attention_mask": np.ones((1, 5), np.int64)}, "wants rank 2"),
    ],
)
def test_wrong_user_feeds_are_bad_input(llama, feeds, message):
    with pytest.raises(BadInputError, match=message):
        check_feeds(llama, feeds, "user feeds #1")


def test_nonfinite_float_feeds_are_refused():
    from tests.verify.test_whole import _erf_model

    with pytest.raises(BadInputError, match="1 NaN/Inf"):
        check_feeds(_erf_model(), {"x": np.array([[0, 1, np.nan, 2]], dtype=np.float32)})


def test_load_feeds_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.savez(tmp_path / "f.npz", input_ids=array)
    save_file({"input_ids": array}, str(tmp_path / "f.safetensors"))
    for name in ("f.npz", "f.safetensors"):
        np.testing.assert_array_equal(load_feeds(tmp_path / name)["input_ids"], array)
    with pytest.raises(BadInputError, match="does not exist"):
        load_feeds(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_text("not a file of arrays")
    with pytest.raises(BadInputError, match="cannot read feeds"):
        load_feeds(tmp_path / "bad.npz")
