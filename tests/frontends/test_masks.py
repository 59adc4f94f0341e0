"""Mask files mapped onto ONNX initializers through name-scope metadata."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from prune2deploy.errors import MaskError
from prune2deploy.frontends.masks import apply_masks_onnx, apply_masks_torch
from tests.fixtures.models import tiny_llama


def test_tied_embedding_is_found_by_module_name(tiny_llama_onnx):
    """With tied weights the exporter may name the table after the head; the Gather's module still names it."""
    from prune2deploy.frontends.torch import export_module, hf_export_spec

    module = tiny_llama(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = export_module(module, hf_export_spec("causal-lm", vocab_size=64))
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None)
    mask = np.ones((64, 32), dtype=np.float32)
    mask[:, :5] = 0
    assert apply_masks_onnx(model, {"model.embed_tokens.weight": mask}) == 1
    table = gather.inputs[0].const_value.numpy()
    assert not table[:, :5].any() and table[:, 5:].all()


def test_transposed_linear_weight_and_errors(tiny_llama_onnx):
    model = ir.load(str(tiny_llama_onnx))
    mask = np.ones((128, 64), dtype=np.float32)  # up_proj: torch layout [out, in]
    mask[7] = 0
    assert apply_masks_onnx(model, {"model.layers.0.mlp.up_proj.weight": mask}) == 1
    with pytest.raises(MaskError, match=r"has shape \(64, 128\)"):
        apply_masks_onnx(model, {"model.layers.0.mlp.up_proj.weight": mask.T})
    with pytest.raises(MaskError, match="matches no tensor"):
        apply_masks_onnx(model, {"model.layers.9.mlp.up_proj.weight": mask})


def test_torch_masks_copy_only_what_they_mask():
    """The masked copy is the input with masked weights replaced: unmasked tensors are shared (a 1B model is
    not held twice), tied ones stay tied, and the input keeps its values."""
    import torch

    module = tiny_llama(tie_word_embeddings=True)
    name = "model.layers.0.mlp.up_proj.weight"
    before = dict(module.named_parameters())[name].detach().clone()
    mask = np.ones(tuple(before.shape), dtype=np.float32)
    mask[::2] = 0
    masked = apply_masks_torch(module, {name: mask})
    params, masked_params = dict(module.named_parameters()), dict(masked.named_parameters())
    assert torch.equal(params[name], before)  # the input is not modified
    assert torch.equal(masked_params[name], before * torch.from_numpy(mask))
    assert masked_params[name].data_ptr() != params[name].data_ptr()
    other = "model.layers.0.mlp.down_proj.weight"
    assert masked_params[other].data_ptr() == params[other].data_ptr()
    assert masked.lm_head.weight is masked.model.embed_tokens.weight
    assert masked is not module and masked.model.layers[0].mlp is not module.model.layers[0].mlp
