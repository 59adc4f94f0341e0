"""Physically remove channels that every consumer in their group sees as zero, or as a foldable constant.

Exact: a removed channel contributed zero at every contraction that reads it (analysis/channels.py), so
the outputs are unchanged. A *constant* channel (a zero weight column with a non-zero bias, as
``torch.nn.utils.prune.ln_structured`` leaves it, then through activations: act(bias)) holds one value k
at every position for every input; a contraction that reads it at every output position adds
k·W[c, :] to each output row whatever the input, so that vector is added to the consumer's bias and the
channel removed: y = Σ_{c kept} x_c W_c + Σ_{c constant} k_c W_c. That holds for MatMul/Gemm and for
Conv without padding (every tap of every output position lies inside the input); a padded Conv's border
positions read zeros, so there the channel is kept and the reason recorded under ``refused``. A consumer
without a bias gets one (a zero Add / Conv or Gemm bias) before the analysis is run again.

Weights, biases and per-channel constants are sliced; Reshape/Expand targets, Split sizes, Slice bounds and
depthwise Conv group counts that carry a width are rewritten. A constant that other nodes share is copied
before it is changed, never edited under them.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.channels import ChannelAnalysis, ChannelGroup, Fixup, Fold, Slot, analyze_channels
from prune2deploy.graph.dims import set_dim
from prune2deploy.graph.initializers import NameCounter, add_initializer, replace_const
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.layernorm import rescale_layernorm
from prune2deploy.passes.registry import PassOption, PassSpec, register_pass

__all__ = ["RemoveChannelsPass"]

log = logging.getLogger(__name__)


class _Unfixable(Exception):
    """A width-carrying constant could not be rewritten: the group is left as it is."""


class RemoveChannelsPass(P2DPass):
    """Slices every tensor of every prunable channel group down to its non-zero channels.

    Args:
        min_width: a group keeps at least this many channels, even if all are zero (width-0 tensors are
            legal ONNX but badly supported by runtimes).
        multiple_of: round kept widths up to a multiple (keeping zero channels, still exact) so that GPU
            kernels stay efficient; 1 keeps exactly the non-zero channels.
    """

    name = "remove-channels"

    def __init__(self, *, min_width: int = 1, multiple_of: int = 1) -> None:
        super().__init__()
        self.min_width = max(1, min_width)
        self.multiple_of = max(1, multiple_of)
        self._names = NameCounter("p2d")

    def __repr__(self) -> str:
        return f"RemoveChannelsPass(min_width={self.min_width}, multiple_of={self.multiple_of})"

    def call(self, model: ir.Model) -> P2DResult:
        analysis = analyze_channels(model)
        if self._prepare_biases(model, analysis):
            analysis = analyze_channels(model)
        per_group = {}
        skipped = {}
        folded = 0
        for group in analysis.groups:
            if not group.prunable:
                continue
            for node_name, reason in group.fold_refused.items():
                skipped[f"{group.id} ({node_name})"] = reason
            if not group.zero_atoms and not group.constant_atoms:
                continue
            kept_atoms = self._kept_atoms(group)
            if len(kept_atoms) == len(group.atoms):
                continue
            kept = self._kept_per_class(group, kept_atoms)
            try:
                edits = self._plan_fixups(model, group, kept)
            except _Unfixable as exc:
                skipped[group.id] = str(exc)
                log.info("group %s left unchanged: %s", group.id, exc)
                continue
            kept_set = set(kept_atoms)
            constants = [a for a in group.constant_atoms if a not in kept_set]
            for atom in constants:  # before slicing: a fold reads the weight row it removes
                for fold in group.folds.get(atom, []):
                    _apply_fold(fold)
            folded += len(constants)
            self._slice(group, kept)
            for edit in edits:
                edit()
            norms = self._rescale_norms(model, group, kept)
            per_group[group.id] = {
                "width_before": group.width,
                "width_after": max(len(k) for k in kept),
                "removed": len(group.atoms) - len(kept_atoms),
                **({"constant_folded": len(constants)} if constants else {}),
                **({"layernorms_rescaled": norms} if norms else {}),
            }
        return self.result(
            model,
            modified=bool(per_group),
            refused=skipped,
            groups_total=len(analysis.groups),
            groups_prunable=sum(g.prunable for g in analysis.groups),
            groups_changed=len(per_group),
            channels_removed=sum(g["removed"] for g in per_group.values()),
            constant_channels_folded=folded,
            per_group=per_group,
            blocked=_blocked_groups(analysis),
        )

    # -- what to keep -------------------------------------------------------------------------------------
    def _prepare_biases(self, model: ir.Model, analysis: ChannelAnalysis) -> bool:
        """Gives every consumer that a constant channel folds into a bias of its own (a zero one if it has
        none); True when the graph changed and the analysis must run again."""
        changed = False
        seen: set[int] = set()
        for group in analysis.groups:
            if not group.prunable:
                continue
            for folds in group.folds.values():
                for fold in folds:
                    node = fold.contraction.node
                    if id(node) in seen:
                        continue
                    seen.add(id(node))
                    changed |= _ensure_bias(model, node, self._names)
        return changed

    def _kept_atoms(self, group: ChannelGroup) -> list[int]:
        # Zero atoms pad first; a constant atom kept for padding keeps its contribution (no fold made).
        zero = [*sorted(group.zero_atoms), *sorted(group.constant_atoms)]
        zero_set = set(zero)
        kept = [a for a in range(len(group.atoms)) if a not in zero_set]
        target = max(self.min_width, len(kept))
        if self.multiple_of > 1:
            target = min(len(group.atoms), -(-target // self.multiple_of) * self.multiple_of)
        for atom in zero:  # pad with zero channels (exact) up to the target width
            if len(kept) >= target:
                break
            kept.append(atom)
        # min_width holds for every tensor, not only the widest: a Concat input or a Split/Slice part whose
        # channels are all zero would otherwise become a width-0 tensor.
        kept_set = set(kept)
        for ci in range(len(group.classes)):
            members = [a for a in range(len(group.atoms)) if any(c == ci for c, _ in group.atoms[a])]
            need = min(self.min_width, len({i for a in members for c, i in group.atoms[a] if c == ci}))
            for atom in members:
                if len({i for a in kept_set for c, i in group.atoms[a] if c == ci}) >= need:
                    break
                kept_set.add(atom)
        self._even_groups(group, kept_set)
        return sorted(kept_set)

    @staticmethod
    def _even_groups(group: ChannelGroup, kept: set[int]) -> None:
        """A grouped Conv's channels are cut into equal groups: every group keeps as many channels as the
        fullest one, by keeping removable channels (exact: a kept zero or constant channel stays as it was).
        Keeping an atom can grow another grouped class (a Concat), so this runs to a fixpoint."""
        constraints = []
        for fixup in group.fixups:
            if fixup.kind != "grouped":
                continue
            ci = next(i for i, slots in enumerate(group.classes) if fixup.slot in slots)
            constraints.append((ci, fixup.data["groups"]))
        changed = bool(constraints)
        while changed:
            changed = False
            for ci, groups in constraints:
                members = [(a, i) for a in range(len(group.atoms)) for c, i in group.atoms[a] if c == ci]
                size = len(members) // groups
                count = [0] * groups
                for atom, index in members:
                    count[index // size] += atom in kept
                target = max(count)
                for atom, index in members:
                    if atom not in kept and count[index // size] < target:
                        kept.add(atom)
                        count[index // size] += 1
                        changed = True

    @staticmethod
    def _kept_per_class(group: ChannelGroup, kept_atoms: list[int]) -> list[list[int]]:
        per_class: dict[int, set[int]] = defaultdict(set)
        for atom in kept_atoms:
            for ci, index in group.atoms[atom]:
                per_class[ci].add(index)
        return [sorted(per_class[ci]) for ci in range(len(group.classes))]

    # -- slicing ------------------------------------------------------------------------------------------
    def _slice(self, group: ChannelGroup, kept: list[list[int]]) -> None:
        for contraction in group.contractions:
            if contraction.groups > 1:
                self._slice_grouped(contraction, kept[self._class_of(group, contraction.lhs)])
        for ci, slots in enumerate(group.classes):
            indices = np.asarray(kept[ci], dtype=np.int64)
            for slot in slots:
                value = slot.value
                if value.const_value is not None:
                    replace_const(value, np.take(value.const_value.numpy(), indices, axis=slot.axis))
                else:
                    set_dim(value, slot.axis, len(indices))

    def _rescale_norms(self, model: ir.Model, group: ChannelGroup, kept: list[list[int]]) -> int:
        """Each LayerNorm whose channels shrank keeps the full width's statistics (``passes.layernorm``):
        exact, since the analysis removes only channels that are zero at the norm's input."""
        count = 0
        for node, slot in group.norms:
            ci = self._class_of(group, slot)
            width = len({i for atom in group.atoms for c, i in atom if c == ci})  # before the slice
            if len(kept[ci]) == width:
                continue
            tag = f"{node.name}__p2d{self._names.count}"

            def initializer(array: np.ndarray, base: str) -> ir.Value:
                return add_initializer(model.graph, self._names(model.graph, base), array)

            rescale_layernorm(model, node, len(kept[ci]) / width, initializer, tag)
            count += 1
        return count

    @staticmethod
    def _slice_grouped(contraction, kept: list[int]) -> None:
        """Keeps, in each group's rows of a grouped Conv weight, the columns of that group's kept input
        channels (equally many per group: ``_even_groups``). The rows are read as they are now: another
        group may already have sliced them, in equal groups too."""
        weight = contraction.rhs.value
        array = weight.const_value.numpy()
        groups, per_group = contraction.groups, array.shape[1]
        rows = array.shape[0] // groups
        blocks = []
        for g in range(groups):
            columns = [i - g * per_group for i in kept if g * per_group <= i < (g + 1) * per_group]
            blocks.append(np.take(array[g * rows : (g + 1) * rows], columns, axis=1))
        replace_const(weight, np.concatenate(blocks, axis=0))

    # -- width-carrying constants ---------------------------------------------------------------------------
    def _class_of(self, group: ChannelGroup, slot: Slot) -> int:
        for ci, slots in enumerate(group.classes):
            if slot in slots:
                return ci
        raise _Unfixable(f"internal: slot {slot} not in group {group.id}")

    def _plan_fixups(self, model: ir.Model, group: ChannelGroup, kept: list[list[int]]) -> list:
        """Checks every fixup can be made, and returns closures that make them (nothing changes on error)."""
        edits = []
        split_nodes: dict[int, tuple[ir.Node, list[Fixup]]] = {}
        for fixup in group.fixups:
            ci = self._class_of(group, fixup.slot)
            old, new = RuleDim.width(fixup.slot), len(kept[ci])
            if fixup.kind == "groups":
                node = fixup.node
                edits.append(
                    lambda node=node, new=new: node.attributes.__setitem__("group", ir.AttrInt64("group", new))
                )
            elif fixup.kind == "width":
                edits.append(self._width_edit(model, fixup, old, new))
            elif fixup.kind == "slice":
                whole_ci = self._class_of(group, fixup.data["whole"])
                new_start = int(np.searchsorted(np.asarray(kept[whole_ci]), fixup.data["start"]))
                edits.append(self._slice_edit(model, fixup, new_start, new_start + new))
            elif fixup.kind == "split":
                split_nodes.setdefault(id(fixup.node), (fixup.node, []))[1].append(fixup)
        for node, fixups in split_nodes.values():
            edits.append(self._split_edit(model, node, fixups, group, kept))
        return [e for e in edits if e is not None]

    def _new_const(self, model: ir.Model, array: np.ndarray, base: str) -> ir.Value:
        return add_initializer(model.graph, self._names(model.graph, base), array, ir.DataType.INT64)

    def _width_edit(self, model: ir.Model, fixup: Fixup, old: int, new: int):
        node = fixup.node
        # The node's current target, not the one the analysis saw: an earlier group may have rewritten
        # another entry of the same Reshape/Expand, and that edit must be kept.
        shape: ir.Value = node.inputs[1]
        index: int = fixup.data["index"]
        if fixup.data.get("expand"):
            # Expand broadcasts numpy-style: a target shorter than the output aligns to the right, and an
            # output axis left of the target takes the input's (already sliced) width.
            index -= len(node.outputs[0].shape) - self._target_length(node, shape)
            if index < 0:
                return None
        if shape.const_value is not None:
            array = shape.const_value.numpy().copy()
            if array[index] in (0, -1) or (fixup.data.get("expand") and array[index] == 1):
                return None
            if array[index] != old:
                raise _Unfixable(f"{node.name}: shape entry {index} is {array[index]}, expected {old}")

            def edit() -> None:
                # Read the target again: an edit of this same group may have rewritten another entry
                # (a tensor with two axes in one group), and that change must be kept.
                current = node.inputs[1].const_value.numpy().copy()
                current[index] = new
                node.replace_input_with(1, self._new_const(model, current, shape.name or "shape"))

            return edit
        producer = shape.producer()
        if producer is None or producer.op_type != "Concat":
            raise _Unfixable(f"{node.name}: the target shape is computed at run time; cannot rewrite the width")
        offset, piece_index = 0, -1
        for position, piece in enumerate(producer.inputs):
            length = piece.shape[0] if piece.shape is not None and len(piece.shape) == 1 else None
            if not isinstance(length, int):
                raise _Unfixable(f"{producer.name}: shape piece of unknown length")
            if offset <= index < offset + length:
                piece_index = position
                break
            offset += length
        else:
            raise _Unfixable(f"{producer.name}: shape entry {index} not found")
        if piece.const_value is None:
            raise _Unfixable(f"{node.name}: shape entry {index} comes from a run-time value")
        array = piece.const_value.numpy().copy()
        entry = index - offset
        if array[entry] in (0, -1) or (fixup.data.get("expand") and array[entry] == 1):
            return None
        if array[entry] != old:
            raise _Unfixable(f"{node.name}: shape entry {index} is {array[entry]}, expected {old}")

        def edit_concat() -> None:
            # Clone the Concat for this node alone: the original may feed other Reshapes. Start from the
            # node's current Concat, which an earlier edit of this group may already have cloned.
            pieces = list(node.inputs[1].producer().inputs)
            current = pieces[piece_index].const_value.numpy().copy()
            current[entry] = new
            pieces[piece_index] = self._new_const(model, current, piece.name or "shape_piece")
            clone = ir.node("Concat", pieces, attributes={"axis": 0}, name=f"{producer.name}_p2d{self._names.count}")
            clone.outputs[0].name = f"{shape.name}_p2d{self._names.count}"
            clone.outputs[0].shape = shape.shape
            clone.outputs[0].type = shape.type
            model.graph.insert_before(node, clone)
            node.replace_input_with(1, clone.outputs[0])

        return edit_concat

    @staticmethod
    def _target_length(node: ir.Node, shape: ir.Value) -> int:
        length = shape.shape[0] if shape.shape is not None and len(shape.shape) == 1 else None
        if shape.const_value is not None:
            length = shape.const_value.numpy().size
        if not isinstance(length, int):
            raise _Unfixable(f"{node.name}: target shape of unknown length")
        return length

    def _slice_edit(self, model: ir.Model, fixup: Fixup, new_start: int, new_end: int):
        node, k = fixup.node, fixup.data["k"]
        starts, ends = node.inputs[1], node.inputs[2]

        def edit() -> None:
            # Current bounds, read when the edit is made: keep the edits of earlier groups and of this
            # group's other axes.
            s = node.inputs[1].const_value.numpy().copy()
            e = node.inputs[2].const_value.numpy().copy()
            s[k], e[k] = new_start, new_end
            node.replace_input_with(1, self._new_const(model, s, starts.name or "starts"))
            node.replace_input_with(2, self._new_const(model, e, ends.name or "ends"))

        return edit

    def _split_edit(self, model: ir.Model, node: ir.Node, fixups: list[Fixup], group, kept):
        sizes = []
        changed = {f.data["index"]: len(kept[self._class_of(group, f.slot)]) for f in fixups}
        axis = node.attributes.get("axis")
        axis = 0 if axis is None else axis.value
        for index, out in enumerate(node.outputs):
            width = RuleDim.width(Slot(out, axis % len(out.shape)))
            sizes.append(changed.get(index, width))
        array = np.asarray(sizes, dtype=np.int64)

        def edit() -> None:
            if "split" in node.attributes:  # opset < 13: the sizes are an attribute, not an input
                node.attributes["split"] = ir.AttrInt64s("split", array.tolist())
                return
            split = self._new_const(model, array, "split")
            if len(node.inputs) > 1:
                node.replace_input_with(1, split)
            else:
                node.resize_inputs(2)
                node.replace_input_with(1, split)
            if "num_outputs" in node.attributes:
                node.attributes.pop("num_outputs")

        return edit


