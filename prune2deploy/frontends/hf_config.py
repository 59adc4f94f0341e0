"""An HF folder's ``config.json``, checked against the limits and the weights' headers before anything is built.

transformers builds the module from ``config.json`` first and loads the weights into it afterwards, so a
config that says ``"num_hidden_layers": 1000000000`` allocates until the machine runs out of memory before
any weight file is compared with it. Here the numbers are range-checked (:data:`prune2deploy.limits.MODEL_NUMBERS`)
and compared with the tensors the safetensors headers declare (a few KB each, no tensor data read): layer
count, vocabulary and hidden size. Mismatches are refused with the key, both values and what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError
from prune2deploy.io import read_config_file
from prune2deploy.limits import MODEL_CONFIG_BYTES, MODEL_NUMBERS, check_regular_file, check_whole, genai_context

__all__ = [
    "check_against_weights",
    "check_config_numbers",
    "check_genai_context",
    "read_config_json",
    "read_hf_config",
    "safetensors_shapes",
]

#: A safetensors header larger than this is refused (the format's own reader caps it at 100 MB).
_HEADER_BYTES = 100_000_000
#: ``….layers.7.…`` (Llama, BERT's ``layer``, GPT-2's ``h``, ``blocks``): the layer index of a tensor name.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
#: Token embedding tables, [vocab, hidden] in every family this tool loads.
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
#: Config keys of families whose embedding table has its own width (ALBERT, OPT), not hidden_size.
_OWN_EMBEDDING_WIDTH = ("embedding_size", "word_embed_proj_dim")


def read_hf_config(folder: Path, *, strict: bool = False) -> dict[str, Any]:
    """``folder/config.json`` as a checked dict (see :func:`read_config_json`)."""
    return read_config_json(Path(folder) / "config.json", strict=strict)


def read_config_json(path: Path, *, strict: bool = False) -> dict[str, Any]:
    """An HF config file as a checked dict: a regular file of UTF-8 JSON, an object, numbers in range
    (``strict``: see :func:`check_config_numbers`).

    Raises:
        BadInputError: naming the file and what is wrong (a list, NaN, a string where a number belongs, …).
    """
    path = Path(path)
    data = read_config_file(
        path, what="model config", max_bytes=MODEL_CONFIG_BYTES, default_format="JSON", error=BadInputError
    )
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: an HF config is a JSON object, not a {type(data).__name__}; re-save the model")
    check_config_numbers(data, where=str(path), strict=strict)
    return data


def _sections(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The config and its nested model configs (``text_config`` of multimodal models), with a key prefix."""
    yield "", config
    for key in ("text_config", "vision_config", "decoder", "encoder"):
        if isinstance(config.get(key), dict):
            yield f"{key}.", config[key]


def check_config_numbers(config: dict[str, Any], *, where: str, strict: bool = True) -> None:
    """Every number of :data:`MODEL_NUMBERS` present (and not null) is in its range; ``architectures``, when
    present, is a non-empty list of names.

    ``strict`` (shape-only prediction, which does the arithmetic itself): each must be a whole number, so a
    string, a bool or ``64.0`` is refused. Otherwise (a folder transformers will build) only numbers are
    checked, by value (JSON's ``1e9`` is a float), and other types are left to transformers' own config
    classes, some of which take lists (per-layer widths).

    Raises:
        BadInputError: naming ``where``, the key, the value and the range.
    """
    archs = config.get("architectures", [])
    if "architectures" in config and (
        not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a for a in archs)
    ):
        raise BadInputError(
            f"{where}: 'architectures' is {archs!r}; it must be a non-empty list of class names such as "
            '["LlamaForCausalLM"] (or left out)'
        )
    for prefix, section in _sections(config):
        for key, (low, high, why) in MODEL_NUMBERS.items():
            value = section.get(key)
            if value is None or (not strict and (isinstance(value, bool) or not isinstance(value, (int, float)))):
                continue
            if not strict and isinstance(value, float) and value.is_integer():
                value = int(value)
            check_whole(value, name=prefix + key, low=low, high=high, where=where, why=why)


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of every ``*.safetensors`` file in ``folder``, from the headers only.

    Raises:
        BadInputError: a file that is not regular, or whose header is cut, oversized or not a JSON object.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        info = check_regular_file(file, what="weights file")
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= min(_HEADER_BYTES, info.st_size - 8):
                raise BadInputError(
                    f"{file}: its safetensors header claims {size} bytes in a file of {info.st_size} (at most "
                    f"{_HEADER_BYTES}); the file is cut or not safetensors. Copy or re-save it"
                )
            try:
                header = json.loads(handle.read(size))
            except ValueError as exc:
                raise BadInputError(f"{file}: the safetensors header is not JSON ({exc}); re-save the file") from None
        if not isinstance(header, dict):
            raise BadInputError(f"{file}: the safetensors header is not a JSON object; re-save the file")
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
                shapes[name] = tuple(int(d) for d in entry["shape"] if isinstance(d, int))
    return shapes


def check_against_weights(folder: Path, config: dict[str, Any]) -> None:
    """The config's layer count, vocabulary and hidden size against the tensors the weights hold.

    Only what the headers show is compared: a config may have more layers in a nested model (a vision
    tower) than its text model, so a layer count is refused only when it exceeds every index present; the
    vocabulary and hidden size must equal the token embedding's shape when one is found (transformers would
    refuse the mismatch too, but only after building the module from the config). A folder without
    safetensors (a GGUF, a pickle) is left to its own reader.

    Raises:
        BadInputError: naming config.json, the key, its value and what the weights hold.
    """
    shapes = safetensors_shapes(folder)
    if not shapes:
        return
    path = Path(folder) / "config.json"
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    indices = [int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.search(name))]
    layers = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    if indices and isinstance(layers, int) and layers > max(indices) + 1:
        raise BadInputError(
            f"{path}: 'num_hidden_layers' is {layers} but the weights hold layers 0..{max(indices)}; config.json "
            "and the weight "
            "files do not belong together (fix num_hidden_layers or copy the matching config)"
        )
    embedding = next((shapes[n] for n in sorted(shapes) if n.endswith(_EMBEDDINGS) and len(shapes[n]) == 2), None)
    if embedding is None:
        return
    compared = [("vocab_size", embedding[0])]
    if not any(k in text for k in _OWN_EMBEDDING_WIDTH):  # ALBERT, OPT: the table is narrower than the model
        compared.append(("hidden_size", embedding[1]))
    for key, held in compared:
        value = text.get(key, config.get(key))
        if isinstance(value, int) and value != held:
            raise BadInputError(
                f"{path}: '{key}' is {value} but the weights' token embedding is {list(embedding)} ({held}); "
                "config.json and the weight files do not belong together"
            )


def check_genai_context(folder: Path, requested: int | None) -> None:
    """A requested genai/ context length against the folder's ``max_position_embeddings`` and the limit
    (:func:`prune2deploy.limits.genai_context`), before the model is loaded.

    Raises:
        BadInputError: the config is refused, or the length is beyond either bound.
    """
    if requested is None:
        return
    config = read_hf_config(folder)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    positions = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    genai_context(requested, positions if isinstance(positions, int) else None)
