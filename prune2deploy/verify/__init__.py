"""Reference (masked) vs compiled: the proof that the compiled model computes what the pruned one did.

Both models run on the same feeds (random ones at several shapes, plus any the user gives). The error of
each output is measured relative to its scale (max |reference|). An exact pipeline must stay within a
bound that float rounding cannot reach on a correct compile and one wrong channel or head exceeds
(docs/exactness.md): compared in fp64 where ONNX Runtime's CPU kernels allow, else in
fp32 against the reference's measured noise floor. Verification takes *runners* (anything with
``run(feeds) -> outputs``), so every engine that runs on this machine is checked, not only ONNX Runtime.

Modules: ``result`` (the verdict and its words), ``compare`` (output against output), ``feeds`` (what the
models are run on), ``precision`` (fp64 copies), ``whole`` (whole models, one after the other) and
``blockwise`` (one block at a time, for models whose two copies do not fit).
"""

from prune2deploy.verify.blockwise import BlockwiseUnavailable, block_cuts, verify_blockwise
from prune2deploy.verify.compare import compare_outputs
from prune2deploy.verify.feeds import (
    FeedSet,
    check_feeds,
    check_feeds_file,
    feed_sets,
    load_feeds,
    load_user_feeds,
)
from prune2deploy.verify.result import (
    EXACT_TOLERANCE,
    NOISE_FACTOR,
    Verification,
    verdict_line,
    verdict_status,
    verification_notes,
)
from prune2deploy.verify.whole import (
    OutputRunner,
    choose_mode,
    choose_precision,
    fp32_bytes,
    noise_floors,
    verify_models,
    verify_runners,
)

__all__ = [
    "EXACT_TOLERANCE",
    "NOISE_FACTOR",
    "BlockwiseUnavailable",
    "FeedSet",
    "OutputRunner",
    "Verification",
    "block_cuts",
    "check_feeds",
    "check_feeds_file",
    "choose_mode",
    "choose_precision",
    "compare_outputs",
    "feed_sets",
    "fp32_bytes",
    "load_feeds",
    "load_user_feeds",
    "noise_floors",
    "verdict_line",
    "verdict_status",
    "verification_notes",
    "verify_blockwise",
    "verify_models",
    "verify_runners",
]
