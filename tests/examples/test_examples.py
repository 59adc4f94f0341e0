"""Every script of examples/ runs in its --quick mode and says what it claims; the mlops step fails on exit
codes 1 and 2; the sweep file and the GitHub Actions workflow only use options that exist. No network."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """One export cache for the session (examples share checkpoints), never the user's ~/.cache."""
    monkeypatch.setenv("P2D_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "p2d-cache"))


def _run(name: str, out: Path, *extra: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_wanda_2of4_llm(tmp_path, capsys):
    summary = _run("wanda_2of4_llm", tmp_path)
    assert summary["verification"] == "passed"  # check mode: the masks already are 2:4, nothing imposed
    assert summary["sparsify"]["already_nm"] == summary["sparsify"]["eligible"] > 0
    assert summary["sparsify"]["made_nm"] == 0
    assert summary["quality_vs_dense"]["kl_mean"] > 0 and summary["quality_vs_dense"]["top1_agreement"] < 1
    rows = {r["gpu"]: r for r in summary["predictions"]}
    assert rows["t4"]["sparse_used"] is False and rows["a100-sxm-80gb"]["sparse_used"] is True
    assert "on CPU, 2:4 sparsity gives no speedup" in capsys.readouterr().out
    assert (tmp_path / "compiled" / "model.onnx").is_file() and (tmp_path / "pruned" / "plan.yaml").is_file()


def test_minitron_width(tmp_path):
    summary = _run("minitron_width", tmp_path)
    assert summary["verification"] == "passed"
    assert summary["per_layer_heads"] == [[6, 3], [6, 3]]  # 9 → 6 query heads, the 3 kv groups kept
    assert summary["params"][1] < summary["params"][0]
    assert len(summary["generation"]["new_tokens"]) == 12 and summary["generation"]["text"]
    assert (tmp_path / "compiled" / "genai" / "genai_config.json").is_file()


def test_mha_to_gqa(tmp_path):
    summary = _run("mha_to_gqa", tmp_path)
    assert summary["verification"] == "approximate" and summary["genai_matches_model_onnx"]
    assert summary["kv_cache_bytes_per_token"]["before"] == 4 * summary["kv_cache_bytes_per_token"]["after"]
    assert all(v > 0 for values in summary["tokens_per_s"].values() for v in values)
    assert summary["quality_vs_original"]["kl_mean"] > 0
    config = json.loads((tmp_path / "regrouped" / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    hf_config = json.loads((tmp_path / "regrouped" / "hf" / "config.json").read_text())
    assert hf_config["num_key_value_heads"] == 2


def test_torch_prune_cnn(tmp_path):
    summary = _run("torch_prune_cnn", tmp_path)
    for label in ("ln_structured", "scop_bn_gamma"):
        result = summary[label]
        assert result["verification"] == "passed" and result["channels_masked"] > 0
        assert result["params"][1] < result["params"][0] and result["flops"][1] < result["flops"][0]
        assert result["cpu_speedup"]["runs"] > 0
        assert (tmp_path / label / "model.onnx").is_file()


def test_sixteen_heads(tmp_path):
    summary = _run("sixteen_heads", tmp_path)
    assert summary["verification"] == "passed"
    assert summary["heads_removed"] == len(summary["heads_masked"]) == 18  # 25 % of 6 × 12 heads
    assert 0.5 < summary["cosine_vs_dense"]["cosine_mean"] < 1
    assert summary["params"][1] < summary["params"][0]


def test_from_onnx(tmp_path):
    summary = _run("from_onnx", tmp_path)
    assert summary["verification"] == "passed" and summary["channels_removed"] == 64  # 32 of 64 in each block
    assert summary["onnx_keyed_mask"].startswith("val_")  # an exporter name, not a torch one
    assert (tmp_path / "user" / "model.onnx.data").is_file()
    assert (tmp_path / "compiled" / "model.onnx").is_file()


def _make(target: str, **variables: str) -> subprocess.CompletedProcess:
    args = ["make", "-s", "-f", str(EXAMPLES / "mlops" / "Makefile"), target]
    args += [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def mlops_out(tmp_path_factory):
    """`make compile` on a small .onnx model with masks (the from_onnx example's inputs)."""
    tmp = tmp_path_factory.mktemp("mlops")
    _run("from_onnx", tmp / "inputs")
    p2d = f"{shlex.quote(sys.executable)} -m prune2deploy.cli"
    inputs = tmp / "inputs"
    done = _make("compile", P2D=p2d, MODEL=str(inputs / "user" / "model.onnx"),
                 MASKS=str(inputs / "masks.safetensors"), OUT=str(tmp / "out"), FLAGS="--no-profile")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return tmp, p2d


def test_mlops_make_compile_writes_the_artifacts(mlops_out):
    tmp, p2d = mlops_out
    listed = _make("artifacts", OUT=str(tmp / "out")).stdout.split()
    assert [Path(p).name for p in listed] == ["report.json", "report.html", "manifest.json"]
    assert all(Path(p).is_file() for p in listed)
    assert _make("check", P2D=p2d, OUT=str(tmp / "out")).returncode == 0


def test_mlops_make_fails_on_exit_codes_1_and_2(mlops_out):
    tmp, p2d = mlops_out
    bad = _make("compile", P2D=p2d, MODEL=str(tmp / "missing.onnx"), OUT=str(tmp / "bad"))
    assert bad.returncode != 0 and "Error 2" in bad.stderr  # make names the recipe's exit code
    # the reference with one weight changed: the compiled model no longer matches it, verification exits 1
    import numpy as np
    import onnx
    from onnx import numpy_helper

    other = tmp / "mismatch"
    other.mkdir()
    onnx.save(onnx.load(str(tmp / "out" / "model.onnx")), str(other / "model.onnx"))
    reference = onnx.load(str(tmp / "out" / "reference.onnx"))
    weight = max(reference.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(reference, str(other / "reference.onnx"))
    failed = _make("check", P2D=p2d, OUT=str(other))
    assert failed.returncode != 0 and "Error 1" in failed.stderr


def test_github_workflow_calls_the_cli_with_flags_that_exist():
    from prune2deploy.cli import build_parser

    workflow = yaml.safe_load((EXAMPLES / "mlops" / "compile.yml").read_text())
    steps = workflow["jobs"]["compile"]["steps"]
    commands = [s["run"] for s in steps if s.get("run", "").lstrip().startswith("prune2deploy ")]
    assert len(commands) == 2
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command.replace('"', ""))
        assert argv[0] == "prune2deploy"
        parser.parse_args(argv[1:])  # SystemExit on an unknown flag or a bad value
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert {Path(p).name for p in upload["with"]["path"].split()} == {"report.json", "report.html", "manifest.json"}


def test_sweep_yaml_is_a_valid_sweep():
    from prune2deploy.sweep.spec import load_sweep

    spec = load_sweep(EXAMPLES / "sweep.yaml")
    assert spec.model == "minilm-l6" and spec.grid["criterion"] == ["magnitude", "wanda"]


def test_readme_links_every_example():
    readme = (ROOT / "README.md").read_text()
    for path in [*sorted(EXAMPLES.glob("*.py")), EXAMPLES / "mlops", EXAMPLES / "sweep.yaml"]:
        if not path.name.startswith("_"):
            assert f"examples/{path.name}" in readme, path.name
