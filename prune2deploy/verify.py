"""Reference (masked) vs compiled: the proof that the compiled model computes what the pruned one did.

Both models run on the same feeds (random ones at several shapes, plus any the user gives). The error of
each output is measured relative to its scale (max |reference|), and an exact pipeline must stay within
:data:`EXACT_TOLERANCE` (DESIGN.md). Verification takes *runners* (anything with ``run(feeds) -> outputs``):
the reference on ONNX Runtime CPU fp32 against the compiled ONNX, and against every engine that can run on
this machine (the torch engine on CPU), not only ONNX Runtime.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from prune2deploy.feeds import random_feeds
from prune2deploy.ort_session import make_session, release_memory

__all__ = [
    "EXACT_TOLERANCE",
    "BlockwiseUnavailable",
    "FeedSet",
    "OutputRunner",
    "Verification",
    "block_cuts",
    "check_feeds",
    "choose_mode",
    "compare_outputs",
    "feed_sets",
    "fp32_bytes",
    "load_feeds",
    "verdict_line",
    "verdict_status",
    "verification_notes",
    "verify_blockwise",
    "verify_models",
    "verify_runners",
]

#: (label, feeds by input name)
FeedSet = tuple[str, Mapping[str, np.ndarray]]


class OutputRunner(Protocol):
    """What verification needs of an engine: outputs by name for feeds by name."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class _SessionRunner:
    def __init__(self, session) -> None:
        self.session = session
        self.names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, dict(feeds)), strict=True))


log = logging.getLogger(__name__)

#: max |diff| / max(|reference|, 1e-6) allowed for an exact pipeline.
EXACT_TOLERANCE = 1e-4


@dataclass
class Verification:
    """Per-output errors over all feed sets.

    ``status`` is ``passed`` (exact and within the tolerance), ``approximate`` (an approximate pipeline:
    its error is reported, never held to the exact tolerance) or ``failed``. Non-finite values the reference
    does not have (NaN/Inf in the compiled output where the reference is finite), a shape mismatch, or an
    output of which no value could be compared (NaN in both everywhere) fail whatever the pipeline.
    Python's ``max`` and ``>`` skip NaN; nothing here relies on them for NaN.
    """

    exact: bool
    tolerance: float
    feeds: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mode: str = "whole"  # "whole" | "blockwise" (see verify_blockwise)
    blocks: list[dict] = field(default_factory=list)  # blockwise: per block, its input and output errors

    @property
    def problems(self) -> list[str]:
        found = []
        for name, o in self.outputs.items():
            if o.get("shape_mismatch"):
                found.append(f"output '{name}': shape differs from the reference's")
            if o.get("nonfinite_new"):
                found.append(f"output '{name}': {o['nonfinite_new']} NaN/Inf values where the reference is finite")
            if o.get("compared") == 0 and o.get("nonfinite_both"):
                found.append(f"output '{name}': NaN/Inf in both models everywhere; nothing could be compared")
        return found

    @property
    def worst(self) -> float:
        values = [o["max_rel"] for o in self.outputs.values()] + [b["max_rel"] for b in self.blocks]
        if self.problems or any(v is None for v in values):
            return float("inf")
        return max(values, default=0.0)

    @property
    def cosine(self) -> float | None:
        values = [o["cosine"] for o in self.outputs.values() if o.get("cosine") is not None]
        return min(values) if values else None

    @property
    def status(self) -> str:
        if self.problems:
            return "failed"
        if not self.exact:
            return "approximate"
        return "passed" if self.worst <= self.tolerance else "failed"

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def as_dict(self) -> dict:
        worst = self.worst
        return {
            "exact": self.exact,
            "passed": self.passed,
            "status": self.status,
            "tolerance": self.tolerance,
            "worst": worst if np.isfinite(worst) else None,
            "cosine": self.cosine,
            "problems": self.problems,
            "notes": self.notes,
            "feeds": self.feeds,
            "outputs": self.outputs,
            "mode": self.mode,
            **({"blocks": self.blocks} if self.blocks else {}),
        }


