"""Output writers are plug-ins: one registration, and every compile that asks for it calls it.

A throw-away writer registered here is called with the compile's context, its section lands in the report
under its name, and its failed check raises VerificationError after the output folder is written.
"""

from __future__ import annotations

import json

import pytest

from prune2deploy import api
from prune2deploy.errors import UnsupportedModelError, VerificationError
from prune2deploy.frontends.onnx import save_onnx
from prune2deploy.outputs import registry
from prune2deploy.spec import CompileOptions
from tests.fixtures.graphs import mlp_model

FAST = {"profile": False, "quality_windows": 0}


@pytest.fixture
def mlp_file(tmp_path, rng):
    path = tmp_path / "mlp.onnx"
    save_onnx(mlp_model(rng), path)
    return path


def _register(monkeypatch, write, **needs) -> registry.OutputSpec:
    spec = registry.OutputSpec(name="probe", folder="probe", order=99, summary="a test writer", write=write, **needs)
    registry.load_writers()  # the real writers first, then this one beside them for this test only
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec


def test_a_registered_writer_is_called_reported_and_its_failed_check_raises_after_writing(
    tmp_path, mlp_file, monkeypatch
):
    calls = []

    def write(context: registry.OutputContext) -> registry.OutputSection:
        calls.append(context)
        context.folder.mkdir()
        size = context.model_path.stat().st_size  # the verified model.onnx is there to read
        (context.folder / "model.bin").write_bytes(context.model_path.read_bytes())
        check = registry.OutputCheck(False, "probe/ differs from model.onnx by 0.5 (relative)", "Look at probe/.")
        return registry.OutputSection({"written": True, "bytes": size, "max_rel_diff": 0.5}, check=check)

    _register(monkeypatch, write, default=True)
    with pytest.raises(VerificationError, match=r"probe/ differs from model.onnx by 0.5 .*report.json\. Look at"):
        api.compile(mlp_file, tmp_path / "out", CompileOptions(**FAST))
    assert len(calls) == 1
    context = calls[0]
    assert context.torch is None and context.folder.name == "probe" and context.options.tolerance > 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["probe"] == {"written": True, "bytes": (out / "model.onnx").stat().st_size, "max_rel_diff": 0.5}
    assert (out / "probe" / "model.bin").read_bytes() == (out / "model.onnx").read_bytes()
    assert report["verification"]["passed"]  # model.onnx itself is fine: only the writer's check failed


def test_writers_run_only_when_asked_and_only_for_inputs_that_have_what_they_need(tmp_path, mlp_file, monkeypatch):
    calls = []

    def write(context):
        calls.append(context)
        return registry.OutputSection({"written": True})

    _register(monkeypatch, write)  # off by default, no option: never asked for
    report = api.compile(mlp_file, tmp_path / "off", CompileOptions(**FAST)).report
    assert "probe" not in report and not calls

    _register(monkeypatch, write, default=True, causal_lm=True)  # on by default only where it fits
    report = api.compile(mlp_file, tmp_path / "unfit", CompileOptions(**FAST)).report
    assert "probe" not in report and not calls

    _register(monkeypatch, write, option="hf_checkpoint", causal_lm=True)  # asked for, and the input is no LM
    report = api.compile(mlp_file, tmp_path / "asked", CompileOptions(hf_checkpoint=True, **FAST)).report
    assert not report["probe"]["written"] and "causal LM" in report["probe"]["reason"] and not calls


def test_a_writer_that_cannot_write_the_model_leaves_no_folder_and_says_why(tmp_path, mlp_file, monkeypatch):
    def write(context):
        context.folder.mkdir()
        (context.folder / "half-written").write_text("x")
        raise UnsupportedModelError("probe/ cannot express this MLP's widths")

    _register(monkeypatch, write, default=True)
    result = api.compile(mlp_file, tmp_path / "out", CompileOptions(**FAST))
    assert result.report["probe"] == {"written": False, "reason": "probe/ cannot express this MLP's widths"}
    assert not (tmp_path / "out" / "probe").exists() and (tmp_path / "out" / "model.onnx").is_file()


def test_two_writers_cannot_share_a_folder(monkeypatch):
    registry.load_writers()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(RuntimeError, match="both write genai/"):
        registry.register_output(
            registry.OutputSpec(name="other", folder="genai", order=1, summary="", write=lambda c: None)
        )
