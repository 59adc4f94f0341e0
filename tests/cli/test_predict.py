"""`prune2deploy predict`: the prediction row schema's keys under the names docs/cost-model.md gives them."""

from __future__ import annotations

import json

from prune2deploy import api
from prune2deploy.cli import main

FOOTER = "ideal = FLOP ratio; lower bound = roofline"


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header cells and each GPU's cells (columns split on two spaces or more)."""
    import re

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("gpu "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith(("predicted by", "fusion speedup:")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return header, rows


def test_predict_against_prints_speedup_then_the_flop_ratio(tiny_llama_onnx, capsys):
    assert main(["predict", str(tiny_llama_onnx), "--against", str(tiny_llama_onnx), "--gpu", "a100", "l4"]) == 0
    text = capsys.readouterr().out
    header, cells = _table(text)
    assert header == [
        "gpu", "precision", "compiled ms", "reference ms", "speedup", "ideal (FLOP ratio)", "lower bound ms", "bound",
    ]  # fmt: skip
    rows = api.predict(tiny_llama_onnx, against=tiny_llama_onnx, gpus=["a100", "l4"])
    for row in rows:
        got = dict(zip(header, cells[row["gpu"]], strict=True))
        assert got["compiled ms"] == f"{row['compiled_ms']:.3f}" and got["reference ms"] == f"{row['reference_ms']:.3f}"
        assert got["speedup"] == "1.00x" and got["ideal (FLOP ratio)"] == "1.00x"  # the same graph twice
        assert got["lower bound ms"] == f"{row['lower_bound_ms']:.3f}" and got["bound"] == row["binding"]
    assert FOOTER in text and "ideal ms" not in text and "fusion" not in text


def test_predict_against_an_unfused_reference_says_what_fusion_adds_apart(tiny_llama_onnx, tmp_path, capsys):
    from prune2deploy.frontends.onnx import load_onnx, save_onnx
    from prune2deploy.passes.fuse_ort import FuseOrtPass

    fused = load_onnx(tiny_llama_onnx)
    assert FuseOrtPass()(fused).modified
    save_onnx(fused, tmp_path / "fused.onnx")
    assert main(["predict", str(tmp_path / "fused.onnx"), "--against", str(tiny_llama_onnx), "--gpu", "h100"]) == 0
    text = capsys.readouterr().out
    header, cells = _table(text)
    assert header[-2:] == ["fusion speedup", "fusion level"]
    (row,) = api.predict(tmp_path / "fused.onnx", against=tiny_llama_onnx, gpus=["h100"])
    got = dict(zip(header, cells[row["gpu"]], strict=True))
    assert row["fusion_level"] == got["fusion level"] == "reference fused here"
    assert got["fusion speedup"] == f"{row['fusion_speedup']:.2f}x" and got["speedup"] == f"{row['speedup']:.2f}x"
    assert "fusion speedup: what ONNX Runtime fusion alone adds" in text


def test_predict_alone_prints_compiled_ms_and_the_lower_bound(tiny_llama_onnx, capsys):
    assert main(["predict", str(tiny_llama_onnx), "--gpu", "a100"]) == 0
    text = capsys.readouterr().out
    header, cells = _table(text)
    assert header == ["gpu", "precision", "compiled ms", "lower bound ms", "bound"]
    (row,) = api.predict(tiny_llama_onnx, gpus=["a100"])
    assert cells[row["gpu"]][2:4] == [f"{row['compiled_ms']:.3f}", f"{row['lower_bound_ms']:.3f}"]
    assert "unfused roofline" not in text and FOOTER in text


def test_predict_from_a_config_uses_the_config_table(tmp_path, capsys):
    config = {
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 1000, "hidden_act": "silu",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(tmp_path), "--gpu", "h100", "--decode", "--past", "64"]) == 0
    text = capsys.readouterr().out
    header, cells = _table(text)
    assert header[:4] == ["gpu", "precision", "predicted ms", "lower bound ms"] and "tokens/s" in header
    (row,) = api.predict(tmp_path, gpus=["h100"], decode=True, past=64)
    assert row["source"] == "config" and cells[row["gpu"]][2] == f"{row['compiled_ms']:.3f}"
    assert "decode step after 64 tokens" in text and FOOTER in text
