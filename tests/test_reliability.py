"""Reliability and safety: inputs never destroyed, no traversal, no false PASS, honest exit codes.

Each test names the item of docs/reliability.md it proves. Models are tiny onnx.helper graphs (no export),
so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prune2deploy import api
from prune2deploy.cli import main
from prune2deploy.errors import BadInputError, OutputExistsError
from prune2deploy.io import sha256_file

# -- tiny models ----------------------------------------------------------------------------------------------


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(proto, str(path))
    return path


def mlp(path: Path, *, seed: int = 0, zero: int = 6) -> Path:
    """x[batch, 8] → MatMul(8→16) → Relu → MatMul(16→4); ``zero`` hidden channels are zero."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, :zero] = 0
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _save(graph, path)


def two_outputs(path: Path, *, nan_in_second: bool = False) -> Path:
    """y = x·W, z = x·V (optionally z·NaN): two outputs, the second one possibly all NaN."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    v = rng.standard_normal((8, 3)).astype(np.float32)
    scale = np.array(np.nan if nan_in_second else 1.0, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("MatMul", ["x", "v"], ["z0"]),
            helper.make_node("Mul", ["z0", "s"], ["z"]),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v"), numpy_helper.from_array(scale, "s")],
    )
    return _save(graph, path)


def int_input(path: Path, *, factor: float = 1.0, use: str = "cast") -> Path:
    """y = x·W + cast(k)·(factor·v): the weights behind an integer input that is not a token id."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    v = (factor * rng.standard_normal((1, 4))).astype(np.float32)
    if use == "cast":
        nodes = [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT)]
    else:  # an int used only by integer arithmetic: its range cannot be derived
        nodes = [
            helper.make_node("Add", ["k", "one"], ["k1"]),
            helper.make_node("Cast", ["k1"], ["kf0"], to=TensorProto.INT32),
            helper.make_node("Cast", ["kf0"], ["kf"], to=TensorProto.FLOAT),
        ]
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("MatMul", ["kf", "v"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "ints",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(v, "v"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ],
    )
    return _save(graph, path)


def self_attention(path: Path) -> Path:
    """x[batch, seq, 8] → softmax(x·xᵀ)·x: a [batch, seq, seq] activation (memory grows with seq²)."""
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["x", "xt"], ["s"]),
            helper.make_node("Softmax", ["s"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "x"], ["y"]),
        ],
        "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
    )
    return _save(graph, path)


def _compile(*args: str) -> int:
    return main(["compile", *[str(a) for a in args], "--no-profile", "--quiet"])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- 1. --out is, contains or lies inside an input --------------------------------------------------------------


def test_overwrite_never_destroys_an_input(tmp_path, capsys):
    model = mlp(tmp_path / "m.onnx")
    digest = sha256_file(model)
    assert _compile(model, "--out", model, "--overwrite") == 2
    assert model.is_file() and sha256_file(model) == digest
    assert "is the input" in capsys.readouterr().err

    assert _compile(model, "--out", tmp_path, "--overwrite") == 2  # contains the input
    assert model.is_file() and sha256_file(model) == digest

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (hf / "model.safetensors").write_bytes(b"weights")
    before = sha256_file(hf)
    assert _compile(hf, "--out", hf, "--overwrite") == 2
    assert _compile(hf, "--out", hf / "sub", "--overwrite") == 2  # inside the input folder (item 11's hash)
    assert sha256_file(hf) == before and sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]

    masks = tmp_path / "masks.safetensors"
    masks.write_bytes(b"x")
    config = tmp_path / "c.yaml"
    config.write_text("tolerance: 0.001\n")
    assert _compile(model, "--masks", masks, "--out", masks, "--overwrite") == 2
    assert _compile(model, "--config", config, "--out", config, "--overwrite") == 2
    assert masks.read_bytes() == b"x" and config.read_text() == "tolerance: 0.001\n"


# -- 2. an --out that appears while compiling; concurrent compiles -------------------------------------------


def test_out_created_during_compile_is_not_replaced(tmp_path, monkeypatch, capsys):
    import prune2deploy.driver.compile as driver

    model = mlp(tmp_path / "m.onnx")
    out = tmp_path / "out"
    original = driver.load_source

    def load_and_meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "users-file.txt").write_text("mine")
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "load_source", load_and_meanwhile)
    assert _compile(model, "--out", out) == 2
    assert "appeared while compiling" in capsys.readouterr().err
    assert (out / "users-file.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "users-file.txt"
    ]
    assert _leftovers(tmp_path) == []

    out.joinpath("users-file.txt").unlink()
    out.rmdir()

    def file_meanwhile(*args, **kwargs):
        out.write_text("a file")
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "load_source", file_meanwhile)
    assert _compile(model, "--out", out) == 2 and out.read_text() == "a file"
    assert _leftovers(tmp_path) == []


