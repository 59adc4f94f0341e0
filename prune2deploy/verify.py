"""Reference (masked) vs compiled: the proof that the compiled model computes what the pruned one did.

Both models run on the same feeds (random ones at several shapes, plus any the user gives). The error of
each output is measured relative to its scale (max |reference|), and an exact pipeline must stay within
:data:`EXACT_TOLERANCE` (DESIGN.md). Verification takes *runners* (anything with ``run(feeds) -> outputs``):
the reference on ONNX Runtime CPU fp32 against the compiled ONNX, and against every engine that can run on
this machine (the torch engine on CPU), not only ONNX Runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from prune2deploy.feeds import random_feeds
from prune2deploy.ort_session import make_session

__all__ = [
    "EXACT_TOLERANCE",
    "FeedSet",
    "OutputRunner",
    "Verification",
    "compare_outputs",
    "feed_sets",
    "load_feeds",
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
    """Per-output errors over all feed sets; ``passed`` applies the tolerance when ``exact``."""

    exact: bool
    tolerance: float
    feeds: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max((o["max_rel"] for o in self.outputs.values()), default=0.0)

    @property
    def passed(self) -> bool:
        return (not self.exact) or self.worst <= self.tolerance

    def as_dict(self) -> dict:
        return {
            "exact": self.exact,
            "passed": self.passed,
            "tolerance": self.tolerance,
            "feeds": self.feeds,
            "outputs": self.outputs,
        }


def compare_outputs(reference: Mapping[str, np.ndarray], compiled: Mapping[str, np.ndarray]) -> dict:
    """Max abs, max relative (to the reference's scale) and cosine per output."""
    result = {}
    for name, ref in reference.items():
        out = compiled[name]
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        if ref64.shape != out64.shape:
            result[name] = {"max_abs": float("inf"), "max_rel": float("inf"), "scale": 0.0, "cosine": 0.0}
            continue
        diff = float(np.max(np.abs(ref64 - out64))) if ref64.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        denom = float(np.linalg.norm(ref64) * np.linalg.norm(out64))
        cosine = float(np.sum(ref64 * out64) / denom) if denom else 1.0
        result[name] = {"max_abs": diff, "max_rel": diff / max(scale, 1e-6), "scale": scale, "cosine": cosine}
    return result


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
    sets += [(f"user feeds #{i + 1}", feeds) for i, feeds in enumerate(user_feeds)]
    return sets


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
            new_out = compiled.run(feeds)
        except Exception as exc:
            from prune2deploy.errors import VerificationError

            raise VerificationError(f"running {label} failed: {exc}") from exc
        if outputs is not None:
            ref_out = {name: ref_out[name] for name in outputs}
        verification.feeds.append(label)
        for name, stats in compare_outputs(ref_out, new_out).items():
            worst = verification.outputs.get(name)
            if worst is None or stats["max_rel"] > worst["max_rel"]:
                verification.outputs[name] = stats
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(sets))
    return verification


def verify_models(
    reference: ir.Model | bytes | Path,
    compiled: ir.Model | bytes | Path,
    *,
    exact: bool,
    tolerance: float = EXACT_TOLERANCE,
    shapes: Sequence[tuple[int, int]] = ((2, 8), (3, 17)),
    user_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
) -> Verification:
    """Both models on ONNX Runtime CPU: random feeds (when ``reference`` is an onnx_ir model) + the user's."""

    def runner(model) -> _SessionRunner:
        if isinstance(model, ir.Model):
            model = ir.to_proto(model).SerializeToString()
        return _SessionRunner(make_session(model))

    ref_runner, out_runner = runner(reference), runner(compiled)
    probe = reference if isinstance(reference, ir.Model) else None
    sets = feed_sets(probe, shapes=shapes, user_feeds=user_feeds, seed=seed)
    return verify_runners(ref_runner, out_runner, sets, exact=exact, tolerance=tolerance, outputs=ref_runner.names)
