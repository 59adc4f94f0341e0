"""Sequence bounds from the graph: position tables and sliced position-id buffers, found numerically."""

from __future__ import annotations

import json

import pytest

from prune2deploy.analysis.shapes import fit_seqs, sequence_limit
from prune2deploy.errors import BadInputError
from tests import families


@pytest.mark.parametrize(
    ("name", "limit", "table"),
    [
        ("gpt2", 64, "wpe"),  # learned positions, 64 rows
        ("bert", 64, "position_ids"),  # a position-id buffer sliced by the sequence length
        ("roberta", 64, "position_embeddings"),  # 66 rows, positions offset by padding_idx + 1
        ("llama", None, None),  # rotary computed from the positions: no table
        ("vit", None, None),  # patches are static
    ],
)
def test_sequence_limit_of_families(name, limit, table):
    found = sequence_limit(families.fresh(name))
    if limit is None:
        assert found is None
    else:
        assert found.max_seq == limit and table in found.where


def test_fit_seqs_lowers_a_default_and_refuses_a_request():
    limit = sequence_limit(families.fresh("gpt2"))
    assert fit_seqs(limit, [128], explicit=False) == [64]
    assert fit_seqs(limit, [16, 64], explicit=True) == [16, 64]
    assert fit_seqs(None, [128], explicit=True) == [128]
    with pytest.raises(BadInputError, match="at most 64 tokens"):
        fit_seqs(limit, [32, 128], explicit=True)


def test_compile_profiles_within_the_position_table(tmp_path, capsys):
    """The default --seq 128 on a 64-position GPT-2 probes at 64; asking for 128 is exit 2, not a crash."""
    from prune2deploy.cli import main
    from prune2deploy.frontends.onnx import save_onnx

    path = tmp_path / "gpt2.onnx"
    save_onnx(families.fresh("gpt2"), path)
    out = tmp_path / "out"
    assert main(["compile", str(path), "--out", str(out), "--quiet", "--batch", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["cost_shape"] == {"batch": 1, "seq": 64}
    assert {row["seq"] for row in report["latency"]} == {64}
    capsys.readouterr()
    assert main(["compile", str(path), "--out", str(tmp_path / "bad"), "--seq", "128", "--quiet"]) == 2
    assert "at most 64 tokens" in capsys.readouterr().err
