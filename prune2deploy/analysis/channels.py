"""Coupled channel groups: which tensor axes share one channel index space, and which may shrink.

Channel analysis is a dataflow problem over *slots*, a slot being one axis of one value (a weight, a bias,
an activation). Per-op axis rules (``analysis.axis_rules``) declare that two slots are the same index space
(an elementwise Add, a MatMul's output columns and its weight's columns), that one slot is a segment of
another (Concat, Split, Slice), that a pair of slots is contracted by the op (MatMul's K, Conv's input
channels: the only places where a channel may end), or that a slot is blocked (reductions, graph outputs,
ops without a rule). Slots joined by "same" links form a *class*; classes joined by segments form a
*group*. A channel of a group is removable when every contraction that consumes it sees a zero on at least
one side: a zero weight row or an input that is provably zero for that channel.

Removing a channel deletes its index from every slot of the group, so the graph changes only at the
contractions, where the channel contributed zero. That is why the pass built on this is exact.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis import zero_rules
from prune2deploy.analysis.axis_rules import RULES
from prune2deploy.analysis.slots import ChannelFacts, Contraction, Fixup, RuleContext, Slot, UnionFind
from prune2deploy.graph.attributes import float_attr, int_attr, ints_attr
from prune2deploy.graph.scopes import module_of

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "Contraction",
    "Fixup",
    "Fold",
    "RuleContext",
    "Slot",
    "analyze_channels",
]

log = logging.getLogger(__name__)


@dataclass
class Fold:
    """A constant channel read by a contraction: its contribution is a constant vector for the consumer's bias.

    ``channel`` is the index in ``contraction.lhs``'s axis (the activation) and ``value`` the constant.
    """

    contraction: Contraction
    channel: int
    value: float


def const_zero_mask_of(slot: Slot) -> np.ndarray:
    """Per channel of a constant slot: all its entries are zero."""
    return zero_rules.const_zero_mask(slot.value, slot.axis)


def fold_refusal(node: ir.Node, lhs: Slot, rhs: Slot) -> str | None:
    """Why a constant channel of ``lhs`` cannot fold into ``node``'s bias (None: it can, exactly).

    Exact where every output position reads the channel at every kernel tap: MatMul/Gemm, and Conv without
    padding (a padded Conv's border positions read zeros instead of the constant).
    """
    if lhs.value.const_value is not None or rhs.value.const_value is None:
        return f"{node.name} ({node.op_type}) does not read the constant channel against a constant weight"
    if node.op_type == "MatMul":
        return None if len(rhs.value.shape or ()) == 2 else f"{node.name}: batched MatMul weight"
    if node.op_type == "Gemm":
        return f"{node.name}: Gemm with beta 0 has no bias to fold into" if float_attr(node, "beta", 1.0) == 0 else None
    if node.op_type == "Conv":
        if int_attr(node, "group", 1) != 1:
            return f"{node.name}: grouped Conv"
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if any(ints_attr(node, "pads", [])) or auto_pad not in ("NOTSET", "VALID"):
            return (
                f"{node.name} (Conv) pads its input: border positions read zeros, not the constant, so the "
                "channel does not fold into a bias; it is kept"
            )
        return None
    return f"{node.name}: no bias fold for {node.op_type}"


@dataclass
class ChannelGroup:
    """Channels shared by a set of slots; ``channels`` lists, per atom, the (slot-class, index) pairs."""

    id: str
    classes: list[list[Slot]]
    width: int
    atoms: list[list[tuple[int, int]]]  # atom -> [(class index, channel index in that class)]
    contractions: list[Contraction]
    fixups: list[Fixup]
    blocked: list[tuple[Slot, str, str]]  # (slot, node name, reason)
    zero_atoms: list[int] = field(default_factory=list)
    constant_atoms: list[int] = field(default_factory=list)  # removable once their folds are made
    folds: dict[int, list[Fold]] = field(default_factory=dict)  # constant atom -> its folds
    fold_refused: dict[str, str] = field(default_factory=dict)  # node -> why a constant channel stays
    norms: list[tuple[ir.Node, Slot]] = field(default_factory=list)  # LayerNorms over this group's channels

    @property
    def label(self) -> str:
        """For people: "writer → reader" (the id alone names only the module that reads the channels)."""
        contraction_nodes = {id(c.node) for c in self.contractions}
        writers = sorted(
            {
                module_of(use.node)
                for slot in self.slots
                if slot.is_const
                for use in slot.value.uses()
                if id(use.node) not in contraction_nodes
            }
            - {""}
        )
        if not writers:
            return self.id
        writer_parts, reader_parts = writers[0].split("."), self.id.split(".")
        common = 0
        while common < min(len(writer_parts), len(reader_parts)) - 1 and writer_parts[common] == reader_parts[common]:
            common += 1
        reader = ".".join(reader_parts[common:])
        more = f" (+{len(writers) - 1})" if len(writers) > 1 else ""
        return f"{writers[0]}{more} → {reader}"

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.contractions)

    @property
    def slots(self) -> list[Slot]:
        return [slot for cls in self.classes for slot in cls]

    def zero_weight_atoms(self) -> set[int]:
        """Atoms that some weight (a constant of rank ≥ 2 in the group) zeroes: channels someone pruned."""
        atoms: set[int] = set()
        for ci, slots in enumerate(self.classes):
            for slot in slots:
                if not slot.is_const or len(slot.value.shape) < 2:
                    continue
                mask = const_zero_mask_of(slot)
                atoms.update(a for a, members in enumerate(self.atoms) for c, i in members if c == ci and mask[i])
        return atoms

    def partly_zero(self) -> dict[str, int]:
        """Channels that some weight zeroes but that are not removable, and how many of them keep a non-zero
        bias: what ``torch.nn.utils.prune.ln_structured`` leaves (it zeroes weight rows, never the bias).

        So a user who pruned can see that the zeros were found and why they were not enough.
        """
        from prune2deploy.analysis.zero_rules import const_zero_mask

        if self.blocked or not self.width:
            return {"zero_weight_channels": 0, "zero_weight_nonzero_bias": 0}
        zero_w: list[np.ndarray] = []
        bias_on: list[np.ndarray] = []
        for slots in self.classes:
            width = RuleContext.dim(slots[0].value, slots[0].axis)
            if not isinstance(width, int):
                return {"zero_weight_channels": 0, "zero_weight_nonzero_bias": 0}
            zw, nb = np.zeros(width, dtype=bool), np.zeros(width, dtype=bool)
            for slot in slots:
                if not slot.is_const:
                    continue
                mask = const_zero_mask(slot.value, slot.axis)
                if mask.shape != (width,):
                    continue
                if len(slot.value.shape) >= 2:
                    zw |= mask
                elif len(slot.value.shape) == 1:
                    nb |= ~mask
            zero_w.append(zw)
            bias_on.append(nb)
        removable = set(self.zero_atoms)
        partly = [
            a for a, members in enumerate(self.atoms) if a not in removable and any(zero_w[c][i] for c, i in members)
        ]
        with_bias = [a for a in partly if any(bias_on[c][i] for c, i in self.atoms[a])]
        return {"zero_weight_channels": len(partly), "zero_weight_nonzero_bias": len(with_bias)}

    def summary(self) -> dict:
        """A JSON-friendly description for ``inspect`` and the report."""
        return {
            "group": self.id,
            "label": self.label,
            "width": self.width,
            "zero_channels": len(self.zero_atoms),
            **self.partly_zero(),
            "constant_channels": len(self.constant_atoms),
            "prunable": self.prunable,
            "weights": sorted({s.value.name for s in self.slots if s.is_const}),
            "tensors": [repr(s) for s in self.slots][:64],
            "num_tensors": len(self.slots),
            "contractions": [c.node.name for c in self.contractions],
            "blocked": [
                {"tensor": repr(slot), "node": node, "reason": reason} for slot, node, reason in self.blocked[:5]
            ],
        }


class ChannelAnalysis(ChannelFacts):
    """Runs the axis rules over a graph and builds :class:`ChannelGroup` objects."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__()
        self.model = model
        self._zero_cache: dict[Slot, np.ndarray] = {}
        self._const_cache: dict[Slot, np.ndarray | None] = {}
        self.groups: list[ChannelGroup] = []

    # -- building -------------------------------------------------------------------------------------------
    def run(self) -> ChannelAnalysis:
        graph = self.model.graph
        for value in graph.inputs:
            self._block_value(value, "<graph input>", "graph inputs keep their shape")
        for value in graph.outputs:
            self._block_value(value, "<graph output>", "graph outputs keep their shape")
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.graph is not graph:  # a subgraph (If/Loop/Scan body) may read outer values by name
                for value in node.inputs:
                    self._block_value(value, node.name or node.op_type, "read inside a subgraph (If/Loop/Scan)")
        for node in graph:
            ctx = RuleContext(self, node)
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                reason = f"no axis rule for op {node.domain + '::' if node.domain else ''}{node.op_type}"
            else:
                try:
                    reason = rule(ctx, node)
                except Exception as exc:  # a rule bug must not produce a wrong graph: block instead
                    log.debug("axis rule %s failed on %s", node.op_type, node.name, exc_info=True)
                    reason = f"axis rule for {node.op_type} failed: {exc}"
            if reason:
                for value in [*node.inputs, *node.outputs]:
                    self._block_value(value, node.name or node.op_type, reason, ctx)
                continue
            for value in [*node.inputs, *node.outputs]:
                if value is None or ctx.rank(value) is None:
                    continue
                for axis in range(ctx.rank(value)):
                    if Slot(value, axis) not in ctx.touched:
                        ctx.block(Slot(value, axis), f"{node.op_type} does not map axis {axis} of '{value.name}'")
        self._build_groups()
        return self

    def _block_value(self, value: ir.Value | None, node_name: str, reason: str, ctx: RuleContext | None = None) -> None:
        if value is None or value.shape is None:
            return
        for axis in range(len(value.shape)):
            self._blocked.append((Slot(value, axis), node_name, reason))

    def _build_groups(self) -> None:
        for slot, _, _ in self._blocked:
            self._same.find(slot)
        classes: dict[Slot, list[Slot]] = defaultdict(list)
        all_slots: set[Slot] = set(self._same.parent)
        for part, whole, _ in self._segments:
            all_slots.update((part, whole))
        for slot in all_slots:
            classes[self._same.find(slot)].append(slot)
        # Classes joined by segment links form one group.
        groups_uf = UnionFind()
        for root in classes:
            groups_uf.find(root)
        for part, whole, _ in self._segments:
            groups_uf.union(self._same.find(part), self._same.find(whole))
        members: dict[Slot, list[Slot]] = defaultdict(list)
        for root in classes:
            members[groups_uf.find(root)].append(root)
        blocked_by_root: dict[Slot, list] = defaultdict(list)
        for slot, node, reason in self._blocked:
            blocked_by_root[self._same.find(slot)].append((slot, node, reason))
        contractions_by_root: dict[Slot, list[Contraction]] = defaultdict(list)
        for contraction in self._contractions:
            contractions_by_root[self._same.find(contraction.lhs)].append(contraction)
        fixups_by_root: dict[Slot, list[Fixup]] = defaultdict(list)
        for fixup in self._fixups:
            fixups_by_root[self._same.find(fixup.slot)].append(fixup)
        norms_by_root: dict[Slot, list[tuple[ir.Node, Slot]]] = defaultdict(list)
        for norm_node, norm_slot in self._norms:
            norms_by_root[self._same.find(norm_slot)].append((norm_node, norm_slot))
        segments_by_group: dict[Slot, list] = defaultdict(list)
        for seg in self._segments:
            segments_by_group[groups_uf.find(self._same.find(seg[0]))].append(seg)

        for group_root, roots in members.items():
            class_slots = [sorted(classes[r], key=repr) for r in roots]
            blocked = [b for r in roots for b in blocked_by_root.get(r, [])]
            contractions = [c for r in roots for c in contractions_by_root.get(r, [])]
            if not contractions:
                continue  # nothing ends here: no channel to remove (spatial axes, sequence axes, ...)
            # A value without a shape cannot be blocked axis by axis when a rule fails on it (the rule's
            # blocks are silently lost), so a channel that reaches one cannot be followed: block the group.
            for cls in class_slots:
                for slot in cls:
                    if slot.value.shape is None:
                        producer = slot.value.producer()
                        reason = f"'{slot.value.name}' has no shape (run shape inference first)"
                        blocked.append((slot, producer.name if producer is not None else "", reason))
            widths = []
            for cls in class_slots:
                dims = {RuleContext.dim(s.value, s.axis) for s in cls}
                dims.discard(None)
                width = next(iter(dims)) if len(dims) == 1 else None
                if not isinstance(width, int):
                    reason = f"channel width is not static or not consistent: {sorted(map(str, dims))}"
                    blocked.append((cls[0], "", reason))
                    width = 0
                widths.append(width)
            root_index = {r: i for i, r in enumerate(roots)}
            atoms = self._atoms(roots, widths, segments_by_group.get(group_root, []), root_index)
            group = ChannelGroup(
                id=self._group_name(contractions, class_slots),
                classes=class_slots,
                width=max(widths) if widths else 0,
                atoms=atoms,
                contractions=contractions,
                fixups=[f for r in roots for f in fixups_by_root.get(r, [])],
                blocked=blocked,
                norms=[n for r in roots for n in norms_by_root.get(r, [])],
            )
            if not group.blocked and all(widths):
                group.zero_atoms = self._zero_atoms(group, roots, root_index)
                self._constant_atoms(group, roots)
            self.groups.append(group)
        # Ids key the pass records: groups whose contractions share a module (two MLP layers written in one
        # module, attention projections) are told apart by their contraction nodes, which no two groups share.
        counts: dict[str, int] = defaultdict(int)
        for group in self.groups:
            counts[group.id] += 1
        for group in self.groups:
            if counts[group.id] > 1:
                group.id = f"{group.id} [{', '.join(sorted(c.node.name for c in group.contractions))}]"
        self.groups.sort(key=lambda g: g.id)

    def _atoms(self, roots, widths, segments, root_index) -> list[list[tuple[int, int]]]:
        if len(roots) == 1:
            return [[(0, i)] for i in range(widths[0])]
        uf = UnionFind()
        for ci, width in enumerate(widths):
            for i in range(width):
                uf.find((ci, i))
        for part, whole, offset in segments:
            cp, cw = root_index[self._same.find(part)], root_index[self._same.find(whole)]
            for j in range(widths[cp]):
                uf.union((cw, offset + j), (cp, j))
        grouped: dict = defaultdict(list)
        for ci, width in enumerate(widths):
            for i in range(width):
                grouped[uf.find((ci, i))].append((ci, i))
        return sorted(grouped.values(), key=lambda members: members[0])

    @staticmethod
    def _group_name(contractions: list[Contraction], class_slots: list[list[Slot]]) -> str:
        modules = sorted({module_of(c.node) for c in contractions} - {""})
        if modules:
            return modules[0] if len(modules) == 1 else f"{modules[0]} (+{len(modules) - 1})"
        return repr(class_slots[0][0])

    # -- zero detection -------------------------------------------------------------------------------------
    def zero_mask(self, slot: Slot) -> np.ndarray | None:
        """Boolean per channel: provably zero for every input. ``None`` when the width is unknown."""
        if slot not in self._zero_cache:
            self._zero_cache[slot] = zero_rules.zero_mask(self, slot)
        return self._zero_cache[slot]

    def rhs_zero(self, contraction: Contraction) -> np.ndarray | None:
        """Per channel of ``contraction.lhs``: the weight side is zero for it. A grouped Conv's input channel
        ``g·k + j`` is zero when column ``j`` of group ``g``'s rows is."""
        if contraction.groups == 1:
            return self.zero_mask(contraction.rhs)
        weight = contraction.rhs.value.const_value
        if weight is None:
            return None
        array = weight.numpy()
        groups, per_group = contraction.groups, array.shape[1]
        rows = array.reshape(groups, array.shape[0] // groups, per_group, -1)  # [group, row, column, taps]
        return np.all(rows == 0, axis=(1, 3)).reshape(groups * per_group)

    def _zero_atoms(self, group: ChannelGroup, roots, root_index) -> list[int]:
        # A channel index is removable in a class if every contraction of that class sees a zero side.
        removable_per_class: list[np.ndarray] = []
        for ci, root in enumerate(roots):
            width = RuleContext.dim(group.classes[ci][0].value, group.classes[ci][0].axis)
            ok = np.ones(int(width), dtype=bool)
            for contraction in group.contractions:
                if self._same.find(contraction.lhs) != root:
                    continue
                lhs, rhs = self.zero_mask(contraction.lhs), self.rhs_zero(contraction)
                side = np.zeros_like(ok)
                if lhs is not None:
                    side |= lhs
                if rhs is not None:
                    side |= rhs
                ok &= side
            for _node, norm_slot in group.norms:  # a norm's statistics may lose only channels it sees as 0
                if self._same.find(norm_slot) == root:
                    seen = self.zero_mask(norm_slot)
                    ok &= seen if seen is not None and seen.shape == ok.shape else np.zeros_like(ok)
            removable_per_class.append(ok)
        return [a for a, members in enumerate(group.atoms) if all(removable_per_class[ci][i] for ci, i in members)]

    def const_channels(self, slot: Slot) -> np.ndarray | None:
        """Per channel: its value where provably constant at every position for every input, else NaN."""
        if slot not in self._const_cache:
            self._const_cache[slot] = zero_rules.const_channel_values(self, slot)
        return self._const_cache[slot]

    def _constant_atoms(self, group: ChannelGroup, roots) -> None:
        """Atoms that are not zero but constant wherever they are contracted, with a bias fold for each."""
        zero = set(group.zero_atoms)
        candidates = [a for a in range(len(group.atoms)) if a not in zero]
        if not candidates:
            return
        per_class: list[list[tuple[Contraction, np.ndarray | None, np.ndarray | None]]] = []
        for root in roots:
            entries = []
            for contraction in group.contractions:
                if self._same.find(contraction.lhs) != root:
                    continue
                entries.append((contraction, self.rhs_zero(contraction), self.const_channels(contraction.lhs)))
            per_class.append(entries)
        pruned = group.zero_weight_atoms()  # channels a user pruned: say why those stay
        norms_per_class = [[n for n in group.norms if self._same.find(n[1]) == root] for root in roots]
        for atom in candidates:
            folds: list[Fold] = []
            ok = True
            for ci, index in group.atoms[atom]:
                for norm_node, norm_slot in norms_per_class[ci]:
                    seen = self.const_channels(norm_slot)
                    if seen is None or np.isnan(seen[index]):  # varies with the input: the norm needs it
                        if atom in pruned:
                            node_name, reason = zero_rules.why_not_constant(self, norm_slot, index)
                            group.fold_refused[node_name or norm_node.name] = reason
                        ok = False
                    elif seen[index] != 0:
                        group.fold_refused[norm_node.name] = (
                            f"{norm_node.name} (LayerNormalization) averages over a constant, non-zero channel: "
                            "removing it would change the norm's statistics; it is kept"
                        )
                        ok = False
                if not ok:
                    break
                for contraction, rhs_zero, lhs_values in per_class[ci]:
                    if rhs_zero is not None and rhs_zero[index]:
                        continue
                    value = np.nan if lhs_values is None else lhs_values[index]
                    if np.isnan(value):
                        if atom in pruned:
                            node_name, reason = zero_rules.why_not_constant(self, contraction.lhs, index)
                            group.fold_refused[node_name or contraction.node.name] = reason
                        ok = False
                        break
                    if value == 0:
                        continue
                    refusal = fold_refusal(contraction.node, contraction.lhs, contraction.rhs)
                    if refusal is not None:
                        group.fold_refused[contraction.node.name] = refusal
                        ok = False
                        break
                    folds.append(Fold(contraction, index, float(value)))
                if not ok:
                    break
            if ok:
                group.constant_atoms.append(atom)
                group.folds[atom] = folds


def analyze_channels(model: ir.Model) -> ChannelAnalysis:
    """Builds the channel groups of ``model`` (which must carry value shapes)."""
    return ChannelAnalysis(model).run()
