"""compare_outputs and the merging of feed sets: the numbers every verdict is made of."""

from __future__ import annotations

import numpy as np
import pytest

from prune2deploy.verify.compare import compare_outputs, keep_worst, merge_worst, relative_difference


def test_errors_are_relative_to_the_reference_scale():
    ref = {"y": np.array([[1.0, -4.0], [2.0, 0.5]], dtype=np.float32)}
    new = {"y": np.array([[1.0, -4.0], [2.02, 0.5]], dtype=np.float32)}
    stats = compare_outputs(ref, new)["y"]
    assert stats["max_abs"] == pytest.approx(0.02, rel=1e-5)
    assert stats["scale"] == 4.0 and stats["max_rel"] == pytest.approx(0.005, rel=1e-5)
    assert stats["compared"] == 4 and stats["nonfinite_new"] == 0
    assert 0.9999 < stats["cosine"] < 1.0


def test_nonfinite_values_are_counted_not_compared():
    ref = {"y": np.array([1.0, np.nan, 3.0, np.inf])}
    new = {"y": np.array([1.0, np.nan, np.inf, 5.0])}
    stats = compare_outputs(ref, new)["y"]
    assert stats["nonfinite_new"] == 2  # inf where the reference is 3, and 5 where it is inf
    assert stats["nonfinite_both"] == 1 and stats["compared"] == 1 and stats["max_rel"] == 0.0


def test_shape_mismatch_has_no_numbers():
    stats = compare_outputs({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 2))})["y"]
    assert stats["shape_mismatch"] and stats["max_rel"] is None and stats["compared"] == 0


def test_merge_keeps_the_worse_set_and_adds_counts():
    a = {"max_rel": 1e-6, "cosine": 0.99, "nonfinite_new": 0, "nonfinite_both": 1, "compared": 10}
    b = {"max_rel": 1e-3, "cosine": 0.999, "nonfinite_new": 2, "nonfinite_both": 0, "compared": 5}
    merged = merge_worst(a, b)
    assert merged["max_rel"] == 1e-3 and merged["cosine"] == 0.99
    assert (merged["nonfinite_new"], merged["nonfinite_both"], merged["compared"]) == (2, 1, 15)
    assert merge_worst(merge_worst(None, a), {**b, "max_rel": None})["max_rel"] is None  # unmeasurable is worst
    worst: dict = {}
    keep_worst(worst, {"y": a}), keep_worst(worst, {"y": b})
    assert worst["y"]["max_rel"] == 1e-3


def test_relative_difference_measures_rounding():
    exact = np.linspace(-3, 3, 101)
    rounded = exact.astype(np.float32).astype(np.float64)
    floor = relative_difference({"y": exact}, {"y": rounded})["y"]
    assert 0 < floor <= 2.0**-24  # float32 rounds to half an ulp: at most 2^-24 of the scale
