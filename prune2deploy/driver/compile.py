"""The compile driver: what ``api.compile`` does, as named steps over one :class:`CompileRun`.

reference (load + export, masks, ``reference.onnx``) → baseline (``--baseline``: the dense model an already-pruned
input came from, loaded the same way into a scratch file) → passes (the pipeline, then the finishing passes where
verification allows them) → verify (``model.onnx`` against the masked reference; a finished graph that
fails falls back to the unfinished one) → outputs (every enabled writer: genai/, hf/, …) → quality →
engine → profile → report (+ manifest). The output folder is built beside the target and renamed into place
at the end, so it is complete or absent. Optional steps (quality, profiling, the engine's check) that fail
record their error in the report and keep the finished outputs; failed checks (``model.onnx``, an output
folder, the engine) raise :class:`~prune2deploy.errors.VerificationError` after the folder is written, so
the user can inspect it.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.driver.baseline import Baseline, load_baseline, profile_fits
from prune2deploy.driver.engine import EngineStep, build_engine, deployment_axes
from prune2deploy.driver.fp32 import Fp32Copies, Fp32Unavailable
from prune2deploy.driver.outdir import OutputFolder
from prune2deploy.driver.preflight import check_before_loading, input_paths, resolve_plan
from prune2deploy.driver.quality import quality_section
from prune2deploy.driver.report import (
    groups_summary,
    keep_inputs,
    model_summary,
    predictions,
    profile_section,
    report_header,
    write_manifest,
)
from prune2deploy.driver.source import Progress, Source, input_record, load_source
from prune2deploy.driver.verification import (
    SkippedPass,
    blockwise,
    release_mapped,
    verify_against_reference,
    verify_finished,
)
from prune2deploy.driver.writers import write_outputs
from prune2deploy.errors import BadInputError, VerificationError
from prune2deploy.ort_session import release_memory
from prune2deploy.outputs.registry import OutputSection
from prune2deploy.profiling.memory_estimate import (
    check_profile_memory,
    default_memory_limit_gib,
    estimate_memory_bytes,
)
from prune2deploy.spec import CompileOptions

__all__ = [
    "CompileResult",
    "CompileRun",
    "check_before_loading",
    "check_profile_memory",
    "compile_model",
    "default_memory_limit_gib",
    "deployment_axes",
    "estimate_memory_bytes",
    "resolve_plan",
]

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report.get("verification", {}).get("passed", True))


@dataclass
class CompileRun:
    """One compile as its steps fill it in: the options, the loaded input, the models, each step's result.

    The models are dropped (set to None) as soon as no later step reads them: at 1B parameters each pass's
    new weights, the reference's mapped pages and the torch module are gigabytes.
    """

    source: Any
    options: CompileOptions
    folder: OutputFolder
    say: Progress
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    loaded: Source | None = None
    reference: ir.Model | None = None
    compiled: ir.Model | None = None  # the graph the passes change; model.onnx once verified
    baseline: Baseline | None = None  # --baseline: the dense model, in staging/baseline.onnx
    unfinished: ir.Model | None = None  # before the finishing passes, kept for their fall-back
    results: list[Any] = field(default_factory=list)  # P2DResult of every pass that ran, in order
    skipped: list[SkippedPass] = field(default_factory=list)  # selected passes not run, and why
    finishing: list[Any] = field(default_factory=list)  # finishing passes still to run (P2DPass)
    exact: bool = True  # every pass run was exact (before any fall-back)
    limit: Any = None  # the model's sequence limit (analysis.shapes.sequence_limit)
    ref_cost: Any = None
    new_cost: Any = None
    user_feeds: list[Any] = field(default_factory=list)
    verification: Any = None  # prune2deploy.verify.Verification
    records: list[dict[str, Any]] = field(default_factory=list)  # the report's pass entries
    outputs: dict[str, OutputSection] = field(default_factory=dict)
    fp32: Fp32Copies | None = None
    quality: dict[str, Any] = field(default_factory=dict)
    engine: EngineStep | None = None
    profile: dict[str, Any] = field(default_factory=dict)  # latency, speedup, ops; or why not measured
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def staging(self) -> Path:
        return self.folder.staging

    @property
    def reference_path(self) -> Path:
        return self.staging / "reference.onnx"

    @property
    def model_path(self) -> Path:
        return self.staging / "model.onnx"

    @property
    def cost_shape(self) -> tuple[int, int]:
        return self.options.profile_batches[0], self.options.profile_seqs[0]

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start


def compile_model(
    source: Any,
    out_dir: Path | str,
    options: CompileOptions | None = None,
    *,
    progress: Progress | None = None,
    inputs: Sequence[Path | str] = (),
) -> CompileResult:
    """Compiles a pruned model into a physically smaller, verified ONNX model (and engine, and output folders).

    ``inputs`` are further files the output must not touch (the CLI's config file); the model, masks, plan
    and feeds are always protected.

    Raises:
        P2DError subclasses for bad input, existing outputs, missing engines; VerificationError (after the
        folder is written, so the user can inspect it) when an exact pipeline exceeds its tolerance, or an
        output folder or the engine fails its check.
    """
    options = resolve_plan(options or CompileOptions())
    out_dir = Path(out_dir)
    check_before_loading(options, source)
    check_inputs_before_loading(source, options)
    folder = OutputFolder(out_dir, overwrite=options.overwrite, inputs=[*input_paths(source, options), *inputs])
    run = CompileRun(source, options, folder, progress or (lambda _msg: None))  # the CLI stamps elapsed time
    try:
        for step in STEPS:
            step(run)
        folder.finish()
    except BaseException:
        folder.abort()
        raise
    _raise_failures(run, out_dir / "report.json")
    return CompileResult(out_dir, run.report)


def check_inputs_before_loading(source: Any, options: Any) -> None:
    """The limits on what the user hands in (:mod:`prune2deploy.limits`) that need no model: each feeds file's
    declared size, and genai/'s context length against the HF folder's positions (read from its config)."""
    from prune2deploy.frontends.hf_config import check_genai_context
    from prune2deploy.verify import check_feeds_file

    for path in options.feeds:
        check_feeds_file(path)
    if isinstance(source, (str, Path)) and (Path(source) / "config.json").is_file():
        check_genai_context(Path(source), options.genai_context_length)


def reference_step(run: CompileRun) -> None:
    """Loads the input as the masked reference, written once to ``reference.onnx`` and read back mapped.

    The compiled model is a clone sharing its tensors, and a pass makes new tensors only for what it changes;
    ONNX Runtime gets paths. So the weights exist once in memory, never as one protobuf message (2 GB limit).
    Profiling shapes are fitted to the model's sequence limit and checked against memory here, before the
    passes: a grid that cannot fit is bad input.
    """
    from prune2deploy.analysis.shapes import fit_seqs, sequence_limit
    from prune2deploy.frontends.onnx import load_onnx, save_onnx
    from prune2deploy.verify import load_user_feeds

    options = run.options
    with run.timed("load_and_export_s"):
        run.loaded = load_source(run.source, options, progress=run.say)
        input_record(run.loaded)  # hash the input now, as it was read
    with run.timed("save_reference_s"):
        t0 = time.perf_counter()
        written = save_onnx(run.loaded.model, run.reference_path, external_threshold=options.external_data_threshold)
        run.say(f"wrote reference.onnx ({_size(written)}, {time.perf_counter() - t0:.1f} s)")
        run.loaded.model = None  # type: ignore[assignment]  # frees the exporter's (torch) tensors
        gc.collect()
        run.reference = run.loaded.model = load_onnx(run.reference_path)
        run.compiled = run.reference.clone()
    # A default sequence longer than the model's position table is lowered; an explicit one is an error.
    run.limit = sequence_limit(run.reference)
    run.user_feeds = load_user_feeds(run.reference, options.feeds, run.limit)  # bad feeds fail before the passes
    seqs = fit_seqs(run.limit, options.profile_seqs, explicit="profile_seqs" in options.model_fields_set)
    if seqs != list(options.profile_seqs):
        run.options = options = options.replace(profile_seqs=seqs)
    if options.profile:
        check_profile_memory(run.reference, options.profile_batches, options.profile_seqs, options.memory_limit_gib)


def baseline_step(run: CompileRun) -> None:
    """``--baseline``: the dense model an already-pruned input came from, loaded like the input without masks
    (the export cache applies), checked to compute what the input computes, written to ``baseline.onnx`` in the
    staging folder (removed at the end) and costed; quality, profiling and predictions compare against it."""
    if not run.options.baseline:
        return
    with run.timed("baseline_s"):
        run.baseline = load_baseline(
            run.options.baseline, run.options, run.reference, run.staging / "baseline.onnx", run.cost_shape, run.say
        )


def passes_step(run: CompileRun) -> None:
    """The selected passes, then the finishing ones (fusion) where verification allows them.

    The finishing passes run last and on their own: the cost model counts FLOPs of standard ops, so the
    compiled model's cost is taken before its attention and norms become com.microsoft kernels.
    """
    from prune2deploy.analysis.cost import model_cost
    from prune2deploy.passes.registry import passes_in_stage
    from prune2deploy.pipeline import build_passes, run_pipeline

    with run.timed("passes_s"):
        finishing = set(passes_in_stage("finishing"))
        passes = build_passes(run.options)
        run.finishing = [p for p in passes if p.name in finishing]
        pipeline = run_pipeline(run.compiled, [p for p in passes if p.name not in finishing], progress=run.say)
        run.results = list(pipeline.passes)
        batch, seq = run.cost_shape
        run.new_cost = model_cost(run.compiled, batch=batch, seq=seq)
        if run.finishing:
            _finish_graph(run)
        run.exact = all(r.exact for r in run.results)
    _check_requested_passes(run.options, [*run.results, *run.skipped])


def _finish_graph(run: CompileRun) -> None:
    """Runs the finishing passes, keeping the unfinished graph (a clone sharing its tensors) for the fall-back;
    or, when verification will go block by block, decides not to run them and records why."""
    from prune2deploy.pipeline import run_pipeline

    if blockwise(run.reference, run.compiled, run.options):
        # Block-by-block verification cuts the graph at each layer's residual output, which the fused
        # SkipRMSNorm kernels compute inside themselves: a fused graph could not be verified.
        reason = "verification goes block by block here, which needs the unfused graph"
        run.skipped = [SkippedPass(p.name, reason) for p in run.finishing]
        return
    run.unfinished = run.compiled.clone()
    finished = run_pipeline(run.compiled, run.finishing, progress=run.say)
    run.results += finished.passes
    if not any(r.modified for r in finished.passes):
        run.unfinished = None


def verify_step(run: CompileRun) -> None:
    """Writes ``model.onnx`` and verifies it against the masked reference (falling back to the unfinished
    graph when the finished one fails); then frees the compiled graph and unmaps the reference."""
    from prune2deploy.analysis.cost import model_cost
    from prune2deploy.passes.registry import passes_in_stage

    # The passes read every weight they sliced from reference.onnx (mapped: 16 GB resident at 8B bf16); the
    # save needs only the weights they kept, so the rest is unmapped first (re-mapped where the save reads).
    release_mapped(run.reference)
    release_mapped(run.compiled)
    with run.timed("save_s"):
        _save_model(run, run.compiled)
    if run.unfinished is None and blockwise(run.reference, run.compiled, run.options):
        _map_saved_model(run)  # first: the passes' new tensors go before counting reads every reference weight
    run.say("counting parameters and FLOPs")
    batch, seq = run.cost_shape
    run.ref_cost = model_cost(run.reference, batch=batch, seq=seq)
    release_mapped(run.reference)  # counting read every weight (N:M detection); verification maps what it needs
    with run.timed("verify_s"):

        def verify(model: ir.Model) -> Any:
            return verify_against_reference(
                run.reference,
                model,
                (run.reference_path, run.model_path),
                exact=run.exact,
                user_feeds=run.user_feeds,
                options=run.options,
                progress=run.say,
            )

        if run.unfinished is None:
            run.verification = verify(run.compiled)
        else:
            run.verification, run.compiled, run.results = verify_finished(
                verify,
                run.compiled,
                run.unfinished,
                run.results,
                passes_in_stage("finishing"),
                lambda model: _save_model(run, model),
                run.say,
            )
    run.records = run.records or [r.as_dict() for r in [*run.results, *run.skipped]]
    # model.onnx is written and verified: what follows reads files. The compiled graph's own tensors (the
    # passes' new weights, 3 GB at 1B) are freed and the reference's mapped pages unmapped before the output
    # writers load the torch module beside them. The pass results hold the model too.
    run.compiled = run.unfinished = None
    run.results, run.finishing = [], []
    release_mapped(run.reference)
    release_memory()


def _map_saved_model(run: CompileRun) -> None:
    """Before block-by-block verification: the compiled graph is read back mapped from ``model.onnx`` and the
    reference's pages are unmapped.

    Verification block by block reads each block's weights itself, one block at a time. Without this it runs
    beside everything the passes left: the tensors they made (in memory; 5.6 GB at 8B bf16) and every page of
    ``reference.onnx`` they read (mapped, resident; 16 GB at 8B), which made the 8B compile's peak (23.7 GB
    RSS, at the first block). Blockwise mode runs no finishing passes, so there is no fall-back graph to keep,
    and the pass results (which hold the graph) are reduced to their records here.
    """
    from prune2deploy.frontends.onnx import load_onnx

    run.records = [r.as_dict() for r in [*run.results, *run.skipped]]
    run.results, run.finishing, run.compiled = [], [], None
    release_mapped(run.reference)
    release_memory()
    run.compiled = load_onnx(run.model_path)


def _save_model(run: CompileRun, model: ir.Model) -> None:
    from prune2deploy.frontends.onnx import save_onnx

    t0 = time.perf_counter()
    written = save_onnx(model, run.model_path, external_threshold=run.options.external_data_threshold)
    run.say(f"wrote model.onnx ({_size(written)}, {time.perf_counter() - t0:.1f} s)")


def outputs_step(run: CompileRun) -> None:
    """Every enabled output writer (genai/, hf/, …), each checked by the runtime that will serve it."""
    t0 = time.perf_counter()
    run.outputs = write_outputs(run.loaded, run.options, run.staging, run.records, run.say)
    if run.outputs:
        run.timings["lm_outputs_s"] = time.perf_counter() - t0
    if run.loaded.module is not None and run.loaded.module_loader is not None:
        # The writers were the masked module's last user (the tokenizer stays): at 1B parameters it is 4.9 GB
        # that would otherwise sit beside the quality step's ONNX Runtime sessions.
        run.loaded.module = None
        gc.collect()


def quality_step(run: CompileRun) -> None:
    """Compiled vs reference and vs dense on the evaluation text (half-precision graphs as fp32 copies)."""
    refused = ""
    if run.verification.mode == "blockwise":
        refused = "two fp32 copies of the model do not fit in memory (verification ran block by block)"
    run.fp32 = Fp32Copies(run.staging / "fp32", refused=refused, external_threshold=run.options.external_data_threshold)
    with run.timed("quality_s"):
        error = _optional(
            run,
            "quality",
            lambda: quality_section(
                run.loaded,
                run.source,
                run.reference_path,
                run.model_path,
                run.options,
                max_seq=run.limit.max_seq if run.limit else None,
                verify_mode=run.verification.mode,
                progress=run.say,
                fp32=run.fp32,
                baseline=run.baseline.path if run.baseline is not None else None,
            ),
        )
    if isinstance(error, dict):
        run.quality = error
    else:
        run.quality = {"computed": False, "reason": error, "error": error}


def engine_step(run: CompileRun) -> None:
    """Builds the chosen engine (not ONNX Runtime: model.onnx is its input) and checks it where it runs."""
    if run.options.engine == "onnxruntime":
        return
    from prune2deploy.passes.registry import get_pass

    run.say(f"building {run.options.engine} engine")
    run.engine = build_engine(
        run.options,
        run.model_path,
        run.staging,
        run.reference_path,
        run.reference,
        run.user_feeds,
        exact=run.exact,
        sparse_weights=any(get_pass(name).sparse_weights for name in run.options.passes),
        max_positions=run.loaded.extra.get("max_positions"),
    )


def profile_step(run: CompileRun) -> None:
    """Reference vs compiled latency on ONNX Runtime CPU (half-precision graphs as fp32 copies); the baseline
    beside them in the same run where the three fit in memory together."""
    if not run.options.profile:
        return

    def measure() -> dict[str, Any]:
        try:
            paths = run.fp32.runnable(run.reference_path), run.fp32.runnable(run.model_path)
        except Fp32Unavailable as exc:
            reason = f"{run.loaded.extra.get('dtype')} graph: ONNX Runtime's CPU lacks its kernels, and {exc}"
            log.warning("not profiled: %s", reason)
            return {"profile": {"measured": False, "reason": reason}}
        baseline = _profiled_baseline(run, paths)
        run.say("profiling reference vs compiled" + (" vs baseline" if baseline else "") + " on ONNX Runtime CPU")
        ideal = run.ref_cost.flops / max(run.new_cost.flops, 1)
        base_ideal = run.baseline.cost.flops / max(run.new_cost.flops, 1) if baseline else None
        sections = profile_section(*paths, run.options, ideal, baseline_path=baseline, baseline_ideal=base_ideal)
        if run.fp32.made:
            sections["profile"] = {"measured": True, "precision": "fp32 copies of the half-precision graphs"}
        return sections

    result = _optional(run, "profile", measure, hint="compile with --no-profile to skip profiling")
    run.profile = result if isinstance(result, dict) else {"profile": {"measured": False, "error": result}}


def _profiled_baseline(run: CompileRun, paths: tuple[Path, Path]) -> Path | None:
    """The baseline's runnable path when it is timed beside the two models; otherwise None, and why in its record."""
    if run.baseline is None:
        return None
    try:
        path = run.fp32.runnable(run.baseline.path)
    except Fp32Unavailable as exc:
        run.baseline.record.update(profiled=False, reason=f"not timed: {exc}")
        return None
    grid = [(b, s) for b in run.options.profile_batches for s in run.options.profile_seqs]
    why = profile_fits([*paths, path], grid, run.options.memory_limit_gib)
    if why:
        log.warning("%s", why)
        run.baseline.record.update(profiled=False, reason=why)
        return None
    run.baseline.record["profiled"] = True
    return path


