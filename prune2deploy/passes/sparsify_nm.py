"""Make (or check) MatMul/Gemm/Conv weights N:M sparse along K, for sparse tensor cores.

Approximate when imposing: zeroing half of every group of four changes the outputs, so the report carries
the error (verify.py measures it). In check mode nothing changes and the pass is exact; it reports which
weights are eligible, which already are N:M and how much of the model's GEMM work that covers, which is
the first thing to look at when "2:4 gave no speedup".

``auto`` (the compile's default) checks when the input is already an N:M checkpoint and imposes
otherwise. The input counts as N:M when at least one eligible weight (not skipped, not all zero) is
exactly N:M: dense or unstructured-sparse weights are never N:M in every one of their thousands of groups
by chance, while a 2:4 producer's (SparseGPT, Wanda 2:4, ModelOpt, compressed-tensors) all are. With
``require`` (the compile's pass), a weight of such a checkpoint that is not N:M fails the compile (exit 1)
with the weights named: re-masking a nearly-2:4 checkpoint by magnitude would silently replace the
producer's choice; ``sparsity: impose`` asks for exactly that. An explicit ``check`` only reports (the
record's ``violations`` per weight).

Criteria for which N of every M to keep:

- ``magnitude``: the largest ``|W|``.
- ``wanda``: the largest ``|W| * ||X||_2`` per input feature (Sun et al. 2023, "A Simple and Effective
  Pruning Approach for Large Language Models", https://arxiv.org/abs/2306.11695), with per-feature L2
  norms of each node's activation input from a calibration run.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from prune2deploy.analysis.cost import SPARSITY_KEY, model_cost
from prune2deploy.analysis.nm import NM_OPS, nm_eligibility, nm_mask, nm_violations
from prune2deploy.errors import ConfigError, VerificationError
from prune2deploy.graph.initializers import add_initializer, replace_const, unique_name
from prune2deploy.graph.scopes import module_of, name_scopes
from prune2deploy.passes.base import P2DPass, P2DResult
from prune2deploy.passes.registry import PassOption, PassSpec, register_pass

__all__ = ["SparsifyNMPass"]

log = logging.getLogger(__name__)

_MODES = ("check", "impose", "auto")
_CRITERIA = ("magnitude", "wanda")


class SparsifyNMPass(P2DPass):
    """Checks or imposes N:M sparsity (default 2:4) on the constant weights of MatMul, Gemm and Conv.

    Every MatMul/Gemm/Conv gets one record (see :meth:`call`). Imposed nodes are tagged with node
    metadata ``p2d.sparsity = "n:m"`` so engines and the cost model find them without re-reading weights.
    An initializer that another, untouched node also reads is copied, never modified in place.
    """

    name = "sparsify-2:4"

    def __init__(
        self,
        *,
        n: int = 2,
        m: int = 4,
        mode: str = "check",
        criterion: str = "magnitude",
        norms: Mapping[str, np.ndarray] | None = None,
        min_k: int = 0,
        skip: Sequence[str] = (),
        cost_batch: int = 1,
        cost_seq: int = 128,
        compute_cost: bool = True,
        require: bool = False,
    ) -> None:
        """Configures the pass.

        Args:
            n: Non-zeros kept per group. m: Group size along K.
            mode: ``"check"`` only reports; ``"impose"`` zeros the weights; ``"auto"`` checks an input that
                already is N:M and imposes otherwise (module docstring).
            criterion: ``"magnitude"`` or ``"wanda"`` (needs ``norms``).
            norms: Activation value name (the node's data input) -> 1-D per-input-feature L2 norms.
            min_k: Leave weights with K below this dense (small K gains little and hurts accuracy most).
            skip: fnmatch patterns matched against node names, weight names and name scopes
                (``"*lm_head"`` keeps the LM head dense).
            cost_batch: Batch at which the FLOPs fraction is computed. cost_seq: Its sequence length.
            compute_cost: Compute the FLOPs fraction (one shape inference; a small ORT run at most).
            require: When ``auto`` chose check (the input is an N:M checkpoint), a checked weight that is not
                N:M raises VerificationError naming it. An explicit ``check`` only reports.
        """
        super().__init__()
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ConfigError(f"sparsify: N:M needs integers 0 < n < m, got {n}:{m}")
        if mode not in _MODES:
            raise ConfigError(f"sparsify: mode must be one of {_MODES}, got {mode!r}")
        if criterion not in _CRITERIA:
            raise ConfigError(f"sparsify: criterion must be one of {_CRITERIA}, got {criterion!r}")
        if criterion == "wanda" and mode == "impose" and not norms:
            raise ConfigError("sparsify: criterion 'wanda' needs calibration norms (activation name -> norms)")
        self.n, self.m, self.mode, self.criterion = n, m, mode, criterion
        self.norms = dict(norms or {})
        self.min_k, self.skip = min_k, tuple(skip)
        self.cost_batch, self.cost_seq, self.compute_cost = cost_batch, cost_seq, compute_cost
        self.require = require
        self.name = f"sparsify-{n}:{m}"  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"SparsifyNMPass({self.n}:{self.m}, mode={self.mode!r}, criterion={self.criterion!r}, "
            f"min_k={self.min_k}, skip={list(self.skip)})"
        )

    def _skipped(self, node: ir.Node, weight: ir.Value, k: int) -> str | None:
        names = [node.name or "", weight.name or "", *name_scopes(node)]
        for pattern in self.skip:
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return f"matches skip pattern {pattern!r}"
        if k < self.min_k:
            return f"K={k} is below min_k={self.min_k}"
        return None

    def _scores(self, node: ir.Node, weight: np.ndarray, axis: int) -> np.ndarray | str:
        """Importance of each weight element, or a reason why it cannot be scored."""
        magnitude = np.abs(weight.astype(np.float32))
        if self.criterion == "magnitude":
            return magnitude
        activation = node.inputs[0].name if node.inputs[0] is not None else None
        if activation not in self.norms:
            return f"no Wanda calibration norms for activation {activation!r}"
        norms = np.asarray(self.norms[activation], dtype=np.float32).reshape(-1)
        if node.op_type == "Conv":
            groups = node.attributes.get_int("group", 1)
            cin_g, cout = weight.shape[1], weight.shape[0]
            if norms.size != cin_g * groups:
                raise ConfigError(
                    f"sparsify: Wanda norms for {activation!r} have {norms.size} entries but Conv "
                    f"{node.name!r} has {cin_g * groups} input channels"
                )
            group_of = np.arange(cout) // (cout // groups)
            per_channel = norms[group_of[:, None] * cin_g + np.arange(cin_g)[None, :]]  # [Cout, Cin/g]
            return magnitude * per_channel.reshape(cout, cin_g, *([1] * (weight.ndim - 2)))
        if norms.size != weight.shape[axis]:
            raise ConfigError(
                f"sparsify: Wanda norms for {activation!r} have {norms.size} entries but {node.op_type} "
                f"{node.name!r} has K={weight.shape[axis]}"
            )
        shape = [1] * weight.ndim
        shape[axis] = norms.size
        return magnitude * norms.reshape(shape)

    def call(self, model: ir.Model) -> P2DResult:
        """Checks or sparsifies every eligible weight.

        Record keys: ``weights`` (one dict per MatMul/Gemm/Conv: node, initializer, op, shape, eligible,
        reason, skipped, already_nm, made_nm, copied, k, axis, violations), counts (``eligible``,
        ``already_nm``, ``made_nm``, ``copied``) and ``sparse_flops_fraction``: the share of the model's
        MatMul/Gemm/Conv FLOPs (at ``cost_batch`` x ``cost_seq``) whose weight is N:M after the pass.
        """
        tag = f"{self.n}:{self.m}"
        records: list[dict[str, Any]] = []
        candidates: list[tuple[ir.Node, ir.Value, int, np.ndarray, dict[str, Any]]] = []
        planned: dict[ir.Value, list[tuple[ir.Node, int, np.ndarray, dict[str, Any]]]] = {}
        for node in model.graph:
            if node.op_type not in NM_OPS or node.domain not in ("", "ai.onnx"):
                continue
            verdict = nm_eligibility(node, n=self.n, m=self.m)
            weight = verdict.weight
            shape = None
            if weight is not None and weight.shape is not None:
                shape = [d if isinstance(d, int) else None for d in weight.shape]
            record: dict[str, Any] = {
                "node": node.name,
                "initializer": weight.name if weight is not None else None,
                "op": node.op_type,
                "shape": shape,
                "eligible": verdict.eligible,
                "reason": verdict.reason,
                "skipped": None,
                "already_nm": False,
                "made_nm": False,
                "copied": False,
                "k": verdict.k,
                "axis": verdict.axis,
                "violations": None,
            }
            records.append(record)
            if not verdict.eligible:
                continue
            array = weight.const_value.numpy()
            record["violations"] = nm_violations(array, n=self.n, m=self.m, axis=verdict.axis)
            record["already_nm"] = record["violations"] == 0
            record["skipped"] = self._skipped(node, weight, verdict.k)
            if not record["skipped"]:
                record["module"] = module_of(node)  # for messages: the torch module, not an ONNX value name
                candidates.append((node, weight, verdict.axis, array, record))
        mode, why = self._resolve_mode(candidates)
        for node, weight, axis, array, record in candidates:
            if record["already_nm"]:
                if self.mode != "check":  # auto or impose: engines and the cost model find the tag
                    node.metadata_props[SPARSITY_KEY] = tag
                continue
            if mode == "check":
                continue
            scores = self._scores(node, array, axis)
            if isinstance(scores, str):
                record["skipped"] = scores
                log.warning("%s: %s left dense: %s", self.name, node.name, scores)
                continue
            mask = nm_mask(scores, n=self.n, m=self.m, axis=axis)
            masked = np.where(mask, array, np.zeros((), dtype=array.dtype))
            planned.setdefault(weight, []).append((node, NM_OPS[node.op_type], masked, record))

        if mode == "check" and self.mode == "auto" and self.require:
            self._require_nm([record for *_, record in candidates], why)
        for weight, uses in planned.items():
            self._apply(model, weight, uses, tag)

        eligible = [r for r in records if r["eligible"]]
        refused = {}
        if mode == "impose":
            refused = {(r["initializer"] or r["node"]): r["skipped"] for r in records if r["skipped"]}
        return self.result(
            model,
            # Imposing N:M on a weight that was not N:M changes the outputs; checking, or finding every
            # weight already N:M, does not.
            modified=bool(planned),
            exact=not planned,
            refused=refused,
            n=self.n,
            m=self.m,
            mode=mode,
            mode_asked=self.mode,
            mode_reason=why,
            criterion=self.criterion,
            weights=records,
            nodes=len(records),
            eligible=len(eligible),
            already_nm=sum(r["already_nm"] for r in records),
            made_nm=sum(r["made_nm"] for r in records),
            copied=sum(r["copied"] for r in records),
            sparse_flops_fraction=self._fraction(model),
        )

    def _resolve_mode(self, candidates: list[tuple[Any, ...]]) -> tuple[str, str]:
        """(check | impose, why) for this run: ``auto`` checks an input that already is N:M (module docstring)."""
        tag = f"{self.n}:{self.m}"
        if self.mode != "auto":
            return self.mode, f"{self.mode} was asked for"
        already = [record for *_, array, record in candidates if record["already_nm"] and np.any(array)]
        if already:
            return "check", (
                f"auto: {len(already)} of {len(candidates)} checked weights were already {tag} "
                f"(e.g. {_named(already[0])}): the input is a {tag} checkpoint, so {tag} is checked, not imposed"
            )
        return "impose", f"auto: no weight was already {tag}, so {tag} is imposed by {self.criterion}"

    def _require_nm(self, checked: list[dict[str, Any]], why: str) -> None:
        """A checked weight that is not N:M fails the compile: exit 1, the weights named."""
        tag = f"{self.n}:{self.m}"
        bad = [r for r in checked if not r["already_nm"]]
        if not bad:
            return
        named = ", ".join(f"{_named(r)} ({r['violations']} groups)" for r in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise VerificationError(
            f"{self.name}: {len(bad)} of {len(checked)} checked weights are not {tag}: {named}{more} "
            f"(groups of {self.m} along K with more than {self.n} non-zeros). {why[0].upper()}{why[1:]}. Set "
            f"sparsity: impose (--sparsity impose) to re-mask them by {self.criterion}, which is approximate, "
            "or fix the checkpoint"
        )

    def _apply(
        self,
        model: ir.Model,
        weight: ir.Value,
        uses: list[tuple[ir.Node, int, np.ndarray, dict[str, Any]]],
        tag: str,
    ) -> None:
        """Writes the masked weight: in place when only these nodes read it and agree, else as copies."""
        ours = {(node, index) for node, index, _, _ in uses}
        shared = weight.is_graph_output() or any((use.node, use.idx) not in ours for use in weight.uses())
        agree = all(np.array_equal(uses[0][2], masked) for _, _, masked, _ in uses[1:])
        if not shared and agree:
            replace_const(weight, uses[0][2])
            for node, _, _, record in uses:
                record["made_nm"] = True
                node.metadata_props[SPARSITY_KEY] = tag
            return
        for node, index, masked, record in uses:
            name = unique_name(model.graph, f"{weight.name}_{self.n}of{self.m}")
            copy = add_initializer(model.graph, name, masked, weight.dtype)
            node.replace_input_with(index, copy)
            record.update(made_nm=True, copied=True, initializer=name)
            node.metadata_props[SPARSITY_KEY] = tag

    def _fraction(self, model: ir.Model) -> float | None:
        if not self.compute_cost:
            return None
        try:
            cost = model_cost(model, batch=self.cost_batch, seq=self.cost_seq, n=self.n, m=self.m)
        except Exception as exc:  # the fraction is informative; a cost failure must not fail the pass
            log.warning("%s: could not compute the N:M FLOPs fraction: %s", self.name, exc)
            return None
        return cost.sparse_flops_fraction


def _named(record: dict[str, Any]) -> str:
    """A weight as a user knows it: its torch module (``model.layers.0.mlp.up_proj``), else the ONNX names."""
    return record.get("module") or record["initializer"] or record["node"]


register_pass(
    PassSpec(
        name="sparsify-2:4",
        order=60,
        exactness="no when imposing",
        summary="2:4 along K on eligible MatMul/Gemm/Conv weights (--sparse-2-4)",
        options={
            "sparsity": PassOption(
                Literal["auto", "impose", "check"],
                "auto",
                "auto: check a 2:4 checkpoint (a weight that is not 2:4 fails the compile) and impose 2:4 by "
                "magnitude on any other; impose: always; check: only report which weights are 2:4",
                flag="--sparsity",
            )
        },
        switch=("--sparse-2-4", "append the sparsify-2:4 pass"),
        build=lambda o: SparsifyNMPass(n=2, m=4, mode=o.sparsity, skip=("*lm_head*",), require=True),
        stage="sparsity",
        sparse_weights=True,
        in_torch="cannot",
    )
)
