"""Scale: external data end to end, block-by-block verification, half-precision checkpoints, the export cache.

Tiny models with the external-data threshold forced to 0 stand in for big ones: every path a 5 GB model
takes (weights in a side file, ONNX Runtime given paths, outputs self-contained) is taken here too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from prune2deploy import api
from prune2deploy.errors import P2DError
from prune2deploy.feeds import random_feeds
from prune2deploy.frontends.onnx import save_onnx
from prune2deploy.graph.scopes import module_of
from prune2deploy.ort_session import make_session
from prune2deploy.spec import CompileOptions
from prune2deploy.verify import verify_blockwise, verify_models
from tests.fixtures.models import tiny_llama
from tests.fixtures.results import pass_record
from tests.fixtures.zeroing import llama_mlp_masks, save_masks

FAST = {"profile": False, "external_data_threshold": 0}


def _locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    found = set()
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        if "location" in entries:
            found.add(entries["location"])
    return found


def _run(path: Path, feeds: dict) -> np.ndarray:
    session = make_session(Path(path))
    return session.run(None, feeds)[0]


def test_external_data_from_the_exporter_end_to_end(tmp_path, monkeypatch, rng):
    """An exporter-written model with external data in a nested folder, compiled from another cwd; the output
    is self-contained: it runs after the folder is moved and the input deleted."""
    module = tiny_llama()
    masks, kept = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    source = tmp_path / "in" / "nested" / "llama"
    source.mkdir(parents=True)
    ids = torch.randint(0, 128, (2, 8))
    module.config.use_cache = False
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (),
            kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            dynamo=True,
            opset_version=18,
        )
    program.save(str(source / "model.onnx"), external_data=True)
    assert _locations(source / "model.onnx") == {"model.onnx.data"}
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rel_in = Path("..") / "in" / "nested" / "llama" / "model.onnx"  # relative, from another cwd
    result = api.compile(rel_in, tmp_path / "out", CompileOptions(masks=tmp_path / "masks.safetensors", **FAST))
    assert result.passed and result.report["verification"]["mode"] in ("whole", "blockwise")
    assert pass_record(result.report, "remove-channels")["channels_removed"] == sum(96 - k for k in kept.values())
    out = tmp_path / "out"
    assert _locations(out / "model.onnx") == {"model.onnx.data"}
    assert _locations(out / "reference.onnx") == {"reference.onnx.data"}
    probe = ir.load(str(out / "reference.onnx"))
    feeds = random_feeds(probe, batch=2, seq=5, seed=3)
    before = _run(out / "model.onnx", feeds), _run(out / "reference.onnx", feeds)
    np.testing.assert_allclose(before[0], before[1], rtol=1e-4, atol=1e-4)
    shutil.rmtree(tmp_path / "in")
    moved = tmp_path / "moved" / "deeper"
    moved.parent.mkdir()
    (out).rename(moved)
    after = _run(moved / "model.onnx", feeds), _run(moved / "reference.onnx", feeds)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_blockwise_verification_agrees_with_whole_models(tmp_path, rng):
    module = tiny_llama()
    masks, _ = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    # portable: block boundaries are plain values only in the unfused graph (a fused SkipRMSNorm computes them)
    options = CompileOptions(masks=tmp_path / "masks.safetensors", verify_mode="blockwise", portable=True, **FAST)
    result = api.compile(module, tmp_path / "out", options)
    check = result.report["verification"]
    assert check["mode"] == "blockwise" and check["passed"]
    assert [b["block"] for b in check["blocks"]] == [0, 1, 2]  # 2 decoder layers + the head
    assert all(b["max_rel"] < 1e-5 for b in check["blocks"])
    reference = ir.load(str(tmp_path / "out" / "reference.onnx"))
    compiled = ir.load(str(tmp_path / "out" / "model.onnx"))
    whole = verify_models(
        tmp_path / "out" / "reference.onnx", tmp_path / "out" / "model.onnx", exact=True, probe=reference
    )
    blocks = verify_blockwise(reference, compiled, exact=True)
    assert whole.passed and blocks.passed
    assert abs(whole.worst - blocks.worst) < 1e-5
    assert abs(whole.outputs["logits"]["max_abs"] - blocks.outputs["logits"]["max_abs"]) < 1e-4

    # a compiled model broken in its second layer: both modes fail, and blockwise names the block
    broken = ir.load(str(tmp_path / "out" / "model.onnx"))
    down = next(
        n.inputs[1] for n in broken.graph if n.op_type == "MatMul" and module_of(n) == "model.layers.1.mlp.down_proj"
    )
    down.const_value = ir.tensor(down.const_value.numpy() * 1.01, name=down.name)
    save_onnx(broken, tmp_path / "broken.onnx")  # its own data file (ir.save would point at model.onnx.data)
    assert not verify_models(
        tmp_path / "out" / "reference.onnx", tmp_path / "broken.onnx", exact=True, probe=reference
    ).passed
    failed = verify_blockwise(reference, broken, exact=True)
    assert not failed.passed
    assert [b["max_rel"] > 1e-4 for b in failed.blocks] == [False, True, False]


def test_bf16_checkpoint_compiles_to_bf16_and_export_is_cached(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("P2D_CACHE_DIR", str(tmp_path / "cache"))
    module = tiny_llama().to(torch.bfloat16)
    module.save_pretrained(tmp_path / "hf")
    masks_a, kept_a = llama_mlp_masks(module, 0.5, rng)
    masks_b, kept_b = llama_mlp_masks(module, 0.25, rng)
    save_masks(masks_a, tmp_path / "a.safetensors")
    save_masks(masks_b, tmp_path / "b.safetensors")
    lines: list[str] = []
    first = api.compile(tmp_path / "hf", tmp_path / "out_a", CompileOptions(masks=tmp_path / "a.safetensors", **FAST))
    second = api.compile(
        tmp_path / "hf",
        tmp_path / "out_b",
        CompileOptions(masks=tmp_path / "b.safetensors", **FAST),
        progress=lines.append,
    )
    assert any("using the cached export" in line for line in lines)
    # saves say what they wrote and how long it took (the CLI stamps every line with the elapsed time)
    assert any(line.startswith("wrote reference.onnx (") and line.endswith(" s)") for line in lines)
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1
    for result, kept, out in ((first, kept_a, "out_a"), (second, kept_b, "out_b")):
        assert result.report["input"]["dtype"] == "bfloat16"
        check = result.report["verification"]
        assert check["exact"] and check["passed"] and check["outputs"]["logits"]["max_rel"] < 1e-4
        assert pass_record(result.report, "remove-channels")["channels_removed"] == sum(96 - k for k in kept.values())
        model = ir.load(str(tmp_path / out / "model.onnx"))
        # the weights (K > 1): the fused rotary's cos/sin cache is an fp32 [positions, 1] x [1, dim/2] MatMul
        matmul_weights = [
            n.inputs[1].const_value.dtype
            for n in model.graph
            if n.op_type == "MatMul" and n.inputs[1].const_value and n.inputs[1].const_value.shape[0] > 1
        ]
        assert matmul_weights and set(matmul_weights) == {ir.DataType.BFLOAT16}


@pytest.mark.parametrize("threshold", [0, 1 << 30])
def test_save_is_self_contained_for_external_inputs(tmp_path, threshold):
    """A model whose weights live in another folder's data file is saved with its own copy of them."""
    from prune2deploy.frontends.onnx import load_onnx, save_onnx

    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.arange(16, dtype=np.float32).reshape(4, 4), name="w"))
    w.shape, w.type = ir.Shape([4, 4]), ir.TensorType(ir.DataType.FLOAT)
    node = ir.node("MatMul", [x, w], num_outputs=1)
    node.outputs[0].name = "y"
    node.outputs[0].shape, node.outputs[0].type = ir.Shape([2, 4]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18}, name="g")
    (tmp_path / "a").mkdir()
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "a" / "m.onnx", external_data="w.bin", size_threshold_bytes=0)
    loaded = load_onnx(tmp_path / "a" / "m.onnx")
    save_onnx(loaded, tmp_path / "b" / "m.onnx", external_threshold=threshold)
    shutil.rmtree(tmp_path / "a")
    assert _locations(tmp_path / "b" / "m.onnx") <= {"m.onnx.data"}
    out = _run(tmp_path / "b" / "m.onnx", {"x": np.ones((2, 4), np.float32)})
    np.testing.assert_array_equal(out, np.ones((2, 4), np.float32) @ np.arange(16, dtype=np.float32).reshape(4, 4))


