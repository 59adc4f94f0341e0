"""Honest validation: leave-one-source-out cross-validation of the factors fitted on published.json."""

from __future__ import annotations

import math

import pytest

from prune2deploy.profiling.costmodel import ENGINES, FITTED, factor, factors_set, price
from prune2deploy.profiling.roofline import load_catalog
from prune2deploy.profiling.shape_only import model_kernels, shape_from_config
from prune2deploy.profiling.validation import (
    PRIORS,
    Comparison,
    _loss,
    compare_published,
    cross_validate,
    discordant_pairs,
    exercised,
    fit_factors,
    load_published,
    orderings,
    source_group,
    summary,
)


def test_factors_set_prices_with_the_trial_values_and_restores_them():
    kernels = model_kernels(shape_from_config({"model_type": "resnet"}), batch=1, precision="int8")
    t4 = load_catalog()["t4"]
    before = price(kernels, t4, precision="int8").latency_ms
    shipped = {name: factor(name) for name in FITTED}
    trial = {
        "launch_cycles.tensorrt": 15900.0,
        "conv_efficiency": 0.9,
        "launch_overlap.tensorrt": 0.0,
        "launch_cycles_pre_ampere": 1.0,
    }
    with factors_set(trial):
        assert ENGINES["tensorrt"].launch_cycles == 15900.0 and ENGINES["tensorrt"].launch_overlap == 0.0
        inside = price(kernels, t4, precision="int8")
    # 15900 cycles at T4's 1590 MHz = 10 us per kernel launched, none hidden, not scaled: the model's kernels
    # (the classifier GEMM is not split along K here: at 10 us its reduction kernel would cost more than the
    # split saves)
    assert inside.kernels == len(kernels)
    assert inside.launch_ms == pytest.approx(inside.kernels * 10e-3)
    assert {name: factor(name) for name in FITTED} == shipped
    assert ENGINES["tensorrt"].launch_cycles == shipped["launch_cycles.tensorrt"]
    assert ENGINES["tensorrt"].launch_overlap == shipped["launch_overlap.tensorrt"]
    assert price(kernels, t4, precision="int8").latency_ms == before


def test_shipped_factors_are_the_fit_on_all_figures():
    """The fitted factors ship as fit_factors() leaves them on every figure, starting from the cited priors:
    the in-sample numbers of docs/cost-model.md are of that fit, and nothing was hand-tuned after it."""
    assert fit_factors() == {name: factor(name) for name in FITTED}
    assert set(PRIORS) == set(FITTED)


def test_sources_are_publications():
    groups = {source_group(f) for f in load_published()["figures"]}
    assert "github.com/NVIDIA/TensorRT-LLM" in groups and "github.com/mlcommons/inference_results_v3.0" in groups
    assert len(groups) >= 5


@pytest.fixture(scope="module")
def cv():
    """Leave-one-source-out cross-validation, once for the module (about 40 s on 2 cores)."""
    return cross_validate()


@pytest.mark.xdist_group("cost-model-cv")  # the one cross-validation (40-60 s) serves both tests on one worker
def test_cross_validated_error_within_the_targets(cv):
    """Leave one publication out, refit the fitted factors on the rest, predict it: median |error| <= 20% and
    median signed error within +-10% (the shipped, in-sample factors are optimistic: signed error < 0)."""
    held, fitted = cv
    data = load_published()
    assert [r.id for r in held] == [f["id"] for f in data["figures"]]
    assert set(fitted) == {source_group(f) for f in data["figures"]}
    held_out = summary(held)
    assert held_out["median_abs_error"] <= 0.20
    assert abs(held_out["median_signed_error"]) <= 0.10
    # charging split-K its reduction kernel moved it from -9.9% to -5.4%: guard against sliding back to the edge
    assert abs(held_out["median_signed_error"]) <= 0.07
    in_sample = summary(compare_published())
    assert in_sample["median_abs_error"] <= 0.20 and abs(in_sample["median_signed_error"]) <= 0.10
    assert held_out["orderings_held"] >= held_out["orderings"] - 1


#: GPU pairs whose published order the model does not reproduce, with why (docs/cost-model.md). Empty since
#: round 5: T4 (published 0.82-0.85 ms) was priced faster than Jetson AGX Orin (0.63-0.69 ms) until the
#: per-kernel cycles before Ampere (no asynchronous copy) and the floor that a kernel's work hides entered the
#: model. A30 vs A100 PCIe 80GB left earlier: in the rounds where NVIDIA submitted both on one host (v1.1,
#: v2.0) A30 is 9.5% and 5.2% slower, a tie under TIE.
KNOWN_DISCORDANT: set[tuple[str, str, str]] = set()
#: Two GPUs whose published figures differ by less than this are a tie: the same GPU's MLPerf results differ
#: by up to 10% between software releases (Jetson AGX Orin v2.0 vs v3.0 batch 1: 0.695 vs 0.633 ms; A30 v1.0 vs
#: v2.0: 0.541 vs 0.521 ms; A100 PCIe v1.0 vs v1.1 Offline: 31064 vs 32779 samples/s; published.json).
TIE = 1.10