def verdict_status(verification: Mapping) -> str:
    """``passed`` / ``approximate`` / ``failed`` of a verification dict (also one written before ``status``)."""
    if verification.get("status"):
        return str(verification["status"])
    if not verification.get("passed", True):
        return "failed"
    return "passed" if verification.get("exact", True) else "approximate"


def verdict_line(verification: Mapping) -> str:
    """One line a person reads: PASSED only for an exact pipeline within its tolerance.

    An approximate pipeline is labelled with its error and cosine, never PASSED (DESIGN.md, Exactness).
    Takes :meth:`Verification.as_dict` (or report.json's ``verification``).
    """
    status = verdict_status(verification)
    worst, cosine = verification.get("worst"), verification.get("cosine")
    if "worst" not in verification:
        values = [o.get("max_rel") for o in (verification.get("outputs") or {}).values()]
        worst = None if any(v is None for v in values) else max(values, default=0.0)
    if "cosine" not in verification:
        values = [o["cosine"] for o in (verification.get("outputs") or {}).values() if o.get("cosine") is not None]
        cosine = min(values) if values else None
    error = "inf/NaN" if worst is None else f"{worst:.2e}"
    feeds = len(verification.get("feeds") or [])
    if status == "approximate":
        cos = "n/a" if cosine is None else f"{cosine:.6f}"
        return f"approximate — error {error}, cosine {cos} (not held to the exact tolerance; {feeds} feed sets)"
    problems = "; ".join(verification.get("problems") or [])
    word = "PASSED" if status == "passed" else "FAILED"
    line = f"{word}: worst relative error {error} (tolerance {verification.get('tolerance', 0):g}, {feeds} feed sets)"
    return line + (f": {problems}" if problems else "")


def verification_notes(verification: Mapping) -> list[str]:
    """What a verdict does not say: values that are NaN/Inf in both models are reported, not compared."""
    notes = list(verification.get("notes") or [])
    for name, o in (verification.get("outputs") or {}).items():
        if o.get("nonfinite_both"):
            notes.append(
                f"output '{name}': {o['nonfinite_both']} values are NaN/Inf in both the reference and the compiled "
                "model (not compared)"
            )
    return notes


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compare_outputs(reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray]) -> dict:
    """Max abs, max relative (to the reference's scale) and cosine per output, plus non-finite counts.

    Errors are measured where both values are finite; ``nonfinite_new`` counts NaN/Inf in the compiled
    output where the reference is finite (a failure), ``nonfinite_both`` where both are non-finite (reported),
    ``compared`` the values compared. Every number is finite or None, so the report stays valid JSON.
    """
    result = {}
    for name, ref in reference.items():
        out = compiled[name]
        ref64, out64 = np.asarray(ref).astype(np.float64), np.asarray(out).astype(np.float64)
        if ref64.shape != out64.shape:
            result[name] = {
                "max_abs": None,
                "max_rel": None,
                "scale": None,
                "cosine": None,
                "shape_mismatch": True,
                "nonfinite_new": 0,
                "nonfinite_both": 0,
                "compared": 0,
            }
            continue
        ref_ok, out_ok = np.isfinite(ref64), np.isfinite(out64)
        both = ref_ok & out_ok
        nonfinite_new = int(np.count_nonzero(ref_ok & ~out_ok))
        nonfinite_both = int(np.count_nonzero(~ref_ok & ~out_ok))
        # Finite in the compiled output where the reference is not: as wrong as the other way round.
        nonfinite_new += int(np.count_nonzero(~ref_ok & out_ok))
        r, o = ref64[both], out64[both]
        diff = float(np.max(np.abs(r - o))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        denom = float(np.linalg.norm(r) * np.linalg.norm(o))
        cosine = float(np.sum(r * o) / denom) if denom else 1.0
        result[name] = {
            "max_abs": _finite_or_none(diff),
            "max_rel": _finite_or_none(diff / max(scale, 1e-6)),
            "scale": _finite_or_none(scale),
            "cosine": _finite_or_none(cosine),
            "nonfinite_new": nonfinite_new,
            "nonfinite_both": nonfinite_both,
            "compared": int(r.size),
        }
    return result


def _merge(worst: dict | None, stats: dict) -> dict:
    """The worse of two results for one output; counts add up over feed sets."""
    if worst is None:
        return dict(stats)

    def rel(o):
        return float("inf") if o["max_rel"] is None else o["max_rel"]

    merged = dict(worst if rel(worst) >= rel(stats) else stats)
    for key in ("nonfinite_new", "nonfinite_both", "compared"):
        merged[key] = worst.get(key, 0) + stats.get(key, 0)
    merged["shape_mismatch"] = bool(worst.get("shape_mismatch") or stats.get("shape_mismatch"))
    if not merged["shape_mismatch"]:
        merged.pop("shape_mismatch")
    cosines = [c for c in (worst.get("cosine"), stats.get("cosine")) if c is not None]
    merged["cosine"] = min(cosines) if cosines else None
    return merged


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    """User feeds: an ``.npz`` or safetensors file keyed by input name."""
    from prune2deploy.errors import BadInputError

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"feeds file {path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read feeds ({exc}); give an .npz or .safetensors file") from exc


