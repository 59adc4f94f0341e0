"""The CLI: exit codes 0 / 1 / 2, readable summaries, and --json for machines."""

from __future__ import annotations

import json

import pytest

from prune2deploy import api
from prune2deploy.cli import main
from prune2deploy.io import sha256_file
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama
from tests.fixtures.zeroing import llama_mlp_masks, save_masks


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """An exported tiny Llama (unmasked) and a mask file for it."""
    import numpy as np

    folder = tmp_path_factory.mktemp("cli")
    module = tiny_llama()
    api.compile(module, folder / "export", CompileOptions(profile=False))
    masks, kept = llama_mlp_masks(module, 0.5, np.random.default_rng(0))
    save_masks(masks, folder / "masks.safetensors")
    return folder / "export" / "reference.onnx", folder / "masks.safetensors", kept


def test_compile_inspect_verify_predict(tiny_onnx, tmp_path, capsys):
    model, masks, kept = tiny_onnx
    digest = sha256_file(model)
    out = tmp_path / "build"
    assert main(["compile", str(model), "--masks", str(masks), "--out", str(out), "--no-profile", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "verification PASSED" in text and f"channels_removed={2 * 96 - sum(kept.values())}" in text
    quality = next(line for line in text.splitlines() if line.strip().startswith("quality "))
    assert "vs masked reference: KL" in quality and "vs dense (before the masks)" in quality  # the .onnx is dense
    assert "random token ids" in quality  # a bare .onnx has no tokenizer
    assert sha256_file(model) == digest

    assert main(["inspect", str(out / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    widths = sorted(g["width"] for g in info["groups"] if g["prunable"])
    assert widths == sorted(kept.values())
    assert main(["inspect", str(model)]) == 0
    table = capsys.readouterr().out
    assert "prunable" in table and "ReduceMean reduces over this axis" in table  # why the residual stream is blocked

    assert main(["verify", str(out / "model.onnx"), "--reference", str(out / "reference.onnx")]) == 0
    assert "PASSED" in capsys.readouterr().out

    assert main(["predict", str(out / "model.onnx"), "--against", str(model), "--gpu", "a100", "l4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("A100") or "a100" in line.lower() for line in lines)


def test_exit_codes_for_bad_input(tiny_onnx, tmp_path, capsys):
    model, _, _ = tiny_onnx
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["compile", str(bad), "--out", str(tmp_path / "o"), "--no-profile", "--quiet"]) == 2
    assert "bad.onnx: not a valid ONNX model" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["compile", str(model), "--out", str(tmp_path / "taken"), "--no-profile", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["compile", str(model), "--out", str(tmp_path / "o2"), "--passes", "nope", "--quiet"]) == 2
    assert "unknown pass" in capsys.readouterr().err
    assert main(["predict", str(model), "--gpu", "not-a-gpu"]) == 2


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


def test_prune_then_compile_round_trip(tmp_path, capsys):
    """`prune --compile`: the plan's kept MLP widths are exactly the compiled widths, verified exact."""
    import onnx_ir as ir

    from prune2deploy.graph.scopes import module_of
    from prune2deploy.pruning.plan import load_plan

    tiny_llama().save_pretrained(tmp_path / "hf")
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            str(tmp_path / "hf"),
            "--out",
            str(out),
            "--mlp",
            "0.5",
            "--round-to",
            "8",
            "--compile",
            "--no-profile",
            "--quiet",
        ]
    )
    assert code == 0
    assert "verification PASSED" in capsys.readouterr().out
    plan = load_plan(out / "plan.yaml")
    kept = [len(layer.mlp.kept) for layer in plan.layers]
    model = ir.load(str(out / "compiled" / "model.onnx"))
    widths = [n.inputs[1].shape[0] for n in model.graph if n.op_type == "MatMul" and module_of(n).endswith("down_proj")]
    assert widths == kept and all(w % 8 == 0 and w < 96 for w in widths)


def test_drop_layers_is_approximate_and_reported(tiny_onnx, tmp_path, capsys):
    """A depth plan removes non-zero layers: the report says approximate, and compile still succeeds."""
    import onnx_ir as ir

    model, _, _ = tiny_onnx
    out = tmp_path / "shallow"
    assert (
        main(["compile", str(model), "--out", str(out), "--drop-layers", "1", "--no-profile", "--quiet", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    layers = next(r for r in report["passes"] if r["pass"] == "remove-layers")
    assert layers["exact"] is False and report["verification"]["exact"] is False
    assert report["verification"]["outputs"]["logits"]["max_rel"] > 0  # the error is measured, not hidden
    compiled = ir.load(str(out / "model.onnx"))
    scopes = {n.metadata_props.get("pkg.torch.onnx.name_scopes", "") for n in compiled.graph}
    assert not any("model.layers.1" in s for s in scopes) and any("model.layers.0" in s for s in scopes)


def test_compile_without_masks_says_nothing_was_pruned_and_prints_named_gpus(tiny_onnx, tmp_path, capsys):
    model, _, _ = tiny_onnx
    argv = ["compile", str(model), "--out", str(tmp_path / "o"), "--no-profile", "--quiet"]
    assert main([*argv, "--gpu", "l4", "jetson-orin-nano"]) == 0
    text = capsys.readouterr().out
    assert "nothing was pruned: no zero channels/heads found; did you mean --masks or --plan?" in text
    assert "channel groups:" in text and " not:" in text  # the unprunable groups, with their reasons
    rows = [
        line.split()[0] for line in text.splitlines() if line.startswith("    l4") or "jetson-orin-nano-8gb" in line
    ]
    assert rows == ["l4", "jetson-orin-nano-8gb"]  # predictions for the named GPUs are printed, not only in report.json


def test_prune_prints_the_next_command_and_nm_compile_adds_sparsify(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "hf")
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "hf"), "--out", str(out), "--mlp", "0.5", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"next: prune2deploy compile {tmp_path / 'hf'} --plan {out / 'plan.yaml'} --out {out / 'compiled'}" in text
    argv = ["prune", str(tmp_path / "hf"), "--out", str(out), "--nm", "2:4", "--compile", "--no-profile", "--quiet"]
    assert main([*argv, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "pass sparsify-2:4" in text and "2:4: " in text and "eligible weights are 2:4" in text
    report = json.loads((out / "compiled" / "report.json").read_text())
    assert "sparsify-2:4" in report["options"]["passes"]


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