def _optional(run: CompileRun, step: str, work: Callable[[], dict[str, Any]], *, hint: str = "") -> dict | str:
    """Runs an optional step; its failure is returned as the step's error (and warned about), never raised:
    the outputs already written are complete without it."""
    try:
        return work()
    except Exception as exc:  # an optional step: not the compile's verdict
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
        log.warning("%s failed (%s); the outputs are complete without it%s", step, error, f"; {hint}" if hint else "")
        run.say(f"{step} failed; the outputs are kept (see the report)")
        return error + (f" ({hint})" if hint else "")


def report_step(run: CompileRun) -> None:
    """Assembles report.json and manifest.json; removes the reference (unless kept) and the fp32 copies."""
    from prune2deploy.analysis.cost import compare_layers
    from prune2deploy.profiling.report import write_report

    batch, seq = run.cost_shape
    report: dict[str, Any] = {
        **report_header(run.loaded, run.options),
        "passes": run.records,
        "model": {
            "reference": model_summary(run.ref_cost),
            "compiled": model_summary(run.new_cost),
            "cost_shape": {"batch": batch, "seq": seq},
        },
        "per_layer": compare_layers(run.ref_cost, run.new_cost),
        "groups": groups_summary(run.records),
        "verification": run.verification.as_dict(),
        "quality": run.quality,
        "timings": run.timings,
        **{name: output.section for name, output in run.outputs.items()},
    }
    if run.engine is not None:
        report["engine"] = run.engine.section
    profile = dict(run.profile)
    baseline_speedup = profile.pop("baseline_speedup", None)
    report.update(profile)
    report["predictions"] = predictions(
        run.ref_cost, run.new_cost, run.options, reference=run.reference, model_path=run.model_path
    )
    if run.baseline is not None:
        report["baseline"] = _baseline_section(run, baseline_speedup)
        run.baseline.remove()
    release_mapped(run.reference)
    if run.fp32 is not None:
        run.fp32.remove()
    if not run.options.keep_reference:
        for path in (run.reference_path, run.staging / "reference.onnx.data"):
            path.unlink(missing_ok=True)
    run.timings["total_s"] = time.perf_counter() - run.start
    write_report(run.staging, report)
    kept = keep_inputs(run.staging, run.options) if run.options.keep_inputs else {}
    write_manifest(run.staging, run.loaded, run.options, kept=kept)
    run.report = report


