"""Remove residual blocks: exactly when their branch adds zero, approximately when a depth plan says so.

Exact part: a residual sub-block ``out = r + branch(r)`` whose output projection (o_proj, down_proj,
output.dense) has an all-zero weight and no or a zero bias adds exactly 0, so every use of ``out`` can read
``r`` instead; the branch then has no reader and dead-code elimination drops it. When the weight is zero
but the bias is not, the branch is the constant bias: the Add keeps ``r`` and reads the bias instead of the
branch, still exact. Both sub-blocks of a pre-norm layer (Llama) zero means the whole layer goes. In a
post-norm layer (BERT: ``LN(r + branch)``) the LayerNorm stays: it is not part of the branch.

Depth pruning by plan (Minitron-style ``layers=[3, 7]``): the listed layers are removed even though their
branches are not zero, by rewiring the layer's outgoing stream value to its incoming one (for post-norm
layers this removes the layer's norms too). That changes the outputs: the pass is then approximate
(``exact: false`` in its record) and verification reports the error.

Blocks are identified by name scope *and* structure (``analysis.blocks``); anything ambiguous is listed in
the record with the reason and left in place. The zero test ignores IEEE corner cases: a zero weight times
an infinite or NaN activation is NaN in the reference but the removed block yields ``r``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from prune2deploy.analysis.blocks import Layer, ResidualBlock, find_layers
from prune2deploy.errors import BadInputError
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import PassOption, PassSpec, register_pass

__all__ = ["RemoveLayersPass", "count_layers", "replace_value"]

log = logging.getLogger(__name__)


def count_layers(model: ir.Model) -> int:
    """Layers (numbered scopes) that still hold at least one residual block."""
    return sum(1 for layer in find_layers(model) if layer.blocks)


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name through an Identity node."""
    for position, output in enumerate(list(graph.outputs)):
        if output is not old:
            continue
        name = old.name
        old.name = f"{name}__removed"
        identity = ir.node("Identity", [new], name=f"{name}__bypass")
        result = identity.outputs[0]
        result.name, result.shape, result.type = name, old.shape, old.type
        graph.append(identity)
        graph.outputs[position] = result
    old.replace_all_uses_with(new)


