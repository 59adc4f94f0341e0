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
