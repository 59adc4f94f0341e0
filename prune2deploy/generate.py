"""Greedy generation and decode-step timing on ONNX Runtime with a KV-cache decoder graph.

Generation is how a pruned LLM is judged in deployment: prefill once, then one token per step, each step
reading the whole cache. :func:`generate` checks that the compiled graph still generates what the model
did; :func:`decode_latency` measures the per-token cost that KV-head pruning and GQA regrouping reduce.

The graph is the one :func:`prune2deploy.frontends.decoder.export_decoder` writes; its cache layout is
read from the graph, so a pruned or regrouped graph runs unchanged.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from prune2deploy.errors import BadInputError
from prune2deploy.frontends.decoder import DecoderSignature, decoder_signature
from prune2deploy.limits import THREADS_PER_CORE, max_threads
from prune2deploy.ort_session import make_session

__all__ = [
    "DecodeLatency",
    "TextGeneration",
    "check_generate_options",
    "decode_latency",
    "genai_tokens",
    "generate",
    "generate_text",
    "left_pad",
]

log = logging.getLogger(__name__)


def _session(model: Any, threads: int | None) -> Any:
    """An ORT session from a session, an ``.onnx`` path, serialized bytes or an ir.Model."""
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return model
    if isinstance(model, ir.Model):
        model = ir.to_proto(model).SerializeToString()
    elif isinstance(model, str):
        model = Path(model)
    return make_session(model, threads=threads)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Batches prompts of different lengths with padding on the left, as decoder-only generation needs.

    Left padding keeps every row's last real token in the last column, so one decode step serves all rows.

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``[batch, longest]``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BadInputError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers derives them from a left-padded mask (padding gets 0)."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 0, positions).astype(np.int64)


def generate(
    model: Any,
    input_ids: np.ndarray | Sequence[Sequence[int]],
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int = 20,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Greedy decoding: one prefill step over the prompt, then one-token steps feeding present → past.

    Matches ``transformers`` ``generate(do_sample=False)``: positions come from the attention mask, a row
    that produced EOS is continued with ``pad_token_id`` and generation stops when every row has finished
    or after ``max_new_tokens``.

    Args:
        model: an ORT session, ``.onnx`` path, serialized model or ir.Model of a KV-cache decoder graph.
        input_ids: ``[batch, prompt]`` ids, left padded (see :func:`left_pad`).
        attention_mask: ``[batch, prompt]`` with 0 on padding; all ones when not given.
        max_new_tokens: the most tokens to add per row.
        eos_token_id: one id or several; none means generate exactly ``max_new_tokens``.
        pad_token_id: filler after a row's EOS; defaults to the (first) EOS id.
        threads: ORT intra-op threads when a session has to be created.

    Returns:
        int64 ``[batch, prompt + generated]``: the prompt followed by the new tokens.
    """
    session = _session(model, threads)
    signature = decoder_signature(session)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise BadInputError(f"input_ids must be [batch, prompt] with a non-empty prompt, got {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise BadInputError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
    if mask[:, -1].min() == 0:
        raise BadInputError("prompts must be left padded: the last column of attention_mask has a 0")
    eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    pad = int(pad_token_id if pad_token_id is not None else (eos[0] if eos.size else 0))

    batch = ids.shape[0]
    feeds: dict[str, np.ndarray] = {
        signature.input_ids: ids,
        signature.attention_mask: mask,
        **signature.empty_past(batch, 0),
    }
    positions = _positions(mask)
    if signature.position_ids:
        feeds[signature.position_ids] = positions
    sequences = ids
    finished = np.zeros(batch, dtype=bool)
    output_names = [signature.logits] + [
        n for layer in signature.layers for n in (layer.present_key, layer.present_value)
    ]
    for step in range(max_new_tokens):
        outputs = dict(zip(output_names, session.run(output_names, feeds), strict=True))
        token = outputs[signature.logits][:, -1, :].argmax(axis=-1).astype(np.int64)
        token = np.where(finished, pad, token)
        sequences = np.concatenate([sequences, token[:, None]], axis=1)
        finished |= np.isin(token, eos)
        if finished.all() or step + 1 == max_new_tokens:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = {signature.input_ids: token[:, None], signature.attention_mask: mask}
        if signature.position_ids:
            positions = positions[:, -1:] + 1
            feeds[signature.position_ids] = positions
        for layer in signature.layers:
            feeds[layer.past_key] = outputs[layer.present_key]
            feeds[layer.past_value] = outputs[layer.present_value]
    log.debug("generated %d tokens for %d rows", sequences.shape[1] - ids.shape[1], batch)
    return sequences


@dataclass(frozen=True)
class DecodeLatency:
    """Per-token decode latency at one past length and batch."""

    past_length: int
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    kv_cache_bytes: int  # bytes of past cache the step reads (all rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_latency(
    model: Any,
    *,
    past_length: int,
    batch: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
    seed: int = 0,
) -> DecodeLatency:
    """Median latency of one decode step (seq 1) after ``past_length`` cached tokens.

    The past tensors are random with the graph's own cache shapes: values do not change the work, and
    skipping a real prefill makes long past lengths cheap to set up. Each timed call is one ``run`` with
    fresh feeds, as in :func:`generate` (present tensors are allocated by ORT each step).

    Args:
        model: an ORT session, ``.onnx`` path, serialized model or ir.Model of a KV-cache decoder graph.
        past_length: cached tokens before the step (e.g. 512, 2048).
        batch: rows decoded together.
        warmup: untimed steps first (allocator and thread pool warm-up).
        repeats: timed steps; the median is reported.
        threads: ORT intra-op threads when a session has to be created.
        seed: seed of the random ids and past tensors.
    """
    if past_length < 0 or batch < 1 or repeats < 1:
        raise BadInputError(f"need past_length ≥ 0, batch ≥ 1, repeats ≥ 1 (got {past_length}, {batch}, {repeats})")
    session = _session(model, threads)
    signature: DecoderSignature = decoder_signature(session)
    rng = np.random.default_rng(seed)
    vocab = signature.vocab_size or 2
    feeds = {
        signature.input_ids: rng.integers(0, vocab, size=(batch, 1), dtype=np.int64),
        signature.attention_mask: np.ones((batch, past_length + 1), dtype=np.int64),
        **signature.empty_past(batch, past_length, rng=rng),
    }
    if signature.position_ids:
        feeds[signature.position_ids] = np.full((batch, 1), past_length, dtype=np.int64)
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    result = DecodeLatency(
        past_length=past_length,
        batch=batch,
        median_ms=statistics.median(times),
        p10_ms=quantiles[0],
        p90_ms=quantiles[-1],
        repeats=repeats,
        kv_cache_bytes=signature.bytes_per_token * past_length * batch,
    )
    log.info("decode past=%d batch=%d: %.2f ms/token", past_length, batch, result.median_ms)
    return result


