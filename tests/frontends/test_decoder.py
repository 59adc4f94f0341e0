"""KV-cache decoder export: cache layout, prefill at past 0, and cached logits equal recomputation."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.errors import BadInputError
from prune2deploy.frontends.decoder import (
    PAST_DIM,
    TOTAL_DIM,
    decoder_signature,
    export_decoder,
    kv_cache_bytes_per_token,
)

KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 2, 16, 2, 128


def _run(session, ids, mask, positions, past):
    names = [o.name for o in session.get_outputs()]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
    return dict(zip(names, session.run(names, feeds), strict=True))


def _zeros_past(batch, past=0):
    return {
        f"past_key_values.{i}.{kind}": np.zeros((batch, KV_HEADS, past, HEAD_DIM), np.float32)
        for i in range(LAYERS)
        for kind in ("key", "value")
    }


def _presents_as_past(outputs):
    return {
        name.replace("present", "past_key_values"): value
        for name, value in outputs.items()
        if name.startswith("present.")
    }


def test_graph_io_is_symbolic_in_batch_seq_and_past(tiny_llama_kv):
    model, _ = tiny_llama_kv
    inputs = {v.name: [getattr(d, "value", d) for d in v.shape] for v in model.graph.inputs}
    outputs = {v.name: [getattr(d, "value", d) for d in v.shape] for v in model.graph.outputs}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", TOTAL_DIM]
    assert inputs["position_ids"] == ["batch", "seq"]
    assert inputs["past_key_values.1.value"] == ["batch", KV_HEADS, PAST_DIM, HEAD_DIM]
    assert outputs["logits"] == ["batch", "seq", VOCAB]
    assert outputs["present.0.key"] == ["batch", KV_HEADS, TOTAL_DIM, HEAD_DIM]
    assert len(outputs) == 1 + 2 * LAYERS


def test_name_scopes_are_the_models_own_module_paths(tiny_llama_kv):
    model, _ = tiny_llama_kv
    scopes = {
        node.metadata_props.get("pkg.torch.onnx.name_scopes", "") for node in model.graph if node.op_type == "MatMul"
    }
    assert any("'model.layers.1.self_attn.k_proj'" in s for s in scopes)
    assert "model.layers.0.input_layernorm.weight" in model.graph.initializers
    assert not any("model.model." in s for s in scopes)


@pytest.mark.parametrize(("batch", "seq", "past"), [(1, 1, 0), (3, 5, 0), (2, 1, 7), (4, 3, 2)])
def test_cache_shapes_are_past_plus_seq(tiny_llama_kv, rng, batch, seq, past):
    _, path = tiny_llama_kv
    session = make_session(path)
    ids = rng.integers(0, VOCAB, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, past + seq), np.int64)
    positions = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64)
    past_feeds = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in _zeros_past(batch, past).items()}
    out = _run(session, ids, mask, positions, past_feeds)
    assert out["logits"].shape == (batch, seq, VOCAB)
    for name, value in out.items():
        if name.startswith("present."):
            assert value.shape == (batch, KV_HEADS, past + seq, HEAD_DIM)
            # present = concat(past, new): the past part is passed through unchanged
            np.testing.assert_array_equal(value[:, :, :past], past_feeds[name.replace("present", "past_key_values")])


def test_cached_decoding_equals_recomputation(tiny_llama_decoder, tiny_llama_kv, rng):
    """Prefill 5 tokens, then decode 2 + 1 + 1: every position's logits equal one pass over all 9."""
    import torch

    _, path = tiny_llama_kv
    session = make_session(path)
    batch, total = 3, 9
    ids = rng.integers(0, VOCAB, (batch, total), dtype=np.int64)
    mask = np.ones((batch, total), np.int64)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    positions = np.where(mask == 0, 0, np.cumsum(mask, 1) - 1).astype(np.int64)

    full = _run(session, ids, mask, positions, _zeros_past(batch))["logits"]
    chunks, past, start = [], _zeros_past(batch), 0
    for stop in (5, 7, 8, 9):
        out = _run(session, ids[:, start:stop], mask[:, :stop], positions[:, start:stop], past)
        chunks.append(out["logits"])
        past, start = _presents_as_past(out), stop
    cached = np.concatenate(chunks, axis=1)
    real = mask.astype(bool)  # padded positions attend to nothing; their logits are not used
    assert np.abs(cached - full)[real].max() <= 1e-4

    with torch.no_grad():
        reference = tiny_llama_decoder(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            use_cache=False,
        ).logits.numpy()
    assert np.abs(cached - reference)[real].max() <= 1e-4
    assert np.abs(reference[real]).max() > 1e-2  # the comparison is not between zeros