def test_second_compile_to_the_same_out_fails_fast(tmp_path, capsys):
    from prune2deploy.driver.outdir import OutputFolder

    model = mlp(tmp_path / "m.onnx")
    first = OutputFolder(tmp_path / "out", overwrite=False)  # a compile in progress
    try:
        assert _compile(model, "--out", tmp_path / "out") == 2
        assert "another prune2deploy compile" in capsys.readouterr().err
        with pytest.raises(OutputExistsError):
            OutputFolder(tmp_path / "out", overwrite=True)
    finally:
        first.abort()
    assert _compile(model, "--out", tmp_path / "out") == 0  # the lock is released
    assert _leftovers(tmp_path) == []


# -- 3. external-data traversal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["/etc/passwd", "../../etc/passwd", "../outside.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(np.ones(32, np.float32).tobytes())
    path = mlp(folder / "m.onnx")
    proto = onnx.load(str(path))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "512")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    assert _compile(path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "tensor 'w1'" in err and location in err and "outside the model's folder" in err
    assert main(["inspect", str(path)]) == 2 and main(["verify", str(path), "--reference", str(path)]) == 2


def test_symlinked_external_data_that_leaves_the_folder_is_refused(tmp_path):
    from prune2deploy.frontends.onnx import check_external_data

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 512)
    (folder / "w.bin").symlink_to(tmp_path / "secret.bin")
    path = mlp(folder / "m.onnx")
    proto = onnx.load(str(path))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    onnx.save(proto, str(path))
    with pytest.raises(BadInputError, match=r"w\.bin"):
        check_external_data(path)


# -- 4. NaN never passes ------------------------------------------------------------------------------------------


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_nan_in_a_compiled_output_fails_and_json_stays_valid(tmp_path, capsys):
    reference = two_outputs(tmp_path / "ref.onnx")
    compiled = two_outputs(tmp_path / "new.onnx", nan_in_second=True)
    assert main(["verify", str(compiled), "--reference", str(reference)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["verify", str(compiled), "--reference", str(reference), "--json"]) == 1
    report = _strict_json(capsys.readouterr().out)
    assert report["outputs"]["z"]["nonfinite_new"] > 0 and report["status"] == "failed"


def test_nan_in_both_is_reported_not_hidden():
    from prune2deploy.verify import verdict_line, verification_notes, verify_runners

    class Fixed:
        def __init__(self, z):
            self.z = z

        def run(self, feeds):
            return {"y": np.ones(3, np.float32), "z": self.z}

    partly = np.array([np.nan, 1.0, 2.0], np.float32)
    result = verify_runners(Fixed(partly), Fixed(partly), [("f", {})], exact=True)
    assert result.passed and result.outputs["z"]["nonfinite_both"] == 1
    assert any("NaN/Inf in both" in n for n in verification_notes(result.as_dict()))
    everywhere = np.full(3, np.nan, np.float32)
    result = verify_runners(Fixed(everywhere), Fixed(everywhere), [("f", {})], exact=True)
    assert not result.passed and "nothing could be compared" in verdict_line(result.as_dict())


def test_all_nan_feeds_are_bad_input(tmp_path, capsys):
    reference = two_outputs(tmp_path / "ref.onnx")
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.full((2, 8), np.nan, np.float32))
    assert main(["verify", str(reference), "--reference", str(reference), "--feeds", str(feeds)]) == 2
    assert "NaN/Inf" in capsys.readouterr().err


# -- 5. HF weights that do not load ---------------------------------------------------------------------------------