@dataclass(frozen=True)
class TextGeneration:
    """Text generated from a compiled output, and how fast."""

    text: str
    prompt_tokens: int
    new_tokens: list[int]
    tokens_per_s: float  # new tokens / seconds of the generation loop (prefill included)
    engine: str  # "onnxruntime-genai" | "onnxruntime"
    precision: str = "fp32"  # the decoder's weights: int4, int8 (MatMulNBits), fp16 or fp32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def genai_tokens(
    folder: Path | str,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int | None = None,
    min_new_tokens: int = 0,
) -> tuple[list[int], float]:
    """New tokens from onnxruntime-genai on a genai folder, and tokens/s of the loop (prefill included).

    ``min_new_tokens`` suppresses EOS until that many tokens exist (as transformers' ``min_new_tokens``).
    """
    from prune2deploy.ort_session import disable_telemetry

    disable_telemetry()  # before the import: onnxruntime-genai writes its event store when it loads
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise BadInputError("onnxruntime-genai is not installed: pip install onnxruntime-genai") from exc
    try:
        model = og.Model(str(folder))
    except RuntimeError as exc:  # a genai_config.json or model file it cannot read
        raise BadInputError(f"{folder}: onnxruntime-genai cannot load this folder: {exc}") from exc
    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"do_sample": do_sample, "max_length": len(prompt_ids) + max_new_tokens}
    if min_new_tokens:
        options["min_length"] = len(prompt_ids) + min_new_tokens
    if do_sample:
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
        if seed is not None:
            options["random_seed"] = seed
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray([list(prompt_ids)], dtype=np.int32))
    new: list[int] = []
    while not generator.is_done() and len(new) < max_new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    elapsed = time.perf_counter() - start
    return new, len(new) / elapsed if elapsed > 0 else 0.0


def check_generate_options(
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    threads: int | None,
) -> None:
    """Refuses a value that is out of range, or a sampling option that greedy decoding would ignore."""
    import math

    def whole(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(max_new_tokens) or max_new_tokens < 1:
        raise BadInputError(f"--max-new-tokens must be a whole number of at least 1, not {max_new_tokens!r}")
    if threads is not None and (not whole(threads) or not 1 <= threads <= max_threads()):
        raise BadInputError(
            f"--threads must be a whole number from 1 to {max_threads()} ({THREADS_PER_CORE} per core here), "
            f"not {threads!r}"
        )
    if temperature is not None and not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise BadInputError(f"--temperature must be a finite number, not {temperature!r}")
    if temperature is not None and temperature <= 0:
        raise BadInputError(
            f"--temperature must be above 0 (greedy decoding is the default, without --sample), not {temperature}"
        )
    if top_k is not None and (not whole(top_k) or top_k < 1):
        raise BadInputError(f"--top-k must be a whole number of at least 1, not {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise BadInputError(f"--top-p is a probability: above 0 and at most 1, not {top_p!r}")
    given = [name for name, value in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p),
                                      ("--seed", seed)) if value is not None]  # fmt: skip
    if given and not do_sample:
        verb = "takes" if len(given) == 1 else "take"
        raise BadInputError(f"{', '.join(given)} {verb} effect only when sampling: add --sample (greedy otherwise)")