def feed_sets(
    probe: ir.Model | None,
    *,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
) -> list[FeedSet]:
    """Random feeds at each (batch, seq) shape for ``probe``'s inputs, then the user's feed sets."""
    sets: list[FeedSet] = []
    if probe is not None:
        for index, (batch, seq) in enumerate(shapes):
            sets.append(
                (f"random batch={batch} seq={seq}", random_feeds(probe, batch=batch, seq=seq, seed=seed + index))
            )
    for i, feeds in enumerate(user_feeds):
        label = f"user feeds #{i + 1}"
        if probe is not None:
            check_feeds(probe, feeds, label)
        sets.append((label, feeds))
    return sets


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], label: str = "feeds") -> None:
    """User feeds must name the model's inputs with their dtype and rank, static dims, and finite floats.

    Raises:
        BadInputError: naming the input and what is wrong (exit code 2, not a verification failure).
    """
    from prune2deploy.errors import BadInputError
    from prune2deploy.feeds import feed_specs

    specs = {spec.name: spec for spec in feed_specs(model)}
    unknown = sorted(set(feeds) - set(specs))
    missing = sorted(set(specs) - set(feeds))
    if unknown or missing:
        raise BadInputError(
            f"{label}: the model's inputs are {sorted(specs)}"
            + (f"; unknown names {unknown}" if unknown else "")
            + (f"; missing {missing}" if missing else "")
        )
    for name, array in feeds.items():
        spec = specs[name]
        array = np.asarray(array)
        if array.dtype != np.dtype(spec.dtype):
            raise BadInputError(f"{label}: input '{name}' is {array.dtype}, the model wants {np.dtype(spec.dtype)}")
        if spec.dims and len(spec.dims) != array.ndim:
            raise BadInputError(
                f"{label}: input '{name}' has shape {array.shape}, the model wants rank {len(spec.dims)}"
            )
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise BadInputError(
                    f"{label}: input '{name}' has shape {array.shape}; axis {axis} must be {dim} ({spec.dims})"
                )
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise BadInputError(f"{label}: input '{name}' holds {bad} NaN/Inf values; verification needs finite feeds")


