"""The sweep driver's loop on a stand-in for Ray (tests/fixtures/fake_ray.py): variants are submitted in a
bounded window, never all at once, and checks that need no cluster fail before Ray is used."""

from __future__ import annotations

import pytest

from prune2deploy.sweep.run import MAX_IN_FLIGHT, run_sweep, submit_window
from prune2deploy.sweep.spec import parse_sweep
from tests.fixtures.fake_ray import FakeRay, model_folder, patch_driver

NO_QUALITY = {"enabled": False}


def _spec(tmp_path, values: int) -> object:
    grid = {"regroup_gqa": list(range(1, values + 1))}  # compile-only variants: nothing to score
    return parse_sweep({"model": str(model_folder(tmp_path)), "grid": grid, "quality": NO_QUALITY})


def test_submit_window_follows_the_cluster_and_max_parallel():
    assert submit_window(None, {"CPU": 2.0}) == 4
    assert submit_window(None, {"CPU": 1000.0}) == MAX_IN_FLIGHT
    assert submit_window(None, {}) == 2
    assert submit_window(3, {"CPU": 1000.0}) == 3


@pytest.mark.parametrize(("max_parallel", "window"), [(None, 4), (1, 1)])
def test_variants_are_submitted_in_a_bounded_window(monkeypatch, tmp_path, max_parallel, window):
    """Twelve variants on a 2-CPU cluster: at most 4 in flight (1 with --max-parallel 1); all twelve run."""
    ray = FakeRay(cpus=2.0)
    patch_driver(monkeypatch, ray, tmp_path)
    result = run_sweep(_spec(tmp_path, 12), tmp_path / "out", cache_dir=tmp_path / "cache", max_parallel=max_parallel)
    assert len(ray.submitted) == 12 and len(result.ran) == 12 and not result.failed
    assert ray.max_in_flight == window


class _UnstartedRay(FakeRay):
    def is_initialized(self) -> bool:
        raise AssertionError("Ray was used before the sweep file was validated")


_RATIOS = [round(i / 100, 2) for i in range(100)]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"mlp": [0.5], "round_to": [10**230]}, "its id is"),
        ({"mlp": _RATIOS, "heads": _RATIOS, "hidden": _RATIOS}, "1,000,000 variants"),
    ],
)
def test_cli_refuses_bad_ids_and_grids_with_exit_2_before_ray(monkeypatch, tmp_path, capsys, grid, message):
    """Exit 2 before Ray is used, for an id no file system can hold (it was exit 1, after Ray started) and for
    a grid over the limit."""
    import json

    from prune2deploy.cli import main

    ray = _UnstartedRay()
    patch_driver(monkeypatch, ray, tmp_path)
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"model": str(model_folder(tmp_path)), "grid": grid, "quality": NO_QUALITY}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err and not ray.submitted
