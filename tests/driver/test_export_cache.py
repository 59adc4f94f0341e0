"""The export cache stays within its budget: least recently used entries this tool wrote go first."""

from __future__ import annotations

import os
import time

from prune2deploy.driver.source import evict_cache_entries


def _entry(exports, name: str, size: int, age: float):
    entry = exports / name
    entry.mkdir(parents=True)
    (entry / "model.onnx").write_bytes(b"\0" * size)
    digest = entry / "digest.json"
    digest.write_text("{}")
    stamp = time.time() - age
    os.utime(digest, (stamp, stamp))
    return entry


def test_least_recently_used_entries_go_until_the_cache_fits(tmp_path, monkeypatch):
    monkeypatch.setenv("P2D_CACHE_MAX_GB", str(2500 / 2**30))  # a budget of 2,500 bytes
    exports = tmp_path / "exports"
    old, middle, new = (
        _entry(exports, "old", 1000, 300),
        _entry(exports, "middle", 1000, 200),
        _entry(exports, "new", 1000, 0),
    )
    foreign = exports / "user-folder"  # no digest: not the tool's, never removed
    foreign.mkdir()
    (foreign / "notes.txt").write_bytes(b"\0" * 5000)
    assert evict_cache_entries(exports, keep=new) == [old]
    assert not old.exists() and middle.exists() and new.exists() and foreign.exists()


def test_the_newest_entry_stays_even_above_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("P2D_CACHE_MAX_GB", "0")
    exports = tmp_path / "exports"
    older, newest = _entry(exports, "older", 10, 100), _entry(exports, "newest", 10, 0)
    assert evict_cache_entries(exports, keep=newest) == [older]
    assert newest.exists()