class RemoveLayersPass(P2DPass):
    """Bypasses zero residual sub-blocks (exact) and drops the layers a depth plan lists (approximate).

    Args:
        layers: layer indices (``3``, matched against the trailing number of a layer scope) or full scope
            names (``"model.layers.3"``) to remove whole, zero or not. Empty: only the exact removals.
        detect_zero: also bypass every sub-block whose branch adds zero (or fold a constant branch).
    """

    name = "remove-layers"

    def __init__(self, layers: Iterable[int | str] = (), *, detect_zero: bool = True) -> None:
        super().__init__()
        self.layers = list(layers)
        self.detect_zero = detect_zero

    def __repr__(self) -> str:
        return f"RemoveLayersPass(layers={self.layers}, detect_zero={self.detect_zero})"

    def call(self, model: ir.Model) -> P2DResult:
        found = find_layers(model)
        before = sum(1 for layer in found if layer.blocks)
        nodes_before = len(model.graph)
        planned, not_removed = self._resolve(found)
        removed_layers, bypassed, folded = [], [], []
        approximate_layers = []
        for layer in found:
            if layer.name in planned and layer.reason:  # refused as a whole; its exact removals still apply
                not_removed.append({"layer": layer.name, "reason": layer.reason})
            elif layer.name in planned:
                zero = all(block.zero for block in layer.blocks)
                # Read the incoming stream now, not at analysis time: an earlier removal may have rewired it.
                replace_value(model.graph, layer.stream_out, layer.blocks[0].residual)
                removed_layers.append(layer.name)
                if not zero:
                    approximate_layers.append(layer.name)
                continue
            if not self.detect_zero:
                continue
            for block in layer.blocks:
                if block.reason:
                    not_removed.append({"layer": layer.name, "add": block.add.name, "reason": block.reason})
                elif block.zero:
                    self._bypass(model.graph, block)
                    bypassed.append(block.scope)
                elif block.constant:
                    block.add.replace_input_with(1 - block.residual_index, block.bias)
                    folded.append(block.scope)
        RemoveUnusedNodesPass()(model)
        after = count_layers(model)
        exact = not approximate_layers
        if approximate_layers:
            log.warning("remove-layers: dropping non-zero layers %s changes the outputs", approximate_layers)
        refused = {}
        for entry in not_removed:
            where = f"{entry['layer']} ({entry['add']})" if entry.get("add") else entry["layer"]
            refused[where] = entry["reason"]
        return self.result(
            model,
            modified=bool(removed_layers or bypassed or folded),
            exact=exact,
            refused=refused,
            layers_before=before,
            layers_after=after,
            layers_removed=removed_layers,
            approximate_layers=approximate_layers,
            sub_blocks_removed=bypassed,
            constant_branches_folded=folded,
            nodes_removed=nodes_before - len(model.graph),
        )

    def _resolve(self, found: list[Layer]) -> tuple[set[str], list[dict]]:
        """Maps the plan's entries onto layer scopes; an index two stacks share is ambiguous, not guessed."""
        names = {layer.name for layer in found}
        planned: set[str] = set()
        not_removed: list[dict] = []
        for entry in self.layers:
            if isinstance(entry, str) and not entry.isdigit():
                if entry not in names:
                    raise BadInputError(f"remove-layers: no layer '{entry}' in the model; layers are {_span(found)}")
                planned.add(entry)
                continue
            index = int(entry)
            matches = [layer.name for layer in found if layer.index == index]
            if not matches:
                raise BadInputError(f"remove-layers: no layer {index} in the model; layers are {_span(found)}")
            if len(matches) > 1:
                not_removed.append({"layer": str(index), "reason": f"ambiguous: {matches}; give the full scope name"})
                continue
            planned.add(matches[0])
        _check_keeps_a_layer(planned, found)
        return planned, not_removed

    @staticmethod
    def _bypass(graph: ir.Graph, block: ResidualBlock) -> None:
        replace_value(graph, block.add.outputs[0], block.residual)


def _check_keeps_a_layer(planned: set[str], found: list[Layer]) -> None:
    """A depth plan that drops every layer leaves embeddings feeding the head: no pruned model of the input.

    Counted against the graph's own layers, so a plan (or --drop-layers) is refused whether or not it says
    how deep the model is (``model.num_layers`` is optional in a plan).
    """
    layers = {layer.name for layer in found if layer.blocks}
    if layers and layers <= planned:
        raise BadInputError(
            f"remove-layers: the depth plan drops all {len(layers)} layers of the model ({_span(found)}); keep at "
            "least one layer (check the plan's dropped_layers or --drop-layers)"
        )


def _span(found: list[Layer]) -> str:
    if not found:
        return "none (no numbered layer scopes in the graph metadata)"
    return f"{found[0].name} … {found[-1].name}" if len(found) > 1 else found[0].name


def _torch_plan(options: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """A depth plan is repeated on the torch module: the writers drop the same layer scopes."""
    return {"drop_layer_scopes": list(record.get("layers_removed", []))}


def _layer_list(text: str) -> list[int | str]:
    """``"3,7"`` or ``"model.layers.3"``: indices stay ints, scope names stay strings."""
    return [int(x) if x.strip().isdigit() else x.strip() for x in text.split(",") if x.strip()]


register_pass(
    PassSpec(
        name="remove-layers",
        order=10,
        exactness="yes (zero branches) / no (--drop-layers: Minitron-style depth plan)",
        summary="residual sub-blocks (attention, MLP) or whole layers",
        default=True,
        options={
            "drop_layers": PassOption(
                list[int | str],
                [],
                "depth plan: layer indices or scopes to remove even if non-zero, e.g. 3,7 (approximate)",
                flag="--drop-layers",
                parse=_layer_list,
                enables=True,
            )
        },
        build=lambda o: RemoveLayersPass(layers=o.drop_layers),
        in_torch="repeat",
        torch_plan=_torch_plan,
    )
)
