"""The report's ``quality`` section: how far the compiled model is from its reference and from the dense model.

Verification answers "is the compiled graph the masked model?" with a max |diff| on random feeds. A user
who pruned also wants to know what the pruning cost: that is the compiled model against the *dense* model
(before the masks), on real text. Both are measured here with :mod:`prune2deploy.quality` on the bundled
evaluation text: per-token KL, top-1 agreement and perplexity for causal LMs, the cosine of mean-pooled
embeddings for encoders. The section is information, never the verdict: exactness stays verification's.

Where the text comes from: the model's tokenizer (HF folders, GGUF, bundled names; a module that carries
one). Without a tokenizer (an nn.Module, a bare .onnx) the windows are token ids drawn from the vocabulary
by a seeded generator — they still measure how far the distribution moved; the section says so.

Where the dense model comes from: the masks were applied to something the driver read — the cached
unmasked export (HF sources), the .onnx file itself (ONNX sources), or the module given (Python API). Without
masks the input already is the reference, and there is no dense model to compare with; the section says why.
An already-pruned input (2:4, physically smaller) can bring its dense model as ``--baseline``: then the section
also compares with it (``dense baseline (--baseline)``; beside ``dense (before the masks)`` when masks were
applied too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from prune2deploy.driver.baseline import BASELINE_LABEL
from prune2deploy.driver.fp32 import Fp32Copies, Fp32Unavailable
from prune2deploy.driver.source import Progress, Source
from prune2deploy.ort_session import release_memory

__all__ = ["QUALITY_WINDOW", "quality_section"]

log = logging.getLogger(__name__)

#: Tokens per causal-LM window (lowered to the model's sequence limit); encoders embed 8 sentences per window.
QUALITY_WINDOW = 128
_SENTENCES_PER_WINDOW = 8
_RANDOM_TEXT = "random token ids (seed 0) drawn from the vocabulary of {vocab}: no tokenizer for this input"


def quality_section(
    loaded: Source,
    source: Any,
    reference_path: Path,
    model_path: Path,
    options: Any,
    *,
    max_seq: int | None,
    verify_mode: str,
    progress: Progress | None = None,
    fp32: Fp32Copies | None = None,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """Compiled vs reference (and vs dense when known) on the evaluation text; never raises for the model.

    Args:
        loaded: the loaded input (task, tokenizer, path, masks applied).
        source: what the user gave ``compile`` (an nn.Module is the dense model when masks were applied to it).
        reference_path, model_path: the masked reference and the compiled model, as files for ONNX Runtime.
        options: compile options (``quality_windows``: 0 turns the section off).
        max_seq: the model's sequence limit (windows are shortened to it), None when unbounded.
        verify_mode: ``blockwise`` means two fp32 copies do not fit: quality is then skipped.
        fp32: runs half-precision graphs as fp32 copies (ONNX Runtime's CPU lacks their kernels); without
            it, quality of a half-precision graph is skipped.
        baseline: the ``--baseline`` dense model as an ONNX file: compiled vs it is one more comparison.
    """
    windows = options.quality_windows
    if windows == 0:
        return {"computed": False, "reason": "turned off (quality_windows 0 / --quality-windows 0)"}
    if verify_mode == "blockwise":
        return {
            "computed": False,
            "reason": "two fp32 copies of the model do not fit in memory (verification ran block by block); "
            "quality needs both whole models",
        }
    if loaded.extra.get("dtype") in ("bfloat16", "float16") and fp32 is None:
        return {
            "computed": False,
            "reason": f"{loaded.extra['dtype']} graph: ONNX Runtime's CPU provider lacks half-precision kernels "
            "for some of its ops",
        }
    say = progress or (lambda _msg: None)
    kind = _kind(loaded)
    if kind is None:
        return {"computed": False, "reason": "the model's outputs are neither logits nor last_hidden_state"}
    start = time.perf_counter()
    say(f"measuring quality on the evaluation text ({windows} windows)")
    fp32 = fp32 or Fp32Copies(Path(model_path).parent / "fp32", refused="no fp32 copies were asked for")
    try:
        runnable = (str(fp32.runnable(reference_path)), str(fp32.runnable(model_path)))
        section = _measure(kind, loaded, source, runnable, options, windows, max_seq, fp32, baseline)
    except Fp32Unavailable as exc:
        return {"computed": False, "kind": kind, "reason": f"{loaded.extra.get('dtype')} graph: {exc}"}
    except Exception as exc:  # information, not the verdict: why it is missing goes into the report
        log.warning("quality not measured: %s", exc)
        return {"computed": False, "kind": kind, "reason": f"{type(exc).__name__}: {exc}"}
    section["seconds"] = time.perf_counter() - start
    return section


def _kind(loaded: Source) -> str | None:
    """``lm`` (next-token logits), ``encoder`` (hidden states) or None, from the task and the output names."""
    outputs = [o.name for o in loaded.model.graph.outputs]
    if loaded.task == "causal-lm" or "logits" in outputs:
        return "lm"
    if "last_hidden_state" in outputs or loaded.task == "encoder":
        return "encoder"
    return None


def _measure(
    kind: str, loaded: Source, source: Any, paths: tuple[str, str], options: Any, windows: int,
    max_seq: int | None, fp32: Fp32Copies, baseline: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    from prune2deploy.quality import encoder_quality, lm_quality

    tokenizer = _tokenizer(loaded)
    vocab = _vocab_size(loaded, source)
    reference_path, model_path = paths
    compiled = _memo(model_path)
    section: dict[str, Any] = {"computed": True, "kind": kind}
    if kind == "lm":
        window = min(QUALITY_WINDOW, max_seq or QUALITY_WINDOW)
        if tokenizer is not None:
            text = "bundled evaluation text (prune2deploy/data/evaluation.txt)"
            ids = None
        elif vocab:
            text = _RANDOM_TEXT.format(vocab=vocab)
            ids = np.random.default_rng(0).integers(0, vocab, size=window * windows)
        else:
            return {"computed": False, "kind": kind, "reason": "no tokenizer and no known vocabulary size"}

        def measure(reference: Any) -> dict[str, Any]:
            result = lm_quality(
                reference, compiled, tokenizer=tokenizer, token_ids=ids, window=window, max_windows=windows
            )
            return result.to_dict()

        section.update(text=text, window=window, windows=windows)
    else:
        count = windows * _SENTENCES_PER_WINDOW
        if tokenizer is not None:
            text = "bundled evaluation text (prune2deploy/data/evaluation.txt)"
            batches = None
        elif vocab:
            text = _RANDOM_TEXT.format(vocab=vocab)
            length = min(32, max_seq or 32)
            rng = np.random.default_rng(0)
            batches = [rng.integers(0, vocab, size=(_SENTENCES_PER_WINDOW, length)) for _ in range(windows)]
        else:
            return {"computed": False, "kind": kind, "reason": "no tokenizer and no known vocabulary size"}

        def measure(reference: Any) -> dict[str, Any]:
            result = encoder_quality(
                reference, compiled, tokenizer=tokenizer, max_sentences=count, token_batches=batches
            )
            return result.to_dict()

        section.update(text=text, sentences=count)
    # The compiled model's outputs first, on their own (compared with themselves, result unused): then each
    # reference's session runs alone instead of beside the compiled one's (at 1B: 8 GB → 5 GB).
    measure(compiled)
    compiled.release()
    comparisons = [
        {"candidate": "compiled", "reference": "masked reference", **measure(reference_path)},
    ]
    release_memory()  # the reference's session (held in closures) is gone before the dense model's is made
    dense, why = _dense(loaded, source, options)
    if isinstance(dense, str):
        dense = str(fp32.runnable(dense))
    if fp32.made:
        section["precision"] = "fp32 copies of the half-precision graphs (ONNX Runtime's CPU lacks their kernels)"
    if dense is not None:
        comparisons.append({"candidate": "compiled", "reference": "dense (before the masks)", **measure(dense)})
        release_memory()
    elif baseline is None or loaded.masks_applied:  # with no masks, the baseline is the dense model
        section["dense_skipped"] = why
    if baseline is not None:
        base = str(fp32.runnable(baseline))
        comparisons.append({"candidate": "compiled", "reference": BASELINE_LABEL, **measure(base)})
    section["comparisons"] = comparisons
    return section


def _memo(path: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The compiled model as a model function that runs each batch once, however many references it meets.

    ``release()`` drops its ONNX Runtime session (the outputs stay cached; a batch not seen yet loads it
    again), so that the compiled model's session need not sit beside each reference's.
    """
    from prune2deploy.quality import as_model_fn

    state: dict[str, Any] = {"run": None}
    seen: dict[bytes, np.ndarray] = {}

    def cached(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        key = ids.tobytes() + mask.tobytes() + str(ids.shape).encode()
        if key not in seen:
            if state["run"] is None:
                state["run"] = as_model_fn(path)
            seen[key] = state["run"](ids, mask)
        return seen[key]

    def release() -> None:
        state["run"] = None
        release_memory()

    cached.release = release  # type: ignore[attr-defined]
    return cached


def _tokenizer(loaded: Source) -> Any:
    """The input's tokenizer: the one loaded with the module, else the checkpoint's own (HF sources)."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    if loaded.kind == "hf" and loaded.path is not None:
        from prune2deploy.frontends.hf import load_tokenizer

        return load_tokenizer(loaded.path)
    return None


def _vocab_size(loaded: Source, source: Any) -> int | None:
    """The vocabulary of a module's config, else the width of the ONNX graph's token-embedding table."""
    config = getattr(loaded.module if loaded.module is not None else source, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    for node in loaded.model.graph:
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            index = node.inputs[1]
            if index is not None and index.is_graph_input() and "input_ids" in (index.name or ""):
                return int(node.inputs[0].shape[0])
    return None


def _dense(loaded: Source, source: Any, options: Any) -> tuple[Any, str]:
    """The dense model (an ONNX path or a torch module) the masks were applied to, or None and why not."""
    if not loaded.masks_applied:
        return None, "no masks were applied: the input is the reference, there is no dense model to compare with"
    if loaded.kind == "onnx" and loaded.path is not None:
        return str(loaded.path), ""
    if loaded.kind == "torch":
        from prune2deploy.frontends.torch import has_torch_prune

        if has_torch_prune(source):
            return None, "torch.nn.utils.prune masks are baked into the module: its dense weights are not kept"
        return source, ""
    if loaded.kind == "hf" and loaded.path is not None:
        from prune2deploy.driver.source import export_cache_path

        if options.export_cache:
            cached = export_cache_path(loaded.path, loaded.extra.get("dtype", "float32"), options) / "model.onnx"
            if cached.is_file():
                return str(cached), ""
        from prune2deploy.frontends.hf import load_hf_model

        return load_hf_model(loaded.path, dtype="float32").module, ""
    return None, f"the dense model of a {loaded.kind} input is not known"
