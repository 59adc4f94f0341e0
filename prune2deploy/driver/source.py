"""Loading what the user gives (HF folder, GGUF, bundled name, .onnx, nn.Module) as a masked reference."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from prune2deploy.errors import BadInputError

__all__ = [
    "Progress",
    "Source",
    "check_finite_weights",
    "input_record",
    "intact_cache_entry",
    "load_source",
    "options_export_spec",
    "seal_cache_entry",
]

Progress = Callable[[str], None]

log = logging.getLogger(__name__)

#: A causal LM's masked torch module is kept in memory after the export, for the genai/ and hf/ outputs, up to
#: this size; larger ones are loaded again when those outputs are built (``Source.module_loader``).
KEEP_MODULE_MAX_BYTES = 1 << 30


@dataclass
class Source:
    """A loaded input: the masked reference graph plus where it came from."""

    model: ir.Model
    kind: str  # "hf" | "onnx" | "torch"
    path: Path | None
    task: str | None = None
    masks_applied: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: the masked transformers module and its tokenizer (HF / GGUF / bundled / module sources): the genai
    #: and hf outputs are built from them. None for .onnx sources, and after a cached export, where
    #: ``module_loader`` loads and masks them when an output needs them.
    module: Any = None
    tokenizer: Any = None
    module_loader: Callable[[], tuple[Any, Any]] | None = None

    @property
    def causal_lm(self) -> bool:
        return self.task == "causal-lm" and (self.module is not None or self.module_loader is not None)

    def masked_module(self) -> tuple[Any, Any]:
        """(masked module, tokenizer), loaded on first use when the export came from the cache."""
        if self.module is None and self.module_loader is not None:
            self.module, self.tokenizer = self.module_loader()
        return self.module, self.tokenizer


def load_source(source: Any, options: Any, *, progress: Progress | None = None) -> Source:
    """Turns any supported input into a masked reference ONNX model (in memory)."""
    from prune2deploy.frontends import hf, masks
    from prune2deploy.frontends import torch as torch_frontend
    from prune2deploy.frontends.onnx import load_onnx

    say = progress or (lambda _msg: None)
    mask_tensors = masks.load_masks(options.masks) if options.masks else None
    mask_source = str(options.masks) if options.masks else ""
    if not isinstance(source, (str, Path)):  # an nn.Module (Python API)
        # torch.nn.utils.prune keeps weight_orig × weight_mask behind a hook: bake it into a copy once, so the
        # export and the outputs built from the module (genai/, hf/) see plain weights.
        module = torch_frontend.bake_torch_prune(source) if torch_frontend.has_torch_prune(source) else source
        if mask_tensors:
            module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
        spec = options_export_spec(module, options)
        say("exporting module to ONNX")
        model = torch_frontend.export_module(module, spec)
        task = "causal-lm" if type(module).__name__.endswith(("ForCausalLM", "LMHeadModel")) else None
        check_finite_weights(model, f"<nn.Module {type(module).__name__}>")
        return Source(
            model,
            "torch",
            None,
            task=task,
            masks_applied=len(mask_tensors or {}),
            extra={"module": type(module).__name__},
            module=module,
        )
    text = str(source)
    path = Path(text)
    if path.is_file() and path.suffix not in (".onnx", ".gguf"):
        from prune2deploy.frontends.pickles import check_not_pickle

        check_not_pickle(path)  # never unpickled: refused with how to pass the module through the API
    if path.suffix == ".onnx" or (path.is_file() and path.suffix != ".gguf"):
        say(f"loading {path}")
        model = load_onnx(path)
        check_finite_weights(model, str(path))
        applied = masks.apply_masks_onnx(model, mask_tensors, source=mask_source) if mask_tensors else 0
        return Source(model, "onnx", path, masks_applied=applied)
    if text in hf.BUNDLED_MODELS or hf.is_hf_folder(path) or path.suffix == ".gguf":
        bundled = text if text in hf.BUNDLED_MODELS else None
        where = hf.bundled_model_path(text) if bundled else path
        dtype = "float32" if path.suffix == ".gguf" else hf.checkpoint_dtype(where)
        # genai/, hf/ and hf-nas/ are built from the module
        keep = options.genai is not False or options.hf_checkpoint or options.hf_nemotron_nas
        attached = hf.attached_masks(where)  # torch.nn.utils.prune / ModelOpt masks saved beside the weights
        if attached:
            mask_tensors = masks.combine_masks(mask_tensors, attached)
            mask_source = " and ".join(filter(None, [mask_source, f"masks attached in {where}"]))
        model, task, applied, module, tokenizer, max_positions = _hf_reference(
            text if bundled else path, where, dtype, mask_tensors, mask_source, options, say, keep_module=keep
        )
        return Source(
            model,
            "hf",
            where,
            task=task,
            masks_applied=applied,
            extra={"bundled": bundled, "dtype": dtype, "max_positions": max_positions},
            module=module,
            tokenizer=tokenizer,
            module_loader=lambda: _masked_module(text if bundled else path, dtype, mask_tensors, mask_source),
        )
    if not path.exists():
        raise BadInputError(f"{source}: no such file or folder (and not a bundled model name: smollm2-135m, minilm-l6)")
    raise BadInputError(f"{source}: not an .onnx file, a .gguf file or a Hugging Face model folder")


def _masked_module(name, dtype: str, mask_tensors, mask_source: str) -> tuple[Any, Any]:
    """The checkpoint as a transformers module with the masks applied in torch, and its tokenizer."""
    from prune2deploy.frontends import hf, masks

    loaded = hf.load_hf_model(name, dtype=dtype)
    module = loaded.module
    if mask_tensors:
        module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
    return module, loaded.tokenizer


def _hf_reference(
    name, where: Path, dtype: str, mask_tensors, mask_source: str, options: Any, say: Progress, *, keep_module: bool
):
    """The masked reference of a model folder: (model, task, masks applied, module, tokenizer, max positions).

    ``keep_module`` keeps the masked torch module and tokenizer for outputs built from them (genai/, hf/);
    after a cached export they are None and loaded only when such an output asks (``Source.masked_module``).

    With the export cache on, the *unmasked* checkpoint is exported once per (checkpoint hash, export
    options, library versions) and kept in the cache folder; masks are then applied to the ONNX weights,
    so compiling new masks for the same checkpoint costs only the passes. Without it (or when a mask names
    a tensor the ONNX graph does not reveal) the masks are applied in torch before the export.
    """
    from prune2deploy.frontends import hf, masks
    from prune2deploy.frontends.onnx import load_onnx

    cache = export_cache_path(where, dtype, options) if options.export_cache else None
    if cache is not None and _intact_cache_entry(cache):
        say(f"using the cached export {cache}")
        model = load_onnx(cache / "model.onnx")
        task = (cache / "task").read_text().strip() if (cache / "task").is_file() else "causal-lm"
        applied = masks.apply_masks_onnx(model, mask_tensors, source=mask_source) if mask_tensors else 0
        return model, task, applied, None, None, None
    if cache is not None and _checkpoint_bytes(where) > KEEP_MODULE_MAX_BYTES and _may_spawn():
        # The exporter keeps references to the module's tensors after it returns (the checkpoint's mapped
        # pages, 4.9 GB at 1B, stayed resident through the passes); a child process returns all of its
        # memory when it ends. Its module would not be kept anyway at this size (re-loaded for genai/, hf/).
        say(f"loading {name} ({dtype}) and exporting it to ONNX (dynamo, opset 18) in a child process")
        task, max_positions = _export_in_child(name, dtype, options.export_batch, options.export_seq, cache)
        say(f"cached the export in {cache}")
        model = load_onnx(cache / "model.onnx")
        applied = masks.apply_masks_onnx(model, mask_tensors, source=mask_source) if mask_tensors else 0
        return model, task, applied, None, None, max_positions
    say(f"loading {name} ({dtype})")
    loaded = hf.load_hf_model(name, dtype=dtype)
    module = loaded.module
    if mask_tensors and cache is None:
        module = masks.apply_masks_torch(module, mask_tensors, source=mask_source)
    say("exporting to ONNX (dynamo, opset 18)")
    model = _export_hf_module(module, loaded.task, name, options.export_batch, options.export_seq)
    max_positions = getattr(module.config, "max_position_embeddings", None)
    kept = tokenizer = None
    size = _module_bytes(module)
    if keep_module and loaded.task == "causal-lm" and size <= KEEP_MODULE_MAX_BYTES:
        kept, tokenizer = module, loaded.tokenizer
        if mask_tensors and cache is not None:  # exported unmasked for the cache: mask the kept module now
            kept = masks.apply_masks_torch(kept, mask_tensors, source=mask_source)
    elif keep_module and loaded.task == "causal-lm":
        # Holding a 1B model's 4.9 GB of torch weights through the passes and verification would double the
        # compile's memory; re-loading a safetensors checkpoint when genai/ or hf/ need it takes seconds.
        log.info("releasing the torch module (%.2f GB) until an output needs it", size / 1e9)
    del module, loaded.module
    if cache is None:
        return model, loaded.task, len(mask_tensors or {}), kept, tokenizer, max_positions
    _write_cache(model, loaded.task, cache)
    del model
    say(f"cached the export in {cache}")
    model = load_onnx(cache / "model.onnx")
    applied = masks.apply_masks_onnx(model, mask_tensors, source=mask_source) if mask_tensors else 0
    return model, loaded.task, applied, kept, tokenizer, max_positions


def _write_cache(model: ir.Model, task: str, cache: Path) -> None:
    """Writes an export into ``cache`` atomically (a scratch folder renamed; a concurrent writer's copy wins).

    Above the size threshold the cached export keeps its weights in model.onnx.data: reading it back maps
    them, and the exporter's torch tensors can be freed.
    """
    import shutil
    import tempfile

    from prune2deploy.frontends.onnx import save_onnx

    cache.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        save_onnx(model, scratch / "model.onnx")
        (scratch / "task").write_text(task + "\n")
        seal_cache_entry(scratch)
        try:
            scratch.rename(cache)
        except OSError:  # another compile cached it meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    evict_cache_entries(cache.parent, keep=cache)


#: The export cache's size budget: least recently used entries beyond it are removed after each new export
#: (``P2D_CACHE_MAX_GB`` overrides; the newest entry always stays, however large).
CACHE_MAX_BYTES = 20 << 30


def evict_cache_entries(exports: Path, *, keep: Path) -> list[Path]:
    """Removes the least recently used export-cache entries until the cache fits its budget; returns them.

    Only folders this tool wrote (holding its digest file) are candidates, never ``keep``. A cache hit
    refreshes an entry's time (:func:`_intact_cache_entry`), so what a sweep keeps re-reading stays.
    """
    import os
    import shutil

    budget = float(os.environ.get("P2D_CACHE_MAX_GB", CACHE_MAX_BYTES / 2**30)) * 2**30
    entries = [e for e in exports.iterdir() if e.is_dir() and not e.is_symlink() and (e / _DIGEST_FILE).is_file()]
    sizes = {e: sum(f.stat().st_size for f in e.iterdir() if f.is_file()) for e in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=lambda e: (e / _DIGEST_FILE).stat().st_mtime):
        if total <= budget:
            break
        if entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
        log.info("export cache over %.0f GB: removed the least recently used entry %s", budget / 2**30, entry)
    return removed


#: A cache entry's record of its own files: name → sha256, written last (before the entry is renamed into place).
_DIGEST_FILE = "digest.json"


def _entry_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a cache entry but the digest itself (model.onnx, its .data, task)."""
    from prune2deploy.io import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != _DIGEST_FILE}