class RuleDim:
    """Static width of a slot as recorded before the pass changed anything."""

    @staticmethod
    def width(slot: Slot) -> int:
        dim = slot.value.shape[slot.axis]
        if not isinstance(dim, int):
            raise _Unfixable(f"{slot}: width is not static")
        return dim


def _matmul_bias(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The bias Add of a MatMul: its one reader, adding a constant that varies only along the last axis."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add, index = uses[0].node, uses[0].idx
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - index]
    if other is None or other.const_value is None or out.shape is None:
        return None
    shape = tuple(other.const_value.shape.numpy())
    if not shape or any(d != 1 for d in shape[:-1]) or shape[-1] != out.shape[-1] or len(shape) > len(out.shape):
        return None
    return add, 1 - index


def _bias_value(node: ir.Node) -> ir.Value | None:
    """The constant a fold into ``node`` is added to: Gemm's C or Conv's bias (full width), a MatMul's Add."""
    if node.op_type == "MatMul":
        found = _matmul_bias(node)
        return None if found is None else found[0].inputs[found[1]]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None or bias.const_value is None or node.outputs[0].shape is None:
        return None
    width = node.outputs[0].shape[1]
    if tuple(bias.const_value.shape.numpy())[-1:] != (width,):
        return None  # a broadcast bias is not in the output channels' class
    return bias