def _genai_config(folder: Path) -> dict[str, Any]:
    """genai_config.json's ``model`` section, or a BadInputError that names the file and what is wrong."""
    path = folder / "genai_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(f"{path}: not readable JSON ({exc}); re-compile the model to write it again") from exc
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("decoder", {}), dict):
        raise BadInputError(
            f"{path}: not an onnxruntime-genai config (no 'model' mapping with a 'decoder'); re-compile the model"
        )
    return model


def _context_length(config: dict[str, Any]) -> int | None:
    value = config.get("context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _prompt_ids(tokenizer: Any, prompt: str, *, chat: bool, folder: Path) -> list[int]:
    """The prompt's token ids; with ``chat``, wrapped in the tokenizer's chat template as one user turn."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInputError("the prompt is empty; give the text to continue")
    if chat:
        try:
            # return_dict: transformers 5 returns a BatchEncoding by default, 4 a list; ask for one shape
            encoded = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except ValueError as exc:  # no chat template
            raise BadInputError(f"{folder}: the tokenizer has no chat template ({exc}); drop --chat") from exc
        ids = encoded["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = list(ids[0] if len(ids) and isinstance(ids[0], (list, tuple)) else ids)
    if not ids:
        raise BadInputError("the prompt gives no tokens; give the text to continue")
    return [int(i) for i in ids]


def generate_text(
    out_dir: Path | str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    engine: str = "auto",
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    chat: bool = False,
    threads: int | None = None,
) -> TextGeneration:
    """Generates text from a compile output's ``genai/`` folder.

    Args:
        out_dir: a compile output (holding ``genai/``) or the ``genai/`` folder itself.
        engine: ``genai`` (onnxruntime-genai), ``onnxruntime`` (this module's greedy loop on the decoder
            graph), or ``auto`` (genai when installed).
        do_sample, temperature, top_k, top_p, seed: sampling (onnxruntime-genai only; temperature 1, top-k 50,
            top-p 1 when not given); greedy otherwise, where giving any of them is an error.
        chat: wrap the prompt in the tokenizer's chat template as one user turn.

    Raises:
        BadInputError: an option out of range, an empty prompt, a prompt plus ``max_new_tokens`` longer than
            the model's context, no genai/ folder, or a genai_config.json that cannot be read.
    """
    check_generate_options(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, threads=threads,
    )  # fmt: skip
    folder = Path(out_dir)
    if not (folder / "genai_config.json").is_file():
        folder = folder / "genai"
    if not (folder / "genai_config.json").is_file():
        raise BadInputError(f"{out_dir}: no genai/ folder (compile a causal LM without --no-genai)")
    config = _genai_config(folder)
    if engine == "auto":
        try:
            import onnxruntime_genai  # noqa: F401

            engine = "genai"
        except ImportError:
            engine = "onnxruntime"
    if engine not in ("genai", "onnxruntime"):
        raise BadInputError(f"engine must be auto, genai or onnxruntime, not '{engine}'")
    if engine == "onnxruntime" and do_sample:
        raise BadInputError("sampling needs onnxruntime-genai (pip install onnxruntime-genai); greedy runs without")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise BadInputError(f"{folder}: no usable tokenizer files ({exc})") from exc
    ids = _prompt_ids(tokenizer, prompt, chat=chat, folder=folder)
    context = _context_length(config)
    if context is not None and len(ids) + max_new_tokens > context:
        raise BadInputError(
            f"the prompt has {len(ids)} tokens and --max-new-tokens is {max_new_tokens}: together more than the "
            f"model's context of {context} tokens (genai_config.json: context_length). Shorten the prompt or lower "
            "--max-new-tokens" + (f" (at most {context - len(ids)} here)" if len(ids) < context else "")
        )
    eos = config.get("eos_token_id")
    if engine == "genai":
        new, rate = genai_tokens(
            folder, ids, max_new_tokens, do_sample=do_sample, seed=seed,
            temperature=1.0 if temperature is None else temperature, top_k=50 if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
        )  # fmt: skip
        label = "onnxruntime-genai"
    else:
        start = time.perf_counter()
        out = generate(folder / "model.onnx", [ids], max_new_tokens=max_new_tokens, eos_token_id=eos, threads=threads)
        new = out[0, len(ids) :].tolist()
        rate = len(new) / (time.perf_counter() - start)
        label = "onnxruntime"
    eos_ids = set(np.atleast_1d(eos).tolist()) if eos is not None else set()
    shown = [t for t in new if t not in eos_ids]
    text = tokenizer.decode(shown, skip_special_tokens=True)
    return TextGeneration(text, len(ids), new, rate, label, precision=decoder_precision(folder / "model.onnx"))


def decoder_precision(model_path: Path) -> str:
    """What a genai/ decoder computes in, read from its graph (weights are not loaded): the narrowest
    MatMulNBits width, else the logits' type."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    if bits:
        return f"int{min(bits)}"
    logits = next((o for o in graph.output if o.name == "logits"), None)
    half = logits is not None and logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    return "fp16" if half else "fp32"
