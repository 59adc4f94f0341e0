"""Checkpoints as third-party pruning tools save them (tests/fixtures/producers.py), compiled as they are.

Each layout is written by hand in the producer's documented format (tool and version in the fixture's
docstring); compiling it must exit 0 with verification passed: 2:4 formats found already 2:4 (checked, not
imposed), channel masks with the channels removed.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from prune2deploy import api
from prune2deploy.errors import BadInputError, UnsupportedModelError, VerificationError
from prune2deploy.frontends import hf
from prune2deploy.spec import CompileOptions, with_passes
from tests.fixtures import producers as P
from tests.fixtures.models import tiny_llama

FAST = {"profile": False, "genai": False, "quality_windows": 0, "export_cache": False}


def _compile(folder: Path, out: Path, *, sparse: bool = False, **options) -> dict:
    data = {**FAST, **options}
    api.compile(folder, out, CompileOptions(**(with_passes(data, ["sparsify-2:4"]) if sparse else data)))
    return json.loads((out / "report.json").read_text())


def _pass(report: dict, prefix: str) -> dict:
    return next(p for p in report["passes"] if p["pass"].startswith(prefix))


def _params(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.named_parameters()}


@pytest.fixture(scope="module")
def llama24():
    return P.impose_24(tiny_llama(0))


def test_compressed_tensors_sparse24_is_decoded_exactly_and_checked_not_imposed(llama24, tmp_path):
    folder = P.save_llama(llama24, tmp_path / "ct24")
    compressed = P.write_compressed_tensors(folder, "sparse-24-bitmask")
    assert len(compressed) == 14
    loaded = hf.load_hf_model(folder)
    expected = _params(llama24)
    for name, value in _params(loaded.module).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert not hasattr(loaded.module.config, "quantization_config")  # hf/ is written as a plain checkpoint

    report = _compile(folder, tmp_path / "out", sparse=True)
    assert report["verification"]["status"] == "passed"
    assert report["input"]["format"] == "compressed-tensors sparse-24-bitmask (2:4), version 0.9.1"
    record = _pass(report, "sparsify")["record"]
    assert (record["mode"], record["mode_asked"]) == ("check", "auto")
    assert "already 2:4" in record["mode_reason"]
    assert record["already_nm"] == 14 and record["made_nm"] == 0


def test_compressed_tensors_old_names_keep_weight_in_the_prefix(llama24, tmp_path):
    """Releases before 0.9 stored ``P.weight.compressed`` (the weight's name as prefix)."""
    folder = P.save_llama(llama24, tmp_path / "old")
    P.write_compressed_tensors(folder, "sparse-24-bitmask", old_names=True, version="0.8.1")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert "model.layers.0.mlp.up_proj.weight.bitmask" in handle.keys()  # noqa: SIM118
    expected = _params(llama24)
    for name, value in _params(hf.load_hf_model(folder).module).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_compressed_tensors_sparse_bitmask_with_zero_neurons_removes_them(tmp_path):
    module = tiny_llama(1)
    masks = P.channel_masks(module, keep=40)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(torch.from_numpy(mask).float())
    folder = P.save_llama(module, tmp_path / "bitmask")
    P.write_compressed_tensors(folder, "sparse-bitmask")
    with open(folder / "config.json") as handle:
        assert json.load(handle)["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
    expected = _params(module)
    for name, value in _params(hf.load_hf_model(folder).module).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    report = _compile(folder, tmp_path / "out")
    assert report["verification"]["status"] == "passed"
    assert _pass(report, "remove-channels")["modified"]
    assert report["model"]["compiled"]["params"] < report["model"]["reference"]["params"]


def test_quantized_compressed_tensors_is_refused_with_its_scheme(llama24, tmp_path):
    folder = P.save_llama(llama24, tmp_path / "fp8")
    groups = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    }
    P.write_compressed_tensors(folder, "sparse-24-bitmask", config_groups=groups)
    with pytest.raises(UnsupportedModelError) as caught:
        hf.load_hf_model(folder)
    message = str(caught.value)
    assert "W8A8 (float, channel)" in message and "'float-quantized'" in message
    assert "activation quantization" in message and caught.value.exit_code == 2


def test_torch_prune_attached_masks_are_read_as_masks(tmp_path):
    module = tiny_llama(2)
    masks = P.channel_masks(module, keep=32)
    dense = _params(module)
    folder = P.save_llama(module, tmp_path / "tp")
    P.write_torch_prune_attached(folder, masks, dense=dense)
    # The dense model is weight_orig (for the report's "vs dense"); the masks are the attached ones.
    for name, value in _params(hf.load_hf_model(folder).module).items():
        np.testing.assert_array_equal(value, dense[name], err_msg=name)
    attached = hf.attached_masks(folder)
    assert sorted(attached) == sorted(masks)
    assert all(np.array_equal(attached[k], masks[k]) for k in masks)

    report = _compile(folder, tmp_path / "out")
    assert report["verification"]["status"] == "passed"
    assert report["input"]["masks_applied"] == 6
    assert "torch.nn.utils.prune" in report["input"]["format"]
    assert _pass(report, "remove-channels")["modified"]
    assert report["model"]["compiled"]["params"] < report["model"]["reference"]["params"]


def test_modelopt_attached_masks_are_read_as_masks_and_checked_2_4(tmp_path):
    module = tiny_llama(3)
    masks = P.two_four_masks(module)
    dense = _params(module)
    folder = P.save_llama(module, tmp_path / "mo")
    P.write_modelopt_attached(folder, masks, dense=dense)
    report = _compile(folder, tmp_path / "out", sparse=True)
    assert report["verification"]["status"] == "passed"
    assert report["input"]["masks_applied"] == 14
    assert "ModelOpt" in report["input"]["format"]
    record = _pass(report, "sparsify")["record"]
    assert (record["mode"], record["already_nm"], record["made_nm"]) == ("check", 14, 0)


def test_unknown_extra_tensors_are_still_refused_by_name(tmp_path):
    module = tiny_llama(4)
    dense = _params(module)
    folder = P.save_llama(module, tmp_path / "extra")
    masks = P.two_four_masks(module)
    P.write_modelopt_attached(folder, masks, dense=dense)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = np.ones(1, dtype=np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(BadInputError, match=r"read as ModelOpt.*model\.layers\.0\.mlp\.up_proj\.weight_scale"):
        hf.load_hf_model(folder)


def test_nearly_2_4_checkpoint_fails_the_check_naming_the_weight_unless_imposed(llama24, tmp_path):
    module = tiny_llama(0)
    module.load_state_dict(llama24.state_dict())
    with torch.no_grad():
        weight = module.model.layers[1].mlp.down_proj.weight
        weight[0, :4] = torch.tensor([0.5, 0.25, -0.5, 0.125])  # one group of four with four non-zeros
    folder = P.save_llama(module, tmp_path / "nearly")
    with pytest.raises(
        VerificationError, match=r"1 of 14 checked weights are not 2:4: model\.layers\.1\.mlp\.down_proj"
    ):
        _compile(folder, tmp_path / "out", sparse=True)
    assert not (tmp_path / "out").exists()

    report = _compile(folder, tmp_path / "imposed", sparse=True, sparsity="impose")
    record = _pass(report, "sparsify")["record"]
    assert (record["mode"], record["made_nm"], record["already_nm"]) == ("impose", 1, 13)
    assert report["verification"]["status"] == "approximate"


def test_dense_checkpoint_gets_2_4_imposed_by_auto(tmp_path):
    folder = P.save_llama(tiny_llama(5), tmp_path / "dense")
    record = _pass(_compile(folder, tmp_path / "out", sparse=True), "sparsify")["record"]
    assert (record["mode"], record["made_nm"]) == ("impose", 14)
    assert record["mode_reason"].startswith("auto: no weight was already 2:4")


class _Boom:
    """Unpickling this creates a file: proof that a compile never unpickles."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_pickles_are_refused_without_being_unpickled(tmp_path, suffix):
    model_file = tmp_path / f"pruned{suffix}"
    torch.save({"model": tiny_llama(6), "payload": _Boom(str(tmp_path / "ran"))}, model_file)
    with pytest.raises(BadInputError) as caught:
        api.compile(model_file, tmp_path / "out", CompileOptions(**FAST))
    message = str(caught.value)
    assert "never unpickles" in message and "api.compile" in message
    assert "LlamaForCausalLM" in message  # named from the opcodes, not by importing
    assert not (tmp_path / "ran").exists()
    raw = tmp_path / f"raw{suffix}"
    raw.write_bytes(pickle.dumps(_Boom(str(tmp_path / "ran")), protocol=2))
    with pytest.raises(BadInputError, match="never unpickles"):
        api.compile(raw, tmp_path / "out", CompileOptions(**FAST))
    assert not (tmp_path / "ran").exists()


def test_symlink_out_of_the_model_folder_is_refused_before_reading(tmp_path, monkeypatch):
    folder = P.save_llama(tiny_llama(7), tmp_path / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "model.safetensors").rename(outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(Path("..") / "outside" / "model.safetensors")
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        if "outside" in str(file):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(BadInputError, match="a symlink that leaves the model folder"):
        api.compile(folder, tmp_path / "out", CompileOptions(**FAST))
    assert opened == []
    with pytest.raises(BadInputError, match="leaves the model folder"):
        hf.checkpoint_sha256(folder)


def test_checkpoint_hash_covers_only_the_loaders_files_and_allows_the_hub_cache(tmp_path):
    folder = P.save_llama(tiny_llama(8), tmp_path / "model")
    before = hf.checkpoint_sha256(folder)
    (folder / "notes.txt").write_text("not read by the loader")
    (folder / ".git").mkdir()
    (folder / ".git" / "big.pack").write_bytes(b"x" * 1000)
    assert hf.checkpoint_sha256(folder) == before
    assert [p.name for p in hf.checkpoint_files(folder)] == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]

    # the hub cache: <repo>/snapshots/<rev>/file -> ../../blobs/<sha>
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in hf.checkpoint_files(folder):
        (repo / "blobs" / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / file.name)
    assert hf.checkpoint_sha256(snapshot) == before
    assert hf.load_hf_model(snapshot).module.config.num_hidden_layers == 2
