"""One policy for the sizes and numbers a user hands in, checked before any work starts.

A few bytes can ask for unbounded memory or time: ``"num_hidden_layers": 1e12`` in a config, an ``.npz``
whose header claims gigabytes, ``threads: 100000``, a FIFO given as external data (reading it waits for a
writer forever). Every reader checks what it was given against the limits here, before it allocates or
opens anything, and refuses with :class:`~prune2deploy.errors.BadInputError` (exit code 2) naming the file,
the key, the value found, the limit and what to do. One place, so that a limit is stated once with its
reason, and docs/reliability.md ("Limits on sizes and numbers") lists the same numbers.

The width limits are far above any published model (the largest numbers are from the config.json of
meta-llama/Llama-3.1-405B: 126 layers, hidden 16,384, intermediate 53,248, 128 heads, 131,072 positions;
google/gemma-2-2b: vocabulary 256,000; Meta's Llama 4 announcement: a 10M-token context for Scout), so
they only stop numbers that cannot describe a real model and would make the arithmetic or the allocation
run away.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError

__all__ = [
    "CONFIG_BYTES",
    "EXPORT_BATCH",
    "EXPORT_SEQ",
    "FEEDS_BYTES",
    "GENAI_CONTEXT",
    "MAX_WIDTH",
    "MODEL_CONFIG_BYTES",
    "MODEL_NUMBERS",
    "PLAN_BYTES",
    "SWEEP_RECORD_BYTES",
    "SWEEP_VARIANTS",
    "THREADS_PER_CORE",
    "VARIANT_ID_BYTES",
    "check_regular_file",
    "check_whole",
    "genai_context",
    "max_threads",
]

#: Option, sweep and other config files: a few hundred bytes in practice.
CONFIG_BYTES = 1 << 20
#: An HF ``config.json``: label maps (id2label of an ImageNet classifier) make one tens of KB; 16 MiB is generous.
MODEL_CONFIG_BYTES = 16 << 20
#: All arrays of one feeds file together, as their headers declare them (never read first): verification runs
#: both models on each set, so a feed set is a few batches of tokens or images (a 3x224x224 fp32 image is 0.6 MB).
FEEDS_BYTES = 1 << 30
#: genai/'s context length: its decoder holds cos/sin tables of this many rows, and onnxruntime-genai sizes the
#: KV cache by it; 131,072 is Llama-3.1's context (2 x 131,072 x 64 x 4 B = 67 MB of tables at head size 128).
GENAI_CONTEXT = 1 << 17
#: The torch exporter's example batch and sequence length: the export only needs a batch of 2 (batch 1 is
#: specialised) and a few tokens; the example runs the model once, so 100,000 would run it on 100,000 rows.
EXPORT_BATCH = 64
EXPORT_SEQ = 4096
#: Threads per core at most: beyond a few per core a thread pool only adds switching, and 100,000 threads
#: exhaust the process's memory for stacks.
THREADS_PER_CORE = 4

#: A plan lists every kept and removed index of every layer: about 3 MB for an 8B model (32 layers of 14,336
#: MLP indices at ~6 bytes each) and ~47 MB for a 405B one (126 x 53,248), so 64 MiB holds every model we know
#: of while a larger file is refused before PyYAML builds it (its objects take ~10x the file's bytes).
PLAN_BYTES = 64 << 20
#: Variants one sweep may have: each is a compile of minutes, so a larger grid is a mistake (a 10^6-point grid
#: would have been expanded, validated and submitted whole before the first compile ran). Checked from the
#: axes' lengths before a single variant is built.
SWEEP_VARIANTS = 1000
#: A variant id names folders (``OUT/<id>/`` and the compile's ``.<id>.old.p2d-PID-XXXXXXXX`` beside it, 26
#: bytes longer), so it must stay well under NAME_MAX (255 bytes on Linux and macOS file systems).
VARIANT_ID_BYTES = 200
#: sweep.json, a report.json or a quality record larger than this is not read: 1,000 variants (the most a
#: grid may have) make a sweep.json of a few MB, and a compile's report.json is tens of KB.
SWEEP_RECORD_BYTES = 64 << 20

#: Any other width a model config declares (GPT-2's ``n_embd``, ``ffn_dim``): no published model is this wide.
MAX_WIDTH = 1 << 20

#: Range of every integer a model config declares: (low, high, why). Above: see the module's docstring.
MODEL_NUMBERS: dict[str, tuple[int, int, str]] = {
    "num_hidden_layers": (1, 1024, "Llama-3.1-405B has 126"),
    "hidden_size": (1, 1 << 18, "Llama-3.1-405B has 16,384"),
    "intermediate_size": (1, 1 << 20, "Llama-3.1-405B has 53,248"),
    "num_attention_heads": (1, 4096, "Llama-3.1-405B has 128"),
    "num_key_value_heads": (1, 4096, "Llama-3.1-405B has 8"),
    "head_dim": (1, 4096, "most models have 64 or 128"),
    "vocab_size": (1, 1 << 22, "Gemma has 256,000"),
    "max_position_embeddings": (1, 1 << 24, "Llama 4 Scout's 10M-token context"),
}


def max_threads() -> int:
    """The most threads an option may ask for on this machine (:data:`THREADS_PER_CORE` per core)."""
    return (os.cpu_count() or 1) * THREADS_PER_CORE


def check_whole(value: Any, *, name: str, low: int, high: int, where: str, why: str = "") -> int:
    """``value`` as an int in ``[low, high]``, or BadInputError naming ``where``, ``name``, the value and the range.

    A bool is not a number here (``true`` in JSON would otherwise be 1), nor is a float, a string or NaN:
    a config that says ``"hidden_size": "64"`` or ``64.0`` is refused rather than guessed at.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "NaN/Infinity" if isinstance(value, float) and not math.isfinite(value) else repr(value)
        raise BadInputError(
            f"{where}: '{name}' is {shown} ({type(value).__name__}); it must be a whole number from {low} to {high}"
        )
    if not low <= value <= high:
        reason = f" ({why})" if why else ""
        raise BadInputError(f"{where}: '{name}' is {value}, outside {low}..{high}{reason}; fix the value in the file")
    return value


