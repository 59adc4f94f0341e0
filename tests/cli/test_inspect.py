"""`prune2deploy inspect`: what is zero per group, and what is not counted as zero."""

from __future__ import annotations

from prune2deploy import api
from prune2deploy.cli import main
from prune2deploy.spec import CompileOptions


def test_inspect_says_zero_weight_rows_keep_their_bias(tmp_path, capsys):
    """torch's ln_structured zeroes weight rows, never the bias: inspect says so instead of "zero 0"."""
    import torch
    import torch.nn.utils.prune as torch_prune

    from tests.fixtures.models import tiny_bert

    torch.manual_seed(0)
    module = tiny_bert()
    with torch.no_grad():  # trained biases are not zero (random-init BERT's are, and equal ones get shared)
        for layer in module.encoder.layer:
            layer.intermediate.dense.bias.uniform_(0.1, 0.5)
    dense = module.encoder.layer[0].intermediate.dense
    torch_prune.ln_structured(dense, "weight", amount=0.25, n=2, dim=0)
    zero_rows = int((dense.weight.detach().abs().sum(dim=1) == 0).sum())
    api.compile(module, tmp_path / "out", CompileOptions(profile=False))
    info = api.inspect(tmp_path / "out" / "reference.onnx")
    assert zero_rows > 0 and info["zero_weight_nonzero_bias"] == zero_rows
    assert main(["inspect", str(tmp_path / "out" / "reference.onnx")]) == 0
    assert f"note: {zero_rows} channels have all-zero weights but a non-zero bias" in capsys.readouterr().out


def test_inspect_marks_what_a_fused_graph_hides(tiny_llama_onnx, tmp_path, capsys):
    """On fuse-ort's output: the note, the groups cut at a fused op, and per row which fused op hides the count
    (residual Adds inside the skip norms; query heads read from MultiHeadAttention's num_heads)."""
    from prune2deploy.frontends.onnx import load_onnx, save_onnx
    from prune2deploy.passes.fuse_ort import FuseOrtPass

    assert main(["inspect", str(tiny_llama_onnx)]) == 0
    plain = capsys.readouterr().out
    assert "fused" not in plain and "heads from" not in plain
    model = load_onnx(tiny_llama_onnx)
    assert FuseOrtPass()(model).modified
    save_onnx(model, tmp_path / "fused.onnx")
    info = api.inspect(tmp_path / "fused.onnx")
    assert main(["inspect", str(tmp_path / "fused.onnx")]) == 0
    lines = capsys.readouterr().out.splitlines()
    cut = info["groups_at_fused_ops"]
    assert cut > 0 and lines[0].endswith(f"{info['prunable']} prunable, {cut} cut at a fused op")
    assert lines[1] == f"note: {info['fused']['note']}"
    layers = lines[lines.index("layers (residual blocks):") + 1 :]
    assert "hidden by fused" in layers[0]
    for row in info["layers"]:
        line = next(x for x in layers if x.startswith(row["layer"] + " "))
        assert (
            row["hidden_by_fused"] == ["SkipSimplifiedLayerNormalization"]
            and "SkipSimplifiedLayerNormalization" in line
        )
    attention = lines[lines.index("attention:") + 1 :]
    assert "heads from" in attention[0] and "hidden by fused" in attention[0]
    for block in info["attention"]:
        line = next(x for x in attention if x.startswith(block["layer"] + " "))
        assert line.split()[1:4] == [str(block["heads"]), "MultiHeadAttention", "num_heads"]
