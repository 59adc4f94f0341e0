"""Pack the MatMuls that read one activation into one wider MatMul: Q/K/V projections, SwiGLU's gate and up.

After pruning, the per-head and per-neuron projections are narrow GEMMs that all read the same input (a
SmolLM2 layer pruned to 6 query / 3 kv heads and 768 neurons runs q 384, k 192, v 192, gate 768, up 768
columns against the same 576-wide activation). ONNX Runtime's CPU GEMM (MLAS) splits each call over the
thread pool and packs the activation once per call, so several narrow calls cost more than one call over
the concatenated weight: this pass concatenates the constant weights along the output axis and splits the
result (``MatMul → Split``). onnxruntime-genai's model builder emits Llama the same way (one packed QKV
MatMul per layer); onnxscript's ORT fusions have no rule for it (they match the separate projections, which
is why this pass runs after ``fuse-ort``).

Measured (BENCHMARKS.md §11): the packed GEMMs are faster, but ONNX Runtime's Split copies its outputs,
and on SmolLM2 with 2 CPU threads the two cancel out (±1% of prefill), so the pass is not in the default
pipeline; it is there to ask for where wider models or more threads favour fewer, larger GEMMs.

Each output column is the same dot product over the same K as before, so the pass is exact; the driver
verifies it like any other. Only MatMuls whose second input is a constant 2-D weight of the same dtype and
K are packed; a projection whose weight is shared with another node, or whose output is a graph output,
is left as it is (``refused`` says which).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from prune2deploy.graph.initializers import add_initializer, unique_name
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import PassSpec, register_pass

__all__ = ["PackMatMulsPass"]

log = logging.getLogger(__name__)


def _constant_weight(node: ir.Node) -> ir.Value | None:
    """The 2-D constant weight of a MatMul ``x @ W`` that only this node reads, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    if len(weight.uses()) != 1 or weight.is_graph_output() or weight.is_graph_input():
        return None
    return weight


class PackMatMulsPass(P2DPass):
    """Concatenates the constant weights of MatMuls that share their first input (``min_group`` or more)."""

    name = "pack-matmuls"
    unshare_constants = False  # concatenates weights into new tensors; never slices a shared one

    def __init__(self, min_group: int = 2) -> None:
        super().__init__()
        self.min_group = min_group

    def call(self, model: ir.Model) -> P2DResult:
        groups: dict[tuple[int, int, ir.DataType], list[ir.Node]] = defaultdict(list)
        refused: dict[str, str] = {}
        for node in model.graph:
            weight = _constant_weight(node)
            if weight is None or node.inputs[0] is None:
                continue
            if node.outputs[0].is_graph_output():
                refused[node.name] = "its output is a graph output (packing would rename it)"
                continue
            k = weight.const_value.shape[0]
            groups[(id(node.inputs[0]), k, weight.const_value.dtype)].append(node)
        packed, widths = 0, []
        for nodes in (g for g in groups.values() if len(g) >= self.min_group):
            widths.append([int(n.inputs[1].const_value.shape[1]) for n in nodes])
            self._pack(model, nodes)
            packed += len(nodes)
        log.info("packed %d MatMuls into %d", packed, len(widths))
        return self.result(
            model, modified=bool(widths), refused=refused, packed_matmuls=packed, groups=len(widths), widths=widths[:8]
        )

    @staticmethod
    def _pack(model: ir.Model, nodes: list[ir.Node]) -> None:
        """One MatMul over the concatenated weights before the first of ``nodes``, then a Split to their outputs."""
        weights = [n.inputs[1] for n in nodes]
        sizes = [int(w.const_value.shape[1]) for w in weights]
        array = np.concatenate([w.const_value.numpy() for w in weights], axis=1)
        name = f"{nodes[0].name}__packed{len(nodes)}"
        graph = model.graph
        packed_weight = add_initializer(graph, unique_name(graph, f"{name}.weight"), array)
        x = nodes[0].inputs[0]
        matmul = ir.node("MatMul", [x, packed_weight], name=name)
        split_sizes = add_initializer(graph, unique_name(graph, f"{name}.split"), np.asarray(sizes, dtype=np.int64))
        split = ir.node("Split", [matmul.outputs[0], split_sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                        name=f"{name}/Split")  # fmt: skip
        matmul.outputs[0].name = f"{name}/output"
        first_out = nodes[0].outputs[0]
        if first_out.shape is not None and len(first_out.shape) >= 1:
            matmul.outputs[0].shape = ir.Shape([*list(first_out.shape)[:-1], sum(sizes)])
        matmul.outputs[0].type = first_out.type
        # the packed MatMul must come before every consumer: the earliest of the packed nodes is a safe place
        model.graph.insert_before(nodes[0], [matmul, split])
        for node, out in zip(nodes, split.outputs, strict=True):
            old = node.outputs[0]
            out.name, out.shape, out.type = f"{old.name}__split", old.shape, old.type
            old.replace_all_uses_with(out)
            model.graph.remove(node, safe=True)
            out.name = old.name
        for weight in weights:
            if not weight.uses() and weight.name in model.graph.initializers:
                del model.graph.initializers[weight.name]


register_pass(
    PassSpec(
        name="pack-matmuls",
        order=85,
        exactness="yes (verified)",
        summary="one MatMul for the projections that read one activation (Q/K/V, gate/up), split after: fewer, "
        "wider GEMMs (--pack-matmuls; off by default: no measurable gain on SmolLM2 with 2 CPU threads)",
        switch=(
            "--pack-matmuls",
            "pack the MatMuls that share an input into one MatMul and a Split (standard ONNX ops, any engine; "
            "runs after fuse-ort)",
        ),
        build=lambda o: PackMatMulsPass(),
        stage="finishing",
        in_torch="own-way",
    )
)