def verify_runners(
    reference: OutputRunner,
    compiled: OutputRunner,
    sets: Sequence[FeedSet],
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    outputs: Sequence[str] | None = None,
) -> Verification:
    """Runs both runners on every feed set and keeps each output's worst error."""
    verification = Verification(exact=exact, tolerance=tolerance)
    for label, feeds in sets:
        try:
            ref_out = reference.run(feeds)
        except Exception as exc:
            from prune2deploy.errors import BadInputError

            raise BadInputError(f"the reference does not run on {label}: {str(exc)[:300]}") from exc
        try:
            new_out = compiled.run(feeds)
        except Exception as exc:
            from prune2deploy.errors import VerificationError

            raise VerificationError(f"the compiled model does not run on {label}: {str(exc)[:300]}") from exc
        if outputs is not None:
            ref_out = {name: ref_out[name] for name in outputs}
        verification.feeds.append(label)
        missing = [name for name in ref_out if name not in new_out]
        if missing:
            from prune2deploy.errors import BadInputError

            raise BadInputError(
                f"the compiled model has no output {missing[0]!r} of the reference "
                f"(its outputs: {sorted(new_out)}); are these two versions of the same model?"
            )
        for name, stats in compare_outputs(ref_out, new_out).items():
            verification.outputs[name] = _merge(verification.outputs.get(name), stats)
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(sets))
    return verification


def _session_source(model: ir.Model | bytes | Path) -> bytes | Path:
    """What ONNX Runtime loads: a path as is (its external data beside it), a model serialized.

    Half-precision models are run in fp32 (ONNX Runtime's CPU provider lacks most bf16 kernels): they are
    upcast in memory, which callers keep to models small enough for that (``choose_mode``).
    """
    from prune2deploy.graph.segments import has_half, upcast_to_fp32

    if isinstance(model, Path):
        loaded = ir.load(str(model))
        if not has_half(loaded):
            return model
        model = loaded
    if isinstance(model, ir.Model):
        from onnx_ir.external_data import load_to_model

        model = load_to_model(model.clone())  # bytes carry no folder to resolve external data against
        if has_half(model):
            upcast_to_fp32(model)
        return ir.to_proto(model).SerializeToString()
    return model


def _run_all(
    model: ir.Model | bytes | Path, sets: Sequence[FeedSet], role: str, *, input_model: bool = False
) -> tuple[_SessionRunner, list[dict]]:
    """One session, every feed set; the session is gone when this returns (one model in memory at a time)."""
    from prune2deploy.errors import BadInputError, VerificationError

    try:
        runner = _SessionRunner(make_session(_session_source(model), prepack=False))
    except Exception as exc:
        if role == "reference" or input_model:
            raise BadInputError(f"ONNX Runtime cannot load the {role}: {str(exc)[:300]}") from exc
        raise
    results = []
    for label, feeds in sets:
        try:
            results.append(runner.run(feeds))
        except Exception as exc:
            error = BadInputError if role == "reference" else VerificationError
            raise error(f"the {role} does not run on {label}: {str(exc)[:300]}") from exc
    return runner, results


def verify_models(
    reference: ir.Model | bytes | Path,
    compiled: ir.Model | bytes | Path,
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
    probe: ir.Model | None = None,
    compiled_is_input: bool = False,
) -> Verification:
    """Both models on ONNX Runtime CPU in fp32, one after the other: random feeds for ``probe``'s inputs
    (``reference`` itself when it is an onnx_ir model) + the user's.

    Paths are handed to ONNX Runtime as paths (their external data stays on disk, mapped); only one of the
    two sessions exists at a time, so verification needs the memory of the larger model, not of both.
    """
    probe = probe if probe is not None else reference if isinstance(reference, ir.Model) else None
    sets = feed_sets(probe, shapes=shapes, user_feeds=user_feeds, seed=seed)
    ref_runner, ref_outs = _run_all(reference, sets, "reference")
    ref_inputs = sorted(i.name for i in ref_runner.session.get_inputs())
    names = ref_runner.names
    del ref_runner
    release_memory()  # the reference's weights leave before the compiled model's arrive
    new_runner, new_outs = _run_all(compiled, sets, "compiled model", input_model=compiled_is_input)
    new_inputs, new_names = sorted(i.name for i in new_runner.session.get_inputs()), new_runner.names
    del new_runner
    release_memory()
    if ref_inputs != new_inputs or sorted(names) != sorted(new_names):
        from prune2deploy.errors import BadInputError

        raise BadInputError(
            f"the models have different inputs or outputs ({new_inputs} → {sorted(new_names)} vs the "
            f"reference's {ref_inputs} → {sorted(names)}); are these two versions of the same model?"
        )
    verification = Verification(exact=exact, tolerance=tolerance, mode="whole")
    for (label, _), ref_out, new_out in zip(sets, ref_outs, new_outs, strict=True):
        verification.feeds.append(label)
        for name, stats in compare_outputs({n: ref_out[n] for n in names}, new_out).items():
            verification.outputs[name] = _merge(verification.outputs.get(name), stats)
    if probe is not None:
        from prune2deploy.feeds import unknown_ranges

        for name in unknown_ranges(probe):
            verification.notes.append(
                f"input '{name}': its value range cannot be derived from the graph (not an index into a constant "
                "table, not compared with a constant, not cast to float), so random feeds held it at 0"
                + ("" if user_feeds else "; give --feeds with real values to verify what depends on it")
            )
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(sets))
    return verification