def test_hf_folder_with_weights_that_do_not_match_is_refused(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from tests.fixtures.models import tiny_llama

    folder = tmp_path / "hf"
    tiny_llama().save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("layers.0.mlp.up_proj", "layers.0.mlp.upproj"): v for k, v in weights.items()}
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert _compile(folder, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj.weight" in err and "upproj" in err
    assert not (tmp_path / "out").exists()


# -- 6. approximate is never PASSED ----------------------------------------------------------------------------------


def _report(exact: bool, worst: float) -> dict:
    return {
        "model": {"reference": {"params": 1, "flops": 1}, "compiled": {"params": 1, "flops": 1}, "cost_shape": {}}
        | {"cost_shape": {"batch": 1, "seq": 1}},
        "passes": [{"pass": "remove-layers", "exact": exact, "modified": True, "record": {}, "refused": {}}],
        "verification": {
            "exact": exact,
            "passed": True,
            "tolerance": 1e-4,
            "feeds": ["a"],
            "outputs": {"y": {"max_abs": worst, "max_rel": worst, "scale": 1.0, "cosine": 0.97}},
        },
    }


def test_approximate_results_are_labelled_not_passed(capsys):
    from prune2deploy.cli.summary import print_compile as _print_compile
    from prune2deploy.profiling.report_html import render_html

    _print_compile(_report(False, 0.34), Path("o"))
    text = capsys.readouterr().out
    assert "PASSED" not in text and "approximate — error 3.40e-01, cosine 0.970000" in text
    assert "not held to the exact tolerance" in text and "remove-layers" in text
    page = render_html(_report(False, 0.34))
    assert ">passed<" not in page and "approximate — error 3.40e-01" in page
    _print_compile(_report(True, 0.0), Path("o"))
    assert "verification PASSED" in capsys.readouterr().out


def test_approximate_compile_report_json_says_approximate(tmp_path):
    from prune2deploy.verify import verify_models

    model = api.load_source(str(mlp(tmp_path / "m.onnx")), api.CompileOptions()).model
    result = verify_models(model, model, exact=False).as_dict()
    assert result["status"] == "approximate" and result["passed"] is True


# -- 7. feeds from how inputs are used -------------------------------------------------------------------------------


def test_integer_inputs_are_exercised(tmp_path, capsys):
    reference = int_input(tmp_path / "ref.onnx")
    changed = int_input(tmp_path / "new.onnx", factor=-5.0)
    assert main(["verify", str(changed), "--reference", str(reference)]) == 1
    from prune2deploy.feeds import feed_specs, random_feeds
    from prune2deploy.frontends.onnx import load_onnx

    (spec,) = [s for s in feed_specs(load_onnx(reference)) if s.name == "k"]
    assert spec.source == "cast"
    values = random_feeds(load_onnx(reference), batch=16)["k"]
    assert len(np.unique(values)) > 3


def test_unknown_integer_range_is_reported(tmp_path, capsys):
    reference = int_input(tmp_path / "ref.onnx", use="arith")
    assert main(["verify", str(reference), "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "input 'k'" in out and "--feeds" in out


# -- 8. config files: types, aliases, size, encoding -------------------------------------------------------------------

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_BOMB + "gpus: [*i, *i, *i, *i]\n", "anchors and aliases"),
        ("compile: null\n", "option 'compile'"),
        ("- a\n- b\n", "not list"),
        ("compile: [1, 2]\n", "option 'compile'"),
        ("drop_layers: 1\n", "option 'drop_layers'"),
        ("tolerance: abc\n", "option 'tolerance'"),
        ("1: 2\n", "option names are strings"),
    ],
)
def test_bad_config_files_are_exit_2_and_name_the_key(tmp_path, capsys, text, expected):
    model = mlp(tmp_path / "m.onnx")
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert _compile(model, "--config", config, "--out", tmp_path / "out") == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_bytes_encoding_and_size_are_checked(tmp_path, capsys):
    from prune2deploy.limits import CONFIG_BYTES

    model = mlp(tmp_path / "m.onnx")
    config = tmp_path / "c.yaml"
    config.write_bytes(b"gpus: [\xff\xfe]\n")
    assert _compile(model, "--config", config, "--out", tmp_path / "out") == 2
    assert "not UTF-8" in capsys.readouterr().err
    config.write_text("# padding\n" * (CONFIG_BYTES // 10 + 1))
    assert _compile(model, "--config", config, "--out", tmp_path / "out") == 2
    assert "at most" in capsys.readouterr().err


# -- 9. exit codes -----------------------------------------------------------------------------------------------------


def test_os_errors_are_exit_2_with_a_message(tmp_path, monkeypatch, capsys):
    import errno

    import prune2deploy.frontends.onnx as frontend

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.onnx"))

    monkeypatch.setattr(frontend, "save_onnx", disk_full)
    assert _compile(mlp(tmp_path / "m.onnx"), "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_internal_errors_are_exit_3_with_the_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    import prune2deploy.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a pass")

    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    assert _compile(mlp(tmp_path / "m.onnx"), "--out", tmp_path / "out") == 3
    err = capsys.readouterr().err
    assert "this is a bug" in err.lower() and "Traceback" not in err
    crash = Path(re.search(r"traceback is in (\S+)", err).group(1))
    assert "RuntimeError: a bug in a pass" in crash.read_text()
    crash.unlink()


def test_bad_inputs_are_exit_2(tmp_path, capsys):
    from safetensors.torch import save_file

    model = mlp(tmp_path / "m.onnx")
    import torch

    fp8 = tmp_path / "fp8.safetensors"
    save_file({"w1": torch.ones(8, 16).to(torch.float8_e4m3fn)}, str(fp8))
    assert _compile(model, "--masks", fp8, "--out", tmp_path / "o1") == 2

    other = two_outputs(tmp_path / "other.onnx")
    assert main(["verify", str(other), "--reference", str(model)]) == 2  # mismatched models

    proto = onnx.load(str(model))
    weights = numpy_helper.to_array(proto.graph.initializer[1]).copy()
    weights[0, 0] = np.nan
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(weights, "w2"))
    nan_model = tmp_path / "nan.onnx"
    onnx.save(proto, str(nan_model))
    assert _compile(nan_model, "--out", tmp_path / "o2") == 2
    assert "NaN/Inf" in capsys.readouterr().err

    for name, array in (
        ("wrong_name", {"input": np.zeros((2, 8), np.float32)}),
        ("wrong_shape", {"x": np.zeros((2, 9), np.float32)}),
        ("wrong_dtype", {"x": np.zeros((2, 8), np.float64)}),
    ):
        feeds = tmp_path / f"{name}.npz"
        np.savez(feeds, **array)
        assert _compile(model, "--feeds", feeds, "--out", tmp_path / name) == 2, name
        assert "user feeds #1" in capsys.readouterr().err


def test_sigterm_is_an_interrupt_and_leaves_no_staging(tmp_path, monkeypatch, capsys):
    import prune2deploy.driver.compile as driver

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(driver, "load_source", terminated)
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier test's library installed (Ray)
    assert _compile(mlp(tmp_path / "m.onnx"), "--out", tmp_path / "out") == 130
    assert "interrupted" in capsys.readouterr().err
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # restored


# -- 10. options either take effect or are errors ----------------------------------------------------------------------


def test_options_that_would_do_nothing_are_errors(tmp_path, capsys):
    model = mlp(tmp_path / "m.onnx")
    assert _compile(model, "--regroup-gqa", "5", "--out", tmp_path / "o1") == 2
    assert "--regroup-gqa" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert _compile(model, "--regroup-gqa", "0", "--out", tmp_path / "o2") == 2
    assert _compile(model, "--precision", "fp16", "--out", tmp_path / "o3") == 2
    assert "convert-precision" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["profile", str(model), "--batch", "0"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(model), "--reference", str(model), "--tolerance", "-1"])
    assert exit_.value.code == 2


