"""Fuse the pruned graph for ONNX Runtime: RMSNorm / SkipRMSNorm / (Skip)LayerNorm, rotary, attention.

Fusion comes after pruning because the fused ops (``com.microsoft``) hide the channel structure the other
passes read. The rewrites are onnxscript's ORT fusions (``onnxscript.rewriter.ort_fusions``); this pass adds
the record of what fired and the head-size constraint check, and the driver verifies the fused graph
against the masked reference like any other pass's output (ORT's fused kernels differ from the unfused
graph only by float rounding, so the pass is exact at the compile tolerance).

On by itself for ``--engine onnxruntime`` in fp32 (:attr:`PassSpec.auto`); not for TensorRT, the torch engine or
``--portable``: those keep standard ONNX ops.

The fusions run in onnxscript's order (``fuse_xformers``) with two changes, each for a graph the exporter
writes for transformers' Llama family and each exact:

- The rotary angles arrive as ``Mul(positions[1, S, 1], inv_freq[E])`` (transformers 5 broadcasts where
  earlier versions multiplied matrices), which onnxscript's cos/sin-cache rule does not match, so the rotary
  fusion it counted was inlined back into Slice/Neg/Concat/Mul. :func:`_rotary_angles_as_matmul` writes
  them in the ``Transpose(MatMul(inv_freq[1, E, 1], positions[1, 1, S]))`` form the rule reads (a product
  of two numbers either way: the same float), and :func:`_position_ids_per_batch` expands the fused
  ``RotaryEmbedding``'s ``[1, S]`` position ids to ``[B, S]``, which ONNX Runtime's kernel requires.
- onnxscript's GroupQueryAttention rule is left out: with the rotary in cache form it fires on the prefill
  graph and builds a GQA whose sequence lengths ignore the attention mask (wrong for padded batches; ORT
  refuses batch > 1). Attention becomes ``MultiHeadAttention`` with the mask, as before. The KV-cache
  decoder in ``genai/`` is where GroupQueryAttention belongs (:mod:`prune2deploy.outputs.genai`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from prune2deploy.graph.initializers import add_initializer, unique_name
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import PassSpec, register_pass

__all__ = ["FuseOrtPass"]

log = logging.getLogger(__name__)

#: com.microsoft attention kernels on CPU want head_size % 8 == 0 (ORT's GQA says so explicitly).
_HEAD_MULTIPLE = 8
_ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention")


class FuseOrtPass(P2DPass):
    """Runs onnxscript's ``optimize_for_ort`` and reports the fusion counts.

    When a fused attention would get a head size ORT's CPU kernels do not take, the attention fusions are
    undone by falling back to the unfused graph for the whole model (``refused`` says which node and why).
    """

    name = "fuse-ort"
    unshare_constants = False  # rewrites only: un-shared copies would be folded into new tensors

    def call(self, model: ir.Model) -> P2DResult:
        backup = model.graph.clone()  # shares the tensors: a whole-model protobuf copy would double memory
        try:
            counts = _fuse_for_ort(model)
        except Exception as exc:  # a fusion that cannot run leaves the graph as it was
            self._restore(model, backup)
            return self.result(model, modified=False, refused={"model": f"onnxscript ORT fusions failed: {exc}"})
        refused = {}
        for node in model.graph:
            if node.domain == "com.microsoft" and node.op_type in _ATTENTION_OPS:
                heads = node.attributes.get("num_heads")
                hidden = node.inputs[0].shape[-1] if node.inputs[0] is not None and node.inputs[0].shape else None
                if heads is not None and isinstance(hidden, int) and (hidden // heads.value) % _HEAD_MULTIPLE:
                    refused[node.name] = (
                        f"head size {hidden // heads.value} is not a multiple of {_HEAD_MULTIPLE} (ONNX Runtime's CPU "
                        "attention kernels); the model is kept unfused"
                    )
        if refused:
            self._restore(model, backup)
            return self.result(model, modified=False, refused=refused)
        fused = {k: int(v) for k, v in counts.items() if v}
        ops: dict[str, int] = {}
        for node in model.graph:
            if node.domain == "com.microsoft" or node.op_type in ("SimplifiedLayerNormalization", "RotaryEmbedding"):
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
        log.info("ORT fusions: %s", fused)
        return self.result(model, modified=bool(fused), fusions=fused, fused_ops=ops)

    @staticmethod
    def _restore(model: ir.Model, backup: ir.Graph) -> None:
        model.graph = backup  # onnx_ir models hold their graph by attribute


def _fuse_for_ort(model: ir.Model) -> dict[str, int]:
    """onnxscript's ``optimize_for_ort`` in its order, less the GQA rules, with the rotary mended (module doc)."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import (
        fused_matmul_rule_sets,
        instance_to_group_normalization,
        shape_optimization,
        softmax,
    )
    from onnxscript.rewriter.ort_fusions.attention import fuse_attention
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_partial_rotary_embedding, fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    rewrite(model, [gemm_to_matmul_add_rule])
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    counts = {"rotary_angles_as_matmul": _rotary_angles_as_matmul(model)}
    for name, fuse in (
        ("erf_gelu", fuse_erfgelu),
        ("rms_normalization", fuse_rms_normalization),
        ("skip_layer_normalization", fuse_skip_layer_normalization),
        ("skip_rms_normalization", fuse_skip_rms_normalization),
        ("rotary_embedding", fuse_rotary_embedding),
        ("cos_sin_cache", fuse_cos_sin_cache),
    ):
        counts[name] = fuse(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    counts["partial_rotary_embedding"] = fuse_partial_rotary_embedding(model)
    counts["sdpa"] = fuse_sdpa(model, apply_shape_inference=True)
    for name, fuse in (("mha1", fuse_mha1), ("mha2", fuse_mha2), ("mha_scale", fuse_mha_scale)):
        counts[name] = fuse(model)
    if counts["mha1"] or counts["mha2"]:
        counts["mha_bias"] = fuse_mha_bias(model)
        counts["attention"] = fuse_attention(model)
    for name, fuse in (("gelu", fuse_gelu), ("bias_gelu", fuse_bias_gelu), ("sdpa_via_mha", replace_sdpa_by_mha)):
        counts[name] = fuse(model)
    optimize(model)  # inlines the intermediate fusion functions no later rule consumed
    rewrite(
        model,
        [
            *softmax.rules.rules,
            *instance_to_group_normalization.rules.rules,
            *fused_matmul_rule_sets.fused_matmul_rule_sets(),
        ],
    )
    counts["position_ids_per_batch"] = _position_ids_per_batch(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    common_passes.RemoveInitializersFromInputsPass()(model)
    common_passes.ShapeInferencePass()(model)
    return counts


def _rotary_angles_as_matmul(model: ir.Model) -> int:
    """``Mul(Cast(Unsqueeze(Range, [0, 2])), inv_freq[E])`` → ``Transpose(MatMul(inv_freq[1, E, 1],
    Cast(Unsqueeze(Range, [0, 1]))), [0, 2, 1])``: the same [1, S, E] angles, in the form onnxscript's
    cos/sin-cache rule matches. Returns how many were rewritten."""
    changed = 0
    for node in list(model.graph):
        if node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
            continue
        angles, inv_freq = node.inputs
        if inv_freq is None or inv_freq.const_value is None or len(inv_freq.const_value.shape) != 1:
            continue
        cast = angles.producer() if angles is not None else None
        unsqueeze = cast.inputs[0].producer() if cast is not None and cast.op_type == "Cast" else None
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) != 2:
            continue
        positions, axes = unsqueeze.inputs
        producer = positions.producer() if positions is not None else None
        if producer is None or producer.op_type != "Range" or axes is None or axes.const_value is None:
            continue
        if axes.const_value.numpy().tolist() != [0, 2] or cast.attributes.get_int("to") != ir.DataType.FLOAT:
            continue
        frequencies = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1, 1)
        tag = node.name or f"rotary_angles_{changed}"
        column = add_initializer(model.graph, unique_name(model.graph, f"{tag}__inv_freq_3d"), frequencies)
        seq = positions.shape[0] if positions.shape is not None and len(positions.shape) == 1 else None
        built = [
            ir.node(
                "Unsqueeze",
                [
                    positions,
                    add_initializer(
                        model.graph, unique_name(model.graph, f"{tag}__axes"), np.asarray([0, 1], np.int64)
                    ),
                ],
                name=f"{tag}/positions",
            ),
        ]
        built.append(ir.node("Cast", [built[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{tag}/cast"))
        built.append(ir.node("MatMul", [column, built[-1].outputs[0]], name=f"{tag}/matmul"))
        built.append(ir.node("Transpose", [built[-1].outputs[0]], attributes={"perm": [0, 2, 1]}, name=f"{tag}/t"))
        shapes = ([1, 1, seq], [1, 1, seq], [1, frequencies.shape[1], seq], None)
        for made, shape in zip(built, shapes, strict=True):
            out = made.outputs[0]
            out.name = made.name
            out.type = positions.type if made.op_type == "Unsqueeze" else ir.TensorType(ir.DataType.FLOAT)
            out.shape = ir.Shape(shape) if shape is not None else node.outputs[0].shape
        model.graph.insert_before(node, built)
        node.outputs[0].replace_all_uses_with(built[-1].outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        changed += 1
    return changed


def _position_ids_per_batch(model: ir.Model) -> int:
    """Expands the ``[1, S]`` position ids of fused ``RotaryEmbedding`` nodes to ``[B, S]`` (B from the node's
    input): ONNX Runtime's kernel wants one row per batch entry, and every row is the same."""
    changed = 0
    for node in list(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "RotaryEmbedding" or len(node.inputs) < 2:
            continue
        x, positions = node.inputs[0], node.inputs[1]
        if positions is None or positions.shape is None or len(positions.shape) != 2 or positions.shape[0] != 1:
            continue
        tag = f"{node.name}__position_ids"
        batch = ir.node("Shape", [x], attributes={"start": 0, "end": 1}, name=f"{tag}/batch")
        seq = ir.node("Shape", [positions], attributes={"start": 1, "end": 2}, name=f"{tag}/seq")
        shape = ir.node("Concat", [batch.outputs[0], seq.outputs[0]], attributes={"axis": 0}, name=f"{tag}/shape")
        expand = ir.node("Expand", [positions, shape.outputs[0]], name=tag)
        for made in (batch, seq, shape, expand):
            made.outputs[0].name = made.name
            made.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        expand.outputs[0].type = positions.type
        rows = x.shape[0] if x.shape is not None and len(x.shape) >= 1 else None
        expand.outputs[0].shape = ir.Shape([rows, positions.shape[1]])
        model.graph.insert_before(node, [batch, seq, shape, expand])
        node.replace_input_with(1, expand.outputs[0])
        changed += 1
    return changed


register_pass(
    PassSpec(
        name="fuse-ort",
        order=80,
        exactness="yes (verified)",
        summary="ONNX Runtime fusions after pruning (RMSNorm, SkipRMSNorm, rotary, attention), verified like any "
        "pass; on by itself for --engine onnxruntime in fp32 (--portable keeps standard ONNX ops)",
        switch=(
            "--fuse-ort",
            "require the ONNX Runtime fusions (com.microsoft RMSNorm, rotary, attention): on by default for "
            "--engine onnxruntime in fp32; with this flag, --portable or another engine is an error",
        ),
        auto=lambda values: (
            values.get("engine") == "onnxruntime" and not values.get("portable") and values.get("precision") == "fp32"
        ),
        build=lambda o: FuseOrtPass(),
        stage="finishing",
        engines=("onnxruntime",),
        in_torch="own-way",
    )
)
