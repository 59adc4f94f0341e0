"""Narrow the hidden (residual-stream, embedding) width: drop channels from every tensor that carries it.

Which channels: those that every source leaves zero (``analysis.hidden``: embedding columns, writer output
columns and biases, LayerNorm scale and bias), or an explicit list from a width plan (Minitron-style).
What changes: embedding and position-embedding columns, writer output columns (o_proj, down_proj, ...),
reader input rows (q/k/v, gate/up, lm_head, a tied head included: it reads the stream like any other
reader), norm scales and biases, per-channel constants. Every constant is sliced as a new tensor for the
one input that reads it, so a tensor the exporter shared with an unaffected node is never edited.
Graph outputs keep their shape: a hidden-width output is padded back (Pad + Gather), dropped channels
filled with zero, or with the LayerNorm bias when a LayerNorm produced the output.

RMSNorm exactness. With ``d`` channels of which the dropped ``d - d'`` are zero in the stream,
``mean_d(x²) = (d'/d) · mean_d'(x²)``, so the reference norm

    y = w · x / sqrt(mean_d(x²) + eps)
      = w · x / sqrt((d'/d) · (mean_d'(x²) + eps · d/d'))
      = (w · sqrt(d/d')) · x / sqrt(mean_d'(x²) + eps · d/d')

is an RMSNorm over the kept channels with ``eps' = eps · d/d'`` and ``w' = w · sqrt(d/d')``: the pass
rewrites both, and the result is exact (float rounding aside). Where the exported pattern is not the
plain ``ReduceMean → Add(eps) → Sqrt → Reciprocal → Mul(x) → Mul(w)`` chain, the same correction is made
by multiplying the ReduceMean's output by ``d'/d``, also exact.

LayerNorm exactness. With the same zero channels, ``r = d'/d``, and m', v' the mean and variance over
the kept channels, the reference statistics are

    mean_d = r · m'        E_d[x²] = r · E_d'[x²]        var_d = r · v' + r(1 - r) · m'²

(the second form of var_d avoids the cancellation of E[x²] - mean²), so the reference LayerNorm of a kept
channel, ``γ · (x - mean_d) / sqrt(var_d + eps) + β``, is computed exactly from the kept channels by
the decomposed norm the pass emits in place of each LayerNormalization (ReduceMean, Sub, Mul,
ReduceMean, the rescaled variance, Sqrt, Div, then γ and β). The dropped channels' own outputs were
``γ_c · (…) + β_c = 0`` (the analysis only calls a channel zero when the norm's scale and bias are zero
there). Dropping channels that are not zero (a plan) is approximate for any norm; the norms are then left
uncorrected (``rescale_norms=None``), the usual choice of width pruning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from prune2deploy.analysis.hidden import ConstUse, HiddenStream, analyze_hidden
from prune2deploy.errors import BadInputError
from prune2deploy.graph.initializers import NameCounter, add_initializer
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.layernorm import rescale_layernorm
from prune2deploy.passes.registry import PassOption, PassSpec, register_pass

__all__ = ["PruneHiddenPass"]

log = logging.getLogger(__name__)


class PruneHiddenPass(P2DPass):
    """Removes hidden channels: the provably zero ones, or those a plan lists.

    Args:
        channels: hidden channel indices to drop (a plan); ``None`` drops the detected zero channels.
        min_width: keep at least this many channels.
        rescale_norms: correct RMSNorm for the narrower mean (eps and scale). ``None`` (default) does it
            when every dropped channel is zero in the stream, the case where it makes the model exact.
        allow_inexact: change the model even when the result is approximate (a LayerNorm model). ``None``
            (default): only when ``channels`` is given, since a plan is an explicit request to approximate;
            zero detection alone never turns an exact pipeline into an approximate one.
    """

    name = "prune-hidden"

    def __init__(
        self,
        channels: Iterable[int] | None = None,
        *,
        min_width: int = 1,
        rescale_norms: bool | None = None,
        allow_inexact: bool | None = None,
    ) -> None:
        super().__init__()
        self.allow_inexact = channels is not None if allow_inexact is None else allow_inexact
        self.channels = None if channels is None else sorted({int(c) for c in channels})
        self.min_width = max(1, min_width)
        self.rescale_norms = rescale_norms
        self._names = NameCounter("h")

    @classmethod
    def from_mask(cls, keep: np.ndarray, **options) -> PruneHiddenPass:
        """A plan given as a keep-mask over the hidden width (1/True = keep), the form mask files use."""
        keep = np.asarray(keep).reshape(-1)
        return cls(channels=np.flatnonzero(keep == 0).tolist(), **options)

    def __repr__(self) -> str:
        plan = "detect-zero" if self.channels is None else f"{len(self.channels)} planned"
        return f"PruneHiddenPass(channels={plan}, min_width={self.min_width})"

    def call(self, model: ir.Model) -> P2DResult:
        stream = analyze_hidden(model)
        if not stream.ok:
            log.info("prune-hidden: hidden stream left unchanged: %s", stream.reason)
            return self.result(
                model,
                modified=False,
                refused={"hidden stream": stream.reason},
                width_before=stream.width,
                width_after=stream.width,
                removed=0,
            )
        width = stream.width
        zero = set(stream.zero_channels())
        drop = self._channels_to_drop(width, zero)
        if not drop:
            return self.result(
                model, modified=False, width_before=width, width_after=width, removed=0, zero_channels=len(zero)
            )
        dropped = set(drop)
        keep = np.asarray([c for c in range(width) if c not in dropped], dtype=np.int64)
        all_zero = dropped <= zero
        rescale = all_zero if self.rescale_norms is None else self.rescale_norms
        layernorms = [n.name for n, kind in stream.reductions if kind == "layernorm"]
        means = [n for n, kind in stream.reductions if kind == "mean"]
        exact = all_zero and (rescale or not (means or layernorms))
        if not exact and not self.allow_inexact:
            reason = "the result would be approximate" + (" (LayerNorm)" if layernorms and not rescale else "")
            log.info("prune-hidden: %d zero channels left in place: %s", len(drop), reason)
            return self.result(
                model,
                modified=False,
                refused={"hidden stream": f"{len(drop)} zero channels left in place: {reason}"},
                width_before=width,
                width_after=width,
                removed=0,
                zero_channels=len(zero),
            )

        norms, layernorms_rescaled, restored = self._rewrite(model, stream, drop, keep, means, rescale)
        reasons = []
        if not all_zero:
            reasons.append(f"{len(dropped - zero)} dropped channels are not zero in the stream")
        if layernorms and not rescale:
            reasons.append(f"{len(layernorms)} LayerNorms now average over {len(keep)} of {width} channels")
        if means and not rescale:
            reasons.append("RMSNorms left uncorrected")
        RemoveUnusedNodesPass()(model)  # the unsliced originals are unused now
        if not exact:
            log.warning("prune-hidden is approximate here: %s", "; ".join(reasons))
        return self.result(
            model,
            modified=True,
            exact=exact,
            inexact_because=reasons,
            width_before=width,
            width_after=len(keep),
            removed=len(drop),
            removed_channels=[int(c) for c in drop],
            zero_channels=len(zero),
            tensors_sliced=len(stream.consts),
            embeddings=[u.value.name for u in stream.uses("embedding")],
            writers=len(stream.uses("writer")),
            readers=len(stream.uses("reader")),
            norms=norms,
            layernorms=len(layernorms),
            layernorms_rescaled=layernorms_rescaled,
            outputs_restored=restored,
        )

    def _rewrite(
        self, model: ir.Model, stream: HiddenStream, drop: list[int], keep: np.ndarray, means, rescale: bool
    ) -> tuple[dict[str, int], int, list[str]]:
        """Narrows the stream to ``keep``: norms corrected first (folding changes how constants are sliced),
        then constants and values, then graph outputs padded back to the full width.

        Returns the RMSNorm correction counts, the number of LayerNorms rescaled and the restored outputs.
        """
        width = stream.width
        scales, norms = self._correct_rms_norms(model, stream, means, len(keep), rescale)
        fills = self._output_fills(stream, drop)
        self._narrow_stream(model, stream, keep, scales)
        outputs = list(stream.outputs)
        layernorms_rescaled = 0
        if rescale:
            outputs, layernorms_rescaled = self._rescale_layernorms(model, stream, len(keep) / width, outputs)
        restored = [v.name for v in outputs]
        for value in outputs:
            self._restore_output(model, value, keep, width, fills[value.name])
        return norms, layernorms_rescaled, restored

    def _channels_to_drop(self, width: int, zero: set[int]) -> list[int]:
        """The plan's channels (checked against the width) or the zero ones, leaving ``min_width`` kept."""
        if self.channels is None:
            drop = sorted(zero)
        else:
            bad = [c for c in self.channels if not 0 <= c < width]
            if bad:
                raise BadInputError(f"prune-hidden: channels {bad[:5]} out of range for hidden width {width}")
            drop = list(self.channels)
        return drop[: max(0, width - self.min_width)]

    def _correct_rms_norms(
        self, model: ir.Model, stream: HiddenStream, means: list[ir.Node], kept: int, rescale: bool
    ) -> tuple[dict[tuple[int, int], float], dict[str, int]]:
        """Corrects every RMSNorm's mean for the narrower width (module docstring), or counts it uncorrected.

        Returns the scale factors for the norm weights whose eps was folded (applied when those constants
        are sliced) and the count of each kind of correction, for the record.
        """
        scales: dict[tuple[int, int], float] = {}
        norms = {"rms_folded": 0, "rms_mean_scaled": 0, "rms_uncorrected": 0}
        for node in means:
            if not rescale:
                norms["rms_uncorrected"] += 1
            elif self._fold_rms(model, node, stream, stream.width, kept, scales):
                norms["rms_folded"] += 1
            else:
                self._scale_mean(model, node, kept / stream.width)
                norms["rms_mean_scaled"] += 1
        return scales, norms

    def _narrow_stream(
        self, model: ir.Model, stream: HiddenStream, keep: np.ndarray, scales: dict[tuple[int, int], float]
    ) -> None:
        """Slices every constant that carries the hidden width and gives every stream value the new width."""
        for key, use in stream.consts.items():
            self._slice_const(model, use, keep, scales.get(key, 1.0))
        for node in stream.transposes:  # a constant sliced under a Transpose: its output narrows too
            perm = node.attributes.get("perm")
            perm = [int(p) for p in perm.value] if perm is not None else [1, 0]
            stored = node.inputs[0].const_value.shape
            node.outputs[0].shape = ir.Shape([stored[p] for p in perm])
        for value in stream.values:
            dims = list(value.shape)
            dims[-1] = len(keep)
            value.shape = ir.Shape(dims)

    def _rescale_layernorms(
        self, model: ir.Model, stream: HiddenStream, ratio: float, outputs: list[ir.Value]
    ) -> tuple[list[ir.Value], int]:
        """Replaces every LayerNorm by its rescaled decomposition; a graph output it produced is replaced by
        the new norm's output. Returns the outputs and the number of norms rescaled."""
        count = 0
        for node, kind in stream.reductions:
            if kind != "layernorm":
                continue
            old, new = self._rescale_layernorm(model, node, ratio)
            count += 1
            outputs = [new if v is old else v for v in outputs]
        return outputs, count

    # -- constants --------------------------------------------------------------------------------------------
    def _new_initializer(self, model: ir.Model, array: np.ndarray, base: str) -> ir.Value:
        return add_initializer(model.graph, self._names(model.graph, base), array)

    def _slice_const(self, model: ir.Model, use: ConstUse, keep: np.ndarray, scale: float) -> None:
        old = use.value
        array = old.const_value.numpy()
        for axis in sorted(use.axes):
            array = np.take(array, keep, axis=axis)
        if scale != 1.0:
            array = (array.astype(np.float64) * scale).astype(array.dtype)
        use.node.replace_input_with(use.index, self._new_initializer(model, array, old.name or "hidden"))

    # -- RMSNorm ----------------------------------------------------------------------------------------------
    def _fold_rms(
        self, model: ir.Model, mean: ir.Node, stream: HiddenStream, width: int, kept: int, scales: dict
    ) -> bool:
        """Rewrites eps and the norm scale of one ``ReduceMean → Add(eps) → Sqrt → 1/· → Mul → Mul(w)``."""
        add = _only_consumer(mean.outputs[0], "Add")
        if add is None:
            return False
        eps_index = next((i for i, v in enumerate(add.inputs) if v is not mean.outputs[0]), None)
        eps = add.inputs[eps_index] if eps_index is not None else None
        if eps is None or eps.const_value is None or eps.const_value.numpy().size != 1:
            return False
        sqrt = _only_consumer(add.outputs[0], "Sqrt")
        if sqrt is None:
            return False
        normalizers: list[ir.Node] = []
        recip = _only_consumer(sqrt.outputs[0], "Reciprocal")
        if recip is not None:
            normalizers = [u.node for u in recip.outputs[0].uses()]
            if not all(n.op_type == "Mul" for n in normalizers):
                return False
        else:
            normalizers = [u.node for u in sqrt.outputs[0].uses()]
            if not all(u.node.op_type == "Div" and u.idx == 1 for u in sqrt.outputs[0].uses()):
                return False
        keys = []
        for normalizer in normalizers:
            scale_node = _only_consumer(normalizer.outputs[0], "Mul")
            if scale_node is None:
                return False
            key = next(
                ((id(scale_node), i) for i in range(2) if (id(scale_node), i) in stream.consts),
                None,
            )
            if key is None or stream.consts[key].role != "per-channel":
                return False
            keys.append(key)
        if not keys or any(k in scales for k in keys):
            return False
        ratio = width / kept
        array = eps.const_value.numpy()
        add.replace_input_with(eps_index, self._new_initializer(model, (array * ratio).astype(array.dtype), "eps"))
        for key in keys:
            scales[key] = math.sqrt(ratio)
        return True

    def _scale_mean(self, model: ir.Model, mean: ir.Node, factor: float) -> None:
        """mean_d(x²) = (d'/d) · mean_d'(x²): multiply the narrower mean back to the reference value."""
        out = mean.outputs[0]
        uses = list(out.uses())
        dtype = out.dtype.numpy() if out.dtype is not None else np.float32
        const = self._new_initializer(model, np.asarray(factor, dtype=dtype), "mean_scale")
        mul = ir.node("Mul", [out, const], name=f"{mean.name}__hidden_scale")
        mul.outputs[0].name = f"{out.name}__hidden_scaled"
        mul.outputs[0].shape, mul.outputs[0].type = out.shape, out.type
        model.graph.insert_after(mean, mul)
        for use in uses:
            use.node.replace_input_with(use.idx, mul.outputs[0])

    # -- LayerNorm ----------------------------------------------------------------------------------------------
    def _rescale_layernorm(self, model: ir.Model, node: ir.Node, r: float) -> tuple[ir.Value, ir.Value]:
        """Replaces one LayerNormalization over the kept channels by the decomposed norm with the reference
        statistics (module docstring); returns (old output, new output), the new one under the old name."""
        tag = f"{node.name}__ln{self._names.count}"
        return rescale_layernorm(model, node, r, lambda array, base: self._new_initializer(model, array, base), tag)

    # -- graph outputs ----------------------------------------------------------------------------------------
    @staticmethod
    def _output_fills(stream: HiddenStream, drop: list[int]) -> dict[str, np.ndarray]:
        """Value of each dropped channel in a restored output: the producing LayerNorm's bias, else zero."""
        fills = {}
        for value in stream.outputs:
            fill = np.zeros(stream.width, dtype=np.float32)
            producer = value.producer()
            if producer is not None and producer.op_type == "LayerNormalization" and len(producer.inputs) > 2:
                bias = producer.inputs[2]
                if bias is not None and bias.const_value is not None:
                    fill[drop] = bias.const_value.numpy()[drop]
            fills[value.name] = fill
        return fills

    def _restore_output(self, model: ir.Model, value: ir.Value, keep: np.ndarray, width: int, fill) -> None:
        """Pads a narrowed graph output back to ``width`` channels in their original order."""
        graph = model.graph
        rank = len(value.shape)
        dropped = np.setdiff1d(np.arange(width), keep)
        position = np.empty(width, dtype=np.int64)
        position[keep] = np.arange(len(keep))
        position[dropped] = len(keep) + np.arange(len(dropped))
        pads = np.zeros(2 * rank, dtype=np.int64)
        pads[2 * rank - 1] = len(dropped)
        name = value.name
        value.name = f"{name}__narrow"
        pad = ir.node("Pad", [value, self._new_initializer(model, pads, "pads")], name=f"{name}__pad")
        gather = ir.node(
            "Gather",
            [pad.outputs[0], self._new_initializer(model, position, "order")],
            attributes={"axis": rank - 1},
            name=f"{name}__order",
        )
        nodes = [pad, gather]
        result = gather.outputs[0]
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        if np.any(fill):
            add = ir.node(
                "Add", [result, self._new_initializer(model, fill.astype(dtype), "fill")], name=f"{name}__fill"
            )
            nodes.append(add)
            result = add.outputs[0]
        dims = list(value.shape)
        dims[-1] = width
        for node in nodes:
            node.outputs[0].shape, node.outputs[0].type = ir.Shape(dims), value.type
            node.outputs[0].name = f"{name}__{node.op_type.lower()}"
        result.name = name
        graph.extend(nodes)
        graph.outputs[next(i for i, v in enumerate(graph.outputs) if v is value)] = result


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != op_type:
        return None
    return uses[0].node


register_pass(
    PassSpec(
        name="prune-hidden",
        order=40,
        exactness="yes for zero channels: RMSNorm eps and scale rescaled, LayerNorm statistics rescaled",
        summary="residual-stream channels (--drop-hidden for a width plan)",
        default=True,
        options={
            "drop_hidden": PassOption(
                list[int] | None,
                None,
                "width plan: residual-stream channel indices to remove",
                flag="--drop-hidden",
                parse=lambda text: [int(x) for x in text.split(",") if x.strip()],
                enables=True,
            )
        },
        build=lambda o: PruneHiddenPass(channels=o.drop_hidden),
        in_torch="carried",
    )
)