def seal_cache_entry(folder: Path) -> None:
    """Records the sha256 of every file of a cache entry in its digest file, written last (just before the
    entry is renamed into place); :func:`intact_cache_entry` checks it on every read. Shared by the
    compile's export cache and the sweep's (``sweep/cache.py``)."""
    import json

    (folder / _DIGEST_FILE).write_text(json.dumps(_entry_digest(folder), indent=1) + "\n")


def intact_cache_entry(cache: Path) -> bool:
    """Whether a cache entry sealed by :func:`seal_cache_entry` still holds what was written; a damaged (or
    unsealed) entry is discarded with a warning naming what changed, and the caller exports again."""
    return _intact_cache_entry(cache)


def _intact_cache_entry(cache: Path) -> bool:
    """Whether ``cache`` holds an export whose files are those written with it; a damaged entry is discarded.

    The cache key binds an entry to its checkpoint (the checkpoint's hash), and the digest binds the files to
    the export that was written: a replaced, truncated or edited model.onnx (or .data) would otherwise become
    the reference a compile is verified against. An entry without a digest (or an unreadable one) is not
    trusted either. Discarding renames the entry away first, so a concurrent compile never reads half of it.
    """
    import json
    import shutil
    import tempfile

    if not (cache / "model.onnx").is_file():
        return False
    try:
        recorded = json.loads((cache / _DIGEST_FILE).read_text())
    except (OSError, ValueError):
        recorded, why = None, f"it has no readable {_DIGEST_FILE}"
    if recorded is not None:
        actual = _entry_digest(cache)
        if recorded == actual:
            (cache / _DIGEST_FILE).touch()  # used now: the cache's eviction removes the least recently used
            return True
        changed = (
            sorted(k for k in {*recorded, *actual} if recorded.get(k) != actual.get(k))
            if isinstance(recorded, dict)
            else [_DIGEST_FILE]
        )
        why = f"{', '.join(changed)} changed since it was written"
    log.warning("discarding the cached export %s (%s); exporting the checkpoint again", cache, why)
    try:
        trash = Path(tempfile.mkdtemp(prefix=f".{cache.name}.discard-", dir=cache.parent))
        cache.rename(trash / cache.name)
        shutil.rmtree(trash, ignore_errors=True)
    except OSError:  # another compile discarded (or replaced) it meanwhile
        pass
    return False


