"""Honest validation: leave-one-source-out cross-validation of the factors fitted on published.json."""

from __future__ import annotations

import pytest

from prune2deploy.profiling.costmodel import ENGINES, FITTED, factor, factors_set, price
from prune2deploy.profiling.roofline import load_catalog
from prune2deploy.profiling.shape_only import model_kernels, shape_from_config
from prune2deploy.profiling.validation import (
    compare_published,
    cross_validate,
    load_published,
    source_group,
    summary,
)


def test_factors_set_prices_with_the_trial_values_and_restores_them():
    kernels = model_kernels(shape_from_config({"model_type": "resnet"}), batch=1, precision="int8")
    t4 = load_catalog()["t4"]
    before = price(kernels, t4, precision="int8").latency_ms
    shipped = {name: factor(name) for name in FITTED}
    with factors_set({"launch_us.tensorrt": 10.0, "conv_efficiency": 0.9}):
        assert ENGINES["tensorrt"].launch_us == 10.0
        inside = price(kernels, t4, precision="int8")
    assert inside.launch_ms == pytest.approx(len(kernels) * 10e-3)
    assert {name: factor(name) for name in FITTED} == shipped and ENGINES["tensorrt"].launch_us == shipped[
        "launch_us.tensorrt"
    ]
    assert price(kernels, t4, precision="int8").latency_ms == before


def test_sources_are_publications():
    groups = {source_group(f) for f in load_published()["figures"]}
    assert "github.com/NVIDIA/TensorRT-LLM" in groups and "github.com/mlcommons/inference_results_v3.0" in groups
    assert len(groups) >= 5


def test_cross_validated_error_within_the_targets():
    """Leave one publication out, refit the fitted factors on the rest, predict it: median |error| <= 20% and
    median signed error within +-10% (the shipped, in-sample factors are optimistic: signed error < 0)."""
    held, fitted = cross_validate()
    data = load_published()
    assert [r.id for r in held] == [f["id"] for f in data["figures"]]
    assert set(fitted) == {source_group(f) for f in data["figures"]}
    cv = summary(held)
    assert cv["median_abs_error"] <= 0.20
    assert abs(cv["median_signed_error"]) <= 0.10
    in_sample = summary(compare_published())
    assert in_sample["median_signed_error"] < 0  # the optimism the issue reports, still in the shipped factors
    assert cv["orderings_held"] >= cv["orderings"] - 1
