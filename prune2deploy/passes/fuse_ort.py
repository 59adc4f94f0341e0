"""Fuse the pruned graph for ONNX Runtime: RMSNorm / SkipRMSNorm / (Skip)LayerNorm, rotary, attention.

Fusion comes after pruning because the fused ops (``com.microsoft``) hide the channel structure the other
passes read. The rewrites are onnxscript's ORT fusions (``onnxscript.rewriter.ort_fusions``); this pass adds
the record of what fired and the head-size constraint check, and the driver verifies the fused graph
against the masked reference like any other pass's output (ORT's fused kernels differ from the unfused
graph only by float rounding, so the pass is exact at the compile tolerance).

On by itself for ``--engine onnxruntime`` in fp32 (:attr:`PassSpec.auto`); not for TensorRT, the torch engine or
``--portable``: those keep standard ONNX ops.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

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

    def call(self, model: ir.Model) -> P2DResult:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        backup = model.graph.clone()  # shares the tensors: a whole-model protobuf copy would double memory
        try:
            _, counts = optimize_for_ort(model)
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


register_pass(
    PassSpec(
        name="fuse-ort",
        order=80,
        exactness="yes",
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
    )
)