def _ensure_bias(model: ir.Model, node: ir.Node, names: NameCounter) -> bool:
    """Makes :func:`_bias_value` of ``node`` an unshared, full-width constant; True if the graph changed."""
    bias = _bias_value(node)
    if bias is not None:
        if len(bias.uses()) == 1:
            return False
        reader = _matmul_bias(node) if node.op_type == "MatMul" else (node, 2)
        copy = add_initializer(model.graph, names(model.graph, bias.name or "bias"), bias.const_value.numpy())
        reader[0].replace_input_with(reader[1], copy)
        return True
    out = node.outputs[0]
    width = out.shape[-1] if node.op_type == "MatMul" else out.shape[1]
    weight = node.inputs[1].const_value
    if not isinstance(width, int) or weight is None:
        return False
    dtype = weight.dtype
    if node.op_type == "MatMul":
        zeros = add_initializer(model.graph, names(model.graph, f"{out.name}_bias"), np.zeros(width), dtype)
        added = ir.Value(name=f"{out.name}_biased", shape=out.shape, type=out.type)
        was_output = out.is_graph_output()
        out.replace_all_uses_with(added, replace_graph_outputs=True)
        if was_output:
            added.name, out.name = out.name, f"{out.name}_unbiased"
        add = ir.node("Add", [out, zeros], outputs=[added], name=f"{node.name}_bias")
        model.graph.insert_after(node, add)
        return True
    old = node.inputs[2] if len(node.inputs) > 2 else None
    base = np.zeros(width) if old is None or old.const_value is None else old.const_value.numpy()
    if old is not None and old.const_value is None:
        return False  # a run-time bias: the fold is refused below
    array = np.broadcast_to(base, (*np.shape(base)[:-1], width)) if np.ndim(base) else np.full(width, base)
    bias = add_initializer(model.graph, names(model.graph, f"{node.name}_bias"), array, dtype)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, bias)
    return True


