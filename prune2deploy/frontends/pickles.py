"""Torch pickles (``torch.save(model)``, Torch-Pruning, LLM-Pruner): recognised, never unpickled.

Unpickling runs whatever code the file names, and a compile runs in automated export steps on files from
anywhere. So a pickle given as the model is refused with what it is and what to do: load it yourself,
where you trust it, and pass the module to ``prune2deploy.api.compile`` (which accepts an ``nn.Module``).
There is deliberately no ``--trust-pickle``: the three lines below are the opt-in, in the user's code.

The refusal names the classes the pickle would import, read with :mod:`pickletools` (which decodes the
opcodes without executing any), so the user sees e.g. ``transformers…LlamaForCausalLM`` and knows that
it is a whole model rather than a state dict.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from prune2deploy.errors import BadInputError

__all__ = ["PICKLE_SUFFIXES", "check_not_pickle", "is_pickle", "pickled_globals"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")

_ZIP_MAGIC = b"PK\x03\x04"
_MAX_PICKLE_BYTES = 64 << 20  # the pickle part of a torch zip (tensors live in other members)


def is_pickle(path: Path) -> bool:
    """True for a torch zip archive (``*/data.pkl`` inside) or a raw pickle (protocol 2+ header)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    if head == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def pickled_globals(path: Path, limit: int = 12) -> list[str]:
    """``module.name`` of the classes/functions the pickle would import, first ``limit`` distinct ones.

    Decoded from the opcodes, never executed; [] when the pickle cannot be decoded.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                if archive.getinfo(member).file_size > _MAX_PICKLE_BYTES:
                    return []
                data = archive.read(member)
        else:
            with open(path, "rb") as handle:
                data = handle.read(_MAX_PICKLE_BYTES)
    except (OSError, zipfile.BadZipFile, StopIteration):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and isinstance(arg, str):
                strings = [*strings[-1:], arg]
            name = None
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                name = arg.replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                name = ".".join(strings)
            if name and name not in found and not name.startswith(("torch._utils.", "collections.")):
                found.append(name)
                if len(found) >= limit:
                    break
    except Exception:  # a truncated or exotic pickle: what was decoded so far is enough for a message
        pass
    return found


def check_not_pickle(path: Path) -> None:
    """Raises BadInputError when ``path`` is a torch pickle (see the module's docstring); else nothing.

    Reads the first four bytes and, for a zip archive, its member list (and the pickle's opcodes for the
    message); never unpickles. A state dict (``pytorch_model.bin``: only torch's and collections' globals)
    gets the way to convert it to safetensors, which loads it with torch's ``weights_only`` loader; the advice
    never includes ``weights_only=False``, which would run whatever the file names.
    """
    path = Path(path)
    if not path.is_file() or not is_pickle(path):
        return
    names = pickled_globals(path)
    modules = [n for n in names if not n.startswith("torch.") or n.startswith("torch.nn.")]
    if not modules or path.name.startswith("pytorch_model"):
        raise BadInputError(_state_dict_advice(path))
    what = f" It would import {', '.join(modules[:6])}." if modules else ""
    raise BadInputError(
        f"{path}: a torch pickle (torch.save: Torch-Pruning's and LLM-Pruner's usual output).{what} prune2deploy "
        "never unpickles a file: unpickling runs code the file names. Where you trust the file, load it and pass "
        "the module to the Python API:\n"
        "    obj = torch.load(PATH, weights_only=False)   # LLM-Pruner: obj['model']\n"
        "    prune2deploy.api.compile(obj, OUT, CompileOptions(...))\n"
        "or save it as a model folder with obj.save_pretrained(FOLDER) (transformers models) and compile that"
    )


def _state_dict_advice(path: Path) -> str:
    """How to turn a pickled state dict into safetensors (transformers reads ``pytorch_model.bin`` with
    torch's restricted ``weights_only`` loader, so the conversion runs no code from the file)."""
    folder = path.parent
    return (
        f"{path}: a torch pickle of weights (pytorch_model.bin). prune2deploy never unpickles a file; convert "
        "the model folder to safetensors and compile the new folder:\n"
        '    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('
        f"'{folder}').save_pretrained('{folder}-safetensors', safe_serialization=True)\"\n"
        "(AutoModel for encoders), or for a bare state dict: safetensors.torch.save_file(torch.load(PATH, "
        "weights_only=True), 'model.safetensors') beside its config.json"
    )