def test_kv_cache_bytes_from_config_model_and_graph(tiny_llama_decoder, tiny_llama_kv):
    model, path = tiny_llama_kv
    expected = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    assert kv_cache_bytes_per_token(tiny_llama_decoder.config) == expected
    assert kv_cache_bytes_per_token(tiny_llama_decoder) == expected
    assert kv_cache_bytes_per_token(model) == expected
    assert kv_cache_bytes_per_token(path) == expected
    assert kv_cache_bytes_per_token(make_session(path)) == expected
    assert kv_cache_bytes_per_token(model, dtype_bytes=2) == expected // 2


def _fake_decoder(kv_heads_per_layer, head_dim=8):
    """A graph with only a decoder's I/O (Identity bodies): enough for the signature reader."""

    def value(name, dims, dtype=ir.DataType.FLOAT):
        return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))

    inputs = [value("input_ids", ["batch", "seq"], ir.DataType.INT64)]
    inputs.append(value("attention_mask", ["batch", TOTAL_DIM], ir.DataType.INT64))
    nodes, outputs = [], []
    for i, heads in enumerate(kv_heads_per_layer):
        for kind in ("key", "value"):
            past = value(f"past_key_values.{i}.{kind}", ["batch", heads, "past", head_dim])
            inputs.append(past)
            node = ir.Node("", "Identity", [past])
            node.outputs[0].name = f"present.{i}.{kind}"
            node.outputs[0].shape = ir.Shape(["batch", heads, TOTAL_DIM, head_dim])
            node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            nodes.append(node)
            outputs.append(node.outputs[0])
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_kv_cache_bytes_follow_a_pruned_graph():
    # layer 1 lost a kv head, layer 2 lost both of its own to one: bytes follow the graph, not the config
    model = _fake_decoder([2, 1, 1])
    signature = decoder_signature(model)
    assert [layer.kv_heads for layer in signature.layers] == [2, 1, 1]
    assert signature.position_ids is None
    assert kv_cache_bytes_per_token(model) == 2 * (2 + 1 + 1) * 8 * 4


def test_signature_rejects_a_graph_without_cache():
    model = _fake_decoder([])
    with pytest.raises(BadInputError, match=r"present\.0\.key"):
        decoder_signature(model)


def test_export_rejects_examples_that_would_specialise(tiny_llama_decoder):
    with pytest.raises(BadInputError, match="≥ 2"):
        export_decoder(tiny_llama_decoder, example_past=1)


def test_random_feeds_with_past_zero_is_a_valid_prefill(tiny_llama_kv):
    """verify/profiling build feeds with prune2deploy.feeds; overriding only ``past`` gives a prefill."""
    from prune2deploy.feeds import random_feeds

    model, path = tiny_llama_kv
    feeds = random_feeds(model, batch=2, seq=6, overrides={PAST_DIM: 0})
    assert feeds["attention_mask"].shape == (2, 6)
    assert feeds["past_key_values.0.key"].shape == (2, KV_HEADS, 0, HEAD_DIM)
    out = make_session(path).run(["logits", "present.1.value"], feeds)
    assert out[0].shape == (2, 6, VOCAB) and out[1].shape == (2, KV_HEADS, 6, HEAD_DIM)
    assert np.isfinite(out[0]).all()
