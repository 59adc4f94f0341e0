"""bench_genai_quant's bookkeeping: the tok/s ratios it reports and the builder's folder of links.

The benchmark itself runs minutes of builds and timing (never in CI); these are the parts whose numbers go into
BENCHMARKS.md without being looked at one by one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_genai_quant
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_genai_quant


def test_ratios_are_of_medians_and_per_round(bench):
    names = {n for pair in bench.RATIOS for n in pair}
    rates = {n: {"median": 10.0, "rounds": [10.0, 10.0, 10.0]} for n in names}
    rates["ours-int4-pruned"] = {"median": 30.0, "rounds": [20.0, 30.0, 60.0]}
    rates["builder-int4-pruned"] = {"median": 20.0, "rounds": [20.0, 20.0, 10.0]}
    got = bench.ratios(rates)["ours-int4-pruned / builder-int4-pruned"]
    assert got["of_medians"] == pytest.approx(1.5)
    # per round: 1.0, 1.5, 6.0 — the same round's load for both, unlike the ratio of medians
    assert (got["per_round_median"], got["per_round_min"], got["per_round_max"]) == pytest.approx((1.5, 1.0, 6.0))
    assert bench.ratios(rates)["ours-int4-pruned / builder-int4-dense"]["of_medians"] == pytest.approx(3.0)


def test_matching_counts_equal_positions(bench):
    assert bench.matching([1, 2, 3, 4], [1, 5, 3, 0]) == 2
    with pytest.raises(ValueError):
        bench.matching([1, 2], [1])  # sequences of different lengths are a bug, not a partial match


def test_builder_folder_links_the_weights_and_adds_only_the_architecture(bench, tmp_path):
    source = tmp_path / "padded"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (source / "model.safetensors").write_bytes(b"weights")
    bench.with_architecture(source, tmp_path / "linked")
    linked = tmp_path / "linked"
    assert (linked / "model.safetensors").is_symlink() and (linked / "model.safetensors").read_bytes() == b"weights"
    config = json.loads((linked / "config.json").read_text())
    assert config == {"model_type": "llama", "hidden_size": 8, "architectures": ["LlamaForCausalLM"]}
    assert "architectures" not in json.loads((source / "config.json").read_text())  # the input is unchanged
