"""`prune2deploy compile`: exit codes, the summary, flags generated from the option declarations."""

from __future__ import annotations

import json
import re

import pytest

from prune2deploy import api
from prune2deploy.cli import build_parser, main
from prune2deploy.cli.compile import compile_options
from prune2deploy.errors import ConfigError
from prune2deploy.io import sha256_file
from prune2deploy.spec import CORE_OPTIONS, CompileOptions


def _parse(*argv: str):
    return compile_options(build_parser().parse_args(["compile", "m.onnx", "--out", "o", *argv]))


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
    groups = json.loads((tmp_path / "o" / "report.json").read_text())["groups"]
    unsized = groups["total"] - groups["prunable"] - len(groups["blocked"])
    line = next(x for x in text.splitlines() if x.startswith("  channel groups:"))
    named = [groups["prunable"], *([unsized] if unsized else []), len(groups["blocked"])]
    assert [int(n) for n in re.findall(r"(\d+) (?:of|without|not)\b", line)] == named  # they add up to the total
    assert f"of {groups['total']} prunable" in line and (not unsized or "without a static width" in line)
    rows = [
        line.split()[0] for line in text.splitlines() if line.startswith("    l4") or "jetson-orin-nano-8gb" in line
    ]
    assert rows == ["l4", "jetson-orin-nano-8gb"]  # predictions for the named GPUs are printed, not only in report.json


# -- flags from the option declarations (no model is loaded below) ----------------------------------------------------


def _subparser(command: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def test_compile_has_a_flag_for_every_declared_option_and_each_reaches_its_key():
    flags = {flag for action in _subparser("compile")._actions for flag in action.option_strings}
    declared = [o.flag for o in CORE_OPTIONS.values() if o.flag]
    declared += [o.flag for spec in api.pass_specs().values() for o in spec.options.values() if o.flag]
    declared += [spec.switch[0] for spec in api.pass_specs().values() if spec.switch]
    assert declared and set(declared) <= flags
    options = _parse(
        "--masks", "m.safetensors", "--batch", "1", "8", "--seq", "16", "--budget", "3", "--gpu", "l4",
        "--tolerance", "1e-3", "--threads", "2", "--overwrite", "--portable", "--no-profile", "--no-genai",
        "--hf-checkpoint", "--no-export-cache", "--verify-mode", "whole", "--quality-windows", "0",
        "--shapes", "batch=1:2:4", "seq=1:16:64", "--memory-limit-gib", "2.5", "--export-cache-dir", "c",
        "--feeds", "f.npz", "--passes", "remove-channels", "--drop-layers", "1", "--multiple-of", "8",
    )  # fmt: skip
    assert (options.profile_batches, options.profile_seqs, options.profile_budget_s) == ([1, 8], [16], 3.0)
    assert options.gpus == ["l4"] and options.tolerance == 1e-3 and options.threads == 2
    assert options.overwrite and options.portable and not options.profile and options.genai is False
    assert options.hf_checkpoint and not options.export_cache and options.verify_mode == "whole"
    assert options.quality_windows == 0 and options.memory_limit_gib == 2.5
    assert options.shapes == {"batch": (1, 2, 4), "seq": (1, 16, 64)}
    assert str(options.masks) == "m.safetensors" and [str(f) for f in options.feeds] == ["f.npz"]
    assert options.passes == ["remove-layers", "remove-channels"] and options.multiple_of == 8
    torch = _parse("--engine", "torch", "--engine-option", "device=cpu")
    assert torch.engine == "torch" and torch.engine_options == {"device": "cpu"}


def test_every_command_and_option_is_described_and_help_shows_defaults(capsys):
    for name in ("compile", "prune", "inspect", "verify", "profile", "predict", "demo", "generate", "sweep", "passes"):
        sub = _subparser(name)
        assert sub.description, name
        undescribed = [a.dest for a in sub._actions if not a.help]
        assert not undescribed, (name, undescribed)
    shown = {
        "compile": ["(default: 10.0)", "(default: remove-layers,", "(default: onnxruntime)", "(default: 4)"],
        "demo": ["(default: 20.0)", "(default: smollm2-135m)", "(default: 0.3)", "(default: minitron)"],
        "prune": ["(default: magnitude)", "(default: free)", "(default: 24)", "wanda:", "whole-group:"],
        "profile": ["(default: 10.0)", "(default: 1)"],
        "verify": ["(default: 0.0001)"],
        "predict": ["(default: tensorrt)", "(default: fp16)"],
    }
    for name, texts in shown.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(t in text for t in texts), (name, [t for t in texts if t not in text])


def test_hf_nemotron_nas_flag_is_in_compile_help_and_sets_its_option(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--hf-nemotron-nas" in text and "OUT/hf-nas/" in text and "DeciLMForCausalLM" in text
    assert _parse("--hf-nemotron-nas").hf_nemotron_nas and not _parse().hf_nemotron_nas


def test_options_that_do_nothing_are_refused_and_budget_is_one_flag():
    compile_ = ["compile", "m", "--out", "o"]
    for argv in (
        [*compile_, "--detect-zeros"],
        [*compile_, "--profile-budget", "3"],
        ["demo", "--profile-budget", "3"],
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    with pytest.raises(ConfigError, match="detect_zeros"):
        CompileOptions(detect_zeros=True)
    assert build_parser().parse_args(["demo", "--budget", "3"]).budget == 3.0
    assert build_parser().parse_args(["profile", "m.onnx", "--budget", "3"]).budget == 3.0
    assert _parse("--budget", "3").profile_budget_s == 3.0


# -- 2:4 and fuse-ort on every engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "tensorrt"],
        ["--engine", "tensorrt-rtx", "--precision", "fp16"],
        ["--engine", "tensorrt", "--precision", "fp16", "--plan", "pruned/plan.yaml"],  # wanda_2of4_llm's deploy line
    ],
)
def test_sparse_2_4_validates_for_other_engines_without_fuse_ort(argv):
    options = _parse("--sparse-2-4", *argv)
    assert "sparsify-2:4" in options.passes and "fuse-ort" not in options.passes
    back = options.replace(engine="onnxruntime", precision="fp32", plan=None)  # the auto pass joins again by itself
    assert "fuse-ort" in back.passes and "sparsify-2:4" in back.passes
    assert "fuse-ort" not in back.requested_passes


def test_fuse_ort_asked_for_on_another_engine_is_an_error_naming_its_flag(tmp_path, capsys):
    argv = ["compile", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--fuse-ort", "--engine", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "--fuse-ort" in err and "engine tensorrt cannot run" in err and "--portable" not in err
    assert main([*argv, "--fuse-ort", "--portable"]) == 2
    assert "--portable keeps standard ONNX ops" in capsys.readouterr().err
    assert main([*argv, "--shapes", "seq=128"]) == 2  # a flag's own reader refusing a value is bad input
    assert "--shapes takes" in capsys.readouterr().err


def test_no_pass_names_in_the_cli_spec_or_api():
    """Policy reads the registry's kinds (structural, sparse_weights, engines, stage), never a pass's name."""
    from pathlib import Path

    import prune2deploy

    root = Path(prune2deploy.__file__).parent
    files = [*sorted((root / "cli").glob("*.py")), root / "spec.py", root / "api.py", root / "profiling" / "summary.py"]
    for name in api.pass_specs():
        for path in files:
            assert f'"{name}"' not in path.read_text(), (name, path.name)