def _checkpoint_bytes(where: Path) -> int:
    """Bytes of a checkpoint's weight files (a GGUF file, or a folder's safetensors/bin shards)."""
    if where.is_file():
        return where.stat().st_size
    return sum(p.stat().st_size for p in where.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))


def _export_in_child(name, dtype: str, batch: int, seq: int, cache: Path) -> tuple[str, int | None]:
    """Runs :func:`_export_to_cache` in a fresh (spawned) process; its errors are raised here as they were."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_export_to_cache, name, dtype, batch, seq, cache).result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"{name}: the export process ended without a result ({exc}); the usual cause is the kernel "
            "stopping it for memory. The export needs about 1.2x the checkpoint's bytes of memory."
        ) from exc


def _may_spawn() -> bool:
    """A daemonic process (a multiprocessing pool's worker) may not start children: it exports in-process."""
    import multiprocessing

    return not multiprocessing.current_process().daemon


def _export_to_cache(name, dtype: str, batch: int, seq: int, cache: Path) -> tuple[str, int | None]:
    """Loads the unmasked checkpoint, exports it and writes the cache; returns (task, max positions)."""
    from prune2deploy.frontends import hf

    loaded = hf.load_hf_model(name, dtype=dtype)
    model = _export_hf_module(loaded.module, loaded.task, name, batch, seq)
    _write_cache(model, loaded.task, cache)
    return loaded.task, getattr(loaded.module.config, "max_position_embeddings", None)


def _export_hf_module(module: Any, task: str, name: Any, batch: int, seq: int) -> ir.Model:
    """A transformers module exported for ``task`` (no KV cache), its weights checked finite."""
    from prune2deploy.frontends import torch as torch_frontend

    module.config.use_cache = False
    vocab = getattr(module.config, "vocab_size", 100)
    spec = torch_frontend.hf_export_spec(task, batch=batch, seq=seq, vocab_size=vocab)
    model = torch_frontend.export_module(module, spec)
    check_finite_weights(model, str(name))
    return model


def _module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers (tied tensors once)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def export_cache_path(where: Path, dtype: str, options: Any) -> Path:
    """``<cache dir>/<key>``: the key hashes the checkpoint's files, the export options and the versions."""
    import hashlib
    import json
    import os
    from importlib import metadata

    from prune2deploy import __version__
    from prune2deploy.driver.outdir import check_not_input

    root = options.export_cache_dir or os.environ.get("P2D_CACHE_DIR") or Path.home() / ".cache" / "prune2deploy"
    flag = "--export-cache-dir" if options.export_cache_dir else "the export cache (P2D_CACHE_DIR or ~/.cache)"
    check_not_input(Path(root) / "exports", [where], flag=flag)  # the cache writes there
    parts = {
        "checkpoint": _checkpoint_hash(Path(where)),
        "dtype": dtype,
        "batch": options.export_batch,
        "seq": options.export_seq,
        "prune2deploy": __version__,
        **{lib: metadata.version(lib) for lib in ("torch", "transformers", "onnxscript", "onnx-ir")},
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return Path(root) / "exports" / key


_HASHES: dict[tuple, str] = {}


def _checkpoint_hash(path: Path) -> str:
    """sha256 of the folder (or file), remembered per (path, sizes, mtimes) for this process."""
    from prune2deploy.frontends.hf import checkpoint_files, checkpoint_sha256

    files = checkpoint_files(path) if path.is_dir() else [path]  # only what the loader reads
    stamp = (str(path.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _HASHES:
        _HASHES[stamp] = checkpoint_sha256(path)
    return _HASHES[stamp]


def check_finite_weights(model: ir.Model, source: str) -> None:
    """NaN/Inf in the input's weights is bad input: no compiled model can match such a reference.

    Raises:
        BadInputError: naming the first few tensors and how many values are not finite.
    """
    bad = []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not value.dtype or not value.dtype.is_floating_point():
            continue
        array = tensor.numpy()
        count = _nonfinite_count(array)
        if count:
            bad.append(f"'{value.name}' ({count} of {array.size})")
    if bad:
        raise BadInputError(
            f"{source}: weights hold NaN/Inf values: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else "")
            + ". Fix the checkpoint (a diverged training run or a broken conversion) before compiling"
        )


#: Exponent bits by dtype name: a float is NaN or Inf exactly when all of them are set (IEEE 754; bfloat16
#: has fp32's 8-bit exponent in 16 bits).
_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}


def _nonfinite_count(array: Any, chunk: int = 1 << 24) -> int:
    """How many values of ``array`` are NaN or Inf, read from their exponent bits ``chunk`` values at a time.

    This scans every weight of the checkpoint: testing the bits of an unsigned view needs no float32 copy
    (an 8B bf16 model's 16 GB were upcast tensor by tensor, 44 s of its export) and reads the exporter's
    transposed views as they are. Other float types (float8) are upcast.
    """
    import numpy as np

    mask = _EXPONENT_BITS.get(str(array.dtype))
    if mask is None or array.ndim == 0:
        return int(array.size - np.count_nonzero(np.isfinite(array.astype(np.float32, copy=False))))
    unsigned = {2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize]
    step = max(1, chunk * array.shape[0] // max(1, array.size))
    count = 0
    for start in range(0, array.shape[0], step):
        bits = array[start : start + step].view(unsigned)
        count += int(np.count_nonzero((bits & unsigned(mask)) == unsigned(mask)))
    return count


def options_export_spec(module: Any, options: Any) -> Any:
    """Export spec for a bare module: transformers models get ids + mask; others must bring their own."""
    from prune2deploy.frontends.torch import ExportSpec, hf_export_spec

    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        task = "causal-lm" if type(module).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"
        config.use_cache = False
        return hf_export_spec(task, batch=options.export_batch, seq=options.export_seq, vocab_size=config.vocab_size)
    example = getattr(module, "example_inputs", None)
    if isinstance(example, ExportSpec):
        return example
    raise BadInputError(
        f"{type(module).__name__}: not a transformers model; set module.example_inputs = "
        "prune2deploy.frontends.torch.ExportSpec(...) to say what its inputs look like, then call api.compile"
    )


def input_record(loaded: Source) -> dict[str, Any]:
    """Where the input came from, for the report and the manifest.

    Computed once per load (the first call) and reused, so the manifest hashes the input as it was read.
    """
    if "input_record" in loaded.extra:
        return dict(loaded.extra["input_record"])
    record: dict[str, Any] = {
        "kind": loaded.kind,
        "path": str(loaded.path) if loaded.path else f"<nn.Module {loaded.extra.get('module')}>",
        "masks_applied": loaded.masks_applied,
    }
    if loaded.path is not None and loaded.path.exists():
        record["sha256"] = _checkpoint_hash(loaded.path)
    if loaded.extra.get("bundled"):
        record["bundled"] = loaded.extra["bundled"]
    if loaded.extra.get("dtype"):
        record["dtype"] = loaded.extra["dtype"]
    if loaded.kind == "hf" and loaded.path is not None and loaded.path.is_dir():
        from prune2deploy.frontends.hf import checkpoint_format

        if fmt := checkpoint_format(loaded.path):  # a pruning tool's layout read (docs/inputs.md)
            record["format"] = fmt
    loaded.extra["input_record"] = dict(record)
    return record
