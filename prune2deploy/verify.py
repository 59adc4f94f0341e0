"""Reference (masked) vs compiled: the proof that the compiled model computes what the pruned one did.

Both models run on ONNX Runtime CPU in fp32 on the same feeds (random ones at several shapes, plus any the
user gives). The error of each output is measured relative to its scale (max |reference|), and an exact
pipeline must stay within :data:`EXACT_TOLERANCE` (DESIGN.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from prune2deploy.engines.onnxruntime import make_session
from prune2deploy.feeds import random_feeds

__all__ = ["EXACT_TOLERANCE", "Verification", "compare_outputs", "load_feeds", "verify_models"]

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
    """Runs both models on every feed set and keeps each output's worst error."""

    def session(model):
        if isinstance(model, ir.Model):
            model = ir.to_proto(model).SerializeToString()
        return make_session(model)

    ref_session, out_session = session(reference), session(compiled)
    probe = reference if isinstance(reference, ir.Model) else None
    verification = Verification(exact=exact, tolerance=tolerance)
    feed_sets: list[tuple[str, Mapping[str, np.ndarray]]] = []
    if probe is not None:
        for index, (batch, seq) in enumerate(shapes):
            feed_sets.append(
                (f"random batch={batch} seq={seq}", random_feeds(probe, batch=batch, seq=seq, seed=seed + index))
            )
    feed_sets += [(f"user feeds #{i + 1}", feeds) for i, feeds in enumerate(user_feeds)]
    names = [o.name for o in ref_session.get_outputs()]
    for label, feeds in feed_sets:
        try:
            ref_out = dict(zip(names, ref_session.run(names, dict(feeds)), strict=True))
            new_out = dict(zip(names, out_session.run(names, dict(feeds)), strict=True))
        except Exception as exc:
            from prune2deploy.errors import VerificationError

            raise VerificationError(f"running {label} failed: {exc}") from exc
        verification.feeds.append(label)
        for name, stats in compare_outputs(ref_out, new_out).items():
            worst = verification.outputs.get(name)
            if worst is None or stats["max_rel"] > worst["max_rel"]:
                verification.outputs[name] = stats
    log.info("verification: worst relative error %.3g over %d feed sets", verification.worst, len(feed_sets))
    return verification
