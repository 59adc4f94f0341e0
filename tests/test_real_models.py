"""The two bundled real models: MiniLM-L6 (BERT encoder) and SmolLM2-135M (Llama decoder, from GGUF).

Random MLP neurons are masked through a mask file keyed by torch parameter name; compile must remove
exactly those and match the masked model. MiniLM is compiled by its bundled name (load, torch masks,
export); SmolLM2 from the session's export (tests/conftest.py), so that it is exported once per session.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy import api
from prune2deploy.frontends.hf import load_hf_model
from prune2deploy.spec import CompileOptions
from tests.fixtures.results import pass_record
from tests.fixtures.zeroing import save_masks

pytestmark = pytest.mark.slow


def _random_mlp_masks(module, fraction: float, rng: np.random.Generator) -> tuple[dict, list[int]]:
    from prune2deploy.demo import _mlp_layouts

    params = {name: p.detach().numpy() for name, p in module.named_parameters()}
    masks, kept = {}, []
    for producers, biases, reader in _mlp_layouts(module):
        width = params[reader].shape[1]
        keep = np.ones(width, dtype=np.float32)
        keep[rng.choice(width, int(fraction * width), replace=False)] = 0
        for name in producers:
            masks[name] = np.repeat(keep[:, None], params[name].shape[1], axis=1)
        for name in biases:
            masks[name] = keep.copy()
        masks[reader] = np.repeat(keep[None, :], params[reader].shape[0], axis=0)
        kept.append(int(keep.sum()))
    return masks, kept


@pytest.mark.parametrize(("name", "fraction"), [("minilm-l6", 0.4), ("smollm2-135m", 0.5)])
def test_real_model_mlp_channels(name, fraction, tmp_path, rng, request):
    if name == "smollm2-135m":  # the session's SmolLM2 and its export: the torch-named masks go onto the graph
        module, source = request.getfixturevalue("smollm2").module, request.getfixturevalue("smollm2_onnx")
    else:  # by bundled name: api.compile loads, masks in torch and exports
        module, source = load_hf_model(name).module, name
    masks, kept = _random_mlp_masks(module, fraction, rng)
    save_masks(masks, tmp_path / "masks.safetensors")
    del module
    result = api.compile(
        source,
        tmp_path / "out",
        CompileOptions(masks=tmp_path / "masks.safetensors", profile=False, keep_reference=False),
    )
    model = ir.load(str(tmp_path / "out" / "model.onnx"))
    from prune2deploy.graph.scopes import module_of

    def is_mlp_reader(node) -> bool:
        module = module_of(node)
        return module.endswith("mlp.down_proj") or (module.endswith(".output.dense") and "attention" not in module)

    reading = sorted(
        n.inputs[1].shape[0]
        for n in model.graph
        if n.op_type == "MatMul" and n.inputs[1].const_value is not None and is_mlp_reader(n)
    )
    assert reading == sorted(kept)  # every MLP's reader now has exactly the kept rows
    record = pass_record(result.report, "remove-channels")
    assert record["groups_changed"] == len(kept)
    width = {"minilm-l6": 1536, "smollm2-135m": 1536}[name]
    assert record["channels_removed"] == sum(width - k for k in kept)
    assert result.report["verification"]["passed"]
    assert all(o["max_rel"] < 1e-4 for o in result.report["verification"]["outputs"].values())
    ref, new = result.report["model"]["reference"], result.report["model"]["compiled"]
    assert new["params"] < ref["params"] and new["flops"] < ref["flops"]