def test_regroup_gqa_refusing_every_block_is_an_error(tmp_path, capsys):
    import onnx_ir as ir

    from tests.fixtures.exports import fresh

    path = tmp_path / "llama.onnx"
    ir.save(fresh("llama-mha"), str(path))  # 4 query heads: 5 kv heads cannot divide them
    assert _compile(path, "--regroup-gqa", "5", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "regroup-gqa" in err and "changed nothing" in err


# -- 11. provenance ----------------------------------------------------------------------------------------------------


def test_plan_mask_hash_is_checked(tmp_path):
    import hashlib

    from prune2deploy.driver.compile import resolve_plan
    from prune2deploy.pruning.plan import Plan, dump_plan

    (tmp_path / "masks.safetensors").write_bytes(b"swapped")
    plan = Plan(method="magnitude", criterion="magnitude", ratios={"mlp": 0.5})
    plan.masks = {"file": "masks.safetensors", "sha256": hashlib.sha256(b"original").hexdigest(), "tensors": 1}
    dump_plan(plan, tmp_path / "plan.yaml")
    with pytest.raises(BadInputError, match="sha256"):
        resolve_plan(api.CompileOptions(plan=tmp_path / "plan.yaml"))


def _plan_naming_masks(folder: Path, masks: dict) -> Path:
    from prune2deploy.pruning.plan import Plan, dump_plan

    folder.mkdir(parents=True, exist_ok=True)
    plan = Plan(method="magnitude", criterion="magnitude", ratios={"mlp": 0.5})
    plan.masks = masks
    dump_plan(plan, folder / "plan.yaml")
    return folder / "plan.yaml"


def test_plan_without_mask_hash_is_refused_unless_masks_is_given(tmp_path):
    """Binding is the default: a plan naming a mask file without its sha256 is exit 2 (a swapped file would
    be accepted); --masks FILE is how a user says to take a file as it is."""
    from prune2deploy.driver.compile import resolve_plan

    (tmp_path / "masks.safetensors").write_bytes(b"swapped")
    plan = _plan_naming_masks(tmp_path, {"file": "masks.safetensors", "tensors": 1})
    with pytest.raises(BadInputError, match=r"has no masks\.sha256.*pass --masks") as info:
        resolve_plan(api.CompileOptions(plan=plan))
    assert info.value.exit_code == 2
    chosen = resolve_plan(api.CompileOptions(plan=plan, masks=tmp_path / "masks.safetensors"))
    assert chosen.masks == tmp_path / "masks.safetensors"


def test_plan_mask_file_outside_the_plan_folder_is_refused(tmp_path):
    """``masks.file`` is read beside the plan only: ``..`` or a symlink leading out is exit 2 before a byte of
    it is read (an absolute path is refused when the plan is read: tests/pruning/test_plan.py)."""
    from prune2deploy.driver.compile import resolve_plan

    secret = tmp_path / "elsewhere.safetensors"
    secret.write_bytes(b"not yours")
    digest = sha256_file(secret)
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "link.safetensors").symlink_to(secret)
    for name in ("../elsewhere.safetensors", "link.safetensors"):
        plan = _plan_naming_masks(tmp_path / "plans", {"file": name, "sha256": digest})
        with pytest.raises(BadInputError, match="outside the plan's folder"):
            resolve_plan(api.CompileOptions(plan=plan))


