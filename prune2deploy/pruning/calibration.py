"""Calibration data: the token windows that data-aware criteria (Wanda, Taylor, Minitron, Michel) see.

Sources are a text file (tokenised with the model's own tokenizer and cut into consecutive windows) or a
tensor file of input ids (.pt, .npy, .safetensors). Without a source the bundled public-domain text
``prune2deploy/data/calibration.txt`` is used (its passages are listed in ``CALIBRATION_SOURCES.md``).
Windows are consecutive and deterministic, so the same inputs give the same masks; the sha256 of the exact
token ids used goes into the plan, which makes a plan reproducible and a changed tokenizer visible.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prune2deploy.errors import BadInputError

__all__ = [
    "CalibrationData",
    "bundled_text",
    "bundled_text_path",
    "chunk_tokens",
    "load_calibration",
    "tokens_sha256",
]

log = logging.getLogger(__name__)

_TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


def bundled_text_path(name: str = "calibration.txt") -> Path:
    """Path of a bundled text (``calibration.txt`` or ``evaluation.txt``)."""
    return Path(str(importlib.resources.files("prune2deploy") / "data" / name))


def bundled_text(name: str = "calibration.txt") -> str:
    """A bundled text without its ``#`` header lines."""
    lines = bundled_text_path(name).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")).strip() + "\n"


def tokens_sha256(ids: torch.Tensor) -> str:
    """sha256 over the shape and the int64 little-endian bytes of the token ids."""
    array = np.ascontiguousarray(ids.detach().cpu().numpy().astype("<i8"))
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def chunk_tokens(ids: torch.Tensor, seq_len: int, num_samples: int) -> torch.Tensor:
    """Cuts a 1-D token stream into up to ``num_samples`` consecutive windows of ``seq_len`` tokens."""
    available = ids.numel() // seq_len
    if available == 0:
        raise BadInputError(f"calibration data has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if available < num_samples:
        log.warning("calibration data gives %d windows of %d tokens, not %d", available, seq_len, num_samples)
    count = min(available, num_samples)
    return ids[: count * seq_len].reshape(count, seq_len).clone()


@dataclass
class CalibrationData:
    """Token windows [N, L] plus where they came from and their hash."""

    input_ids: torch.Tensor
    source: str
    sha256: str

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int = 4) -> list[torch.Tensor]:
        return list(torch.split(self.input_ids, batch_size))

    def info(self) -> dict:
        """The plan's ``calibration`` entry."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "tokens": int(self.input_ids.numel()),
        }


def _load_tensor(path: Path) -> torch.Tensor:
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "input_ids" in tensors:
                return tensors["input_ids"]
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            raise BadInputError(f"{path}: holds {sorted(tensors)}; name the ids tensor 'input_ids'")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except BadInputError:
        raise
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read calibration ids ({exc})") from exc
    if isinstance(loaded, dict):
        loaded = loaded.get("input_ids")
    if not isinstance(loaded, torch.Tensor):
        raise BadInputError(f"{path}: expected a tensor or a dict with 'input_ids'")
    return loaded


def _from_ids(ids: torch.Tensor, path: Path, seq_len: int, num_samples: int, vocab: int | None) -> torch.Tensor:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim not in (1, 2):
        raise BadInputError(
            f"{path}: calibration ids must be a 1-D or 2-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise BadInputError(f"{path}: token ids must lie in [0, {vocab}); found {int(ids.min())}..{int(ids.max())}")
    if ids.ndim == 1:
        return chunk_tokens(ids, seq_len, num_samples)
    if ids.shape[1] > seq_len:
        ids = ids[:, :seq_len]
    elif ids.shape[1] < seq_len:
        log.warning(
            "%s: rows have %d tokens, shorter than seq_len %d; using them as they are",
            path,
            ids.shape[1],
            seq_len,
        )
    return ids[:num_samples].clone()


def load_calibration(
    source: Path | str | None,
    *,
    tokenizer=None,
    num_samples: int = 32,
    seq_len: int = 128,
    vocab_size: int | None = None,
) -> CalibrationData:
    """Loads calibration windows from a text file, a tensor file of ids, or the bundled text.

    Args:
        source: a ``.txt`` (any non-tensor suffix is read as UTF-8 text), a tensor file, or None for the
            bundled text.
        tokenizer: the model's tokenizer; required for text.
        num_samples: windows to take (fewer when the source is short; a warning says so).
        seq_len: tokens per window.
        vocab_size: when given, ids outside the vocabulary are refused.
    """
    if num_samples < 1 or seq_len < 1:
        raise BadInputError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}")
    if source is None:
        path, text = bundled_text_path(), bundled_text()
        label = "bundled:calibration.txt"
    else:
        path = Path(source)
        if not path.is_file():
            raise BadInputError(f"{path}: calibration file not found")
        label = str(path)
        text = None
        if path.suffix not in _TENSOR_SUFFIXES:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise BadInputError(f"{path}: not UTF-8 text and not a .pt/.npy/.safetensors file") from exc
    if text is not None:
        if tokenizer is None:
            raise BadInputError(f"{path}: text calibration needs the model's tokenizer, and none was loaded")
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        windows = chunk_tokens(ids, seq_len, num_samples)
    else:
        windows = _from_ids(_load_tensor(path), path, seq_len, num_samples, vocab_size)
    return CalibrationData(input_ids=windows, source=label, sha256=tokens_sha256(windows))