def _baseline_section(run: CompileRun, speedup: list[dict[str, Any]] | None) -> dict[str, Any]:
    """report.json's ``baseline``: where it came from, its size, the measured speedup of the compiled model over it
    and the predictions with it as the reference (plus TensorRT's 2:4 estimate for a 2:4 input on another engine)."""
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.profiling.prediction import costmodel_engine

    baseline = run.baseline
    section = dict(baseline.record)
    if speedup is not None:
        section["speedup"] = speedup
    elif run.options.profile and section.get("profiled") is not False:  # profiling failed, or was not possible
        section.update(profiled=False, reason="the profile step did not time it (see profile)")
    dense = load_onnx(baseline.path)  # mapped; a fused model.onnx prices a fused copy of it
    rows = predictions(baseline.cost, run.new_cost, run.options, reference=dense, model_path=run.model_path)
    if run.new_cost.sparse_flops and costmodel_engine(run.options.engine) != "tensorrt":
        rows += predictions(
            baseline.cost, run.new_cost, run.options, reference=dense, model_path=run.model_path, engine="tensorrt"
        )
    section["predictions"] = rows
    release_mapped(dense)
    return section


#: The compile, in order. Each step reads what earlier ones left on the run and adds its own part.
STEPS: tuple[Callable[[CompileRun], None], ...] = (
    reference_step,
    baseline_step,
    passes_step,
    verify_step,
    outputs_step,
    quality_step,
    engine_step,
    profile_step,
    report_step,
)


