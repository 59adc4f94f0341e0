"""``--baseline DENSE``: the dense model an already-pruned input came from, for the report's comparisons.

An input that is already pruned (2:4 weights, a physically smaller checkpoint) is its own reference: the quality
and the measured and predicted speedups of the compile are against the same pruned model (1.00× on every GPU for a
2:4 input). The user has the dense original; given it, the report adds the compiled model against it:

- ``quality.comparisons``: an entry ``reference: "dense baseline (--baseline)"`` with the measures of the "vs dense"
  entry, on the same evaluation text (when masks were applied too, ``dense (before the masks)`` is the other dense);
- ``latency``: the baseline's rows (``model: "baseline"``), timed in the same run as the reference and the compiled
  model; ``baseline.speedup``: compiled vs baseline, the rows of ``speedup``;
- ``baseline.predictions``: the rows of ``predictions`` with the baseline as reference (and, for a 2:4 input whose
  engine is not TensorRT, TensorRT's rows too: the sparse tensor cores' estimate, ``sparse_used``).

Checked before the minutes of loading (:func:`check_baseline`): the baseline exists and has the input's model family,
vocabulary and tokenizer; after loading (:func:`load_baseline`): the same graph inputs and outputs. A mismatch is bad
input (exit 2) naming both. The baseline is loaded like the input (the export cache applies) without masks, written to
``staging/baseline.onnx`` and removed with the other scratch files: it is not kept in the output folder (the user has
the original; the report records its path and sha256).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.driver.source import Progress, input_record, load_source
from prune2deploy.errors import BadInputError

__all__ = [
    "BASELINE_LABEL",
    "Baseline",
    "baseline_path",
    "check_baseline",
    "load_baseline",
    "profile_fits",
]

log = logging.getLogger(__name__)

#: The quality comparison's ``reference`` for the baseline (the masks' dense model is ``dense (before the masks)``).
BASELINE_LABEL = "dense baseline (--baseline)"


@dataclass
class Baseline:
    """The loaded baseline: its scratch file, its cost at the compile's cost shape and the report's record."""

    path: Path  # staging/baseline.onnx
    cost: Any  # analysis.cost.ModelCost at the compile's cost shape
    record: dict[str, Any] = field(default_factory=dict)

    def files(self) -> list[Path]:
        return [self.path, self.path.with_name(self.path.name + ".data")]

    def remove(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)


# -- before loading ------------------------------------------------------------------------------------------------


def baseline_path(name: str) -> Path:
    """The file or folder ``--baseline`` names (a bundled name's folder); bad input when there is none."""
    from prune2deploy.frontends.hf import BUNDLED_MODELS, bundled_model_path

    if name in BUNDLED_MODELS:
        return bundled_model_path(name)
    path = Path(name)
    if not path.exists():
        raise BadInputError(
            f"--baseline {name}: no such file or folder (and not a bundled model name: {', '.join(BUNDLED_MODELS)})"
        )
    return path


@dataclass
class _Signature:
    """What must match between the input and its baseline, as far as it can be read without loading."""

    what: str  # how the source is named in messages
    source: str  # where the fields were read: "config" (HF config.json / module), "gguf" or "onnx"
    family: str | None = None
    vocab: int | None = None
    tokenizer: str | None = None  # a digest of the tokenizer's vocabulary


def check_baseline(source: Any, options: Any) -> None:
    """The baseline exists and has the input's model family, vocabulary size and tokenizer.

    Family and tokenizer are compared where both were read the same way (two model folders, two GGUF files);
    the vocabulary size wherever both are known. What cannot be read here is checked after loading (the graphs'
    inputs and outputs).

    Raises:
        BadInputError: naming both and what differs.
    """
    if not options.baseline:
        return
    base = _signature(baseline_path(options.baseline), f"--baseline {options.baseline}")
    mine = _signature(source, f"the input {source}" if isinstance(source, (str, Path)) else "the input module")
    if mine is None or base is None:
        return
    problems = []
    if mine.vocab and base.vocab and mine.vocab != base.vocab:
        problems.append(f"vocabulary of {mine.vocab} tokens vs {base.vocab}")
    if mine.source == base.source:
        if mine.family and base.family and mine.family != base.family:
            problems.append(f"model family {mine.family!r} vs {base.family!r}")
        if mine.tokenizer and base.tokenizer and mine.tokenizer != base.tokenizer:
            problems.append(f"tokenizer vocabulary {mine.tokenizer[:12]}… vs {base.tokenizer[:12]}… (sha256)")
    if problems:
        raise BadInputError(
            f"{base.what} is not the dense model of {mine.what}: {'; '.join(problems)}. The baseline must be the "
            "same model before pruning (same family, vocabulary and tokenizer); pass the checkpoint the input was "
            "pruned from"
        )


def _signature(source: Any, what: str) -> _Signature | None:
    """The family, vocabulary and tokenizer of a model folder, GGUF, .onnx file or module; None when unknown."""
    from prune2deploy.frontends.hf import BUNDLED_MODELS, bundled_model_path

    if not isinstance(source, (str, Path)):
        config = getattr(source, "config", None)
        if config is None:
            return None
        return _Signature(what, "config", getattr(config, "model_type", None), getattr(config, "vocab_size", None))
    path = bundled_model_path(str(source)) if str(source) in BUNDLED_MODELS else Path(source)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            return _folder_signature(path, what)
        ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
        if ggufs:
            return _gguf_signature(ggufs[0], what)
        if path.is_file() and path.suffix == ".onnx":
            return _onnx_signature(path, what)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:  # the loaders say what is wrong
        log.info("baseline check: %s not read before loading (%s); checked after loading", path, exc)
    return None


def _folder_signature(folder: Path, what: str) -> _Signature:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab = text.get("vocab_size") if isinstance(text.get("vocab_size"), int) else None
    return _Signature(what, "config", config.get("model_type"), vocab, _tokenizer_digest(folder))


def _tokenizer_digest(folder: Path) -> str | None:
    """sha256 of the tokenizer's vocabulary (token → id, without added tokens), or of its SentencePiece model."""
    for name in ("tokenizer.json", "vocab.json"):
        file = folder / name
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab") if name == "tokenizer.json" else data
            if vocab:
                return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()
    for name in ("vocab.txt", "tokenizer.model", "spiece.model"):
        file = folder / name
        if file.is_file():
            return hashlib.sha256(file.read_bytes()).hexdigest()
    return None


def _gguf_signature(path: Path, what: str) -> _Signature:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def text(key: str) -> str | None:
        f = fields.get(key)
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace") if f is not None and f.data else None

    tokens = fields.get("tokenizer.ggml.tokens")
    digest = vocab = None
    if tokens is not None:
        vocab = len(tokens.data)
        h = hashlib.sha256()
        for index in tokens.data:
            h.update(bytes(tokens.parts[index]) + b"\0")
        digest = h.hexdigest()
    return _Signature(what, "gguf", text("general.architecture"), vocab, digest)


def _onnx_signature(path: Path, what: str) -> _Signature:
    """The vocabulary from the ``logits`` output's last dimension (the graph alone: external data is not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    vocab = None
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name == "logits" and dims and dims[-1].HasField("dim_value"):
            vocab = int(dims[-1].dim_value)
    return _Signature(what, "onnx", None, vocab)


# -- loading -------------------------------------------------------------------------------------------------------


def load_baseline(
    name: str, options: Any, reference: ir.Model, path: Path, cost_shape: tuple[int, int], say: Progress
) -> Baseline:
    """Loads the baseline like the input, without masks (the export cache applies), checks that its graph takes
    and gives what the reference's does, writes it to ``path`` and returns it with its cost.

    Raises:
        BadInputError: the graphs' inputs or outputs differ (naming both).
    """
    from prune2deploy.analysis.cost import model_cost
    from prune2deploy.frontends.onnx import save_onnx

    say(f"loading the baseline {name}")
    # Not validated again (the input's options are): no masks, and no torch module kept for genai/ or hf/.
    plain = options.model_copy(update={"masks": None, "genai": False, "hf_checkpoint": False, "hf_nemotron_nas": False})
    loaded = load_source(name, plain, progress=say)
    _check_interface(reference, loaded.model, name)
    record = {"source": name, **input_record(loaded), "kept": False}
    if loaded.masks_applied:
        record["note"] = f"{loaded.masks_applied} masks attached to the baseline were applied: it is not dense"
    batch, seq = cost_shape
    cost = model_cost(loaded.model, batch=batch, seq=seq)
    save_onnx(loaded.model, path, external_threshold=options.external_data_threshold)
    loaded.model = None  # type: ignore[assignment]
    gc.collect()
    record["model"] = {"params": int(cost.params), "flops": int(cost.flops), "nodes": len(cost.nodes)}
    return Baseline(path, cost, record)


def _check_interface(reference: ir.Model, baseline: ir.Model, name: str) -> None:
    """The baseline takes the reference's inputs and gives its outputs, the logits with the same vocabulary."""

    def names(values: Any) -> list[str]:
        return sorted(v.name for v in values)

    problems = []
    for what, mine, base in (
        ("inputs", reference.graph.inputs, baseline.graph.inputs),
        ("outputs", reference.graph.outputs, baseline.graph.outputs),
    ):
        if names(mine) != names(base):
            problems.append(f"graph {what} {names(mine)} vs {names(base)}")
    last = {}
    for key, model in (("input", reference), ("baseline", baseline)):
        for value in model.graph.outputs:
            if value.name == "logits" and value.shape is not None and isinstance(value.shape[-1], int):
                last[key] = value.shape[-1]
    if len(last) == 2 and last["input"] != last["baseline"]:
        problems.append(f"logits over {last['input']} vs {last['baseline']} tokens")
    if problems:
        raise BadInputError(
            f"--baseline {name} does not compute what the input computes: {'; '.join(problems)} (the input first). "
            "The baseline must be the same model before pruning"
        )


def profile_fits(paths: list[Path], grid: list[tuple[int, int]], limit_gib: float | None) -> str:
    """'' when the models at ``paths`` fit in memory together at every shape of the grid (profiling opens all
    their sessions at once), else why not, from the cost model's estimate
    (:mod:`prune2deploy.profiling.memory_estimate`)."""
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.profiling.memory_estimate import default_memory_limit_gib, estimate_memory_bytes

    limit = limit_gib if limit_gib is not None else default_memory_limit_gib()
    models = [load_onnx(path) for path in paths]  # mapped: the weights are not read
    for batch, seq in grid:
        need = sum(estimate_memory_bytes(model, batch, seq) for model in models) / 2**30
        if need > limit:
            return (
                f"the reference, the compiled model and the baseline together need about {need:.1f} GiB at batch "
                f"{batch}, seq {seq} (estimated from the cost model), more than the limit of {limit:.1f} GiB "
                "(--memory-limit-gib); the baseline was not timed"
            )
    return ""
