"""``inspect`` on the tool's own fused output: layers in numeric order, and the counts fused kernels hide
(query heads, residual Adds, channel groups cut at a fused op) marked as such, not shown as the model's."""

from __future__ import annotations

from prune2deploy import api
from prune2deploy.analysis.inspect import layer_sort_key
from prune2deploy.passes.fuse_ort import FuseOrtPass
from tests.fixtures.models import tiny_llama


def test_layer_names_sort_numerically():
    names = ["model.layers.10", "model.layers.2", "lm_head", "model.layers.1", "model.layers.11"]
    assert sorted(names, key=layer_sort_key) == [
        "lm_head", "model.layers.1", "model.layers.2", "model.layers.10", "model.layers.11",
    ]  # fmt: skip


def test_inspect_says_it_reads_a_fused_graph():
    from prune2deploy.frontends.torch import export_module, hf_export_spec

    module = tiny_llama(num_hidden_layers=11)
    unfused = export_module(module, hf_export_spec("causal-lm", batch=2, seq=8, vocab_size=module.config.vocab_size))
    plain = api.inspect(unfused)
    assert plain["fused"] is None and all(b["heads"] == 4 and b["supported"] for b in plain["attention"])
    fused = unfused.clone()
    assert FuseOrtPass()(fused).modified
    info = api.inspect(fused)
    assert [row["layer"] for row in info["layers"]] == [f"model.layers.{i}" for i in range(11)]
    assert [b["layer"] for b in info["attention"]] == [f"model.layers.{i}" for i in range(11)]
    assert info["fused"]["ops"] == {
        "MultiHeadAttention": 11, "RotaryEmbedding": 22, "SimplifiedLayerNormalization": 1,
        "SkipSimplifiedLayerNormalization": 22,
    }  # fmt: skip
    assert "fused for ONNX Runtime" in info["fused"]["note"]
    # query heads come from the fused kernel's num_heads (was 0: no q projection found), marked as such
    for block in info["attention"]:
        assert block["heads"] == 4 and block["heads_from"] == "MultiHeadAttention num_heads"
        assert not block["supported"] and "fused MultiHeadAttention" in block["reasons"][0]
    # residual Adds inside the skip norms: said, not "no residual Add"
    for row in info["layers"]:
        assert row["hidden_by_fused"] == ["SkipSimplifiedLayerNormalization"]
        assert "inside fused SkipSimplifiedLayerNormalization" in row["blocked_by"]
    # more groups than the unfused graph's, because fused ops cut them: counted and said
    assert len(info["groups"]) > len(plain["groups"]) and info["groups_at_fused_ops"] > 0