def test_manifest_hashes_the_input_as_read(tmp_path):
    model = mlp(tmp_path / "m.onnx")
    digest = sha256_file(model)
    assert _compile(model, "--out", tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"]["sha256"] == digest


# -- 12. leftovers -----------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_a_killed_compile_is_removed(tmp_path):
    model = mlp(tmp_path / "m.onnx")
    stale = tmp_path / f".out.p2d-{_dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"\0" * 1024)
    old = tmp_path / f".out.old.p2d-{_dead_pid()}-efgh"
    old.write_text("backup of a file")
    live = tmp_path / f".out.p2d-{os.getppid()}-live"  # a running process: not touched
    live.mkdir()
    assert _compile(model, "--out", tmp_path / "out") == 0
    assert _leftovers(tmp_path) == [live.name]


# -- 13. resource bounds -----------------------------------------------------------------------------------------------


def test_profiling_shapes_are_checked_against_memory(tmp_path, capsys):
    model = self_attention(tmp_path / "a.onnx")
    args = ["--seq", "100000", "--memory-limit-gib", "4", "--quiet"]
    assert main(["compile", str(model), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert "batch 1, seq 100000" in err and "--memory-limit-gib" in err
    assert main(["profile", str(model), "--seq", "100000", "--memory-limit-gib", "4"]) == 2
    from prune2deploy.driver.compile import estimate_memory_bytes
    from prune2deploy.frontends.onnx import load_onnx

    assert estimate_memory_bytes(load_onnx(model), 1, 100000) >= 2 * 4 * 100000**2  # the [1, s, s] scores


# -- 14. permissions ---------------------------------------------------------------------------------------------------


def test_outputs_follow_the_umask(tmp_path):
    model = mlp(tmp_path / "m.onnx")
    old = os.umask(0o022)
    try:
        assert _compile(model, "--out", tmp_path / "out") == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


# -- 15. round 3: invalid ONNX, the export cache, --overwrite, every writer's guard, generate ---------


def test_onnx_rejected_by_the_checker_is_refused(tmp_path, capsys):
    """Two initializers named w1 (the second all zero): ONNX Runtime ran the first, the loader kept the zeros,
    and the compile of a zero network said PASSED."""
    path = mlp(tmp_path / "dup.onnx")
    proto = onnx.load(str(path))
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((8, 16), np.float32), "w1"))
    onnx.save(proto, str(path))
    assert _compile(path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "checker rejects" in err and "not unique" in err
    assert not (tmp_path / "out").exists()
    assert main(["inspect", str(path)]) == 2 and main(["verify", str(path), "--reference", str(path)]) == 2


def test_ort_contrib_ops_in_the_default_domain_pass_the_check(tmp_path):
    """A graph fused for ONNX Runtime (SimplifiedLayerNormalization is ORT's op in ONNX's domain) still loads,
    and the schemas lent to the checker are gone afterwards."""
    from onnx import defs

    from prune2deploy.frontends.onnx import load_onnx

    graph = helper.make_graph(
        [helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-5)],
        "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(np.ones(8, np.float32), "scale")],
    )
    model = load_onnx(_save(graph, tmp_path / "rms.onnx"))
    assert [n.op_type for n in model.graph] == ["SimplifiedLayerNormalization"]
    assert not defs.has("SimplifiedLayerNormalization")


def _hf_folder(folder: Path) -> Path:
    from tests.fixtures.models import tiny_llama

    tiny_llama().save_pretrained(folder)
    return folder


def test_tampered_export_cache_is_discarded_and_re_exported(tmp_path, capsys):
    hf = _hf_folder(tmp_path / "hf")
    cache = tmp_path / "cache"
    args = ["--export-cache-dir", cache, "--no-genai"]
    assert _compile(hf, *args, "--out", tmp_path / "o1") == 0
    (entry,) = (cache / "exports").iterdir()
    assert json.loads((entry / "digest.json").read_text())["model.onnx"] == sha256_file(entry / "model.onnx")
    proto = onnx.load(str(entry / "model.onnx"))
    for tensor in proto.graph.initializer:  # the weights replaced with zeros: a zero network as the reference
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    onnx.save(proto, str(entry / "model.onnx"))
    capsys.readouterr()
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # whatever pytest's logging plugin does
    logging.getLogger("prune2deploy").addHandler(handler)
    try:
        assert _compile(hf, *args, "--out", tmp_path / "o2") == 0
    finally:
        logging.getLogger("prune2deploy").removeHandler(handler)
    said = capsys.readouterr().err + "\n".join(warnings)
    assert "discarding the cached export" in said and "model.onnx changed" in said
    (entry,) = (cache / "exports").iterdir()  # exported again, with a digest that holds
    assert json.loads((entry / "digest.json").read_text())["model.onnx"] == sha256_file(entry / "model.onnx")
    reference = onnx.load(str(tmp_path / "o2" / "reference.onnx"))
    assert any(np.abs(numpy_helper.to_array(t)).max() > 0 for t in reference.graph.initializer if t.dims)


def test_export_cache_entry_without_a_digest_is_not_trusted(tmp_path):
    from prune2deploy.driver.source import _intact_cache_entry

    entry = tmp_path / "exports" / "key"
    entry.mkdir(parents=True)
    mlp(entry / "model.onnx")
    assert not _intact_cache_entry(entry) and not entry.exists()


def _previous_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    assert _compile(mlp(tmp_path / "m.onnx"), "--out", out) == 0
    return out


@pytest.mark.parametrize("kind", ["checkout", "file", "symlink", "foreign-manifest", "output-plus-user-file"])
def test_overwrite_replaces_only_an_output_of_this_tool(tmp_path, kind, capsys):
    model = mlp(tmp_path / "m.onnx")
    out = tmp_path / "out"
    if kind == "checkout":
        (out / ".git").mkdir(parents=True)
        (out / "main.py").write_text("print('mine')\n")
    elif kind == "file":
        out.write_text("a file")
    elif kind == "symlink":
        (tmp_path / "target").mkdir()
        (tmp_path / "target" / "notes.txt").write_text("mine")
        out.symlink_to(tmp_path / "target")
    elif kind == "foreign-manifest":
        out.mkdir()
        (out / "manifest.json").write_text('{"name": "my-web-app", "outputs": {}}')
        (out / "index.html").write_text("<html>")
    else:
        out = _previous_output(tmp_path)
        (out / "my-notes.txt").write_text("mine")
    before = sha256_file(out) if out.is_dir() else out.read_bytes()
    capsys.readouterr()
    assert _compile(model, "--out", out, "--overwrite") == 2
    assert "--overwrite replaces only an output folder of prune2deploy" in capsys.readouterr().err
    assert (sha256_file(out) if out.is_dir() else out.read_bytes()) == before
    assert out.is_symlink() == (kind == "symlink") and _leftovers(tmp_path) == []


def test_overwrite_out_dot_is_refused_in_a_folder_of_the_users(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "README.md").write_text("mine")
    model = mlp(tmp_path / "m.onnx")
    monkeypatch.chdir(work)
    assert _compile(model, "--out", ".", "--overwrite") == 2
    assert "without a prune2deploy manifest.json" in capsys.readouterr().err
    assert (work / "README.md").read_text() == "mine"


def test_overwrite_replaces_an_earlier_output_and_leaves_no_backup(tmp_path):
    out = _previous_output(tmp_path)
    first = json.loads((out / "manifest.json").read_text())["created"]
    assert _compile(tmp_path / "m.onnx", "--out", out, "--overwrite") == 0
    assert (out / "model.onnx").is_file() and json.loads((out / "manifest.json").read_text())["created"] >= first
    assert _leftovers(tmp_path) == []


def test_overwrite_checks_again_at_the_rename(tmp_path, monkeypatch, capsys):
    import prune2deploy.driver.compile as driver

    out = _previous_output(tmp_path)
    original = driver.load_source

    def user_file_meanwhile(*args, **kwargs):
        (out / "added-while-compiling.txt").write_text("mine")
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "load_source", user_file_meanwhile)
    assert _compile(tmp_path / "m.onnx", "--out", out, "--overwrite") == 2
    assert "changed while compiling" in capsys.readouterr().err
    assert (out / "added-while-compiling.txt").read_text() == "mine" and _leftovers(tmp_path) == []


