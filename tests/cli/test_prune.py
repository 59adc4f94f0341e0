"""`prune2deploy prune`: masks and a plan, the next command, what was asked vs removed, --compile."""

from __future__ import annotations

import json

from prune2deploy.cli import main


def test_prune_then_compile_round_trip(tiny_hf, tmp_path, capsys):
    """`prune --compile`: the plan's kept MLP widths are exactly the compiled widths, verified exact."""
    import onnx_ir as ir

    from prune2deploy.graph.scopes import module_of
    from prune2deploy.pruning.plan import load_plan

    out = tmp_path / "pruned"
    argv = ["prune", str(tiny_hf), "--out", str(out), "--mlp", "0.5", "--round-to", "8", "--compile", "--no-profile"]
    assert main([*argv, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "verification PASSED" in text
    plan = load_plan(out / "plan.yaml")
    kept = [len(layer.mlp.kept) for layer in plan.layers]
    model = ir.load(str(out / "compiled" / "model.onnx"))
    widths = [n.inputs[1].shape[0] for n in model.graph if n.op_type == "MatMul" and module_of(n).endswith("down_proj")]
    assert widths == kept and all(w % 8 == 0 and w < 96 for w in widths)
    # what was asked and what whole units removed, per structure
    removed = 1 - sum(kept) / (96 * len(kept))
    span = f"{min(kept)}" if min(kept) == max(kept) else f"{min(kept)}–{max(kept)}"
    assert f"  mlp: asked 50%, removed {100 * removed:.0f}% (kept {span} of 96 per layer)" in text


def test_prune_prints_the_next_command_and_nm_compile_adds_sparsify(tiny_hf, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_hf), "--out", str(out), "--heads", "0.3", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"next: prune2deploy compile {tiny_hf} --plan {out / 'plan.yaml'} --out {out / 'compiled'}\n" in text
    assert "  heads: asked 30%, removed 25% (kept 3 of 4 per layer)" in text  # whole heads: 30% of 4 rounds to 1
    argv = ["prune", str(tiny_hf), "--out", str(out), "--nm", "2:4", "--quiet", "--overwrite"]
    assert main(argv) == 0
    assert f"--out {out / 'compiled'} --sparse-2-4\n" in capsys.readouterr().out  # the flag the plan needs
    assert main([*argv, "--compile", "--no-profile"]) == 0
    text = capsys.readouterr().out
    assert "pass sparsify-2:4" in text and "2:4: " in text and "eligible weights are 2:4" in text
    # 2:4 zeros keep every shape: said as such, not as "nothing was pruned … did you mean --masks"
    assert "no channel, head or layer removed: the zeros are 2:4" in text and "nothing was pruned" not in text
    report = json.loads((out / "compiled" / "report.json").read_text())
    assert "sparsify-2:4" in report["options"]["passes"]
