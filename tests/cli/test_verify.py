"""`prune2deploy verify`: exit 1 when the compiled model does not match its reference."""

from __future__ import annotations

from prune2deploy.cli import main


def test_verify_fails_with_exit_1(tiny_onnx, tmp_path, capsys):
    import numpy as np
    import onnx_ir as ir

    model, _, _ = tiny_onnx
    broken = ir.load(str(model))
    weight = next(v for v in broken.graph.initializers.values() if v.const_value is not None and len(v.shape) == 2)
    weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(1.5), name=weight.name)
    ir.save(broken, str(tmp_path / "broken.onnx"))
    assert main(["verify", str(tmp_path / "broken.onnx"), "--reference", str(model)]) == 1
    assert "FAILED" in capsys.readouterr().out
