"""Issue 14's family matrix: tiny transformers (2 layers, hidden 64), MLP channels and one head per layer
zeroed, compiled by the default pipeline, exact (1e-4) and smaller with the head really gone — or, where
head removal is not supported yet, refused with the exact reason (MLP channels still go, exactly).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.analysis.attention import analyze_attention
from prune2deploy.analysis.channels import analyze_channels
from prune2deploy.feeds import random_feeds
from prune2deploy.graph.initializers import replace_const
from prune2deploy.pipeline import build_passes, run_pipeline
from prune2deploy.spec import CompileOptions
from tests import families
from tests.fixtures.zeroing import zero_heads

#: family -> None (one head per layer removed exactly) or the reason remove-heads refuses with.
EXPECTED = {
    "llama": None,
    "qwen2": None,
    "qwen3": None,  # per-head q/k RMSNorm over head_dim: the head axis passes through the reduction
    "gpt2": None,
    "bert": None,
    "roberta": None,
    "distilbert": None,
    "vit": None,
    "phi": None,  # partial rotary: Slice/Concat of head_dim keep the head axis; the view after p·v is identity
    "gptneox": None,  # fused QKV interleaved per head ([heads, 3·head_dim] then Split), partial rotary
    "falcon": None,  # fused multi-query QKV ([heads + 2, head_dim], Slice / GatherND of the head axis)
    "opt": None,  # q scaled by a constant between the projection and the head split
    "mpt": None,  # ALiBi: a per-head bias sliced to the sequence length, gathered with the kept heads
    "olmo2": "normalises over all 64 channels of every head between the projection and the head split",
    # q/k/v are found (Gather off the fused [heads, 3, head_dim]); the batch×heads fold with ALiBi is not
    "bloom": "(Reshape): folds the head axis into the batch axis with a target other than the exporter's",
}


def _zero_mlp_channels(model, rng) -> int:
    """Zeroes a quarter of each channel group's channels on its reading side (the contractions' weight
    rows); attention groups (head_dim-sized, read by the head passes) are left alone, and so are groups that a
    LayerNorm averages over (the residual stream): zero reading rows alone do not make those removable.
    Returns the count."""
    analysis = analyze_channels(model)
    total = 0
    for group in analysis.groups:
        if not group.prunable or group.norms or group.width < 32:
            continue
        if not all(c.rhs.is_const for c in group.contractions):
            continue
        atoms = rng.choice(len(group.atoms), len(group.atoms) // 4, replace=False)
        for contraction in group.contractions:
            ci = next(i for i, cls in enumerate(group.classes) if contraction.lhs in cls)
            index = [i for a in atoms for c, i in group.atoms[a] if c == ci]
            array = contraction.rhs.value.const_value.numpy().copy()
            np.moveaxis(array, contraction.rhs.axis, 0)[index] = 0
            replace_const(contraction.rhs.value, array)
        total += len(atoms)
    return total


def _feeds(model, name: str) -> dict[str, np.ndarray]:
    return random_feeds(model, batch=2, seq=7, seed=0)


@pytest.mark.parametrize("name", families.FAMILIES)
def test_family_heads_and_mlp_channels(name):
    rng = np.random.default_rng(0)
    model = families.fresh(name)
    blocks = analyze_attention(model).blocks
    supported = [b for b in blocks if b.supported]
    if EXPECTED[name] is None:
        assert len(supported) == len(blocks) == 2
        zero_heads(model, {b.name: [1] for b in supported})
    else:
        assert not supported and all(any(EXPECTED[name] in r for r in b.reasons) for b in blocks)
    zeroed = _zero_mlp_channels(model, rng)
    assert zeroed > 0
    reference = ir.to_proto(model).SerializeToString()
    result = run_pipeline(model, build_passes(CompileOptions(profile=False, portable=True)))
    records = {r.name: r for r in result.passes}
    assert records["remove-channels"].record["channels_removed"] >= zeroed
    heads = records["remove-heads"]
    if EXPECTED[name] is None:
        assert heads.record["heads_removed"] == 2
        after = analyze_attention(model).blocks
        assert [b.num_heads for b in after] == [b.num_heads - 1 for b in blocks]
    else:
        assert heads.record["heads_removed"] == 0
        assert any(EXPECTED[name] in reason for reason in heads.refused.values())
    assert result.exact
    feeds = _feeds(model, name)
    expected, actual = families.run(reference, feeds), families.run(model, feeds)
    for key, value in expected.items():
        scale = max(1.0, float(np.abs(value).max()))
        assert actual[key].shape == value.shape
        assert float(np.abs(actual[key] - value).max()) <= 1e-4 * scale, key