def _apply_fold(fold: Fold) -> None:
    """Adds the constant channel's contribution to the consumer's bias (which shares its output columns'
    class, so a later slice of those columns slices the folded bias with them)."""
    node = fold.contraction.node
    weight = fold.contraction.rhs.value.const_value.numpy().astype(np.float64)
    c, k = fold.channel, fold.value
    if node.op_type == "MatMul":
        vector = k * weight[c, :]
    elif node.op_type == "Gemm":
        row = weight[:, c] if fold.contraction.rhs.axis == 1 else weight[c, :]
        vector = k * row * node.attributes.get_float("alpha", 1.0) / node.attributes.get_float("beta", 1.0)
    else:  # Conv without padding: every output position sums the whole kernel over the constant
        vector = k * weight[:, c].reshape(weight.shape[0], -1).sum(axis=1)
    bias = _bias_value(node)
    assert bias is not None, f"{node.name}: no bias to fold into (prepared before the analysis)"
    array = bias.const_value.numpy()
    replace_const(bias, (array.astype(np.float64) + vector).astype(array.dtype))


def _blocked_groups(analysis: ChannelAnalysis) -> list[dict[str, object]]:
    """Groups with a width that cannot be pruned, each with the first node that blocks it and why.

    Axes without a static width (batch, sequence) meet contractions too but are not channels: left out.
    """
    blocked = []
    for group in analysis.groups:
        if group.width <= 0 or group.prunable:
            continue
        if group.blocked:
            _slot, node, reason = group.blocked[0]
            blocked.append({"group": group.label, "width": group.width, "node": node, "reason": reason})
        else:
            reason = "no MatMul/Gemm/Conv reads these channels: nothing to remove them from"
            blocked.append({"group": group.label, "width": group.width, "node": "", "reason": reason})
    return blocked


register_pass(
    PassSpec(
        name="remove-channels",
        order=20,
        exactness="yes",
        summary="MLP / conv channels (grouped convs, channel LayerNorms): weights, biases, BN statistics, "
        "Reshape/Expand/Split/Slice constants, depthwise group counts",
        default=True,
        options={
            "multiple_of": PassOption(
                int,
                1,
                "round kept widths up to a multiple (keeps zero channels; exact)",
                flag="--multiple-of",
                constraints={"ge": 1},
            )
        },
        build=lambda o: RemoveChannelsPass(multiple_of=o.multiple_of),
        in_torch="carried",
    )
)
