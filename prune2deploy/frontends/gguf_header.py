"""A GGUF file's header, checked against the limits and its own tensors before transformers builds a model.

transformers reads a GGUF's metadata into a config and builds the module before it de-quantises a
tensor, so a header saying ``llama.block_count = 1000000000`` allocates without bound, and a cut or
corrupted header fails deep inside the ``gguf`` reader with whatever exception it meets. Here the header
is read with the ``gguf`` package's reader (memory-mapped: no tensor data is read), any failure of that
read is bad input naming the file, and the model numbers are checked like an HF config's
(:data:`prune2deploy.limits.MODEL_NUMBERS`) and against the ``blk.N`` tensors present.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError
from prune2deploy.limits import MODEL_NUMBERS, check_regular_file, check_whole

__all__ = ["GGUF_NUMBERS", "check_gguf_header"]

#: GGUF metadata key (after ``ARCH.``) → the HF config key whose limit applies.
GGUF_NUMBERS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def check_gguf_header(path: Path) -> None:
    """Reads ``path``'s header and refuses what would make loading fail obscurely or allocate without bound.

    Raises:
        BadInputError: naming the file and the key (or what is cut), the value and the limit.
    """
    path = Path(path)
    size = check_regular_file(path, what="GGUF file").st_size
    with open(path, "rb") as handle:
        header = _Header(handle, size, path)
        fields, tensors = header.read()
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise BadInputError(f"{path}: the GGUF header has no general.architecture; re-convert the model")
    for key, hf_key in GGUF_NUMBERS.items():
        value = fields.get(f"{arch}.{key}")
        if value is not None:
            low, high, why = MODEL_NUMBERS[hf_key]
            check_whole(value, name=f"{arch}.{key}", low=low, high=high, where=str(path), why=why)
    blocks = [int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))]
    layers = fields.get(f"{arch}.block_count")
    if blocks and isinstance(layers, int) and layers > max(blocks) + 1:
        raise BadInputError(
            f"{path}: '{arch}.block_count' is {layers} but the file holds tensors of blocks 0..{max(blocks)}; "
            "the header does not describe these tensors. Re-convert the model"
        )
    _check_extents(path, fields, tensors, header.end, size)


#: GGUF value types (the format's specification): struct format of the fixed-size ones.
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """A bounded reader of the GGUF header (magic, version, key/values, tensor infos): every length is
    checked against the bytes left before it is read, so a cut or corrupted header is a clear error, never
    a huge read. Arrays are skipped, not kept (a tokenizer's 50,000 strings)."""

    def __init__(self, handle: Any, size: int, path: Path) -> None:
        self.handle, self.size, self.path = handle, size, path
        self.end = 0

    def _bytes(self, count: int, what: str) -> bytes:
        if count < 0 or self.handle.tell() + count > self.size:
            raise BadInputError(
                f"{self.path}: the GGUF header is cut or corrupted ({what}: {count} bytes at offset "
                f"{self.handle.tell()} of a {self.size}-byte file). Copy it again or re-convert the model"
            )
        return self.handle.read(count)

    def _fixed(self, kind: int, what: str) -> Any:
        import struct

        fmt = _FIXED[kind]
        return struct.unpack(fmt, self._bytes(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        return self._bytes(self._fixed(10, what), what).decode("utf-8", errors="replace")

    def _value(self, kind: int, what: str) -> Any:
        if kind in _FIXED:
            return self._fixed(kind, what)
        if kind == _STRING:
            return self._string(what)
        if kind == _ARRAY:
            item, count = self._fixed(4, what), self._fixed(10, what)
            if item in _FIXED:
                self._bytes(count * _struct_size(item), what)
            elif item == _STRING:
                for _ in range(count):
                    self._bytes(self._fixed(10, what), what)
            else:
                raise BadInputError(f"{self.path}: GGUF key {what} is an array of unknown type {item}")
            return None
        raise BadInputError(f"{self.path}: GGUF key {what} has unknown value type {kind}; re-convert the model")

    def read(self) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int, int]]]:
        """(key → scalar value, tensor name → (dims, ggml type, offset)); the header's end in ``self.end``."""
        if self._bytes(4, "magic") != b"GGUF":
            raise BadInputError(f"{self.path}: not a GGUF file (no GGUF magic); pass a .gguf written by llama.cpp")
        version = self._fixed(4, "version")
        if version not in (2, 3):
            raise BadInputError(f"{self.path}: GGUF version {version}; versions 2 and 3 are read")
        tensor_count, kv_count = self._fixed(10, "tensor count"), self._fixed(10, "key count")
        fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string("key")
            fields[key] = self._value(self._fixed(4, key), key)
        tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
        for _ in range(tensor_count):
            name = self._string("tensor name")
            dims = tuple(self._fixed(10, name) for _ in range(self._fixed(4, name)))
            tensors[name] = (dims, self._fixed(4, name), self._fixed(10, name))
        self.end = self.handle.tell()
        return fields, tensors


def _struct_size(kind: int) -> int:
    import struct

    return struct.calcsize(_FIXED[kind])


def _check_extents(path: Path, fields: dict[str, Any], tensors: dict, end: int, size: int) -> None:
    """Each tensor's data (from the ``gguf`` package's block sizes per ggml type) lies inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise BadInputError(f"{path}: general.alignment is {alignment!r}, not a power of two; re-convert the model")
    start = -(-end // alignment) * alignment
    for name, (dims, kind, offset) in tensors.items():
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise BadInputError(f"{path}: tensor '{name}' has unknown ggml type {kind}; re-convert the model") from None
        count = 1
        for dim in dims:
            count *= dim
        nbytes = count // block * block_bytes
        if start + offset + nbytes > size:
            raise BadInputError(
                f"{path}: tensor '{name}' {list(dims)} needs bytes {start + offset}..{start + offset + nbytes} of a "
                f"{size}-byte file; the file is cut or its header corrupted. Copy it again or re-convert the model"
            )