def test_gpu_order_per_workload_as_published():
    """Wherever the published set has >= 2 GPUs for one workload setting, the predicted order of every pair
    that the publications separate by more than TIE is the published one, except the known, explained pairs;
    and those pairs still disagree (else this list and docs/cost-model.md are stale)."""
    rows = compare_published()
    published = {}
    for r in rows:
        published.setdefault((r.workload, r.model, r.precision, r.batch, r.seq, r.sparse, r.gpu), []).append(r)
    found = set()
    for order in orderings(rows):
        setting = order["setting"]
        for fast, slow in discordant_pairs(order):
            times = [sorted(x.published_ms for x in published[(*setting, g)]) for g in (fast, slow)]
            ratio = times[1][len(times[1]) // 2] / times[0][len(times[0]) // 2]
            if ratio >= TIE:
                found.add((setting[0], *sorted((fast, slow))))
    assert found == KNOWN_DISCORDANT
    assert len(orderings(rows)) >= 9


def test_resnet50_batch1_order_follows_the_clock():
    """Small-batch ResNet-50 is bound by a per-kernel cost in cycles: L4 (2040 MHz) before A100 (1410 MHz),
    as MLPerf SingleStream publishes, although A100 has 2.6x L4's int8 peak (the catalog without clocks
    ranked A100 first)."""
    rows = {r.id: r for r in compare_published()}
    l4, a100 = rows["mlperf3.1-resnet50-l4-singlestream"], rows["mlperf1.0-resnet50-a100-40gb-singlestream"]
    assert l4.published_ms < a100.published_ms and l4.predicted_ms < a100.predicted_ms
    kernels = model_kernels(shape_from_config({"model_type": "resnet"}), batch=1, precision="int8")
    catalog = load_catalog()
    on_l4, on_a100 = (price(kernels, catalog[g], precision="int8", detail=True) for g in ("l4", "a100-40gb"))
    trt = ENGINES["tensorrt"]
    assert trt.launch_s(catalog["l4"]) == pytest.approx(trt.launch_s(catalog["a100-40gb"]) * 1410 / 2040)
    for pred in (on_l4, on_a100):  # most of the time is in kernels whose work hides under the floor
        assert sum(t.ms for t in pred.detail if t.binding == "launch") > 0.5 * pred.latency_ms


@pytest.mark.xdist_group("cost-model-cv")
def test_a_factor_no_training_figure_uses_is_not_refit(cv):
    """Without the demoBERT figures only ResNet-50's classifier GEMM runs int8 GEMMs: the fit would follow
    noise, so the int8 GEMM efficiency keeps its cited prior in that fold (not the shipped value, which is
    fitted on the held-out figures themselves)."""
    data = load_published()
    catalog = load_catalog()
    no_bert = {f["id"] for f in data["figures"] if f["workload"] != "bert"}
    assert exercised("gemm_efficiency.int8", data, catalog)
    assert not exercised("gemm_efficiency.int8", data, catalog, only=no_bert)
    _, fitted = cv
    assert fitted["github.com/NVIDIA/TensorRT"]["gemm_efficiency.int8"] == PRIORS["gemm_efficiency.int8"]
    assert PRIORS["gemm_efficiency.int8"] != factor("gemm_efficiency.int8")


def _row(i, gpu, ratio, batch=1):
    """One figure of workload setting ``batch`` on ``gpu``, predicted at ``ratio`` times its published 1 ms."""
    return Comparison(f"f{i}", "w", "m", gpu, "int8", batch, 1, False, 1.0, ratio, 0.1, "launch")


def _one_per_gpu(ratios):
    return [_row(i, f"g{i}", r) for i, r in enumerate(ratios)]


def test_fit_breaks_ties_by_the_signed_error():
    """Where two trials have the same mean |log error|, the value whose median signed error is nearer zero
    wins (validation._loss), not wherever the descent passed first."""
    optimistic, centred = _one_per_gpu([1 / 1.1, 1 / 1.1, 1.1**2]), _one_per_gpu([1 / 1.1**2, 1.0, 1.1**2])
    assert _loss(optimistic)[0] == _loss(centred)[0]  # the same mean |log error| ...
    assert _loss(centred) < _loss(optimistic)  # ... and the centred one is preferred


def test_fit_loss_is_a_mean_so_one_gpu_moves_it():
    """A factor that prices one GPU alone (the pre-Ampere per-kernel cycles) moves the loss: a median over
    settings and GPUs stayed flat while that GPU was off (docs/cost-model.md round 5)."""

    def off_by(ratio):
        return _one_per_gpu([1.0, 1.0, 1.05, 0.95, ratio])

    assert _loss(off_by(1.0))[0] < _loss(off_by(0.7))[0] < _loss(off_by(0.5))[0]


def test_fit_counts_a_gpu_once_per_setting():
    """Repeats of one GPU in one setting (MLPerf rounds, partners' systems) weigh once in the fit's loss: five
    figures of one GPU 50% off weigh as one GPU, not as five of seven."""
    repeated = [_row(i, "slow", 1.5) for i in range(5)] + [_row(5, "a", 1.0), _row(6, "b", 1.0)]
    assert _loss(repeated)[0] == pytest.approx(math.log(1.5) / 3, abs=1e-9)  # three GPUs, one off
    assert _loss(repeated) == _loss([_row(0, "slow", 1.5), _row(5, "a", 1.0), _row(6, "b", 1.0)])
    batch8 = _row(9, "slow", 1.5, batch=8)
    # a batch-8 figure of the same GPU is another setting: three groups, two of them off
    assert _loss([repeated[0], repeated[5], batch8])[0] == pytest.approx(2 * math.log(1.5) / 3, abs=1e-9)
