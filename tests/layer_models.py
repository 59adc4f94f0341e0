"""Exports and helpers for the remove-layers and prune-hidden tests.

Each tiny transformer is exported once per process (``fresh`` re-reads a copy per test). Tests zero
weights in the exported graph, found through the exporter's name scopes (``module_of``), not through the
analysis under test, and compare ONNX Runtime outputs of the zeroed (reference) and compiled models.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir

from prune2deploy.analysis.scopes import module_of
from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.passes.sharing import unshare_initializers

__all__ = [
    "clone",
    "fresh",
    "ids_feeds",
    "lm_metrics",
    "matmul_weights",
    "run",
    "snapshot",
    "zero_hidden",
    "zero_module",
]


def _module(name: str):
    from tests.models import tiny_bert, tiny_llama

    if name == "llama":
        module = tiny_llama()
    elif name == "llama-tied":
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = tiny_llama().config.to_dict()
        config["tie_word_embeddings"] = True
        module = LlamaForCausalLM(LlamaConfig(**config)).eval()
    elif name == "bert":
        module = tiny_bert()
    elif name == "smollm2":
        import pytest

        from prune2deploy.errors import BadInputError
        from prune2deploy.frontends.hf import load_hf_model

        try:
            module = load_hf_model("smollm2-135m").module
        except BadInputError as exc:
            pytest.skip(str(exc))
    else:
        raise KeyError(name)
    module.config.use_cache = False
    return module


@functools.cache
def _exported(name: str) -> bytes:
    import time

    from prune2deploy.frontends.torch import export_module, hf_export_spec

    start = time.perf_counter()
    module = _module(name)
    task = "encoder" if name == "bert" else "causal-lm"
    model = export_module(module, hf_export_spec(task, vocab_size=module.config.vocab_size))
    _EXPORT_SECONDS[name] = time.perf_counter() - start
    return ir.to_proto(model).SerializeToString()


def export_seconds(name: str) -> float:
    """Time the first export of ``name`` took in this process (0 when cached)."""
    return _EXPORT_SECONDS.get(name, 0.0)


_EXPORT_SECONDS: dict[str, float] = {}


def fresh(name: str) -> ir.Model:
    """A private copy of the exported model, its shared constants un-shared (as compile() does)."""
    model = ir.from_proto(onnx.ModelProto.FromString(_exported(name)))
    unshare_initializers(model)
    return model


def snapshot(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def clone(model: ir.Model) -> ir.Model:
    return ir.from_proto(onnx.ModelProto.FromString(snapshot(model)))


def run(model: ir.Model | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = make_session(model if isinstance(model, bytes) else snapshot(model))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def ids_feeds(vocab: int, batch: int = 3, seq: int = 11, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }


def matmul_weights(model: ir.Model, scope: str) -> list[tuple[ir.Node, ir.Value]]:
    """(node, constant weight) of the MatMul/Gemm nodes whose innermost module is ``scope``."""
    return [
        (n, n.inputs[1])
        for n in model.graph
        if n.op_type in ("MatMul", "Gemm") and module_of(n) == scope and n.inputs[1].const_value is not None
    ]


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.array(array, order="C"), name=value.name)


def zero_module(model: ir.Model, scope: str, *, bias: float | None = 0.0) -> None:
    """Zeroes a Linear's weight (and sets its bias to ``bias``; ``None`` leaves it) in the exported graph."""
    found = matmul_weights(model, scope)
    assert found, scope
    for node, weight in found:
        _set(weight, np.zeros_like(weight.const_value.numpy()))
        if bias is None:
            continue
        for use in node.outputs[0].uses():
            if use.node.op_type == "Add" and module_of(use.node) == scope:
                for value in use.node.inputs:
                    if value is not None and value.const_value is not None:
                        _set(value, np.full_like(value.const_value.numpy(), bias))


def zero_hidden(model: ir.Model, channels, writers: tuple[str, ...], norms: bool = False) -> None:
    """Zeroes hidden channels in every embedding table and in the output columns of the writer Linears
    (modules whose name ends with one of ``writers``); ``norms`` also zeroes LayerNorm scale and bias."""
    channels = np.asarray(channels)
    for node in model.graph:
        if node.op_type == "Gather" and node.inputs[0].const_value is not None and "embed" in module_of(node):
            table = node.inputs[0].const_value.numpy().copy()
            table[:, channels] = 0
            _set(node.inputs[0], table)
        elif node.op_type == "MatMul" and module_of(node).endswith(writers) and node.inputs[1].const_value is not None:
            weight = node.inputs[1].const_value.numpy().copy()
            weight[:, channels] = 0
            _set(node.inputs[1], weight)
            for use in node.outputs[0].uses():
                for value in use.node.inputs:
                    if use.node.op_type == "Add" and value is not None and value.const_value is not None:
                        bias = value.const_value.numpy().copy()
                        bias[..., channels] = 0
                        _set(value, bias)
        elif node.op_type == "LayerNormalization" and norms:
            for value in node.inputs[1:]:
                array = value.const_value.numpy().copy()
                array[channels] = 0
                _set(value, array)


def lm_metrics(reference: np.ndarray, compiled: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference ‖ compiled) of next-token distributions (float64)."""
    ref = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    out = compiled.astype(np.float64).reshape(-1, compiled.shape[-1])
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = out - np.logaddexp.reduce(out, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    top1 = float(np.mean(ref.argmax(-1) == out.argmax(-1)))
    rel = float(np.max(np.abs(ref - out)) / np.max(np.abs(ref)))
    return {"top1": top1, "kl": kl, "max_rel": rel}