def check_regular_file(path: Path, *, what: str) -> os.stat_result:
    """Refuses anything but a regular file, before it is opened: a FIFO blocks the reader until some writer
    opens it (forever, in an automated step), a character device (``/dev/zero``) never ends, a socket cannot
    be read. ``os.stat`` follows symlinks, so a link to a regular file is accepted (where it may point is
    checked by the caller's folder rules).

    Raises:
        BadInputError: naming ``what``, the path and what it is.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BadInputError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = _file_kind(info.st_mode)
        raise BadInputError(
            f"{what} {path} is {kind}, not a regular file; prune2deploy reads only regular files (a FIFO or device "
            "would block or never end). Copy the data into a file and pass that"
        )
    return info


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def genai_context(requested: int | None, positions: int | None) -> int:
    """genai/'s context length: ``requested`` if it is within the model's ``positions`` and
    :data:`GENAI_CONTEXT`; by default the model's positions, capped at :data:`GENAI_CONTEXT` (a config's
    10^8 positions would make 50 GB of rotary tables).

    Raises:
        BadInputError: a requested length beyond either bound, naming both.
    """
    if requested is None:
        return min(positions or 4096, GENAI_CONTEXT)
    if positions and requested > positions:
        raise BadInputError(
            f"genai_context_length is {requested}, beyond the model's {positions} positions "
            "(max_position_embeddings in config.json); positions it was not trained on give no useful output. "
            f"Give at most {min(positions, GENAI_CONTEXT)}"
        )
    if requested > GENAI_CONTEXT:
        raise BadInputError(
            f"genai_context_length is {requested}, above prune2deploy's limit of {GENAI_CONTEXT} (the decoder's "
            f"rotary tables and onnxruntime-genai's KV cache grow with it); give at most {GENAI_CONTEXT}"
        )
    return requested