def test_prune_sweep_and_export_cache_never_write_into_the_model(tmp_path, monkeypatch, capsys):
    import prune2deploy.sweep.run as sweep_run

    hf = _hf_folder(tmp_path / "hf")
    before = sha256_file(hf)
    assert main(["prune", str(hf), "--out", str(hf), "--mlp", "0.5", "--overwrite", "--quiet"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["prune", str(hf), "--out", str(hf / "masks"), "--mlp", "0.5", "--quiet"]) == 2
    assert "lies inside the input" in capsys.readouterr().err

    monkeypatch.setattr(sweep_run, "_import_ray", lambda: object())  # Ray is never started: the guard is first
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"model: {hf}\ngrid:\n  mlp: [0.25, 0.5]\n")
    assert main(["sweep", str(sweep), "--out", str(hf)]) == 2
    assert "is the input" in capsys.readouterr().err

    assert _compile(hf, "--export-cache-dir", hf / "cache", "--out", tmp_path / "out") == 2
    assert "--export-cache-dir" in capsys.readouterr().err
    assert sha256_file(hf) == before and not (hf / "masks").exists() and not (hf / "cache").exists()


def test_profile_without_seq_runs(tmp_path, capsys):
    model = mlp(tmp_path / "m.onnx")
    assert main(["profile", str(model), "--budget", "0.2", "--json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["kind"] == "latency"]
    assert row["batch"] == 1 and row["runs"] >= 5


def test_inspect_of_a_model_folder_says_what_it_takes(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert main(["inspect", str(hf)]) == 2
    err = capsys.readouterr().err
    assert "is a model folder, not an ONNX file" in err and "prune2deploy compile" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sample", "--top-k", "-3"], "--top-k must be"),
        (["--sample", "--top-p", "7"], "--top-p is a probability"),
        (["--sample", "--temperature", "-1"], "--temperature must be above 0"),
        (["--temperature", "0.5"], "only when sampling"),
        (["--threads", "-4"], "--threads must be"),
        (["--max-new-tokens", "-2"], "--max-new-tokens must be"),
    ],
)
def test_generate_options_out_of_range_are_exit_2(tmp_path, args, expected, capsys):
    assert main(["generate", str(tmp_path), "hi", *args]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("text", ['{"model": ', "[1]", '{"model": {"decoder": 3}}'])
def test_malformed_genai_config_is_exit_2(tmp_path, text, capsys):
    (tmp_path / "genai_config.json").write_text(text)
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "genai_config.json" in capsys.readouterr().err


def test_atomic_writes_name_the_file_on_a_full_disk(tmp_path, monkeypatch):
    import errno

    import prune2deploy.io as io_module

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left") as error:
        io_module.atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert error.value.filename == str(tmp_path / "report.json") and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def genai_out(tmp_path_factory):
    """A compiled tiny Llama with genai/ (character tokenizer with a chat template)."""
    pytest.importorskip("onnxruntime_genai")
    from tests.outputs.test_generate_text import _char_tokenizer, _llama

    tmp = tmp_path_factory.mktemp("genai")
    module, tokenizer = _llama(), _char_tokenizer()
    module.generation_config.eos_token_id = None
    module.save_pretrained(str(tmp / "hf"))
    tokenizer.save_pretrained(str(tmp / "hf"))
    assert _compile(tmp / "hf", "--out", tmp / "out") == 0
    return tmp / "out"


def test_generate_chat_and_prompts_that_do_not_fit(genai_out, capsys):
    result = api.generate(genai_out, "hi", chat=True, max_new_tokens=4)
    assert result.prompt_tokens == 3  # "<s>" + "h" + "i" from the template
    assert main(["generate", str(genai_out), "hi", "--chat", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == 3
    for args, expected in (
        (["a" * 300], "model's context of 128 tokens"),
        (["hi", "--max-new-tokens", "100000"], "at most 126 here"),
        ([""], "the prompt is empty"),
    ):
        assert main(["generate", str(genai_out), *args]) == 2, args
        assert expected in capsys.readouterr().err


def test_no_telemetry_is_written_under_home(genai_out, tmp_path):
    """onnxruntime and onnxruntime-genai write ~/.cache/Microsoft/DeveloperTools/ on import unless told not to."""
    model = mlp(tmp_path / "m.onnx")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"} | {"HOME": str(tmp_path / "home")}
    code = (
        "from prune2deploy.cli import main; "
        f"assert main(['verify', {str(model)!r}, '--reference', {str(model)!r}]) == 0; "
        f"assert main(['generate', {str(genai_out)!r}, 'hi', '--max-new-tokens', '2']) == 0"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    assert not (tmp_path / "home" / ".cache" / "Microsoft").exists()


# -- limits on sizes and numbers (issue 29 B: prune2deploy/limits.py) ------------------------------------------------


def _external(path: Path, *, offset: int = 0, length: int = 512) -> Path:
    """``path``'s first initializer moved to ``w1.bin`` beside it (external data)."""
    proto = onnx.load(str(path))
    tensor = proto.graph.initializer[0]
    (path.parent / "w1.bin").write_bytes(tensor.raw_data or numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w1.bin"), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def test_fifo_external_data_and_offsets_beyond_the_file_are_exit_2(tmp_path, capsys):
    """A FIFO as external data hung `compile` forever (the checker opened it and waited for a writer)."""
    model = _external(mlp(tmp_path / "m.onnx"))
    (tmp_path / "w1.bin").unlink()
    os.mkfifo(tmp_path / "w1.bin")
    code = f"from prune2deploy.cli import main; raise SystemExit(main(['inspect', {str(model)!r}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is a FIFO (named pipe), not a regular file" in done.stderr
    (tmp_path / "w1.bin").unlink()
    model = _external(mlp(tmp_path / "m.onnx"), offset=256)
    assert main(["inspect", str(model)]) == 2
    err = capsys.readouterr().err
    assert "tensor 'w1' has external data at bytes 256..768 of w1.bin, which holds 512 bytes" in err


def test_sizes_and_numbers_beyond_the_limits_are_exit_2(tmp_path, capsys):
    """Numbers a user hands in are checked before work starts, with the value and the limit in the message."""
    from prune2deploy.limits import EXPORT_BATCH, max_threads

    model = mlp(tmp_path / "m.onnx")
    config = tmp_path / "c.yaml"
    for text, expected in (("threads: 100000", "threads"), ("export_batch: 100000", "export_batch")):
        config.write_text(text)
        assert _compile(model, "--out", tmp_path / "out", "--config", config) == 2, text
        assert expected in capsys.readouterr().err
    assert _compile(model, "--out", tmp_path / "out", "--threads", "100000") == 2
    assert f"less than or equal to {max_threads()}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as argparse_exit:  # argparse's own exit, code 2
        main(["profile", str(model), "--threads", "100000"])
    assert argparse_exit.value.code == 2 and f"must be at most {max_threads()}" in capsys.readouterr().err
    with pytest.raises(BadInputError, match=f"threads must be a whole number from 1 to {max_threads()}"):
        api.profile(model, threads=100000)  # the Python API too
    assert main(["generate", str(tmp_path), "hi", "--threads", "100000"]) == 2
    assert "--threads must be a whole number from 1 to" in capsys.readouterr().err
    assert EXPORT_BATCH < 100000


def test_feeds_whose_header_claims_gigabytes_are_exit_2_before_loading(tmp_path, capsys):
    import zipfile

    from numpy.lib import format as npy

    model = mlp(tmp_path / "m.onnx")
    header = tmp_path / "x.npy"
    with open(header, "wb") as handle:
        npy.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28, 8)})
    with zipfile.ZipFile(tmp_path / "feeds.npz", "w") as archive:
        archive.writestr("x.npy", header.read_bytes() + bytes(64))
    assert _compile(model, "--out", tmp_path / "out", "--feeds", tmp_path / "feeds.npz") == 2
    err = capsys.readouterr().err
    assert "feeds.npz: the feeds declare 8589934592 bytes (largest: 'x.npy'" in err and "at most" in err
    assert main(["verify", str(model), "--reference", str(model), "--feeds", str(tmp_path / "feeds.npz")]) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2]", "an HF config is a JSON object, not a list"),  # was exit 3 (AttributeError)
        ('{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1e12}', "'num_hidden_layers' is 1000000000000"),
    ],
)
def test_hf_config_that_is_not_a_model_is_exit_2(tmp_path, text, expected, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    (folder / "model.safetensors").write_bytes(b"")
    assert _compile(folder, "--out", tmp_path / "out") == 2
    assert f"config.json: {expected}" in capsys.readouterr().err


def test_state_dict_pickle_says_how_to_convert_to_safetensors(tmp_path, capsys):
    import torch

    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2)}, folder / "pytorch_model.bin")
    assert _compile(folder / "pytorch_model.bin", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "save_pretrained(" in err and "safe_serialization=True" in err and "never unpickles" in err
    assert "weights_only=False" not in err
