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


def _npz_declaring(path, shape, descr="<f8"):
    """An .npz whose member's header declares ``shape`` but holds 16 bytes of data."""
    import io
    import zipfile

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input_ids.npy", header.getvalue() + bytes(16))
    return path


def test_feed_files_are_checked_before_their_data_is_read(tmp_path):
    import os

    from prune2deploy.limits import FEEDS_BYTES
    from prune2deploy.verify.feeds import check_feeds_file

    with pytest.raises(
        BadInputError, match=f"declare {1 << 31} bytes \\(largest: 'input_ids.npy'.*at most {FEEDS_BYTES}"
    ):
        load_feeds(_npz_declaring(tmp_path / "claims.npz", (1 << 28,)))  # 2 GiB claimed by a 200-byte file
    with pytest.raises(BadInputError, match="holds Python objects"):
        load_feeds(_npz_declaring(tmp_path / "objects.npz", (2,), descr="|O"))
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(BadInputError, match="is a FIFO"):
        check_feeds_file(tmp_path / "fifo.npz")  # opening it would wait for a writer forever
    np.savez_compressed(tmp_path / "ok.npz", input_ids=np.zeros((2, 8), np.int64))
    check_feeds_file(tmp_path / "ok.npz")


def test_token_ids_and_lengths_beyond_the_model_are_bad_input(llama):
    from prune2deploy.analysis.shapes import SequenceLimit
    from prune2deploy.verify.feeds import check_sequence

    mask = np.ones((1, 5), np.int64)
    for ids, shown in ((np.full((1, 5), 128, np.int64), "128..128"), (np.full((1, 5), -1, np.int64), "-1..-1")):
        with pytest.raises(BadInputError, match=f"'input_ids' holds values {shown}, but it indexes a table of 128"):
            check_feeds(llama, {"input_ids": ids, "attention_mask": mask})
    check_feeds(llama, {"input_ids": np.full((1, 5), 127, np.int64), "attention_mask": mask})
    feeds = {"input_ids": np.ones((1, 5), np.int64), "attention_mask": mask}
    with pytest.raises(BadInputError, match="'input_ids' is 5 long on axis 1; the model accepts at most 4 positions"):
        check_sequence(llama, feeds, SequenceLimit(4, "wpe (4 rows)"))
    check_sequence(llama, feeds, SequenceLimit(5, "wpe (5 rows)"))


def test_verify_checks_user_feeds_against_the_reference_before_running(llama, tmp_path, monkeypatch):
    """`verify --feeds` checks token ids and lengths as compile does: an id past the vocabulary or a sequence
    beyond the reference's position bound is exit 2 naming the file, before either model runs."""
    import onnx_ir as ir

    from prune2deploy import api
    from prune2deploy.analysis import shapes
    from prune2deploy.analysis.shapes import SequenceLimit

    path = tmp_path / "model.onnx"
    ir.save(llama, path)
    mask = np.ones((1, 5), np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=np.full((1, 5), 128, np.int64), attention_mask=mask)
    with pytest.raises(BadInputError, match=r"ids.npz \(user feeds #1\).*indexes a table of 128"):
        api.verify(path, path, feeds=[tmp_path / "ids.npz"])
    np.savez(tmp_path / "long.npz", input_ids=np.ones((1, 5), np.int64), attention_mask=mask)
    monkeypatch.setattr(shapes, "sequence_limit", lambda model, **_: SequenceLimit(4, "wpe (4 rows)"))
    with pytest.raises(BadInputError, match=r"long.npz \(user feeds #1\): input 'input_ids' is 5 long"):
        api.verify(path, path, feeds=[tmp_path / "long.npz"])
