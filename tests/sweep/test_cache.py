"""The sweep's dense-export cache binds each entry to the files written into it (the compile cache's digest,
``driver/source.py``): a tampered entry is discarded with a warning and the checkpoint exported again."""

from __future__ import annotations

import json
import logging

import pytest

from prune2deploy.driver.source import seal_cache_entry
from prune2deploy.sweep.cache import dense_export


class _Exported(Exception):
    """Raised by the stand-in loader: the cache asked for the checkpoint, i.e. it is exporting again."""


def _loader():
    raise _Exported


def _entry(cache, key: str):
    folder = cache / "exports" / key[:24]
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"the export as written")
    (folder / "export.json").write_text(json.dumps({"key": key}))
    seal_cache_entry(folder)
    return folder


def _call(cache, key):
    return dense_export("m", _loader, key=key, cache_dir=cache, export_batch=2, export_seq=8)


def test_intact_entry_is_used_without_exporting(tmp_path):
    folder = _entry(tmp_path, "k" * 64)
    cached = _call(tmp_path, "k" * 64)
    assert not cached.exported and cached.onnx == (folder / "model.onnx").resolve()


@pytest.mark.parametrize("tamper", ["model.onnx", "export.json", "digest.json", "added file"])
def test_tampered_entry_is_discarded_and_exported_again(tmp_path, caplog, tamper):
    folder = _entry(tmp_path, "k" * 64)
    if tamper == "added file":
        (folder / "model.onnx.data").write_bytes(b"\0" * 16)
    elif tamper == "digest.json":
        (folder / "digest.json").unlink()
    else:
        (folder / tamper).write_bytes(b"swapped")
    with caplog.at_level(logging.WARNING, logger="prune2deploy"), pytest.raises(_Exported):
        _call(tmp_path, "k" * 64)
    assert not folder.exists()  # discarded (renamed away, then removed), never read
    assert any("discarding the cached export" in r.getMessage() for r in caplog.records)
