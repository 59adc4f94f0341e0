"""Quality of a pruned or compiled model against its reference, on real text.

Approximate passes (LayerNorm hidden pruning, depth pruning, 2:4) must report their error instead of
hiding it, and a max-abs-diff on random ids says little about a language model. This module measures what
users feel: for causal LMs the per-token KL divergence KL(P_ref ‖ P_cand) of the next-token distributions,
top-1 agreement, and the perplexity of both models on the same text; for encoders the cosine similarity of
mean-pooled sentence embeddings. Either side may be a torch module or an ONNX model run by ONNX Runtime,
so the compiled ONNX can be compared with the original torch model. Text is cut into windows and run a few
at a time, so memory stays at one batch of logits however long the text is.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from prune2deploy.errors import BadInputError

__all__ = [
    "EncoderQuality",
    "LMQuality",
    "as_model_fn",
    "encoder_quality",
    "lm_quality",
    "text_windows",
]

log = logging.getLogger(__name__)

#: (input_ids [B, L] int64, attention_mask [B, L] int64) -> logits [B, L, V] or hidden states [B, L, D].
ModelFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class LMQuality:
    """Candidate vs reference on one text; KL in nats per token, perplexities over next-token targets."""

    kl_mean: float
    kl_max: float
    top1_agreement: float
    ppl_reference: float
    ppl_candidate: float
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncoderQuality:
    """Cosine similarity of mean-pooled sentence embeddings, candidate vs reference."""

    cosine_mean: float
    cosine_min: float
    sentences: int

    def to_dict(self) -> dict:
        return asdict(self)


def _torch_fn(module: torch.nn.Module) -> ModelFn:
    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        for name in ("logits", "last_hidden_state"):
            value = getattr(out, name, None)
            if value is not None:
                return value.float().numpy()
        if isinstance(out, (tuple, list)):
            return out[0].float().numpy()
        return out.float().numpy()

    return run


def _onnx_fn(session) -> ModelFn:
    inputs = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    out_name = next((n for n in ("logits", "last_hidden_state") if n in outputs), outputs[0])
    dtypes = {i.name: np.int32 if "int32" in i.type else np.int64 for i in inputs}

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {}
        for spec in inputs:
            name = spec.name
            if "input_ids" in name:
                value = ids
            elif "attention_mask" in name:
                value = mask
            elif "position" in name:
                value = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            elif "token_type" in name:
                value = np.zeros_like(ids)
            else:
                raise BadInputError(
                    f"ONNX input '{name}' is not input_ids, attention_mask, position_ids or token_type_ids; "
                    "quality evaluation cannot feed it"
                )
            feeds[name] = np.ascontiguousarray(value, dtype=dtypes[name])
        return np.asarray(session.run([out_name], feeds)[0], dtype=np.float32)

    return run


def as_model_fn(model) -> ModelFn:
    """Wraps a torch module, an ONNX file path / bytes, an ONNX Runtime session or an OrtRunner."""
    if isinstance(model, torch.nn.Module):
        return _torch_fn(model)
    if isinstance(model, (str, Path, bytes)):
        from prune2deploy.ort_session import make_session

        return _onnx_fn(make_session(Path(model) if not isinstance(model, bytes) else model, prepack=False))
    session = getattr(model, "session", model)
    if hasattr(session, "get_inputs") and hasattr(session, "run"):
        return _onnx_fn(session)
    if callable(model):
        return model
    raise BadInputError(f"cannot evaluate a {type(model).__name__}: give a torch module, an .onnx path or a session")


def text_windows(token_ids: Sequence[int] | np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows [N, window] of a token stream; a short tail is dropped."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    count = ids.size // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise BadInputError(f"text has {ids.size} tokens, fewer than one window of {window}")
    return ids[: count * window].reshape(count, window)


def _tokens(tokenizer, text: str | None, token_ids) -> np.ndarray:
    if token_ids is not None:
        return np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if tokenizer is None:
        raise BadInputError("quality evaluation of text needs the model's tokenizer (or token_ids)")
    if text is None:
        from prune2deploy.pruning.calibration import bundled_text

        text = bundled_text("evaluation.txt")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def lm_quality(
    reference,
    candidate,
    *,
    tokenizer=None,
    text: str | None = None,
    token_ids: Sequence[int] | np.ndarray | None = None,
    window: int = 128,
    batch: int = 2,
    max_windows: int | None = None,
) -> LMQuality:
    """Compares next-token distributions of ``candidate`` with ``reference`` on a text.

    Args:
        reference, candidate: torch modules, ONNX paths/bytes, sessions or ``ModelFn`` callables that return
            logits [B, L, V].
        tokenizer: used when ``token_ids`` is not given; ``text`` defaults to the bundled evaluation text.
        window: tokens per window; every position of a window is compared, and perplexity is computed on
            the window's next-token targets (each window starts without context, the same for both).
        batch: windows per forward pass (bounds memory: batch × window × vocab logits at a time).
        max_windows: cap on the number of windows.
    """
    ids = text_windows(_tokens(tokenizer, text, token_ids), window, max_windows)
    ref_fn, cand_fn = as_model_fn(reference), as_model_fn(candidate)
    kl_sum = kl_max = agree = 0.0
    nll_ref = nll_cand = 0.0
    positions = targets = 0
    for start in range(0, ids.shape[0], batch):
        chunk = ids[start : start + batch]
        mask = np.ones_like(chunk)
        ref = torch.from_numpy(ref_fn(chunk, mask)).double().log_softmax(dim=-1)
        cand = torch.from_numpy(cand_fn(chunk, mask)).double().log_softmax(dim=-1)
        if ref.shape != cand.shape:
            raise BadInputError(f"reference logits {tuple(ref.shape)} and candidate {tuple(cand.shape)} differ")
        kl = (ref.exp() * (ref - cand)).sum(dim=-1).clamp_min(0.0)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += float((ref.argmax(dim=-1) == cand.argmax(dim=-1)).sum())
        positions += kl.numel()
        nxt = torch.from_numpy(chunk[:, 1:])[..., None]
        nll_ref -= float(ref[:, :-1].gather(-1, nxt).sum())
        nll_cand -= float(cand[:, :-1].gather(-1, nxt).sum())
        targets += nxt.numel()
    return LMQuality(
        kl_mean=kl_sum / positions,
        kl_max=kl_max,
        top1_agreement=agree / positions,
        ppl_reference=math.exp(nll_ref / targets),
        ppl_candidate=math.exp(nll_cand / targets),
        tokens=int(ids.size),
        windows=int(ids.shape[0]),
    )


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if len(p.split()) >= 4]


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def _cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return ((a * b).sum(axis=1) / denom).tolist()


def encoder_quality(
    reference,
    candidate,
    *,
    tokenizer=None,
    sentences: Sequence[str] | None = None,
    batch: int = 8,
    max_length: int = 128,
    max_sentences: int | None = 64,
    token_batches: Sequence[np.ndarray] | None = None,
) -> EncoderQuality:
    """Cosine similarity of mean-pooled embeddings (sentence-transformers' pooling) per sentence.

    ``sentences`` default to the sentences of the bundled evaluation text. Padding is masked out of the
    pooling, so batching does not change the result. ``token_batches`` ([B, L] token ids, no padding)
    replace the text for models without a tokenizer.
    """
    if token_batches is not None:
        ref_fn, cand_fn = as_model_fn(reference), as_model_fn(candidate)
        cosines = []
        for ids in token_batches:
            ids = np.asarray(ids, dtype=np.int64)
            mask = np.ones_like(ids)
            a, b = _mean_pool(ref_fn(ids, mask), mask), _mean_pool(cand_fn(ids, mask), mask)
            cosines.extend(_cosines(a, b))
        if not cosines:
            raise BadInputError("no token batches to embed")
        values = np.asarray(cosines)
        return EncoderQuality(cosine_mean=float(values.mean()), cosine_min=float(values.min()), sentences=len(values))
    if tokenizer is None:
        raise BadInputError("encoder quality on text needs the model's tokenizer (or token_batches)")
    if sentences is None:
        from prune2deploy.pruning.calibration import bundled_text

        sentences = _sentences(bundled_text("evaluation.txt"))
    sentences = list(sentences)[:max_sentences] if max_sentences else list(sentences)
    if not sentences:
        raise BadInputError("no sentences to embed")
    ref_fn, cand_fn = as_model_fn(reference), as_model_fn(candidate)
    cosines = []
    for start in range(0, len(sentences), batch):
        enc = tokenizer(
            sentences[start : start + batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        a, b = _mean_pool(ref_fn(ids, mask), mask), _mean_pool(cand_fn(ids, mask), mask)
        cosines.extend(_cosines(a, b))
    values = np.asarray(cosines)
    return EncoderQuality(cosine_mean=float(values.mean()), cosine_min=float(values.min()), sentences=len(values))
