"""The compile summary's notes: 2:4, "nothing was pruned" from the registry's kinds, and who cost the quality."""

from __future__ import annotations

from pathlib import Path

from prune2deploy.cli.summary import print_compile
from prune2deploy.profiling.report_html import render_html
from prune2deploy.profiling.summary import pruning_notes, quality_warning


def _lm_quality(top1_dense: float, ppl_dense: float, top1_masked: float = 1.0) -> dict:
    return {
        "computed": True, "kind": "lm", "text": "bundled evaluation text", "window": 128, "windows": 4,
        "comparisons": [
            {"candidate": "compiled", "reference": "masked reference", "kl_mean": 1e-7, "top1_agreement": top1_masked,
             "ppl_reference": ppl_dense, "ppl_candidate": ppl_dense},
            {"candidate": "compiled", "reference": "dense (before the masks)", "kl_mean": 2.5,
             "top1_agreement": top1_dense, "ppl_reference": 12.0, "ppl_candidate": ppl_dense},
        ],
    }  # fmt: skip


def _report(passes: list[dict], params: tuple[int, int], **extra) -> dict:
    return {
        "options": {"masks": "m.safetensors", "gpus": []},
        "model": {"reference": {"params": params[0], "flops": 10}, "compiled": {"params": params[1], "flops": 10},
                  "cost_shape": {"batch": 1, "seq": 8}},
        "passes": [{"exact": True, "refused": {}, **p} for p in passes],
        "verification": {"exact": True, "passed": True, "status": "passed", "tolerance": 1e-4, "feeds": ["a"],
                         "outputs": {"y": {"max_abs": 0.0, "max_rel": 0.0, "scale": 1.0, "cosine": 1.0}}},
        **extra,
    }  # fmt: skip


def test_masks_that_cost_a_lot_are_named_not_the_compile(capsys):
    assert quality_warning(_lm_quality(top1_dense=0.9, ppl_dense=14.0)) is None  # 1.2x, 90%: nothing to say
    warning = quality_warning(_lm_quality(top1_dense=0.3, ppl_dense=50.0))
    assert warning.startswith("the masks cost this quality, not the compile") and "(4.2×)" in warning
    assert "not the compile" not in quality_warning(_lm_quality(top1_dense=0.3, ppl_dense=50.0, top1_masked=0.6))
    encoder = {"computed": True, "kind": "encoder", "text": "t", "sentences": 8, "comparisons": [
        {"reference": "masked reference", "cosine_mean": 0.99999, "cosine_min": 0.9999},
        {"reference": "dense (before the masks)", "cosine_mean": 0.7, "cosine_min": 0.5}]}  # fmt: skip
    assert "not the compile" in quality_warning(encoder)
    report = _report([{"pass": "remove-channels", "modified": True, "record": {}}], (100, 60),
                     quality=_lm_quality(top1_dense=0.3, ppl_dense=50.0))  # fmt: skip
    print_compile(report, Path("o"))
    text = capsys.readouterr().out
    assert "  quality vs masked reference: KL" in text and "vs dense (before the masks): KL 2.5, top-1 30.0%" in text
    assert "  note: the masks cost this quality, not the compile" in text
    page = render_html(report)
    assert "<li>Quality: vs masked reference" in page and "the masks cost this quality, not the compile" in page


def test_nothing_pruned_reads_the_registry_and_2_4_weights_are_not_nothing():
    structural = _report([{"pass": "remove-heads", "modified": True, "record": {}}], (100, 100))
    assert pruning_notes(structural) == []  # a structural pass changed the graph
    finishing = _report([{"pass": "fuse-ort", "modified": True, "record": {}}], (100, 100))
    assert pruning_notes(finishing)[0].startswith("nothing was pruned: the masks zero no whole channel")
    record = {"eligible": 28, "already_nm": 28, "made_nm": 0}
    sparse = _report([{"pass": "sparsify-2:4", "modified": False, "record": record}], (100, 100))
    notes = pruning_notes(sparse)
    assert notes[0].startswith("2:4: 28 of 28 eligible weights are 2:4 (0 made so here)")
    assert notes[1].startswith("no channel, head or layer removed: the zeros are 2:4") and len(notes) == 2


def test_channel_group_counts_add_up_and_the_ideal_is_the_flop_ratio(capsys):
    """Issue 25 item 9: "30 of 63 prunable; 32 not" left one group unnamed (an axis without a static width)."""
    blocked = [{"group": f"g{i}", "reason": "Reshape creates this axis", "hint": ""} for i in range(32)]
    report = _report(
        [{"pass": "remove-channels", "modified": True, "record": {}}], (100, 60),
        groups={"total": 63, "prunable": 30, "changed": 30, "blocked": blocked},
        latency=[{"engine": "onnxruntime", "model": m, "batch": 1, "seq": 8, "median_ms": ms}
                 for m, ms in (("reference", 3.0), ("compiled", 2.0))],
        speedup=[{"engine": "onnxruntime", "batch": 1, "seq": 8, "measured": 1.5, "ideal_speedup": 1.8}],
    )  # fmt: skip
    print_compile(report, Path("o"))
    text = capsys.readouterr().out
    line = "  channel groups: 30 of 63 prunable, 1 without a static width (batch/sequence axes, not channels); 32 not:"
    assert line in text.splitlines()
    assert "ideal (FLOP ratio)" in text and "1.50x" in text and "1.80x" in text
    page = render_html(report)
    assert "30 of 63 channel groups are prunable; 1 is without a static width" in page
    assert "The remaining 32 groups are left as they are" in page
    assert "<li>Channel groups: 30 of 63 prunable, 32 blocked (see below), 1 without a static width" in page