def _raise_failures(run: CompileRun, report_path: Path) -> None:
    """The checks' verdicts, from their typed results, once the output folder is in place."""
    for output in run.outputs.values():
        check = output.check
        if check is not None and not check.passed:
            raise VerificationError(f"{check.problem}; see {report_path}." + (f" {check.hint}" if check.hint else ""))
    verification = run.verification
    if not verification.passed:
        what = "; ".join(verification.problems) or (
            f"by {verification.worst:.3g} (relative, compared in {verification.precision}), more than its bound "
            f"{verification.bound():.3g} (tolerance {run.options.tolerance:g}; docs/exactness.md)"
        )
        raise VerificationError(
            f"compiled model differs from the masked reference: {what}; see {report_path}. "
            "This is a bug: please report it."
        )
    problem = run.engine.problem() if run.engine is not None else None
    if problem:
        raise VerificationError(
            f"the {run.options.engine} engine's outputs differ from the masked reference: {problem}"
            f" (bound: the tolerance {run.options.tolerance:g} or the reference's fp32 noise, docs/exactness.md); see "
            f"{report_path}."
        )


def _check_requested_passes(options: CompileOptions, results: Sequence[Any]) -> None:
    """A pass switched on by an option the user gave (``--regroup-gqa 5``) must change something.

    Otherwise the option did nothing, silently: an error that says why each place was refused.
    """
    from prune2deploy.passes.registry import load_passes

    values = options.model_dump()
    registered = load_passes()
    asked = {name for name, spec in registered.items() if spec.enabled_by(values)}
    for result in results:
        if result.name in asked and not result.modified:
            options_ = registered[result.name].options
            keys = [k for k, o in options_.items() if o.enables and values.get(k) is not None]
            flags = ", ".join(options_[k].flag or k for k in keys)
            reasons = "; ".join(f"{where}: {why}" for where, why in list(result.refused.items())[:3])
            more = len(result.refused) - 3
            raise BadInputError(
                f"{flags} asked for the {result.name} pass, which changed nothing: "
                + (reasons + (f"; and {more} more" if more > 0 else "") if reasons else "it found nothing to change")
                + ". Fix the value or leave the option out."
            )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
