"""The compile driver: every engine that runs here is verified against the masked reference."""

from __future__ import annotations

import json

from prune2deploy import api
from prune2deploy.spec import CompileOptions
from tests.fixtures.models import tiny_llama
from tests.fixtures.zeroing import llama_mlp_masks, save_masks


def test_torch_engine_is_verified_against_the_reference(tmp_path, rng):
    module = tiny_llama()
    masks, _ = llama_mlp_masks(module, 0.5, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    options = CompileOptions(
        masks=tmp_path / "masks.safetensors", engine="torch", engine_options={"device": "cpu"}, profile=False
    )
    result = api.compile(module, tmp_path / "out", options)
    engine = result.report["engine"]
    assert engine["engine"] == "torch" and engine["info"]["device"] == "cpu"
    check = engine["verification"]
    assert check["exact"] and check["passed"] and check["worst"] < 1e-4
    assert set(check["outputs"]) == {"logits"} and len(check["feeds"]) == 2
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["engine"]["verification"]["passed"]


def test_half_precision_engine_is_reported_as_approximate(tmp_path):
    options = CompileOptions(engine="torch", engine_options={"device": "cpu"}, precision="fp16", profile=False)
    result = api.compile(tiny_llama(), tmp_path / "out", options)
    check = result.report["engine"]["verification"]
    assert not check["exact"] and check["passed"]  # approximate: its error is reported, not held to 1e-4
    assert 0 < check["worst"] < 5e-2
    assert result.report["engine"]["info"]["precision"]["source"] == "converted by convert-precision"
