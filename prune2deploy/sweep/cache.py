"""The dense-export cache: one ONNX export per checkpoint and export options, shared by every variant.

Exporting is the largest fixed cost of a compile (SmolLM2-135M: 45–150 s of a ~4-minute compile here), and
it is the same for every variant of a sweep: the variants differ only in their masks, which are applied to
the dense ONNX's initializers (:func:`prune2deploy.frontends.masks.apply_masks_onnx`, through the exporter's
name scopes). So a sweep exports once, into ``<cache>/exports/<key>/model.onnx``, keyed by the sha256 of
the checkpoint's files and the export options (and the torch / transformers / prune2deploy versions, which
change the graph); a second sweep of the same checkpoint exports nothing. Each entry records the sha256 of its
files when it is written and is checked on every read, with the compile's export-cache code
(``driver/source.py``): a replaced or edited model.onnx would otherwise be every variant's reference, so such
an entry is discarded with a warning and the checkpoint exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from prune2deploy import __version__
from prune2deploy.errors import BadInputError
from prune2deploy.io import atomic_write_json

__all__ = ["DEFAULT_CACHE", "CachedExport", "checkpoint_files", "default_cache_dir", "dense_export", "export_key"]

log = logging.getLogger(__name__)

#: Where exports are cached unless ``--cache`` or ``P2D_CACHE_DIR`` says otherwise (git-ignored).
DEFAULT_CACHE = ".p2d-cache"
_CHECKPOINT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".json", ".model", ".txt", ".pt", ".pth", ".tiktoken"}
_OPSET = 18


@dataclass
class CachedExport:
    """The dense ONNX of a checkpoint and whether this call exported it (False: it came from the cache)."""

    onnx: Path
    key: str
    exported: bool
    seconds: float = 0.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("P2D_CACHE_DIR", DEFAULT_CACHE))


def _checkpoint_path(model: str) -> Path:
    from prune2deploy.frontends.hf import BUNDLED_MODELS, bundled_model_path

    path = bundled_model_path(model) if model in BUNDLED_MODELS else Path(model)
    if not path.exists():
        raise BadInputError(f"{model}: no such file or folder (and not a bundled model: {', '.join(BUNDLED_MODELS)})")
    return path


def checkpoint_files(model: str) -> list[Path]:
    """The files that define a checkpoint (weights, config, tokenizer), not code or caches beside them."""
    path = _checkpoint_path(model)
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES and "__pycache__" not in p.parts
    )
    if not files:
        raise BadInputError(f"{path}: holds no checkpoint files ({', '.join(sorted(_CHECKPOINT_SUFFIXES))})")
    return files


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def export_key(model: str, *, export_batch: int, export_seq: int) -> str:
    """sha256 of the checkpoint files (names and contents) and everything that shapes the export."""
    digest = hashlib.sha256()
    path = _checkpoint_path(model)
    for file in checkpoint_files(model):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    options = {
        "checkpoint": digest.hexdigest(),
        "export_batch": export_batch,
        "export_seq": export_seq,
        "opset": _OPSET,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "prune2deploy": __version__,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def dense_export(
    model: str,
    loaded: Any,
    *,
    key: str,
    cache_dir: Path,
    export_batch: int,
    export_seq: int,
) -> CachedExport:
    """The cached dense ONNX for ``key``, exporting ``loaded`` (a loaded HFModel, or a callable returning
    one) only when the cache has none. The entry is written in a staging folder and renamed into place, so
    a crash never leaves a half export that a later sweep would trust."""
    import time

    from prune2deploy.driver.source import intact_cache_entry, seal_cache_entry
    from prune2deploy.frontends.onnx import save_onnx
    from prune2deploy.frontends.torch import export_module, hf_export_spec

    folder = Path(cache_dir) / "exports" / key[:24]
    onnx_path = folder / "model.onnx"
    if intact_cache_entry(folder):  # an entry whose files changed since they were written is discarded
        log.info("dense export of %s from the cache: %s", model, onnx_path)
        return CachedExport(onnx_path.resolve(), key, exported=False)
    start = time.perf_counter()
    hf_model = loaded() if callable(loaded) else loaded
    module = hf_model.module
    module.config.use_cache = False
    spec = hf_export_spec(
        hf_model.task, batch=export_batch, seq=export_seq, vocab_size=getattr(module.config, "vocab_size", 100)
    )
    ir_model = export_module(module, spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_onnx(ir_model, staging / "model.onnx")
        seconds = time.perf_counter() - start
        atomic_write_json(
            staging / "export.json",
            {
                "model": model,
                "key": key,
                "task": hf_model.task,
                "export_batch": export_batch,
                "export_seq": export_seq,
                "seconds": round(seconds, 3),
            },
        )
        seal_cache_entry(staging)  # the sha256 of every file, checked on each read (as the compile's cache)
        if folder.exists() and intact_cache_entry(folder):  # another sweep finished the same export: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s once for the sweep in %.1f s → %s", model, seconds, onnx_path)
    return CachedExport(onnx_path.resolve(), key, exported=True, seconds=seconds)
