"""Resume trusts a variant's own files, not sweep.json: an `out` outside the sweep folder, a missing or
corrupt report.json or edited numbers make the variant run again; sweep.html links only to safe paths."""

from __future__ import annotations

import json

import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.limits import SWEEP_RECORD_BYTES
from prune2deploy.sweep.report import render_sweep_html, report_href
from prune2deploy.sweep.resume import safe_out
from prune2deploy.sweep.run import run_sweep
from prune2deploy.sweep.spec import parse_sweep
from tests.fixtures.fake_ray import FakeRay, model_folder, patch_driver


@pytest.fixture
def swept(monkeypatch, tmp_path):
    """Three finished variants in tmp_path/out (fake Ray), and a function that re-runs the sweep."""
    spec = parse_sweep(
        {"model": str(model_folder(tmp_path)), "grid": {"regroup_gqa": [1, 2, 3]}, "quality": {"enabled": False}}
    )

    def sweep():
        ray = FakeRay()
        patch_driver(monkeypatch, ray, tmp_path)
        return run_sweep(spec, tmp_path / "out", cache_dir=tmp_path / "cache"), ray

    first, _ = sweep()
    assert len(first.ran) == 3
    return tmp_path / "out", sweep


def _edit_record(out, change):
    record = json.loads((out / "sweep.json").read_text())
    change(record["variants"])
    (out / "sweep.json").write_text(json.dumps(record))


def test_untouched_sweep_resumes_every_variant(swept):
    _, sweep = swept
    again, ray = sweep()
    assert len(again.skipped) == 3 and not again.ran and not ray.submitted


def test_tampered_out_is_run_again_and_never_linked(swept):
    out, sweep = swept
    _edit_record(out, lambda v: v[0].update(out="javascript:alert(1)//") or v[1].update(out="../../elsewhere"))
    ids = [v["id"] for v in json.loads((out / "sweep.json").read_text())["variants"]]
    again, ray = sweep()
    assert sorted(ray.submitted) == sorted(ids[:2]) and again.skipped == [ids[2]]
    record = json.loads((out / "sweep.json").read_text())
    assert [v["out"] for v in record["variants"]] == ids
    page = (out / "sweep.html").read_text()
    assert "javascript:" not in page and "elsewhere" not in page


def test_resumed_numbers_are_read_from_the_variants_report(swept):
    """Numbers edited in sweep.json are not shown: the entry is rebuilt from the variant's report.json."""
    out, sweep = swept
    _edit_record(out, lambda v: v[0].update(params={"reference": 100, "compiled": 1}, speedup=99.0))
    again, ray = sweep()
    assert not ray.submitted and len(again.skipped) == 3
    first = json.loads((out / "sweep.json").read_text())["variants"][0]
    assert first["params"] == {"reference": 100, "compiled": 50} and first["speedup"] == 2.0 and first["resumed"]


@pytest.mark.parametrize("damage", ["missing", "not json", "not a report"])
def test_variant_with_a_missing_or_corrupt_report_is_run_again(swept, damage):
    out, sweep = swept
    victim = json.loads((out / "sweep.json").read_text())["variants"][1]
    report = out / victim["out"] / "report.json"
    if damage == "missing":
        report.unlink()
    else:
        report.write_text("{not json" if damage == "not json" else json.dumps({"speedup": [{"x": 1}]}))
    again, ray = sweep()
    assert ray.submitted == [victim["id"]] and len(again.skipped) == 2
    assert json.loads(report.read_text())["model"]["compiled"]["params"] == 50  # written again


@pytest.mark.parametrize("content", ["[]", '{"variants": 3}'])
def test_sweep_json_that_is_not_a_sweep_record_is_exit_2(swept, content):
    out, sweep = swept
    (out / "sweep.json").write_text(content)
    with pytest.raises(BadInputError, match=r"not a sweep\.json of prune2deploy sweep") as info:
        sweep()
    assert info.value.exit_code == 2 and (out / "sweep.json").read_text() == content  # left as it was


def test_links_are_built_only_from_plain_relative_paths(tmp_path):
    assert report_href("mlp-0.5_abcd1234") == "mlp-0.5_abcd1234/report.html"
    for bad in ["javascript:alert(1)", "../x", "/etc", "a/../../b", "a b", '"><script>', "", None, 5, "https://e.x"]:
        assert report_href(bad) is None, bad
    (tmp_path / "v").mkdir()
    (tmp_path / "link").symlink_to(tmp_path.parent)
    assert safe_out("v", tmp_path) == "v"
    assert [safe_out(o, tmp_path) for o in ["link", "..", "/tmp", "v/..", ".", 3]] == [None] * 6
    variant = {"id": "v", "out": 'x"><img src=x onerror=alert(1)>', "error": None,
               "options": {"grid": {}, "prune": {}, "compile": {}}}  # fmt: skip
    record = {"variants": [variant], "executor": {"workers": [], "version": "1", "address": "a"}, "exports": 0,
              "model": "m"}  # fmt: skip
    page = render_sweep_html(record)
    assert "<img" not in page and 'href="x' not in page


def test_oversized_sweep_json_is_exit_2_and_oversized_report_runs_again(swept):
    out, sweep = swept
    victim = json.loads((out / "sweep.json").read_text())["variants"][0]
    with open(out / victim["out"] / "report.json", "r+b") as handle:  # sparse: no disk used
        handle.truncate(SWEEP_RECORD_BYTES + 1)
    again, ray = sweep()
    assert ray.submitted == [victim["id"]] and len(again.skipped) == 2
    with open(out / "sweep.json", "r+b") as handle:
        handle.truncate(SWEEP_RECORD_BYTES + 1)
    with pytest.raises(BadInputError, match=f"a sweep.json is at most {SWEEP_RECORD_BYTES} bytes"):
        sweep()
