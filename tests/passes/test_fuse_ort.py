"""fuse-ort: onnxscript's ORT fusions on an exported Llama agree with the unfused graph to the exact
tolerance; a head size ORT's CPU attention does not take keeps the graph unfused and says why; the pass is
the ONNX Runtime engine's default in fp32 and refused where its kernels cannot run."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.errors import ConfigError
from prune2deploy.feeds import random_feeds
from prune2deploy.frontends.torch import export_module, hf_export_spec
from prune2deploy.ort_session import make_session
from prune2deploy.passes.fuse_ort import FuseOrtPass
from prune2deploy.spec import CompileOptions


def _llama(hidden: int, heads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=heads // 2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    module = LlamaForCausalLM(config).eval()
    return export_module(module, hf_export_spec("causal-lm", batch=2, seq=8, vocab_size=128))


def _run(model: ir.Model, feeds):
    session = make_session(ir.to_proto(model).SerializeToString())
    return session.run(["logits"], feeds)[0]


def _ops(model: ir.Model) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for node in model.graph:
        counts[(node.domain, node.op_type)] = counts.get((node.domain, node.op_type), 0) + 1
    return counts


def test_fusions_fire_and_match_the_unfused_graph():
    model = _llama(64, 4)  # head size 16
    feeds = random_feeds(model, batch=3, seq=11)
    want = _run(model, feeds)
    result = FuseOrtPass()(model)
    assert result.modified and not result.refused
    assert (
        result.record["fusions"]["rms_normalization"] == 5 and result.record["fusions"]["skip_rms_normalization"] == 4
    )
    ops = _ops(model)
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 4
    assert ops[("com.microsoft", "MultiHeadAttention")] == 2
    # the rotary is fused too (transformers 5's broadcast angles are rewritten into the form onnxscript's
    # cos/sin-cache rule reads), and no GroupQueryAttention, whose sequence lengths would ignore the mask
    assert ops[("com.microsoft", "RotaryEmbedding")] == 4 and result.record["fusions"]["cos_sin_cache"] == 4
    assert ("com.microsoft", "GroupQueryAttention") not in ops
    assert ("", "Softmax") not in ops and ("", "ReduceMean") not in ops and ("", "Neg") not in ops
    got = _run(model, feeds)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_fused_graph_follows_a_padded_attention_mask():
    model = _llama(64, 4)
    reference = ir.to_proto(model).SerializeToString()
    ids = np.random.default_rng(0).integers(0, 128, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    feeds = {"input_ids": ids, "attention_mask": mask}
    want = make_session(reference).run(["logits"], feeds)[0]
    assert FuseOrtPass()(model).modified
    got = _run(model, feeds)
    keep = mask.astype(bool)  # padded positions' logits are whatever the mask leaves; compare the real ones
    assert np.abs(got - want)[keep].max() <= 1e-4 * np.abs(want).max()


def test_head_size_not_multiple_of_8_stays_unfused():
    model = _llama(48, 4)  # head size 12
    feeds = random_feeds(model, batch=2, seq=5)
    want = _run(model, feeds)
    before = _ops(model)
    result = FuseOrtPass()(model)
    if not result.refused:
        pytest.skip("onnxscript fused no attention for head size 12")
    assert not result.modified and "head size 12" in next(iter(result.refused.values()))
    assert _ops(model) == before
    np.testing.assert_array_equal(_run(model, feeds), want)


def test_fuse_ort_is_default_for_onnxruntime_in_fp32_and_refused_where_its_kernels_cannot_run():
    assert "fuse-ort" in CompileOptions().passes
    assert "fuse-ort" in CompileOptions(passes=["remove-channels"]).passes
    for other in ({"portable": True}, {"engine": "tensorrt"}, {"engine": "torch"}):
        assert "fuse-ort" not in CompileOptions(**other).passes
    with pytest.raises(ConfigError, match="portable"):
        CompileOptions(passes=["fuse-ort"], portable=True)
    with pytest.raises(ConfigError, match="engine tensorrt cannot run"):
        CompileOptions(passes=["fuse-ort"], engine="tensorrt")


def test_fusion_keeps_a_tied_embedding_stored_once():
    """The tied lm_head reads the embedding through a Transpose; un-sharing it for a rewrite let onnxscript's
    optimizer fold that Transpose into a second, transposed copy (SmolLM2: 494 MB for 379 MB of weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prune2deploy.pipeline import run_pipeline

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, tie_word_embeddings=True,
    )  # fmt: skip
    model = export_module(LlamaForCausalLM(config).eval(), hf_export_spec("causal-lm", batch=2, seq=8, vocab_size=512))
    feeds = random_feeds(model, batch=2, seq=5)
    want = _run(model, feeds)

    def stored(m: ir.Model) -> int:
        return sum(v.const_value.nbytes for v in m.graph.initializers.values() if v.const_value is not None)

    before = stored(model)
    result = run_pipeline(model, [FuseOrtPass()])
    assert result.passes[0].modified
    assert stored(model) <= before  # the embedding (512 x 64 floats = 131 kB) is not stored twice
    assert [v.shape for v in model.graph.initializers.values() if v.const_value.nbytes >= 512 * 64 * 4] == [(512, 64)]
    np.testing.assert_allclose(_run(model, feeds), want, rtol=1e-4, atol=1e-5)
