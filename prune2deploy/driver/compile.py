"""The compile driver: what ``api.compile`` does, step by step.

source (HF folder, GGUF, bundled model name, nn.Module or .onnx) + masks → masked reference → pipeline →
verification (compiled ONNX, and the engine where it runs here) → engine → profile → report + manifest. The
output folder is built beside the target and renamed into place at the end, so it is complete or absent.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.driver.outdir import OutputFolder
from prune2deploy.driver.quality import quality_section
from prune2deploy.driver.report import (
    groups_summary,
    model_summary,
    predictions,
    profile_section,
    report_header,
    write_manifest,
)
from prune2deploy.driver.source import Progress, input_record, load_source
from prune2deploy.errors import BadInputError, EngineUnavailable, P2DError, UnsupportedModelError, VerificationError
from prune2deploy.ort_session import release_memory
from prune2deploy.spec import CompileOptions

__all__ = [
    "CompileResult",
    "check_before_loading",
    "check_profile_memory",
    "compile_model",
    "default_memory_limit_gib",
    "deployment_axes",
    "estimate_memory_bytes",
    "resolve_plan",
]

log = logging.getLogger(__name__)

#: Passes that finish the graph for ONNX Runtime: run after the cost is taken (the cost model counts standard
#: ops), and undone together when the finished graph does not load or verify (:func:`_verify_fused`).
_FINISHING_PASSES = ("fuse-ort", "pack-matmuls")


@dataclass
class CompileResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report.get("verification", {}).get("passed", True))


def compile_model(
    source: Any,
    out_dir: Path | str,
    options: CompileOptions | None = None,
    *,
    progress: Progress | None = None,
    inputs: Sequence[Path | str] = (),
) -> CompileResult:
    """Compiles a pruned model into a physically smaller, verified ONNX model (and engine).

    ``inputs`` are further files the output must not touch (the CLI's config file); the model, masks, plan
    and feeds are always protected.

    Raises:
        P2DError subclasses for bad input, existing outputs, missing engines; VerificationError (after the
        folder is written, so the user can inspect it) when an exact pipeline exceeds its tolerance.
    """
    from prune2deploy.analysis.cost import compare_layers, model_cost
    from prune2deploy.analysis.shapes import fit_seqs, sequence_limit
    from prune2deploy.frontends.onnx import load_onnx, save_onnx
    from prune2deploy.pipeline import build_passes, run_pipeline
    from prune2deploy.verify import load_feeds

    options = resolve_plan(options or CompileOptions())
    out_dir = Path(out_dir)
    check_before_loading(options)
    folder = OutputFolder(out_dir, overwrite=options.overwrite, inputs=[*_input_paths(source, options), *inputs])
    staging = folder.staging
    say = progress or (lambda _msg: None)  # the CLI prefixes each line with its elapsed time
    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        loaded = load_source(source, options, progress=say)
        input_record(loaded)  # hash the input now, as it was read
        timings["load_and_export_s"] = time.perf_counter() - start

        # The reference is written once (weights in reference.onnx.data above the threshold) and read back
        # memory-mapped; the compiled model is a clone sharing its tensors, and a pass makes new tensors only
        # for what it changes. ONNX Runtime gets paths. So the weights exist once in memory, never as one
        # protobuf message (2 GB limit), and both outputs are self-contained in the output folder.
        t0 = time.perf_counter()
        reference_path = staging / "reference.onnx"
        written = save_onnx(loaded.model, reference_path, external_threshold=options.external_data_threshold)
        say(f"wrote reference.onnx ({_size(written)}, {time.perf_counter() - t0:.1f} s)")
        loaded.model = None  # type: ignore[assignment]  # frees the exporter's (torch) tensors
        gc.collect()
        reference = load_onnx(reference_path)
        loaded.model = reference
        compiled = reference.clone()
        timings["save_reference_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        passes = build_passes(options)
        # Fusion runs last and on its own: the cost model counts FLOPs of standard ops, so the compiled
        # model's cost is taken before its attention and norms become com.microsoft kernels.
        fusions = [p for p in passes if p.name in _FINISHING_PASSES]
        pipeline = run_pipeline(compiled, [p for p in passes if p.name not in _FINISHING_PASSES], progress=say)
        # Probe and profile within the sequence lengths the model accepts (its position table): a default
        # longer than that is lowered, an explicit one is an error.
        limit = sequence_limit(reference)
        seqs = fit_seqs(limit, options.profile_seqs, explicit="profile_seqs" in options.model_fields_set)
        if seqs != list(options.profile_seqs):
            options = options.replace(profile_seqs=seqs)
        batch0, seq0 = options.profile_batches[0], options.profile_seqs[0]
        new_cost = model_cost(compiled, batch=batch0, seq=seq0)
        unfused = fused = None
        if fusions and _blockwise(reference, compiled, options):
            # Block-by-block verification cuts the graph at each layer's residual output, which the fused
            # SkipRMSNorm kernels compute inside themselves: the fused graph could not be verified.
            for finishing in fusions:
                pipeline.passes.append(
                    finishing.result(
                        compiled,
                        modified=False,
                        refused={"model": "verification goes block by block here, which needs the unfused graph"},
                        skipped=True,
                    )
                )
            fusions = []
        if fusions:
            # The unfused graph is kept (a clone sharing its tensors) for the fall-back below: a fused graph that
            # ONNX Runtime cannot load or that fails verification is replaced by it, and the report says why.
            unfused = compiled.clone()
            fused = run_pipeline(compiled, fusions, progress=say)
            pipeline.passes.extend(fused.passes)
            if not any(r.modified for r in fused.passes):
                unfused = None
        timings["passes_s"] = time.perf_counter() - t0
        _check_requested_passes(options, pipeline)

        t0 = time.perf_counter()
        model_path = staging / "model.onnx"
        written = save_onnx(compiled, model_path, external_threshold=options.external_data_threshold)
        say(f"wrote model.onnx ({_size(written)}, {time.perf_counter() - t0:.1f} s)")
        timings["save_s"] = time.perf_counter() - t0

        say("counting parameters and FLOPs")
        ref_cost = model_cost(reference, batch=batch0, seq=seq0)

        t0 = time.perf_counter()
        user_feeds = [load_feeds(path) for path in options.feeds]

        exact = pipeline.exact

        def verify(model: ir.Model):
            return _verify(reference, model, reference_path, model_path, exact, user_feeds, options, say)

        if unfused is None:
            verification = verify(compiled)
        else:
            verification, compiled = _verify_fused(verify, compiled, unfused, pipeline, model_path, options, say)
        timings["verify_s"] = time.perf_counter() - t0
        # model.onnx is written and verified: what follows reads files. The compiled graph's own tensors (the
        # passes' new weights, 3 GB at 1B) are freed and the reference's mapped pages unmapped before the LM
        # outputs load the torch module beside them.
        records = pipeline.records()
        del compiled, unfused, fused, pipeline  # the pass results hold the model too
        _release(reference)
        release_memory()

        t0 = time.perf_counter()
        # genai/ and hf/ are fp32 builds of the masked module: a precision change is theirs to make, not a
        # different model, but any other approximate change (pooled K/V, dropped layers, imposed 2:4) is.
        approximate = [
            r["pass"] for r in records if r["modified"] and not r["exact"] and r["pass"] != "convert-precision"
        ]
        lm_sections = _lm_outputs(loaded, options, staging, say, approximate=approximate, records=records)
        if lm_sections:
            timings["lm_outputs_s"] = time.perf_counter() - t0
        if loaded.module is not None and loaded.module_loader is not None:
            # The LM outputs were the masked module's last user (the tokenizer stays): at 1B parameters it is
            # 4.9 GB that would otherwise sit beside the quality step's ONNX Runtime sessions.
            loaded.module = None
            gc.collect()

        # After the LM outputs: they load the tokenizer with the module when the export came from the cache.
        t0 = time.perf_counter()
        quality = quality_section(
            loaded,
            source,
            reference_path,
            model_path,
            options,
            max_seq=limit.max_seq if limit else None,
            verify_mode=verification.mode,
            progress=say,
        )
        timings["quality_s"] = time.perf_counter() - t0

        report: dict[str, Any] = {
            **report_header(loaded, options),
            "passes": records,
            "model": {
                "reference": model_summary(ref_cost),
                "compiled": model_summary(new_cost),
                "cost_shape": {"batch": batch0, "seq": seq0},
            },
            "per_layer": compare_layers(ref_cost, new_cost),
            "groups": groups_summary(records),
            "verification": verification.as_dict(),
            "quality": quality,
            "timings": timings,
            **lm_sections,
        }
        if options.engine != "onnxruntime":
            say(f"building {options.engine} engine")
            report["engine"] = _build_engine(
                options,
                model_path,
                staging,
                reference_path,
                reference,
                user_feeds,
                exact,
                loaded.extra.get("max_positions"),
            )
        if options.profile:
            check_profile_memory(reference, options.profile_batches, options.profile_seqs, options.memory_limit_gib)
            say("profiling reference vs compiled on ONNX Runtime CPU")
            report.update(profile_section(reference_path, model_path, options, ref_cost.flops / max(new_cost.flops, 1)))
        report["predictions"] = predictions(ref_cost, new_cost, options, reference=reference, model_path=model_path)
        _release(reference)
        if not options.keep_reference:
            for path in (reference_path, staging / "reference.onnx.data"):
                path.unlink(missing_ok=True)
        timings["total_s"] = time.perf_counter() - start

        from prune2deploy.profiling.report import write_report

        write_report(staging, report)
        write_manifest(staging, loaded, options)
        folder.finish()
    except BaseException:
        folder.abort()
        raise
    result = CompileResult(out_dir, report)
    lm_check = report.get("genai", {}).get("check")
    if lm_check and not lm_check["passed"]:
        raise VerificationError(
            f"genai/ decoder differs from the masked model by {lm_check['max_rel_diff']:.3g} (relative), more than "
            f"its tolerance {lm_check['tolerance']:g}; see {out_dir / 'report.json'}. This is a bug."
        )
    tokens = report.get("genai", {}).get("genai", {})
    if tokens.get("checked") and not tokens["greedy_tokens_equal"]:
        raise VerificationError(
            f"onnxruntime-genai's greedy tokens on genai/ differ from transformers' on the masked model "
            f"({tokens['matching']} of {tokens['tokens_compared']} equal); see {out_dir / 'report.json'}."
        )
    engine_check = report.get("engine", {}).get("verification")
    if not verification.passed:
        what = "; ".join(verification.problems) or (
            f"by {verification.worst:.3g} (relative), more than the exact tolerance {options.tolerance:g}"
        )
        raise VerificationError(
            f"compiled model differs from the masked reference: {what}; see {out_dir / 'report.json'}. "
            "This is a bug: please report it."
        )
    if engine_check and not engine_check["passed"]:
        raise VerificationError(
            f"the {options.engine} engine's outputs differ from the masked reference: {_engine_problem(engine_check)}"
            f" (exact tolerance {options.tolerance:g}); see {out_dir / 'report.json'}."
        )
    return result


def check_before_loading(options: CompileOptions) -> None:
    """What can be checked without the model, checked before the minutes of loading and exporting it:
    target GPU names, the engine's availability, shape ranges against the profiling grid."""
    from prune2deploy.profiling.roofline import load_catalog, resolve_gpus

    if options.gpus:
        resolve_gpus(options.gpus, load_catalog())
    if options.engine != "onnxruntime":
        from prune2deploy.engines.registry import make_engine

        availability = make_engine(options.engine).available()
        if not availability.can_build:
            raise EngineUnavailable(
                f"engine {options.engine} cannot build here: {availability.reason}. {availability.install_hint}"
            )


def deployment_axes(options: CompileOptions, max_positions: int | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the batch and sequence axes an engine's optimization profile accepts.

    ``options.shapes`` wins per axis. The defaults fit a deployment, not the profiling point: batch 1 to
    max(8, largest profiled batch), sequence 1 to the model's maximum positions capped at 2048 (never below
    the largest profiled sequence); opt is the first profiled shape, where the engine is tuned.
    """
    batches, seqs = options.profile_batches, options.profile_seqs
    longest = min(max_positions or _DEFAULT_MAX_SEQ, _DEFAULT_MAX_SEQ)
    axes = {
        "batch": (1, batches[0], max(_DEFAULT_MAX_BATCH, *batches)),
        "seq": (1, seqs[0], max(longest, *seqs)),
    }
    axes.update({axis: tuple(span) for axis, span in options.shapes.items()})
    return axes


_DEFAULT_MAX_BATCH = 8
_DEFAULT_MAX_SEQ = 2048


def _lm_outputs(
    loaded: Any,
    options: CompileOptions,
    staging: Path,
    say: Progress,
    *,
    approximate: Sequence[str] = (),
    records: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """``genai/`` (on by default for causal LMs with a torch module) and ``hf/`` (on request).

    Both are built from the masked transformers module, which carries what the exact passes remove (zero
    neurons, heads, layers) but not the changes of approximate passes (``approximate``). regroup-gqa's pooled
    K/V are repeated on the sliced module, with the query-head permutations of similarity grouping taken
    from the pass's record (``records``), and so is remove-layers' depth plan (the layers its record lists);
    genai/ is then checked against ``model.onnx``. After the others (imposed 2:4) the outputs would silently
    be a different model than ``model.onnx``, so they are not written and the report says why.
    """
    from prune2deploy.outputs.lm import not_written, write_lm_outputs

    genai = options.genai if options.genai is not None else loaded.causal_lm
    if not (genai or options.hf_checkpoint):
        return {}
    regroup = None
    if "regroup-gqa" in approximate:
        # The one approximate pass the LM outputs repeat in torch (outputs/regroup.py): its decode speed-up is
        # genai/'s. The decoder is then checked against model.onnx as well as against the torch model.
        regroup = {"kv_heads": options.kv_heads, "grouping": options.gqa_grouping, "method": options.gqa_method}
        if options.gqa_grouping == "similarity":
            record = next(r["record"] for r in records if r["pass"] == "regroup-gqa")
            regroup["orders"] = {name: block["order"] for name, block in record.get("per_block", {}).items()}
        approximate = [name for name in approximate if name != "regroup-gqa"]
    drop_layers: list[int] = []
    if "remove-layers" in approximate:
        # A depth plan: the module loses the same decoder layers (outputs/depth.py), checked against model.onnx.
        from prune2deploy.outputs.depth import layer_indices

        record = next(r["record"] for r in records if r["pass"] == "remove-layers")
        try:
            drop_layers = layer_indices(record.get("layers_removed", []))
        except UnsupportedModelError as exc:
            return not_written(str(exc), genai=genai, hf=options.hf_checkpoint)
        approximate = [name for name in approximate if name != "remove-layers"]
    if approximate:
        reason = (
            f"genai/ and hf/ are built from the masked transformers module, which does not carry the changes of "
            f"the approximate pass(es) {', '.join(approximate)} that model.onnx has; they would be a different "
            "model than model.onnx, so they are not written (compile without those passes for genai/ and hf/)"
        )
        log.warning(reason)
        return not_written(reason, genai=genai, hf=options.hf_checkpoint)
    if not loaded.causal_lm:
        reason = (
            "genai/ and hf/ are built from a transformers causal LM (model folder, GGUF, bundled name or module); "
            f"this input is {loaded.kind}" + (f" ({loaded.task})" if loaded.task else "")
        )
        return not_written(reason, genai=genai, hf=options.hf_checkpoint)

    def masked_module() -> tuple[Any, Any]:
        """The masked module for the LM outputs, which then hold the compile's only reference to it (freed
        when they are done with it; a cached export re-loads it from the checkpoint when asked again)."""
        module, tokenizer = loaded.masked_module()
        if loaded.module_loader is not None:
            loaded.module = None
        return module, tokenizer

    return write_lm_outputs(
        masked_module,
        staging,
        genai=genai,
        hf_checkpoint=options.hf_checkpoint,
        context_length=options.genai_context_length,
        tolerance=options.tolerance,
        progress=say,
        regroup=regroup,
        drop_layers=drop_layers,
        compiled_model=staging / "model.onnx",
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _release(model: ir.Model) -> None:
    """Unmaps the memory-mapped weights of ``model`` (they are mapped again if read later).

    A mapping that arrays still view stays mapped: a rewrite may have made a new tensor as a view of a mapped
    weight (onnxscript's ORT fusions do), and closing the map under it would be an error (``BufferError``).
    """
    viewed = []
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            try:
                value.const_value.release()
            except BufferError:
                viewed.append(value.name)
    if viewed:
        log.debug("still mapped (an array views them): %s", ", ".join(viewed))


def _blockwise(reference: ir.Model, compiled: ir.Model, options: CompileOptions) -> bool:
    from prune2deploy.verify import choose_mode

    return choose_mode(reference, compiled, options.verify_mode) == "blockwise"


def _verify(reference, compiled, reference_path: Path, model_path: Path, exact: bool, user_feeds, options, say):
    """Whole models one after the other when they fit, else block by block (``options.verify_mode``)."""
    from prune2deploy.verify import BlockwiseUnavailable, choose_mode, verify_blockwise, verify_models

    mode = choose_mode(reference, compiled, options.verify_mode)
    if mode == "blockwise":
        say("verifying against the masked reference, block by block")
        try:
            return verify_blockwise(
                reference,
                compiled,
                exact=exact,
                tolerance=options.tolerance,
                user_feeds=user_feeds,
                progress=say,
                scratch=reference_path.parent,  # the staging folder: beside the outputs, removed with it
            )
        except BlockwiseUnavailable as exc:
            if options.verify_mode == "blockwise":
                raise EngineUnavailable(f"block-by-block verification is not possible here: {exc}") from exc
            log.warning("block-by-block verification not possible (%s); verifying whole models", exc)
    say("verifying against the masked reference")
    # Both models' mapped weights were read by the passes; unmap them so ONNX Runtime's copy is the only one.
    _release(reference)
    return verify_models(
        reference_path, model_path, exact=exact, tolerance=options.tolerance, user_feeds=user_feeds, probe=reference
    )


def _verify_fused(verify, fused: ir.Model, unfused: ir.Model, pipeline, model_path: Path, options, say):
    """Verifies the fused model.onnx; where ONNX Runtime cannot load it or it fails, falls back to the unfused.

    onnxscript's fusions are pattern rewrites of an exported graph; on some graphs they produce one ONNX
    Runtime refuses (GPT-2's Gemm after the attention fusion: "Input 0 expected to have rank 2"). That is a
    per-model fact, not a reason to fail the compile: the unfused graph is written and verified instead, and
    the fuse-ort pass's entry in the report says what failed (``record.fell_back``, ``refused.model``).

    Returns:
        (verification, the model now in model.onnx).
    """
    try:
        verification = verify(fused)
        failure = (
            None
            if verification.passed
            else ("; ".join(verification.problems) or f"differs from the masked reference by {verification.worst:.3g}")
        )
    except BadInputError as exc:  # ONNX Runtime cannot load the fused graph
        failure = str(exc)
    if failure is None:
        return verification, fused
    log.warning("the ORT-fused model.onnx failed (%s); writing the unfused graph instead", failure)
    say("fused graph failed to load or verify; falling back to the unfused graph")
    for result in (r for r in pipeline.passes if r.name in _FINISHING_PASSES and r.modified):
        result.record["fell_back"] = True
        result.refused["model"] = f"fused graph failed, model.onnx is the unfused graph: {failure[:500]}"
        result.modified = False
        result.exact = True
    from prune2deploy.frontends.onnx import save_onnx

    save_onnx(unfused, model_path, external_threshold=options.external_data_threshold)
    return verify(unfused), unfused


def _engine_problem(check: dict[str, Any]) -> str:
    worst = check.get("worst")
    return "; ".join(check.get("problems") or []) or ("error inf/NaN" if worst is None else f"error {worst:.3g}")


def default_memory_limit_gib() -> float:
    """Half of this machine's physical memory: profiling more than that would swap or be killed."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30 / 2
    except (ValueError, OSError, AttributeError):
        return 8.0


def estimate_memory_bytes(model: ir.Model, batch: int, seq: int) -> int:
    """What ONNX Runtime needs at least to run ``model`` once at (batch, seq), from the cost model.

    Weights plus twice the largest node's activations (its inputs and outputs live together, and the
    arena keeps the previous ones); a lower bound, which is enough to refuse shapes that cannot fit.
    """
    from prune2deploy.analysis.cost import model_cost

    cost = model_cost(model, batch=batch, seq=seq)
    weights = sum(node.weight_bytes for node in cost.nodes)
    largest = max((node.bytes_read + node.bytes_written for node in cost.nodes), default=0)
    return int(weights + 2 * largest)


def check_profile_memory(model: ir.Model, batches: Sequence[int], seqs: Sequence[int], limit_gib: float | None) -> None:
    """Refuses profiling shapes whose estimated memory exceeds the limit, before ONNX Runtime allocates.

    Raises:
        BadInputError: naming the shape, the estimate and how to raise the limit (``--memory-limit-gib``).
    """
    limit = limit_gib if limit_gib is not None else default_memory_limit_gib()
    for batch in batches:
        for seq in seqs:
            need = estimate_memory_bytes(model, batch, seq) / 2**30
            if need > limit:
                raise BadInputError(
                    f"profiling at batch {batch}, seq {seq} needs about {need:.1f} GiB (estimated from the cost "
                    f"model), more than the limit of {limit:.1f} GiB; choose smaller --batch/--seq, or raise the "
                    "limit with --memory-limit-gib (option memory_limit_gib)"
                )


def _check_requested_passes(options: CompileOptions, pipeline: Any) -> None:
    """A pass switched on by an option the user gave (``--regroup-gqa 5``) must change something.

    Otherwise the option did nothing, silently: an error that says why each place was refused.
    """
    from prune2deploy.passes.registry import load_passes

    values = options.model_dump()
    asked = {name for name, spec in load_passes().items() if spec.enabled_by(values)}
    for result in pipeline.passes:
        if result.name in asked and not result.modified:
            keys = [k for k, o in load_passes()[result.name].options.items() if o.enables and values.get(k) is not None]
            flags = ", ".join(load_passes()[result.name].options[k].flag or k for k in keys)
            reasons = "; ".join(f"{where}: {why}" for where, why in list(result.refused.items())[:3])
            more = len(result.refused) - 3
            raise BadInputError(
                f"{flags} asked for the {result.name} pass, which changed nothing: "
                + (reasons + (f"; and {more} more" if more > 0 else "") if reasons else "it found nothing to change")
                + ". Fix the value or leave the option out."
            )


def _input_paths(source: Any, options: CompileOptions) -> list[Path]:
    """Every file or folder this compile reads: the output may not be, contain or lie inside one."""
    paths: list[Path] = []
    if isinstance(source, (str, Path)):
        from prune2deploy.frontends.hf import BUNDLED_MODELS, bundled_model_path

        if str(source) in BUNDLED_MODELS:
            with contextlib.suppress(P2DError):  # a missing bundled package is reported by the loader
                paths.append(bundled_model_path(str(source)))
        else:
            paths.append(Path(source))
    paths += [p for p in (options.masks, options.plan) if p is not None]
    paths += list(options.feeds)
    return paths


def resolve_plan(options: CompileOptions) -> CompileOptions:
    """A plan brings its mask file (next to it), its depth plan and its hidden-channel plan.

    The plan's layer and hidden-channel lists are pass options: giving them switches their passes on.
    """
    if options.plan is None:
        return options
    from prune2deploy.pruning.plan import load_plan

    plan = load_plan(options.plan)
    changes: dict[str, Any] = {}
    if options.masks is None and plan.masks and plan.masks.get("file"):
        changes["masks"] = options.plan.parent / plan.masks["file"]
        expected = plan.masks.get("sha256")
        if expected and changes["masks"].is_file():
            from prune2deploy.io import sha256_file

            found = sha256_file(changes["masks"])
            if found != expected:
                raise BadInputError(
                    f"{changes['masks']}: sha256 {found[:12]}… is not the {str(expected)[:12]}… that the plan "
                    f"{options.plan} records for it; the mask file was replaced or edited after pruning. "
                    "Re-run `prune2deploy prune`, or pass --masks explicitly to use this file anyway"
                )
    if plan.dropped_layers:
        changes["drop_layers"] = list(plan.dropped_layers)
    if plan.hidden is not None and list(plan.hidden.removed):
        changes["drop_hidden"] = [int(c) for c in plan.hidden.removed]
    return options.replace(**changes) if changes else options


def _build_engine(
    options: CompileOptions,
    model_path: Path,
    staging: Path,
    reference_path: Path,
    reference: ir.Model,
    user_feeds: list,
    exact: bool,
    max_positions: int | None = None,
) -> dict[str, Any]:
    """Builds the chosen engine and, where it can run on this machine, verifies it against the reference."""
    from prune2deploy.engines.base import BuildOptions
    from prune2deploy.engines.registry import make_engine
    from prune2deploy.pipeline import convert_precision

    engine = make_engine(options.engine)
    availability = engine.available()
    if not availability.can_build:
        raise EngineUnavailable(
            f"engine {options.engine} cannot build here: {availability.reason}. {availability.install_hint}"
        )
    inputs = []
    for value in ir.load(str(model_path)).graph.inputs:
        if value.shape is not None:
            inputs.append((value.name, [d if isinstance(d, int) else None for d in value.shape]))
    axes = deployment_axes(options, max_positions) if engine.needs_shape_ranges else {}
    shape_ranges = engine.shape_ranges(inputs, batches=options.profile_batches, seqs=options.profile_seqs, axes=axes)
    built = engine.build(
        model_path,
        BuildOptions(
            precision=options.precision,
            sparse_weights="sparsify-2:4" in options.passes,
            shape_ranges=shape_ranges,
            work_dir=staging / "engine",
            extra=dict(options.engine_options),
            convert_precision=convert_precision,
        ),
    )
    section: dict[str, Any] = {
        "engine": built.engine,
        "artifact": str(built.artifact.relative_to(staging)) if built.artifact else None,
        "info": built.info,
    }
    if axes:
        section["shapes"] = {axis: list(span) for axis, span in axes.items()}
        section["shape_ranges"] = {name: [list(s) for s in spans] for name, spans in shape_ranges.items()}
    section["verification"] = _verify_engine(engine, built, reference_path, reference, user_feeds, options, exact)
    return section


def _verify_engine(
    engine, built, reference_path: Path, reference: ir.Model, user_feeds: list, options: CompileOptions, exact: bool
):
    """The engine's outputs against the masked reference (ONNX Runtime CPU fp32), where it runs here.

    Exact only when the pipeline was exact and the engine runs fp32; half precision is reported as
    approximate (its error, not a verdict).
    """
    from prune2deploy.verify import OutputRunner, feed_sets, verify_runners

    if not engine.available().can_run:
        return None
    from prune2deploy.ort_session import make_session

    session = make_session(reference_path, prepack=False)
    names = [o.name for o in session.get_outputs()]

    class _Reference:
        def run(self, feeds):
            return dict(zip(names, session.run(names, dict(feeds)), strict=True))

    try:
        with engine.runner(built) as runner:
            runner_: OutputRunner = runner
            result = verify_runners(
                _Reference(),
                runner_,
                feed_sets(reference, user_feeds=user_feeds),
                exact=exact and options.precision == "fp32",
                tolerance=options.tolerance,
                outputs=names,
            )
    except EngineUnavailable as exc:  # built here, runs elsewhere (a GPU engine)
        log.info("engine %s not verified here: %s", engine.name, exc)
        return None
    return result.as_dict()