def _keep_worst(worst: dict[str, dict], stats: Mapping[str, dict]) -> None:
    for name, entry in stats.items():
        worst[name] = _merge(worst.get(name), entry)


def fp32_bytes(model: ir.Model) -> int:
    """Bytes of ``model``'s weights once in fp32 (what an ONNX Runtime CPU session of it holds)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes * (2 if tensor.dtype in (ir.DataType.BFLOAT16, ir.DataType.FLOAT16) else 1)
    return total


def choose_mode(reference: ir.Model, compiled: ir.Model, requested: str = "auto", available: int | None = None) -> str:
    """``whole`` when one fp32 session of the larger model (and, for half models, its upcast copy) fits
    comfortably in the memory available now; ``blockwise`` otherwise, or when ``requested`` says so."""
    if requested != "auto":
        return requested
    from prune2deploy.graph.segments import has_half

    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    size = max(fp32_bytes(reference), fp32_bytes(compiled))
    half = has_half(reference) or has_half(compiled)
    # ORT may prepack MatMul weights (a second copy); an upcast half model is also serialized once.
    needed = size * (3 if half else 2)
    if half and size > 1 << 30:
        return "blockwise"
    return "whole" if needed <= 0.7 * available else "blockwise"


class BlockwiseUnavailable(Exception):
    """The compiled model's block boundaries do not match the reference's (say, layers were removed)."""


def block_cuts(reference: ir.Model, compiled: ir.Model) -> list[str]:
    """Names of the residual-stream values that leave each decoder (or residual) layer, in graph order.

    Raises:
        BlockwiseUnavailable: no layers found, a layer without a clear exit, or a boundary that the compiled
            model lacks or gives another shape (removed layers, pruned hidden channels).
    """
    from prune2deploy.analysis.blocks import find_layers

    layers = find_layers(reference)
    if not layers:
        raise BlockwiseUnavailable("no numbered layers with residual blocks were found")
    cuts = []
    for layer in layers:
        if layer.stream_out is None or not layer.stream_out.name:
            raise BlockwiseUnavailable(f"layer {layer.name}: {layer.reason or 'no clear output'}")
        cuts.append(layer.stream_out.name)
    theirs = {v.name: v for node in compiled.graph for v in node.outputs if v.name}
    ours = {v.name: v for node in reference.graph for v in node.outputs if v.name}
    for name in cuts:
        if name not in theirs:
            raise BlockwiseUnavailable(f"the compiled model has no value '{name}' (a layer boundary)")
        producer = theirs[name].producer()
        if producer is not None and producer.domain not in ("", "ai.onnx"):
            # A fused kernel (SkipRMSNorm) computes the boundary together with what follows it: a block cut
            # there would re-run the previous layer's tail, and its errors would be charged to the next block.
            raise BlockwiseUnavailable(
                f"layer boundary '{name}' is computed inside the fused {producer.domain}.{producer.op_type} node "
                f"{producer.name!r}; verify the unfused graph (portable) block by block, or the whole model"
            )
        if ours[name].shape is not None and theirs[name].shape is not None and ours[name].shape != theirs[name].shape:
            raise BlockwiseUnavailable(f"'{name}' has shape {theirs[name].shape}, the reference's {ours[name].shape}")
    outputs = {v.name for v in reference.graph.outputs}
    return [c for c in cuts if c not in outputs]


def verify_blockwise(
    reference: ir.Model,
    compiled: ir.Model,
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
    progress=None,
    scratch: Path | None = None,
) -> Verification:
    """Reference and compiled model one block at a time, in fp32.

    Block ``k`` of each model computes the stream leaving layer ``k`` from the stream entering it (the
    first block starts at the graph inputs, the last ends at the graph outputs). Both are fed the
    *reference's* activation at the block's input, so each block's error is its own; the verdict holds
    every block and the final outputs to the tolerance. Only one block's weights (in fp32) are in memory
    at a time. Each block is written to a temporary folder in ``scratch`` (the system's temporary folder
    by default) for ONNX Runtime to read, and deleted after.

    Raises:
        BlockwiseUnavailable: see :func:`block_cuts`.
    """
    from onnx_ir.external_data import load_to_model

    from prune2deploy.errors import VerificationError
    from prune2deploy.frontends.onnx import save_onnx
    from prune2deploy.graph.segments import segment, upcast_to_fp32

    cuts = block_cuts(reference, compiled)
    sets = feed_sets(reference, shapes=shapes, user_feeds=user_feeds, seed=seed)
    final = [v.name for v in reference.graph.outputs]
    verification = Verification(exact=exact, tolerance=tolerance, mode="blockwise")
    verification.feeds = [label for label, _ in sets]
    entering: list[dict[str, np.ndarray]] = [{} for _ in sets]  # the reference's stream at the block input
    bounds = [None, *cuts]
    for index, start in enumerate(bounds):
        ends = [cuts[index]] if index < len(cuts) else final
        inputs = [start] if start else []
        outs: dict[str, list[dict[str, np.ndarray]]] = {}
        for role, model in (("reference", reference), ("compiled model", compiled)):
            part = segment(model, inputs=inputs, outputs=ends)
            load_to_model(part)  # this block's weights, read into memory (the part is saved on its own)
            upcast_to_fp32(part)
            # Saved to a scratch file with its weights beside it, then freed, before ONNX Runtime reads it: as
            # bytes, the part, its protobuf and the serialized string were three more copies of the block's
            # fp32 weights beside the session's own (the embedding block of a 3B model: 1.6 GB each).
            with tempfile.TemporaryDirectory(prefix="p2d-block-", dir=scratch) as folder:
                path = Path(folder) / "block.onnx"
                save_onnx(part, path, external_threshold=0)
                del part
                release_memory()
                session = make_session(path, prepack=False)
            wanted = {i.name for i in session.get_inputs()}
            results = []
            for (label, feeds), carried in zip(sets, entering, strict=True):
                given = {k: v for k, v in {**feeds, **carried}.items() if k in wanted}
                try:
                    results.append(dict(zip(ends, session.run(ends, given), strict=True)))
                except Exception as exc:
                    raise VerificationError(f"block {index} of the {role} on {label} failed: {exc}") from exc
            outs[role] = results
            del session
            release_memory()
        block = {"block": index, "input": start, "outputs": {}}
        for ref_out, new_out in zip(outs["reference"], outs["compiled model"], strict=True):
            _keep_worst(block["outputs"], compare_outputs(ref_out, new_out))
        values = [o["max_rel"] for o in block["outputs"].values()]
        block["max_rel"] = None if any(v is None for v in values) else max(values, default=0.0)
        verification.blocks.append(block)
        if index == len(cuts):
            verification.outputs = dict(block["outputs"])
        entering = [{ends[0]: out[ends[0]]} for out in outs["reference"]]
        if progress is not None:
            progress(f"verified block {index + 1}/{len(bounds)} (max relative error {block['max_rel']:.2g})")
    log.info("blockwise verification: worst relative error %.3g over %d blocks", verification.worst, len(bounds))
    return verification