def _weights_model(weights: dict[str, np.ndarray]) -> ir.Model:
    """Adds of one input and each weight (the weights' own shapes), outputs named after the weights."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    values, nodes = [], []
    for name, array in weights.items():
        w = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        w.shape, w.type = ir.Shape(array.shape), ir.TensorType(w.const_value.dtype)
        node = ir.node("Add", [x, w], num_outputs=1)
        node.outputs[0].name = f"y_{name}"
        node.outputs[0].type = ir.TensorType(w.const_value.dtype)  # typed outputs: ONNX's checker requires them
        values.append(w)
        nodes.append(node)
    outputs = [n.outputs[0] for n in nodes]
    graph = ir.Graph([x], outputs, nodes=nodes, initializers=values, opset_imports={"": 18}, name="weights")
    return ir.Model(graph, ir_version=10)


def test_strided_weights_are_written_as_their_values(tmp_path):
    """The exporter leaves transposed MatMul weights as numpy views; they are written contiguous (by torch,
    through an integer view of their bits) and the in-memory model is left as it was."""
    import ml_dtypes

    from prune2deploy.frontends.onnx import save_onnx

    base = np.random.default_rng(0).normal(size=(48, 40))
    weights = {
        "bf16_t": base.astype(ml_dtypes.bfloat16).T,
        "fp32_t": base.astype(np.float32).T,
        "fp16_step": base.astype(np.float16)[::2, ::3],
        "fp32_reversed": base.astype(np.float32)[::-1],  # negative strides: numpy's copy
    }
    model = _weights_model(weights)
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    save_onnx(model, tmp_path / "m.onnx", external_threshold=0)
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == before
    loaded = ir.load(tmp_path / "m.onnx")
    for name, array in weights.items():
        got = loaded.graph.initializers[name].const_value.numpy()
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(array).view(np.uint8))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_nonfinite_weights_are_counted_from_their_bits_in_strided_views(dtype):
    import ml_dtypes

    from prune2deploy.driver.source import check_finite_weights
    from prune2deploy.errors import BadInputError

    kind = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    array = np.random.default_rng(1).normal(size=(64, 24)).astype(kind)
    check_finite_weights(_weights_model({"w": array.T, "big": np.full((3, 2), 6.5e4, dtype=kind)}), "m.onnx")
    array[5, 7], array[63, 0], array[0, 23] = np.nan, np.inf, -np.inf
    with pytest.raises(BadInputError, match=r"'w' \(3 of 1536\)"):
        check_finite_weights(_weights_model({"w": array.T}), "m.onnx")


def test_release_keeps_a_mapping_that_an_array_still_views(tmp_path):
    # A fusion can make a new tensor as a view of a mapped weight (seen at 1B): unmapping must leave it alone.
    import numpy as np
    import onnx_ir as ir

    from prune2deploy.driver.verification import release_mapped as _release
    from prune2deploy.frontends.onnx import load_onnx, save_onnx

    x = ir.Value(name="x", shape=ir.Shape([4096]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape([4096]), type=ir.TensorType(ir.DataType.FLOAT))
    w.const_value = ir.tensor(np.arange(4096, dtype=np.float32), name="w")  # large enough to go to .data
    node = ir.node("Add", [x, w])
    node.outputs[0].shape, node.outputs[0].type = ir.Shape([4096]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18}, name="g")
    save_onnx(ir.Model(graph, ir_version=10), tmp_path / "m.onnx", external_threshold=0)
    model = load_onnx(tmp_path / "m.onnx")
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    view = model.graph.initializers["w"].const_value.numpy()[::-1]
    _release(model)  # no BufferError
    np.testing.assert_array_equal(view[:3], [4095, 4094, 4093])


def test_large_checkpoint_exports_in_a_child_process(tmp_path, rng, monkeypatch):
    """Above the keep-module size the export runs in a spawned process and is read back from the cache: the
    same verified compile (masks applied to the ONNX weights), and the child's errors reach the caller."""
    from prune2deploy.driver import source

    monkeypatch.setenv("P2D_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(source, "KEEP_MODULE_MAX_BYTES", 0)
    module = tiny_llama()
    module.save_pretrained(tmp_path / "hf")
    masks, kept = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "m.safetensors")
    lines: list[str] = []
    options = CompileOptions(masks=tmp_path / "m.safetensors", **FAST)
    result = api.compile(tmp_path / "hf", tmp_path / "out", options, progress=lines.append)
    assert any("in a child process" in line for line in lines)
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1
    check = result.report["verification"]
    assert check["exact"] and check["passed"]
    assert pass_record(result.report, "remove-channels")["channels_removed"] == sum(96 - k for k in kept.values())

    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not a checkpoint")
    # a broken weights file is bad input, found before a child process starts (or inside it, as it was)
    with pytest.raises(P2DError, match=r"could not load the model|not a readable safetensors file"):
        api.compile(tmp_path / "hf", tmp_path / "out2", CompileOptions(**FAST))


def test_an_export_process_that_dies_is_an_internal_error_that_says_so(tmp_path, monkeypatch):
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    from prune2deploy.driver import source

    class KilledPool:  # what a pool reports when the kernel stops its process
        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def submit(self, *_):
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", KilledPool)
    with pytest.raises(RuntimeError, match="stopping it for memory") as caught:
        source._export_in_child(tmp_path / "hf", "float32", 1, 8, tmp_path / "cache")
    assert not isinstance(caught.value, P2DError)  # exit code 3, not a user error
