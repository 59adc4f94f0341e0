"""The verdict: PASSED only for an exact pipeline within its bound; the bound follows the precision."""

from __future__ import annotations

from prune2deploy.verify.result import (
    EXACT_TOLERANCE,
    NOISE_FACTOR,
    Verification,
    verdict_line,
    verdict_status,
    verification_notes,
)


def _stats(max_rel, **extra):
    return {"max_rel": max_rel, "cosine": 1.0, "nonfinite_new": 0, "nonfinite_both": 0, "compared": 8, **extra}


def test_fp64_bound_is_the_tolerance():
    ok = Verification(exact=True, tolerance=1e-4, precision="fp64", outputs={"y": _stats(3e-14)}, feeds=["a"])
    assert ok.status == "passed" and ok.bound() == 1e-4
    bad = Verification(exact=True, tolerance=1e-4, precision="fp64", outputs={"y": _stats(2e-4)})
    assert bad.status == "failed" and bad.exceeded() == ["output 'y'"]
    assert verdict_line(ok.as_dict()) == "PASSED: worst relative error 3.00e-14 in fp64 (tolerance 0.0001, 1 feed sets)"


def test_fp32_bound_rises_with_the_noise_floor():
    # SmolLM2, fused, uneven GQA: 2.9e-4 against a floor of 1.4e-4 is rounding, not an error.
    noisy = Verification(exact=True, tolerance=1e-4, outputs={"logits": _stats(2.9e-4)}, floors={"logits": 1.44e-4})
    assert noisy.bound("logits") == NOISE_FACTOR * 1.44e-4 and noisy.status == "passed"
    assert "bound 0.0029 = 20 × the fp32 noise floor" in verdict_line(noisy.as_dict())
    # One wrong MLP channel of the same model: 7.3e-3.
    wrong = Verification(exact=True, tolerance=1e-4, outputs={"logits": _stats(7.3e-3)}, floors={"logits": 1.44e-4})
    assert wrong.status == "failed"
    quiet = Verification(exact=True, tolerance=1e-4, outputs={"y": _stats(2e-4)}, floors={"y": 1e-9})
    assert quiet.bound("y") == EXACT_TOLERANCE and quiet.status == "failed"  # the tolerance is the least bound


def test_nonfinite_fails_whatever_the_pipeline():
    bad = _stats(0.0, nonfinite_new=3)
    for exact in (True, False):
        verification = Verification(exact=exact, tolerance=1e-4, outputs={"y": bad}, floors={"y": 1.0})
        assert verification.status == "failed" and verification.worst == float("inf")
        assert "3 NaN/Inf values where the reference is finite" in verdict_line(verification.as_dict())


def test_approximate_is_never_passed():
    verification = Verification(exact=False, tolerance=1e-4, outputs={"y": _stats(1e-9)})
    assert verification.status == "approximate" and verification.passed
    assert verdict_line(verification.as_dict()).startswith("approximate — error 1.00e-09, cosine 1.000000")


def test_blocks_are_held_to_their_own_bounds():
    blocks = [{"block": 0, "max_rel": 5e-4, "bound": 1e-3}, {"block": 1, "max_rel": 5e-4, "bound": 1e-4}]
    verification = Verification(exact=True, tolerance=1e-4, outputs={"y": _stats(0.0)}, blocks=blocks)
    assert verification.exceeded() == ["block 1"] and verification.status == "failed"


def test_reports_written_before_status_and_bounds():
    old = {"passed": True, "exact": True, "tolerance": 1e-4, "outputs": {"y": {"max_rel": 2e-5, "cosine": 1.0}}}
    assert verdict_status(old) == "passed"
    assert verdict_line(old) == "PASSED: worst relative error 2.00e-05 (tolerance 0.0001, 0 feed sets)"
    assert verdict_status({"passed": False}) == "failed" and verdict_status({"exact": False}) == "approximate"
    notes = verification_notes({"notes": ["n"], "outputs": {"y": {"nonfinite_both": 2}}})
    assert notes[0] == "n" and "2 values are NaN/Inf in both" in notes[1]
